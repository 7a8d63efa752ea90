"""Ahead-of-time compilation for a GPU target without the GPU (deviceless AOT), and what a compiled program says.

`target_mesh(target, axis_sizes)` builds a ("data", "fsdp", "tensor") mesh over the abstract devices of a target:
for a GPU target, `jax.experimental.topologies.get_topology_desc(platform="cuda", ...)` from the target's XLA
`GpuTargetConfig` text file (`srpo_jax/targets/*.txtpb`); for the `cpu` target, the local CPU devices. Programs are
then lowered on `jax.ShapeDtypeStruct`s (nothing is allocated) and compiled for those devices; `summarize(compiled)`
reads their per-device memory (`memory_analysis`), the collectives in the optimised HLO, XLA's FLOP count
(`cost_analysis`: a while/scan body counted once) and whether cuDNN flash attention (`__cudnn$fmha*` custom calls) is
in the program.

A deviceless GPU compile needs the CUDA plugin (`pip install -e '.[gpu]'`, `make aot-env`),
`JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1` and XLA's own sort instead of CUB's (`ensure_cuda_env` sets both before jax
creates its backends). There is no autotuning without a device, so buffer sizes can move a little on real hardware,
and CUB's sort scratch is not in the figures.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any, Mapping, Optional

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
CUDNN_FMHA = "__cudnn$fmha"
SPLASH = "splash_mha_"  # the names of Pallas splash attention's TPU kernels (fwd, dq, dkv) in their custom calls
# One HLO instruction per match: `= <type> all-gather(` or the async `all-gather-start(`.
_COLLECTIVE_RE = re.compile(r"\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


# XLA's GPU sort rewriter turns large sorts (top-k over the vocabulary) into CUB radix sorts, whose scratch size it asks
# the device for: a deviceless compile then fails ("cudaErrorInvalidDevice"). XLA's own sort kernel needs no device.
DEVICELESS_XLA_FLAGS = ("--xla_gpu_enable_cub_radix_sort=false",)


def ensure_cuda_env() -> None:
  """The deviceless CUDA compile's environment, set before jax creates its backends: skip the driver/library version
  check (there is no driver) and `DEVICELESS_XLA_FLAGS`."""
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  flags = os.environ.get("XLA_FLAGS", "")
  missing = [f for f in DEVICELESS_XLA_FLAGS if f.split("=")[0] not in flags]
  if missing:
    os.environ["XLA_FLAGS"] = " ".join([flags, *missing]).strip()


def cuda_plugin_available() -> bool:
  try:
    import jax_plugins.xla_cuda12  # noqa: F401
  except ImportError:
    return False
  return True


def topology_devices(target_config_text: str, num_devices: int, num_hosts: int = 1):
  """Abstract devices of `num_devices` GPUs described by a GpuTargetConfig text, on `num_hosts` hosts of
  num_devices / num_hosts GPUs each (topology "slices x hosts x devices per host"; listed host by host, each device
  carrying its host as process_index, as `jax.devices()` lists a multi-process run's)."""
  if num_devices % num_hosts:
    raise ValueError(f"{num_devices} devices do not split over {num_hosts} hosts")
  ensure_cuda_env()
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(platform="cuda", topology=f"1x{num_hosts}x{num_devices // num_hosts}",
                                      target_config=target_config_text)
  return list(topo.devices)


def libtpu_available() -> bool:
  try:
    import libtpu  # noqa: F401
  except ImportError:
    return False
  return True


def tpu_topology_devices(topology_name: str):
  """Abstract chips of a TPU slice (e.g. "v5p:2x2x1"), from libtpu's topology description: no TPU needed. Each
  carries its host as process_index."""
  # libtpu locks /tmp/libtpu_lockfile so that two processes do not share a TPU; a deviceless compile uses none, and a
  # second planner (or test) on this machine would otherwise fail to start.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  return list(topologies.get_topology_desc(platform="tpu", topology_name=topology_name).devices)


def make_mesh(devices, axis_sizes: Mapping[str, int]):
  import numpy as np
  from jax.sharding import Mesh
  from srpo_jax.sharding import MESH_AXES
  return Mesh(np.asarray(devices).reshape([axis_sizes[a] for a in MESH_AXES]), MESH_AXES)


@dataclasses.dataclass
class ProgramSummary:
  """What one compiled program costs per device (bytes, FLOPs) and what it contains."""
  name: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  xla_flops: float  # cost_analysis()["flops"]: a while/scan body is counted ONCE, custom calls (cuDNN) not at all
  collectives: dict[str, int]  # instruction counts in the optimised HLO
  cudnn_attention: bool
  compile_s: float
  splash_attention: bool = False

  @property
  def attention_kernel(self) -> str:
    return "cuDNN" if self.cudnn_attention else "splash" if self.splash_attention else "none"

  @property
  def peak_bytes(self) -> int:
    """Live at once while it runs: inputs, the outputs not written in place of donated inputs, temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def summarize(name: str, compiled, compile_s: float) -> ProgramSummary:
  mem = compiled.memory_analysis()
  text = compiled.as_text()
  counts: dict[str, int] = {}
  for m in _COLLECTIVE_RE.finditer(text):
    counts[m.group(1)] = counts.get(m.group(1), 0) + 1
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
    cost = cost[0] if cost else {}
  return ProgramSummary(
      name=name, argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
      alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
      code_bytes=int(mem.generated_code_size_in_bytes), xla_flops=float((cost or {}).get("flops", 0.0)),
      collectives=counts, cudnn_attention=CUDNN_FMHA in text, compile_s=compile_s,
      splash_attention="tpu_custom_call" in text and SPLASH in text)


_HBM_EXHAUSTED_RE = re.compile(r"RESOURCE_EXHAUSTED: Ran out of memory on HBM.*?required for HLO temporaries "
                               r"\(([\d.]+)([KMGT])\)", re.S)


def hbm_exhausted_temporaries(err: Exception) -> Optional[int]:
  """The temporaries XLA's TPU compiler says a program needs when it refuses it for not fitting the chip's HBM
  ("RESOURCE_EXHAUSTED: ... required for HLO temporaries (93.29G) exceeds available HBM"), in bytes; None for any
  other error."""
  m = _HBM_EXHAUSTED_RE.search(str(err))
  if not m:
    return None
  return int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024)


def compile_lowered(name: str, lowered) -> tuple[Any, ProgramSummary]:
  t = time.perf_counter()
  compiled = lowered.compile()
  return compiled, summarize(name, compiled, time.perf_counter() - t)


def lower_jitted(jitted, args, donate_argnums: Optional[tuple[int, ...]] = None):
  """`jitted.lower(*args)`; for a `train_step._JitPerStructure`, with `donate_argnums` forced (the train step donates
  only when the default backend is an accelerator, which a deviceless compile's host backend is not)."""
  if donate_argnums is None or not hasattr(jitted, "_shardings_for"):
    return jitted.lower(*args)
  import contextlib
  import jax
  in_sh, out_sh = jitted._shardings_for(*args)
  mesh = getattr(jitted, "mesh", None)
  with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):  # as `_JitPerStructure.lower` traces
    return jax.jit(jitted._fn, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=donate_argnums).lower(*args)


# ---------------------------------------------------------------------------------------------------------------------
# FLOPs from the optimised, partitioned HLO (per device)
# ---------------------------------------------------------------------------------------------------------------------
_COMP_RE = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(.*\{\s*$")
_INSTR_RE = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
_SHAPE_RE = re.compile(r"^[a-z]\w*\[([0-9,]*)\]")
_CALLS_RE = re.compile(r"\b(calls|body|condition|to_apply|branch_computations|called_computations)="
                       r"(\{[^}]*\}|%[\w.\-]+)")
_TRIP_RE = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_DIMS_RE = lambda key: re.compile(key + r"=\{([0-9,]*)\}")


def _dims(shape_text: str) -> Optional[list[int]]:
  m = _SHAPE_RE.match(shape_text.strip())
  if m is None:
    return None
  return [int(d) for d in m.group(1).split(",") if d]


def _prod(xs) -> int:
  out = 1
  for x in xs:
    out *= int(x)
  return out


@dataclasses.dataclass
class HloFlops:
  """FLOPs per device of one compiled program: every dot (inside fusions too) as 2·|out|·|contracted|, cuDNN
  flash attention from its score shape (causal: half), each computation weighted by how often it runs (while
  loops by XLA's known trip count)."""
  dot: float = 0.0
  attention: float = 0.0
  unknown_trip_counts: int = 0  # while loops without a known trip count (counted once)

  @property
  def total(self) -> float:
    return self.dot + self.attention


def hlo_flops(text: str) -> HloFlops:
  comps: dict[str, list[str]] = {}
  entry, cur = None, None
  for line in text.splitlines():
    m = _COMP_RE.match(line)
    if m:
      cur = m.group(1)
      comps[cur] = []
      if line.startswith("ENTRY"):
        entry = cur
      continue
    if cur is not None:
      if line.startswith("}"):
        cur = None
      else:
        comps[cur].append(line)
  out = HloFlops()
  if entry is None:
    return out
  # Per computation: its own FLOPs and the computations it calls (with a multiplier: a while body runs n times).
  own: dict[str, tuple[float, float]] = {}
  edges: dict[str, list[tuple[str, int]]] = {}
  for name, lines in comps.items():
    shapes: dict[str, str] = {}
    dot = att = 0.0
    calls: list[tuple[str, int]] = []
    for line in lines:
      m = _INSTR_RE.match(line)
      if not m:
        continue
      iname, shape, op, rest = m.groups()
      shapes[iname] = shape
      if op == "dot":
        lhs = rest.split(",")[0].strip().split(" ")[-1].lstrip("%")
        lhs_dims = _dims(shapes.get(lhs, ""))
        out_dims = _dims(shape)
        cm = _DIMS_RE("lhs_contracting_dims").search(rest)
        if lhs_dims is not None and out_dims is not None and cm:
          contracted = _prod(lhs_dims[int(i)] for i in cm.group(1).split(",") if i)
          dot += 2.0 * _prod(out_dims) * contracted
      elif op == "custom-call" and CUDNN_FMHA in rest:
        sm = re.search(r'"intermediate_tensor_shape": \{"element_type": "\w+", "dimensions": \[([^\]]*)\]', rest)
        first = re.match(r"\(?\s*([a-z]\w*\[[0-9,]*\])", shape)
        if sm and first:
          b, n, sq, sk = (int(x.strip().strip('"')) for x in sm.group(1).split(","))
          h = _dims(first.group(1))[-1]
          f = 4.0 * b * n * sq * sk * h  # QK^T and PV
          if "CAUSAL" in rest:
            f *= 0.5
          if "Backward" in rest:
            f *= 2.5  # recomputed QK^T, then dP, dS·K, dS^T·Q, P^T·dO: 5 matmuls to the forward's 2
          att += f
      trip = 1
      if op == "while":
        t = _TRIP_RE.search(rest)
        if t:
          trip = int(t.group(1))
        else:
          out.unknown_trip_counts += 1
      for key, val in _CALLS_RE.findall(rest):
        for callee in re.findall(r"%([\w.\-]+)", val):
          calls.append((callee, trip if key == "body" else 1))
    own[name] = (dot, att)
    edges[name] = calls
  # Multiplicity of each computation: sum over call sites (the call graph is a DAG).
  mult: dict[str, float] = {}

  def visit(name: str, times: float, depth: int = 0):
    if depth > 200:
      return
    mult[name] = mult.get(name, 0.0) + times
    for callee, k in edges.get(name, ()):
      if callee in comps:
        visit(callee, times * k, depth + 1)

  visit(entry, 1.0)
  for name, times in mult.items():
    d, a = own.get(name, (0.0, 0.0))
    out.dot += times * d
    out.attention += times * a
  return out
