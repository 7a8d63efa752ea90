"""Will the run fit? `python -m srpo_jax.plan --config=configs/qwen3_8b.py[:param] --target=h100x8 [--config.x=...]
[--mesh=configs/mesh/8gpu.py]`

For a target (`TARGETS`: h100x8, h100x4, h100x2, h100x1, h200x8, h20x8, a100x8, cpu; with a mesh.num_processes of
N, e.g. `--mesh=configs/mesh/nodes.py:N`, N nodes of the target's GPUs) the planner builds the run's real jitted
programs -- the train step's `accumulate` (one micro-batch's gradient, added to the accumulators) and `apply` (one
AdamW step per mini-batch), `prepare` (π_old) where the trainer runs it (`trainer.needs_old_logp`: several optimizer
steps per training step, or `optim.recompute_old_logp`), `ema`, and the JAX sampler when `rollout.engine == "jax"` --
from ABSTRACT inputs (`nnx.eval_shape` model, `jax.ShapeDtypeStruct` batches: nothing is allocated) at the config's
largest shapes, compiles them for the target without the hardware (`srpo_jax.aot`: deviceless AOT for NVIDIA targets,
the local CPU for `cpu`), and prints per device: parameters, optimizer state, teacher, gradients, each program's
inputs, temporaries and outputs, the total against the device memory times JAX's share of it, the collectives, the
FLOPs and whether cuDNN flash attention is in the program. Exit status 0 when every program fits, 1 when one does not
(the message names the largest term and a setting that would fit), 2 for a bad config or target.

`--analytic` skips the compiler: the state terms are exact (shapes and shardings), the activations a formula
(`analytic_activations`) calibrated against the compiled programs (BUILD_NOTES.md, "Planner"). `srpo_jax.run` calls
`check_fits_analytic` on the real devices before anything is compiled.

State: parameters, optimizer state and the teacher stay resident for the whole run; the gradient accumulators live
from a mini-batch's first `accumulate` to its `apply` (`resident_bytes`), so they count in those programs only.

Largest shapes (`Shapes.from_config`): prompt P = bucket(data.max_prompt_tokens), response T =
bucket(rollout.max_new_tokens), S = P + T. Micro-batches are route-pure (`batching.route_groups`): a *teacher*
micro-batch (`accumulate_t`: SDPO-routed rollouts only, each beside its teacher sequence of bucket(
algo.teacher_max_tokens) + T positions, C = B) or a *plain* one (`accumulate`: no teacher forward). At a fixed
`optim.micro_batch_size` both hold that many rows and the teacher one bounds the plain one (only it is planned for a
method with a teacher); under `optim.micro_batch_tokens` each kind is planned at the most rows of the longest length
the budget admits, a teacher rollout costing its teacher tokens too. `prepare` runs on one micro-batch's rows (no
teacher).

Letters (srpo_jax/models/qwen3.py): B rows, S positions, P prompt, T response, C teacher rows, D, F, L, N, K, H, V.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from typing import Any, Optional

GiB = float(2**30)
# `srpo_jax.run.build_mesh` gives JAX this share of each GPU when SGLang shares it (--mem-fraction-static 0.35);
# JAX's own default preallocation is 75%.
SGLANG_JAX_MEM_FRACTION = 0.55
JAX_DEFAULT_MEM_FRACTION = 0.75
TARGETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "targets")
EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_BAD_INPUT = 0, 1, 2


# ---------------------------------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  spec: Optional[str]  # GpuTargetConfig text file in srpo_jax/targets/; None = a TPU or this machine's CPU
  num_devices: int  # GPUs per node, or TPU chips of the slice; 0 = the local CPU devices
  # TPU slices: jax.experimental.topologies' topology name (libtpu gives its chips without a TPU), HBM per chip (Cloud
  # TPU's system-architecture pages: v5p 95 GiB, v6e 32 GiB, v5e 16 GiB) and the slice's hosts.
  tpu_topology: Optional[str] = None
  hbm_gib: float = 0.0
  hosts: int = 1

  @property
  def is_gpu(self) -> bool:
    return self.spec is not None

  @property
  def is_tpu(self) -> bool:
    return self.tpu_topology is not None

  @property
  def platform(self) -> str:
    """The platform its programs compile for (`Qwen3Config.platform`)."""
    return "gpu" if self.is_gpu else "tpu" if self.is_tpu else "cpu"

  @property
  def is_accelerator(self) -> bool:
    """A deviceless compile for devices this machine does not have."""
    return self.is_gpu or self.is_tpu

  def config_text(self) -> str:
    with open(os.path.join(TARGETS_DIR, self.spec)) as f:
      return f.read()

  def device_memory_bytes(self, num_devices: int = 1) -> int:
    """Memory of one device: the spec's device_memory_size, a TPU chip's HBM, or this machine's RAM shared by its
    CPU devices."""
    if self.is_tpu:
      return int(self.hbm_gib * GiB)
    if self.spec is None:
      return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(num_devices, 1)
    m = re.search(r"device_memory_size:\s*(\d+)", self.config_text())
    return int(m.group(1))

  def device_name(self) -> str:
    if self.is_tpu:
      return f"TPU {self.tpu_topology.split(':')[0]} ({self.hbm_gib:g} GiB HBM)"
    if self.spec is None:
      return "CPU"
    m = re.search(r'device_description_str:\s*"([^"]*)"', self.config_text())
    return m.group(1) if m else self.name


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("h100x8", "h100_sxm.txtpb", 8), Target("h100x4", "h100_sxm.txtpb", 4),
    Target("h100x2", "h100_sxm.txtpb", 2), Target("h100x1", "h100_sxm.txtpb", 1),
    Target("h200x8", "h200.txtpb", 8), Target("h20x8", "h20.txtpb", 8),
    Target("a100x8", "a100_sxm_80.txtpb", 8), Target("cpu", None, 0),
    # Cloud TPU names count TensorCores: a v5p-8 is 4 chips (2 cores each); v6e-8 and v5e-8 are 8 single-core chips.
    Target("v5p-8", None, 4, tpu_topology="v5p:2x2x1", hbm_gib=95), Target("v5p-16", None, 8, tpu_topology="v5p:2x2x2",
                                                                           hbm_gib=95, hosts=2),
    Target("v6e-8", None, 8, tpu_topology="v6e:2x4", hbm_gib=32), Target("v5e-8", None, 8, tpu_topology="v5e:2x4",
                                                                          hbm_gib=16),
)}


def jax_gpu_env(cfg) -> dict[str, str]:
  """The XLA client settings `srpo_jax.run` gives a GPU run (unless the environment sets them) before JAX touches a
  GPU: room for the SGLang server beside JAX (a fixed share), or no pool at all when they time-share (freed memory
  goes back to the GPU for the waking server)."""
  if cfg.rollout.engine != "sglang":
    return {}
  if cfg.rollout.sglang_sleep:
    return {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_ALLOCATOR": "platform"}
  return {"XLA_PYTHON_CLIENT_MEM_FRACTION": str(SGLANG_JAX_MEM_FRACTION)}


def jax_memory_fraction(cfg, target: Target) -> tuple[float, str]:
  """JAX's share of each device's memory and where it comes from (the rest is SGLang's, or XLA's reserve)."""
  if target.is_tpu:
    return 1.0, "TPU: XLA owns the chip's HBM (no SGLang: rollouts use the JAX engine)"
  if not target.is_gpu:
    return 1.0, "CPU: no preallocation"
  if cfg.rollout.engine == "sglang" and cfg.rollout.sglang_sleep:
    from srpo_jax.rollout import sglang_memory
    return sglang_memory.sleep_jax_fraction(target.device_memory_bytes(), sglang_memory.config_tp(cfg)), (
        "rollout.sglang_sleep: JAX time-shares the GPU with a sleeping SGLang server, on the platform allocator")
  env = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
  if env:
    return float(env), f"XLA_PYTHON_CLIENT_MEM_FRACTION={env} (environment)"
  if cfg.rollout.engine == "sglang":
    return SGLANG_JAX_MEM_FRACTION, (f"rollout.engine=sglang: srpo_jax.run sets XLA_PYTHON_CLIENT_MEM_FRACTION="
                                     f"{SGLANG_JAX_MEM_FRACTION}")
  return JAX_DEFAULT_MEM_FRACTION, "JAX's default preallocation (75%)"


# ---------------------------------------------------------------------------------------------------------------------
# The config to plan, and its largest shapes
# ---------------------------------------------------------------------------------------------------------------------
_MODEL_NAMES = {"qwen3-0.6b": "0.6b", "qwen3-1.7b": "1.7b", "qwen3-4b": "4b", "qwen3-8b": "8b", "qwen3-14b": "14b",
                "qwen3-32b": "32b"}


def planning_config(raw) -> Any:
  """Validated `Config` for planning: a paper config's model.path placeholder ("<REQUIRED: /path/to/Qwen3-8B>") or a
  path that is not there becomes the published shape of that model (`model.random_init`): the planner needs shapes,
  not weights. Data files are not checked."""
  from srpo_jax import config as config_lib
  d = raw.to_dict() if hasattr(raw, "to_dict") else dict(raw)
  m = d.get("model", {})
  path = m.get("path")
  if path and not os.path.isfile(os.path.join(path, "config.json")):
    key = next((v for k, v in _MODEL_NAMES.items() if k in path.lower()), None)
    if key is None:
      raise config_lib.ConfigError(f"model.path={path!r}: not an HF directory, and no Qwen3 size in its name to plan "
                                   f"with; pass --config.model.random_init=8b (or a real checkpoint directory)")
    d["model"] = {**m, "path": None, "random_init": key}
  mesh = d.get("mesh", {})
  if mesh.get("num_processes", 1) > 1 and not mesh.get("coordinator"):
    # A multi-node layout (configs/mesh/nodes.py) gets its coordinator from the launcher; planning starts no process.
    d["mesh"] = {**mesh, "coordinator": "planned-only:0"}
  return config_lib.validate(d, check_files=False)


def model_config(cfg, target: Target, layers: Optional[int] = None):
  """The Qwen3Config the run builds (checkpoint config.json or preset), compiled for the target's platform (which
  picks "auto" attention's kernel, as `trainer.build_model` does from the mesh's devices)."""
  from srpo_jax.models import qwen3
  m = cfg.model
  kw = dict(m.qwen3_overrides, platform=target.platform)
  q = (qwen3.Qwen3Config.preset(m.random_init, **kw) if m.random_init else qwen3.Qwen3Config.from_dir(m.path, **kw))
  if layers is not None:
    q = dataclasses.replace(q, num_hidden_layers=layers)
  return q


def _pow2(n: int, minimum: int = 1, multiple_of: int = 1) -> int:
  from srpo_jax.batching import pow2_bucket
  return pow2_bucket(n, minimum, multiple_of)


ACCUMULATE, ACCUMULATE_T = "accumulate", "accumulate_t"  # a plain / a teacher micro-batch's accumulate program
GRADIENT_PROGRAMS = (ACCUMULATE, ACCUMULATE_T, "apply")  # the programs during which the gradients are resident


@dataclasses.dataclass(frozen=True)
class Shapes:
  """The largest arrays each program sees (rows are global: split over row_shards = mesh.data × mesh.fsdp)."""
  row_shards: int
  prompt: int          # P
  resp: int            # T
  seq: int             # S = P + T (training rows)
  teacher_seq: int     # S_T = teacher prompt bucket + T; 0 when the method has no teacher
  budget_mode: bool    # optim.micro_batch_tokens: micro-batches by a token budget, each cut to its length bucket
  micro_rows: int      # rows of the largest plain micro-batch (no teacher sequences)
  teacher_rows: int    # rows of the largest teacher micro-batch (C = B: one teacher row per rollout); 0: no teacher
  micro_batches: int   # accumulate calls per optimizer step (token budget: the fewest, every rollout the longest)
  prep_rows: int       # rows of one `prepare` call (`trainer.row_groups`); 0: the trainer runs no prepare
  sampler_rows: int    # JAX sampler batch (0: rollout.engine != "jax")
  sampler_prompt: int
  sampler_new: int

  @property
  def old_logp(self) -> bool:
    """Whether the micro-batches carry π_old (from `prepare`); otherwise the update uses stop_gradient(π_θ)."""
    return self.prep_rows > 0

  @property
  def tokens_per_device(self) -> int:
    """The update's student tokens per device in a plain micro-batch (the token budget the paper configs set)."""
    return self.micro_rows // self.row_shards * self.seq

  @property
  def micro_batch_kinds(self) -> list[tuple[str, int, bool]]:
    """The accumulate programs to plan: (name, rows, with teacher sequences). At a fixed size a teacher micro-batch
    holds the rows of a plain one plus the teacher forward, so it alone bounds both."""
    kinds = [(ACCUMULATE_T, self.teacher_rows, True)] if self.teacher_rows else []
    if not self.teacher_rows or self.budget_mode:
      kinds.append((ACCUMULATE, self.micro_rows, False))
    return kinds

  @classmethod
  def from_config(cls, cfg, row_shards: int) -> "Shapes":
    from srpo_jax import batching
    from srpo_jax.trainer import needs_old_logp
    method = cfg.method
    p = _pow2(cfg.data.max_prompt_tokens, 16)
    t = _pow2(cfg.rollout.max_new_tokens, 8)
    s = p + t
    st = _pow2(cfg.algo.teacher_max_tokens, 16) + t if method.uses_teacher else 0
    budget, per_mb = cfg.optim.micro_batch_tokens, cfg.rollouts_per_mini_batch
    longest = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    if budget is None:  # trainer.run_updates: micro_batch_size rows (a route's last one cut to batching.row_bucket)
      rows = batching.row_bucket(cfg.micro_batch_size, cfg.micro_batch_size, row_shards)
      c = rows if method.uses_teacher else 0
      s_mb, m = s, cfg.micro_batches_per_mini_batch
      prep = cfg.micro_batch_size  # trainer.row_groups: consecutive chunks of micro_batch_size
    else:
      def budget_rows(cost: int) -> int:
        """batching.token_budget_groups: the most rows of `cost` tokens each under the budget (at least one per
        row shard: a rollout over the budget gets a micro-batch of its own)."""
        rows, n, bucket = batching.padded_rows(1, row_shards), 1, batching.seq_bucket(cost)
        while n <= per_mb and batching.padded_rows(n, row_shards) // row_shards * bucket <= budget:
          rows, n = batching.padded_rows(n, row_shards), n + 1
        return rows

      s_mb = batching.seq_bucket(longest)
      rows = budget_rows(longest)
      # batching.route_groups: an SDPO-routed rollout costs its own tokens plus its teacher sequence's.
      c = budget_rows(longest + cfg.algo.teacher_max_tokens + cfg.rollout.max_new_tokens) if method.uses_teacher else 0
      m = -(-per_mb // rows)
      prep = rows  # trainer.row_groups: token_budget_groups without teacher costs, as a plain micro-batch
    sr = sp = sn = 0
    if cfg.rollout.engine == "jax":
      from srpo_jax.rollout import jax_engine as je
      sr = je.smallest_bucket(min(cfg.rollout.rollouts_per_step,
                                  cfg.rollout.jax_max_batch or je.DEFAULT_BATCH_BUCKETS[-1]),
                              je.DEFAULT_BATCH_BUCKETS, row_shards)
      sp = je.smallest_bucket(cfg.data.max_prompt_tokens, cfg.rollout.length_buckets or je.DEFAULT_PROMPT_BUCKETS)
      sn = max(cfg.rollout.max_new_tokens, cfg.eval_max_new_tokens)
    return cls(row_shards=row_shards, prompt=p, resp=t, seq=s_mb, teacher_seq=st, budget_mode=budget is not None,
               micro_rows=rows, teacher_rows=c, micro_batches=m, prep_rows=prep if needs_old_logp(cfg) else 0,
               sampler_rows=sr, sampler_prompt=sp, sampler_new=sn)


# ---------------------------------------------------------------------------------------------------------------------
# State: exact bytes per device from shapes and shardings
# ---------------------------------------------------------------------------------------------------------------------
def abstract_mesh(axis_sizes: dict[str, int]):
  from jax.sharding import AbstractMesh
  from srpo_jax.sharding import MESH_AXES
  return AbstractMesh(tuple(axis_sizes[a] for a in MESH_AXES), MESH_AXES)


def tree_bytes_per_device(tree, shardings) -> int:
  """Bytes one device holds of `tree` (abstract or concrete arrays) placed with `shardings` (a tree prefix)."""
  import jax
  import numpy as np
  total = [0]

  def add(sh, sub):
    for x in jax.tree.leaves(sub):
      shape = sh.shard_shape(tuple(x.shape)) if sh is not None else tuple(x.shape)
      total[0] += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize

  jax.tree.map(add, shardings, tree, is_leaf=lambda x: x is None)
  return total[0]


@dataclasses.dataclass
class Model:
  """The abstract model, optimizer and their shardings on a mesh (abstract or concrete)."""
  qcfg: Any
  graphdef: Any
  params: Any
  opt_state: Any
  optimizer: Any
  shardings: Any  # train_step.TrainShardings

  @classmethod
  def build(cls, cfg, qcfg, mesh) -> "Model":
    import jax
    from flax import nnx
    from srpo_jax.models.qwen3 import Qwen3
    from srpo_jax.train_step import TrainShardings, make_optimizer
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Qwen3(qcfg, rngs=nnx.Rngs(0))))
    o = cfg.optim
    optimizer, _ = make_optimizer(cfg.lr, warmup_steps=o.warmup_steps, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2,
                                  eps=o.eps, grad_clip=o.grad_clip)  # as trainer.Trainer
    return cls(qcfg=qcfg, graphdef=graphdef, params=params, opt_state=jax.eval_shape(optimizer.init, params),
               optimizer=optimizer, shardings=TrainShardings.build(mesh, params, optimizer))

  def state_bytes(self) -> dict[str, int]:
    p = tree_bytes_per_device(self.params, self.shardings.params)
    return {"parameters": p, "optimizer state": tree_bytes_per_device(self.opt_state, self.shardings.opt_state),
            "teacher": p,  # the trainer keeps θ_T (a copy of the parameters) for every method
            "gradients": p}  # accumulators like the parameters (`trainer.run_updates`: zeros_like(params))


def resident_bytes(state: dict[str, int], program: Optional[str] = None) -> int:
  """The state live while `program` runs: parameters, optimizer state and teacher always, the gradient accumulators
  from a mini-batch's first `accumulate` to its `apply` (`GRADIENT_PROGRAMS`); None: the most (during an update)."""
  total = state["parameters"] + state["optimizer state"] + state["teacher"]
  return total + (state["gradients"] if program is None or program in GRADIENT_PROGRAMS else 0)


# ---------------------------------------------------------------------------------------------------------------------
# Analytic activations and FLOPs (per device)
# ---------------------------------------------------------------------------------------------------------------------
def _dims(q):
  return dict(D=q.hidden_size, F=q.intermediate_size, L=q.num_hidden_layers, N=q.num_attention_heads,
              K=q.num_key_value_heads, H=q.head_dim, V=q.vocab_size)


def _itemsize(name: str) -> int:
  return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


def layer_param_count(q) -> int:
  d = _dims(q)
  return d["D"] * (d["N"] + 2 * d["K"]) * d["H"] + d["N"] * d["H"] * d["D"] + 3 * d["D"] * d["F"]


def analytic_activations(q, shapes: Shapes, fsdp: int, tensor: int) -> dict[str, int]:
  """Estimated temporaries per device of each program (bytes; the gradients are state, not temporaries: `accumulate`
  takes them donated and `apply` consumes them).

  Per training row of S positions: remat keeps every layer's input (L·S·D in the compute dtype); the backward
  recomputes one layer at a time (`bwd_ws`: the residual and its gradient, q/k/v, the MLP's three [S, F]); a teacher
  micro-batch's teacher forward holds one layer at a time (`fwd_ws`: residual, attention/MLP input, two [S, F]), and
  both hidden states at the response positions feed the one head pass. Fixed: two layers' weights gathered by FSDP
  (fp32 + compute-dtype copy), the head weight in the compute dtype, a few [tile, V] fp32 tiles. `prepare` is the
  student's forward. Calibrated on the compiled Qwen3-8B update (1 and 2 rows per device: 9.5 / 15.0 GiB against
  XLA's 9.2 / 14.3, gradients aside) and prepare (54.3 against 54.0); BUILD_NOTES.md, "Planner".
  """
  d = _dims(q)
  D, F, L, N, K, H, V = (d[k] for k in "DFLNKHV")
  act = _itemsize(q.dtype)
  pb = _itemsize(q.param_dtype)
  rs = shapes.row_shards
  tp = max(tensor, 1)
  lp = layer_param_count(q)
  gathered = 2 * lp * (pb + act) / tp
  head = V * D * act / tp
  tile = 4 * 256 * V * 4 / tp
  params = (L * lp + (1 if q.tie_word_embeddings else 2) * V * D) * pb / (fsdp * tp)

  def fwd_ws(tokens):
    return tokens * (2 * D + 2 * F / tp) * act

  def bwd_ws(tokens):
    return tokens * (4 * D + 3 * F / tp + 2 * (N + 2 * K) * H / tp) * act

  s, t, st = shapes.seq, shapes.resp, shapes.teacher_seq

  def train(b, c):  # one accumulate call: b student rows and c teacher rows per device
    saved = L * b * s * D * act if q.remat else L * bwd_ws(b * s)
    return saved + bwd_ws(b * s) + (fwd_ws(c * st) if c else 0) + 2 * (b + c) * t * D * act + gathered + head + tile

  out: dict[str, int] = {}
  for name, rows, teacher in shapes.micro_batch_kinds:
    out[name] = int(train(rows // rs, rows // rs if teacher else 0))
  # AdamW: the new parameters and moments are all computed before the finite check picks them or the old ones
  # (compiled Qwen3-8B on 8 × H100: 2 parameter copies of temporaries).
  out["apply"] = int(3 * params)
  if shapes.prep_rows:
    pr = shapes.prep_rows // rs
    out["prepare"] = int(fwd_ws(pr * s) + pr * t * D * act + gathered / 2 + head + tile)
  out["ema"] = int(params)  # written in place of the donated teacher on GPUs; one fp32 copy otherwise
  if shapes.sampler_rows:
    br = shapes.sampler_rows // rs
    cache = 2 * L * br * (shapes.sampler_prompt + shapes.sampler_new) * K * H * act
    out["sampler"] = int(cache + fwd_ws(br * shapes.sampler_prompt) + br * V * 4 * 3 + gathered / 2 + head)
  return out


def analytic_flops(q, shapes: Shapes, num_devices: int) -> dict[str, float]:
  """Matmul FLOPs per device of one call of each program (dense matmuls 2·m·n·k; causal attention half of 4·S²·N·H
  per row)."""
  d = _dims(q)
  D, L, N, H, V = d["D"], d["L"], d["N"], d["H"], d["V"]
  per_token = 2 * layer_param_count(q)

  def layers(rows, seq):
    return L * rows * (seq * per_token + 2 * N * H * seq * seq)

  def attn(rows, seq):
    return L * rows * 2 * N * H * seq * seq

  head = lambda tokens: 2 * D * V * tokens
  s, t = shapes.seq, shapes.resp
  remat = 1 if q.remat else 0

  def train(b, c):
    # Student: forward, the remat forward, backward (2x the matmuls; flash attention's backward 2.5x the forward).
    student = (3 + remat) * (layers(b, s) - attn(b, s)) + (2 + remat + 0.5) * attn(b, s)
    teacher = layers(c, shapes.teacher_seq) if c else 0
    return student + teacher + 4 * head(b * t) + (6 * head(c * t) if c else 0)  # head: fwd, recompute, dh, dW

  out = {name: train(rows, rows if teacher else 0) / num_devices for name, rows, teacher in shapes.micro_batch_kinds}
  if shapes.prep_rows:
    out["prepare"] = (layers(shapes.prep_rows, s) + head(shapes.prep_rows * t)) / num_devices
  if shapes.sampler_rows:
    br, sp, sn = shapes.sampler_rows, shapes.sampler_prompt, shapes.sampler_new
    decode = sn * (L * br * (per_token + 4 * N * H * (sp + sn)) + head(br))
    out["sampler"] = (layers(br, sp) + head(br) + decode) / num_devices
  return out


# ---------------------------------------------------------------------------------------------------------------------
# Abstract program inputs
# ---------------------------------------------------------------------------------------------------------------------
def _sds(shape, dtype):
  import jax
  return jax.ShapeDtypeStruct(tuple(shape), dtype)


def abstract_micro_batch(b: int, s: int, t: int, st: int = 0, old_logp: bool = False):
  """A `batching.MicroBatch` of ShapeDtypeStructs: B rows of S positions and T response positions; with st > 0 a
  teacher micro-batch (one teacher row of S_T = st positions per row), with `old_logp` the π_old field."""
  import jax.numpy as jnp
  from srpo_jax.batching import MicroBatch
  i32, f32, bl = jnp.int32, jnp.float32, jnp.bool_
  teacher = dict(t_ids=_sds((b, st), i32), t_mask=_sds((b, st), bl), t_start=_sds((b,), i32)) if st else {}
  return MicroBatch(ids=_sds((b, s), i32), mask=_sds((b, s), bl), start=_sds((b,), i32), resp=_sds((b, t), bl),
                    roll_logp=_sds((b, t), f32), adv=_sds((b,), f32), grpo=_sds((b,), bl), sdpo=_sds((b,), bl),
                    old_logp=_sds((b, t), f32) if old_logp else None, **teacher)


@dataclasses.dataclass
class Program:
  """A program to compile: how to lower it, and which of its arguments are the resident state."""
  name: str
  lower: Any  # () -> jax.stages.Lowered
  state_args: tuple[str, ...]  # state terms it takes (subtracted from XLA's argument bytes to get its batch inputs)


def build_programs(cfg, model: Model, shapes: Shapes, mesh, donate: bool) -> list[Program]:
  """The programs the trainer runs (`trainer.run_updates`, `trainer.prepare`, `trainer.ema_teacher`), lowered lazily
  on abstract inputs, with the trainer's donations when `donate` (a GPU target)."""
  import jax.numpy as jnp
  from srpo_jax import aot
  from srpo_jax.train_step import LossHParams, make_train_fns
  fns = make_train_fns(model.graphdef, model.optimizer, LossHParams.from_config(cfg), model.shardings)
  p, o = model.params, model.opt_state
  scalar = _sds((), jnp.float32)
  s, t, st = shapes.seq, shapes.resp, shapes.teacher_seq
  don = lambda *idx: idx if donate else None
  progs = []
  for name, rows, teacher in shapes.micro_batch_kinds:
    mb = abstract_micro_batch(rows, s, t, st if teacher else 0, old_logp=shapes.old_logp)
    args = (p, p, p, scalar, mb, scalar)  # params, teacher, grads (donated), scale, micro-batch, denominator
    # jit drops unused arguments: a plain micro-batch's program does not take the teacher.
    state = ("parameters", "teacher", "gradients") if teacher else ("parameters", "gradients")
    progs.append(Program(name, lambda args=args: aot.lower_jitted(fns.accumulate, args, don(2)), state))
  a_args = (p, o, p, scalar, scalar)  # params, optimizer state, grads, loss, scale
  progs.append(Program("apply", lambda: aot.lower_jitted(fns.apply, a_args, don(0, 1, 2)),
                       ("parameters", "optimizer state", "gradients")))
  if shapes.prep_rows:
    pr, i32, bl = shapes.prep_rows, jnp.int32, jnp.bool_
    p_args = (p, _sds((pr, s), i32), _sds((pr, s), bl), _sds((pr,), i32), _sds((pr, t), bl))
    progs.append(Program("prepare", lambda: aot.lower_jitted(fns.prepare, p_args), ("parameters",)))
  e_args = (p, p, scalar)
  progs.append(Program("ema", lambda: aot.lower_jitted(fns.ema, e_args, don(0)), ("parameters", "teacher")))
  if shapes.sampler_rows:
    progs.append(Program("sampler", lambda: _lower_sampler(cfg, model, shapes, mesh), ("parameters",)))
  return progs


def _lower_sampler(cfg, model: Model, shapes: Shapes, mesh):
  """The JAX engine's program (prefill + decode loop) for the step's rollouts, as `JaxEngine._program` builds it."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from srpo_jax.rollout import jax_engine as je
  from srpo_jax.rollout import sampling as sampling_lib
  engine = je.JaxEngine((model.graphdef, model.params), mesh=mesh)
  r = cfg.rollout
  strategy = sampling_lib.Strategy.from_params(r.temperature, r.top_k, r.top_p, model.qcfg.vocab_size)
  program = engine._program(je._ProgramKey(shapes.sampler_rows, shapes.sampler_prompt, shapes.sampler_new, strategy))
  b, pl = shapes.sampler_rows, shapes.sampler_prompt
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  sds = lambda shape, dt, sh=None: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
  params = jax.tree.map(lambda sh, v: jax.tree.map(lambda x: sds(x.shape, x.dtype, sh), v), model.shardings.params,
                        model.params)  # the engine's arguments carry their placement (no in_shardings)
  inputs = je.StepInputs(temperature=sds((), jnp.float32), top_p=sds((), jnp.float32),
                         is_stop_V=sds((model.qcfg.vocab_size,), jnp.bool_), pad_id=sds((), jnp.int32))
  with jax.set_mesh(mesh):  # as JaxEngine._run_chunk calls it
    return program.lower(params, sds((b, pl), jnp.int32, rows), sds((b, pl), jnp.bool_, rows),
                         sds((b,), jnp.int32, rows), sds((b,), jnp.bool_, rows), sds((), jnp.uint32), inputs)


# ---------------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ProgramPlan:
  name: str
  inputs: int        # non-state inputs (batches) per device
  temporaries: int
  outputs: int       # outputs not written in place of donated inputs
  total: int         # the state resident while it runs (`resident_bytes`) + inputs + temporaries + outputs
  flops: float       # per device: HLO-counted when compiled, else analytic
  analytic_flops: float
  collectives: dict[str, int] = dataclasses.field(default_factory=dict)
  attention_kernel: Optional[str] = None  # "cuDNN" | "splash" | "none" in the compiled program
  compile_s: Optional[float] = None
  argument_bytes: Optional[int] = None  # memory_analysis (cross-check of the state + inputs)
  what_if: bool = False  # not a program the trainer runs today (--prepare_rows): reported, not in the verdict


@dataclasses.dataclass
class Plan:
  config: str
  target: str
  device: str
  num_devices: int
  mesh: dict[str, int]
  model: dict[str, Any]
  shapes: dict[str, Any]
  device_memory: int
  fraction: float
  fraction_source: str
  state: dict[str, int]
  programs: list[ProgramPlan]
  mode: str  # "compiled", "compiled (L layers, extrapolated linearly)", "analytic", "state only"
  notes: list[str] = dataclasses.field(default_factory=list)
  num_hosts: int = 1  # nodes (one process each: mesh.num_processes), each with num_devices / num_hosts devices
  # rollout.engine=sglang on a GPU target: the server's side of each GPU (`sglang_memory.SGLangMemory` as a dict, with
  # `fits`: its KV pool holds the step's rollouts) and the projected refit seconds per training step
  sglang: Optional[dict[str, Any]] = None

  @property
  def budget(self) -> int:
    return int(self.device_memory * self.fraction)

  @property
  def resident(self) -> int:
    """The most state resident at once (during an update: the gradients too)."""
    return resident_bytes(self.state)

  def add_program(self, name: str, inputs: int, temporaries: int, outputs: int, **kw) -> ProgramPlan:
    prog = ProgramPlan(name=name, inputs=inputs, temporaries=temporaries, outputs=outputs,
                       total=resident_bytes(self.state, name) + inputs + temporaries + outputs, **kw)
    self.programs.append(prog)
    return prog

  @property
  def peak(self) -> ProgramPlan:
    real = [p for p in self.programs if not p.what_if]
    return max(real, key=lambda p: p.total) if real else None

  @property
  def total(self) -> int:
    return self.peak.total if self.peak is not None else self.resident

  @property
  def jax_fits(self) -> bool:
    return self.total <= self.budget

  @property
  def fits(self) -> bool:
    return self.jax_fits and (self.sglang is None or self.sglang["fits"])

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.update(budget=self.budget, resident=self.resident, total=self.total, fits=self.fits)
    return d


def make_plan(cfg, target: Target, *, config_name: str = "", analytic: bool = False,
              layers: Optional[tuple[int, ...]] = None, prepare_rows: Optional[int] = None, log=None) -> Plan:
  """Builds (and unless `analytic`, compiles) the run's programs for `target`; see the module docstring.

  layers: None = the model's depth; (a, b) = compile with a and b layers and extrapolate every per-layer term
  linearly to the full depth (inputs and the state are exact either way).
  prepare_rows: also plan `prepare` called on this many rollouts at a time (a what-if; the trainer calls it on one
  micro-batch at a time). Reported as "prepare/N", not part of the verdict.
  """
  log = log or (lambda *_: None)
  from srpo_jax import aot
  if target.is_gpu:
    aot.ensure_cuda_env()  # before jax creates its backends
  import jax
  hosts = cfg.mesh.num_processes  # one process per node: the target is each node's GPUs (nodes × target)
  if hosts > 1 and not target.is_gpu:
    raise RuntimeError(f"mesh.num_processes={hosts}: the {target.name} target plans "
                       + (f"its own {target.hosts} host(s)" if target.is_tpu else "this one process")
                       + f"; use a GPU target (each of the {hosts} nodes holds the target's GPUs, e.g. --target=h100x8)"
                       + (" or a larger TPU slice" if target.is_tpu else ""))
  if target.is_tpu:
    hosts = target.hosts
    if cfg.rollout.engine == "sglang":  # srpo_jax's SGLang client serves GPUs: a TPU run samples with the JAX engine
      cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, engine="jax"))
      log(f"{target.name}: planned with rollout.engine=jax (the SGLang engine is for GPUs)")
  num_devices = (target.num_devices * hosts if target.is_gpu else target.num_devices if target.is_tpu else
                 len(jax.devices("cpu")))
  sizes = cfg.mesh.axis_sizes(num_devices)
  row_shards = sizes["data"] * sizes["fsdp"]
  shapes = Shapes.from_config(cfg, row_shards)
  q_full = model_config(cfg, target)
  fraction, source = jax_memory_fraction(cfg, target)
  plan = Plan(config=config_name, target=target.name, device=target.device_name(), num_devices=num_devices,
              mesh=sizes, model=dict(dataclasses.asdict(q_full)), shapes=dataclasses.asdict(shapes),
              device_memory=target.device_memory_bytes(num_devices), fraction=fraction, fraction_source=source,
              state={}, programs=[], mode="analytic" if analytic else "compiled", num_hosts=hosts)
  abstract = abstract_mesh(sizes)
  full = Model.build(cfg, q_full, abstract)
  plan.state = full.state_bytes()
  _plan_sglang(plan, cfg, target, q_full)
  act = analytic_activations(q_full, shapes, sizes["fsdp"], sizes["tensor"])
  fl = analytic_flops(q_full, shapes, num_devices)
  for msg in _shape_notes(cfg, shapes):
    plan.notes.append(msg)
  if plan.resident > plan.budget:
    plan.mode = "state only"
    plan.notes.append("not compiled: the resident state alone exceeds JAX's share (exact from shapes and shardings)")
    return plan
  if analytic:
    _add_analytic_programs(plan, act, shapes, q_full, fl)
    return plan
  # Compiled: the real programs on the target's devices.
  if target.is_gpu and not aot.cuda_plugin_available():
    raise RuntimeError(f"target {target.name}: the deviceless GPU compile needs the CUDA plugin of jax: run "
                       f"`make aot-env` and use .venv-aot/bin/python (or pip install -e '.[gpu]'); --analytic needs "
                       f"no compiler")
  if target.is_gpu:
    mesh = aot.make_mesh(aot.topology_devices(target.config_text(), num_devices, num_hosts=hosts), sizes)
  elif target.is_tpu:
    if not aot.libtpu_available():
      raise RuntimeError(f"target {target.name}: the deviceless TPU compile needs libtpu: run `make aot-env` and use "
                         f".venv-aot/bin/python (or pip install -e '.[tpu]'); --analytic needs no compiler")
    mesh = aot.make_mesh(aot.tpu_topology_devices(target.tpu_topology), sizes)
  else:
    from srpo_jax import sharding
    mesh = sharding.make_mesh(**sizes, devices=jax.devices("cpu"))
  depths = tuple(layers) if layers else (q_full.num_hidden_layers,)
  donate = target.is_accelerator
  results: dict[int, dict[str, Any]] = {}
  for depth in depths:
    q = model_config(cfg, target, layers=depth)
    model = Model.build(cfg, q, mesh)
    state_d = model.state_bytes()
    results[depth] = {}
    progs = build_programs(cfg, model, shapes, mesh, donate)
    if prepare_rows:
      alt = _prepare_what_if(cfg, shapes, prepare_rows)
      prog = next(p for p in build_programs(cfg, model, alt, mesh, donate) if p.name == "prepare")
      progs.append(dataclasses.replace(prog, name=f"prepare/{prepare_rows}"))
    for prog in progs:
      t0 = time.perf_counter()
      lowered = prog.lower()
      state_in = sum(state_d[k] for k in prog.state_args)
      try:
        compiled, summ = aot.compile_lowered(prog.name, lowered)
      except Exception as e:  # noqa: BLE001 - XLA's TPU compiler refuses a program over the chip's HBM
        temp = aot.hbm_exhausted_temporaries(e)
        if temp is None:
          raise
        summ = aot.ProgramSummary(prog.name, argument_bytes=state_in, output_bytes=0, alias_bytes=0, temp_bytes=temp,
                                  code_bytes=0, xla_flops=0.0, collectives={}, cudnn_attention=False,
                                  compile_s=time.perf_counter() - t0)
        results[depth][prog.name] = dict(summ=summ, flops=0.0, state_in=state_in, loops=1)
        plan.notes.append(f"{prog.name} ({depth} layers): the compiler ran out of the chip's HBM; its temporaries "
                          f"({temp / GiB:.2f} GiB) are the compiler's own count, its inputs not counted")
        log(f"  {prog.name} ({depth} layers): out of HBM at compile time, temporaries {temp / GiB:.2f} GiB")
        continue
      summ.compile_s = time.perf_counter() - t0
      hf = aot.hlo_flops(compiled.as_text())
      results[depth][prog.name] = dict(summ=summ, flops=hf.total, state_in=state_in, loops=hf.unknown_trip_counts)
      log(f"  {prog.name} ({depth} layers): compiled in {summ.compile_s:.0f} s, temporaries "
          f"{summ.temp_bytes / GiB:.2f} GiB, peak {summ.peak_bytes / GiB:.2f} GiB")
      del compiled, lowered
  full_depth = q_full.num_hidden_layers
  if len(depths) > 1:
    plan.mode = (f"compiled with {depths[0]} and {depths[1]} layers, per-layer terms extrapolated linearly to "
                 f"{full_depth}")
  for name in results[depths[0]]:
    def term(key, depth, name=name):
      r = results[depth][name]
      sm = r["summ"]
      return {"inputs": sm.argument_bytes - r["state_in"], "temp": sm.temp_bytes,
              "out": sm.output_bytes - sm.alias_bytes, "flops": r["flops"], "args": sm.argument_bytes}[key]

    def value(key):
      if len(depths) == 1:
        return term(key, depths[0])
      a, b = depths
      return term(key, a) + (term(key, b) - term(key, a)) / (b - a) * (full_depth - a)

    last = results[depths[-1]][name]["summ"]
    inputs, temp, out = max(int(value("inputs")), 0), int(value("temp")), max(int(value("out")), 0)
    what_if = name.startswith("prepare/")
    loops = results[depths[-1]][name]["loops"]  # while loops with a data-dependent exit: HLO counts them once
    a_fl = (analytic_flops(q_full, _prepare_what_if(cfg, shapes, prepare_rows), num_devices)["prepare"] if what_if
            else fl.get(name, 0.0))
    plan.add_program(
        name, inputs, temp, out, flops=a_fl if loops or target.is_tpu else float(value("flops")), analytic_flops=a_fl,
        collectives=last.collectives, attention_kernel=last.attention_kernel,
        compile_s=sum(results[d][name]["summ"].compile_s for d in depths), argument_bytes=int(value("args")),
        what_if=what_if)
    if loops and not target.is_tpu:
      plan.notes.append(f"{name}: FLOPs analytic (its {loops} while loop(s) have a data-dependent exit, which the HLO "
                        f"count takes once)")
  if target.is_tpu:  # TPU HLO writes matmuls as convolutions and splash as an opaque custom call
    plan.notes.append("FLOPs analytic on a TPU target (the HLO count reads GPU programs' dots and cuDNN calls)")
  if prepare_rows:
    now = (f"the trainer calls it on {shapes.prep_rows}, a micro-batch" if shapes.prep_rows else
           "this config's trainer runs no prepare")
    plan.notes.append(f"prepare/{prepare_rows}: what-if, prepare called on {prepare_rows} rollouts at a time ({now}); "
                      f"not in the verdict")
  return plan


def _plan_sglang(plan: Plan, cfg, target: Target, q) -> None:
  """The SGLang server's side of each GPU beside JAX's share (`srpo_jax.rollout.sglang_memory`), sized as the
  trainer sizes an owned one; nothing for the JAX engine or the CPU."""
  if cfg.rollout.engine != "sglang" or not target.is_gpu:
    return
  from srpo_jax.rollout import sglang_memory
  mem = sglang_memory.for_config(cfg, q, device_memory=plan.device_memory, jax_fraction=plan.fraction,
                                 gpus=target.num_devices, nodes=plan.num_hosts, jax_state=plan.state)
  plan.sglang = dict(dataclasses.asdict(mem), fits=mem.fits, starts=mem.starts, summary=mem.summary(),
                     sleep=mem.sleep, refit_fits=mem.refit_fits,
                     jax_fraction_to_fit=None if mem.sleep else mem.jax_fraction_to_fit(),
                     refit_s=sglang_memory.projected_refit_s(sglang_memory.weight_bytes(q)),
                     refit_note=sglang_memory.REFIT_NOTE)


def _prepare_what_if(cfg, shapes: Shapes, rows: int) -> Shapes:
  return dataclasses.replace(shapes, prep_rows=rows)


def _add_analytic_programs(plan: Plan, act: dict[str, int], shapes: Shapes, q, fl: dict[str, float]) -> None:
  for name, temp in act.items():
    plan.add_program(name, _input_bytes(name, shapes, q), temp, _output_bytes(name, shapes),
                     flops=fl.get(name, 0.0), analytic_flops=fl.get(name, 0.0))


def _input_bytes(name: str, shapes: Shapes, q) -> int:
  """Per-device bytes of a program's batch inputs (analytic path; `abstract_micro_batch`'s fields)."""
  rs = shapes.row_shards
  s, t, st = shapes.seq, shapes.resp, shapes.teacher_seq
  # ids i32 + mask; resp mask, roll logp (+ old logp); start, adv, grpo, sdpo. A teacher row: t_ids + t_mask, t_start.
  row = s * 5 + t * (5 + (4 if shapes.old_logp else 0)) + 10
  for kind, rows, teacher in shapes.micro_batch_kinds:
    if name == kind:
      return int(rows * (row + (st * 5 + 4 if teacher else 0)) / rs)
  if name == "prepare":
    return int(shapes.prep_rows * (s * 5 + t + 4) / rs)
  if name == "sampler":
    return int(shapes.sampler_rows * (shapes.sampler_prompt * 5 + 9) / rs + q.vocab_size)
  return 0


def _output_bytes(name: str, shapes: Shapes) -> int:
  """Per-device outputs not written in place of a donated input (analytic path, GPU donation as the trainer)."""
  rs = shapes.row_shards
  if name == "prepare":
    return int(shapes.prep_rows * shapes.resp * 4 / rs)
  if name == "sampler":
    return int(shapes.sampler_rows * shapes.sampler_new * 8 / rs)
  return 0


def _shape_notes(cfg, shapes: Shapes) -> list[str]:
  notes = []
  if not shapes.budget_mode and cfg.micro_batch_size % shapes.row_shards:
    notes.append(f"optim.micro_batch_size={cfg.micro_batch_size} is padded up to {shapes.micro_rows} rows (a multiple "
                 f"of the {shapes.row_shards} row shards, mesh.data × mesh.fsdp): the extra rows are wasted work; "
                 f"use a multiple of {shapes.row_shards}")
  if shapes.teacher_rows and not shapes.budget_mode:
    notes.append(f"{ACCUMULATE}: a plain micro-batch (no teacher) of the same rows as {ACCUMULATE_T}, which bounds it "
                 f"in memory and FLOPs: not compiled separately")
  if shapes.teacher_rows and shapes.budget_mode:
    notes.append("token budget: each micro-batch kind planned at the longest rollouts; a teacher micro-batch's "
                 "rollouts count their teacher tokens against the budget (batching.route_groups), so it has fewer rows")
  if not shapes.prep_rows:
    notes.append("no prepare: one optimizer step per training step, π_old = stop_gradient(π_θ) inside the update "
                 "(trainer.needs_old_logp; --config.optim.recompute_old_logp=True plans it)")
  return notes


# ---------------------------------------------------------------------------------------------------------------------
# What to change when it does not fit
# ---------------------------------------------------------------------------------------------------------------------
def largest_term(plan: Plan) -> tuple[str, int]:
  """The biggest single term of the peak: a state term resident during the peak program (the gradients only in
  accumulate / apply), or that program's inputs / temporaries / outputs."""
  p = plan.peak
  grads = p is None or p.name in GRADIENT_PROGRAMS
  terms = {k: v for k, v in plan.state.items() if k != "gradients" or grads}
  if p is not None:
    terms[f"{p.name} temporaries"] = p.temporaries
    terms[f"{p.name} inputs"] = p.inputs
    terms[f"{p.name} outputs"] = p.outputs
  return max(terms.items(), key=lambda kv: kv[1])


def suggestion(cfg, plan: Plan) -> str:
  """A setting that would fit (exact for the state; an estimate scaled from the plan for activations)."""
  budget = plan.budget
  state_per_fsdp = plan.resident * plan.mesh["fsdp"]  # the state scales as 1/fsdp
  if plan.resident > budget or (plan.programs and plan.resident > 0.8 * budget):
    for fsdp in (2, 4, 8, 16, 32, 64):
      if state_per_fsdp / fsdp <= 0.6 * budget:
        need = fsdp * plan.mesh["tensor"]
        where = (f"--config.mesh.fsdp={fsdp} --config.mesh.data=-1" if need <= plan.num_devices else
                 f"{fsdp} devices (--mesh=configs/mesh/{fsdp}gpu.py, i.e. mesh.fsdp={fsdp}; plan it with "
                 f"--target=h100x{fsdp})" if fsdp <= 8 else
                 f"mesh.fsdp={fsdp} over {need} devices (more than one 8-GPU node)")
        return (f"shard the parameters, optimizer state and teacher over more devices: {where} "
                f"(state {state_per_fsdp / fsdp / GiB:.1f} GiB per device)")
  p = plan.peak
  if p is None:
    return "no setting found"
  if p.name in (ACCUMULATE, ACCUMULATE_T, "prepare"):
    fit = _fitting_micro_batch(cfg, plan, p)
    if fit is not None:
      rows, tokens, total = fit
      return (f"--config.optim.micro_batch_size={rows} (or --config.optim.micro_batch_tokens={tokens}): "
              f"{rows // plan.shapes['row_shards']} rollout(s) per device, {p.name} about {total / GiB:.1f} GiB "
              f"(this plan's temporaries scaled by the analytic model)")
    return ("one rollout per device does not fit: --config.model.remat=True, a larger mesh.fsdp or tensor, or a "
            "shorter rollout.max_new_tokens")
  if p.name == "sampler":
    return "the JAX sampler's KV cache: --config.rollout.engine=sglang, or fewer rollout.prompts_per_step"
  return f"reduce {p.name}'s shapes"


def _fitting_micro_batch(cfg, plan: Plan, p: ProgramPlan) -> Optional[tuple[int, int, int]]:
  """The largest micro-batch (rows, a multiple of the row shards dividing the mini-batch) with which program `p`
  (an accumulate or prepare: they share the micro-batches' rows) fits at a fixed micro_batch_size, its token budget
  per device (a plain micro-batch's rows at the longest length; a teacher micro-batch under that budget has fewer)
  and estimated total: the plan's temporaries scaled by `analytic_activations`' ratio."""
  rs = plan.shapes["row_shards"]
  q = model_config(cfg, TARGETS.get(plan.target, TARGETS["h100x1"]))
  per_mb = cfg.rollouts_per_mini_batch
  fsdp, tensor = plan.mesh["fsdp"], plan.mesh["tensor"]

  def train_temps(acts):  # the accumulate kind a fixed-size plan has (the teacher one, where there is one)
    return acts[p.name] if p.name == "prepare" else acts.get(ACCUMULATE_T, acts.get(ACCUMULATE))

  def temps(rows):
    c = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, micro_batch_size=rows, micro_batch_tokens=None))
    return train_temps(analytic_activations(q, Shapes.from_config(c, rs), fsdp, tensor))

  now = analytic_activations(q, Shapes(**plan.shapes), fsdp, tensor)[p.name]
  best = None
  for rows in range(rs, per_mb + 1, rs):
    if per_mb % rows:
      continue
    total = p.total - p.temporaries + int(p.temporaries * temps(rows) / now)
    if total <= plan.budget:
      best = (rows, rows // rs * plan.shapes["seq"], total)
  return best


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------
def _g(x: Optional[float]) -> str:
  return "-" if x is None else f"{x / GiB:.2f}"


def format_plan(plan: Plan) -> str:
  q, s = plan.model, plan.shapes
  hosts = plan.num_hosts
  where = (f"{hosts} nodes × {plan.num_devices // hosts} = {plan.num_devices} × {plan.device}" if hosts > 1 else
           f"{plan.num_devices} × {plan.device}")
  lines = [f"srpo_jax.plan: {plan.config} on {plan.target} ({where}; "
           + (f"deviceless compile, no {TARGETS[plan.target].platform.upper()} ran"
              if TARGETS[plan.target].is_accelerator else "this machine's CPU") + ")"]
  lines.append(f"model: D={q['hidden_size']} L={q['num_hidden_layers']} N={q['num_attention_heads']} "
               f"K={q['num_key_value_heads']} F={q['intermediate_size']} V={q['vocab_size']}, {q['dtype']} compute, "
               f"{q['param_dtype']} params, remat={q['remat']}, attention={q['attention']}; mesh "
               + " ".join(f"{k}={v}" for k, v in plan.mesh.items()))
  per_dev = s["micro_rows"] // s["row_shards"]
  sizing = "under a token budget, at the longest rollouts" if s["budget_mode"] else "fixed micro_batch_size"
  m = s["micro_batches"]
  text = (f"shapes: S = {s['prompt']} + {s['resp']} = {s['seq']} positions; {m} accumulate call{'s' * (m != 1)} "
          f"and one apply per optimizer step ({sizing}): ")
  kinds = []
  if s["teacher_rows"]:
    kinds.append(f"{ACCUMULATE_T} {s['teacher_rows']} rollouts, each beside its teacher row of {s['teacher_seq']}")
  if not s["teacher_rows"] or s["budget_mode"]:
    kinds.append(f"{ACCUMULATE} {s['micro_rows']} rollouts ({per_dev} per device = {per_dev * s['seq']:,} tokens "
                 f"per device)")
  text += "; ".join(kinds)
  text += f"; prepare {s['prep_rows']} rollouts per call" if s["prep_rows"] else "; no prepare (on-policy)"
  if s["sampler_rows"]:
    text += f"; sampler {s['sampler_rows']} × ({s['sampler_prompt']} + {s['sampler_new']})"
  lines.append(text)
  lines.append(f"JAX's share: {plan.fraction:.2f} × {plan.device_memory / GiB:.1f} GiB = {plan.budget / GiB:.1f} GiB "
               f"per device ({plan.fraction_source})")
  lines.append(f"mode: {plan.mode}")
  st = plan.state
  lines.append("per device (GiB):")
  for k in ("parameters", "optimizer state", "teacher"):
    lines.append(f"  {k:<34}{_g(st[k]):>9}")
  lines.append(f"  {'gradients':<34}{_g(st['gradients']):>9}  (resident from a mini-batch's first accumulate to "
               f"its apply)")
  if plan.programs:
    names = [p.name for p in plan.programs]
    lines.append(f"  {'program':<34}" + "".join(f"{n:>14}" for n in names))
    rows = [("inputs (batch)", lambda p: _g(p.inputs)), ("temporaries", lambda p: _g(p.temporaries)),
            ("outputs (not in place)", lambda p: _g(p.outputs)), ("total (live state + the above)", lambda p: _g(p.total)),
            ("FLOPs per device per call (T)", lambda p: f"{p.flops / 1e12:.1f}"),
            ("  analytic (T)", lambda p: f"{p.analytic_flops / 1e12:.1f}"),
            ("attention kernel", lambda p: p.attention_kernel or "-"),
            ("compile s", lambda p: "-" if p.compile_s is None else f"{p.compile_s:.0f}")]
    for label, f in rows:
      lines.append(f"  {label:<34}" + "".join(f"{f(p):>14}" for p in plan.programs))
    for p in plan.programs:
      if p.collectives:
        lines.append(f"  collectives in {p.name}: " + ", ".join(f"{k} {v}" for k, v in sorted(p.collectives.items())))
  for n in plan.notes:
    lines.append(f"note: {n}")
  sg = plan.sglang
  if sg is not None:
    lines.append(sg["summary"])
    lines.append(f"refit: projected {sg['refit_s']:.1f} s per training step ({sg['refit_note']})")
  verdict = "FITS" if plan.jax_fits else "DOES NOT FIT"
  where = f" ({plan.peak.name})" if plan.programs else " (resident state)"
  lines.append(f"{verdict}: peak {plan.total / GiB:.2f} GiB{where} of {plan.budget / GiB:.1f} GiB per device")
  if sg is not None:
    lines.append(("FITS" if sg["fits"] else "DOES NOT FIT") + f": SGLang's KV pool {max(sg['kv_tokens'], 0):,} "
                 f"tokens per GPU for the step's {sg['need_tokens']:,}"
                 + (f"; time-shared, refit peak {sg['refit_bytes'] / GiB:.1f} GiB" if sg["sleep"] else ""))
  return "\n".join(lines)


def failure_message(cfg, plan: Plan) -> str:
  if plan.jax_fits and plan.sglang["sleep"]:  # time-shared: the pool beside JAX's parameters, or the refit
    sg = plan.sglang
    what = (f"the refit (JAX's state beside the server's weights) needs {sg['refit_bytes'] / GiB:.1f} GiB per GPU"
            if not sg["refit_fits"] else
            f"SGLang's KV pool holds {max(sg['kv_tokens'], 0):,} tokens per GPU beside JAX's parameters, the step's "
            f"rollouts need {sg['need_tokens']:,}")
    return (f"time-shared on {plan.target} (rollout.sglang_sleep): {what}; shard the parameters over more GPUs, "
            f"fewer rollout.prompts_per_step or a shorter rollout.max_new_tokens")
  if plan.jax_fits:  # then SGLang's KV pool is what does not fit
    sg = plan.sglang
    to_fit = sg["jax_fraction_to_fit"]
    jax_there = plan.total <= plan.device_memory * to_fit
    return (f"SGLang's KV pool on {plan.target} holds {max(sg['kv_tokens'], 0):,} tokens per GPU, the step's rollouts "
            f"need {sg['need_tokens']:,} (rollout.prompts_per_step × n × (data.max_prompt_tokens + "
            f"rollout.max_new_tokens) over {sg['dp']} data-parallel servers{' per node' * (plan.num_hosts > 1)}): "
            f"rollouts would run in waves. "
            + (f"Would fit: XLA_PYTHON_CLIENT_MEM_FRACTION={to_fit:.3f} (JAX's peak {plan.total / GiB:.1f} GiB fits "
               f"its {plan.device_memory * to_fit / GiB:.1f} GiB)" if jax_there and to_fit > 0 else
               f"No split of this GPU holds both: JAX's peak is {plan.total / GiB:.1f} GiB, and SGLang's pool would "
               f"leave JAX {max(to_fit, 0) * plan.device_memory / GiB:.1f} GiB; fewer rollout.prompts_per_step or a "
               f"shorter rollout.max_new_tokens"))
  name, value = largest_term(plan)
  return (f"does not fit on {plan.target}: {plan.total / GiB:.1f} GiB per device > {plan.budget / GiB:.1f} GiB "
          f"(JAX's share {plan.fraction:.2f} of {plan.device_memory / GiB:.1f} GiB). Largest term: {name} "
          f"{value / GiB:.1f} GiB (parameters {plan.state['parameters'] / GiB:.1f}, optimizer state "
          f"{plan.state['optimizer state'] / GiB:.1f}, teacher {plan.state['teacher'] / GiB:.1f} GiB). "
          f"Would fit: {suggestion(cfg, plan)}")


# ---------------------------------------------------------------------------------------------------------------------
# The early check of srpo_jax.run (real devices, no compile)
# ---------------------------------------------------------------------------------------------------------------------
class DoesNotFit(RuntimeError):
  """The analytic estimate says the run does not fit the accelerator (message: the largest term and a fix)."""


def check_fits_analytic(cfg, mesh=None, devices=None) -> Optional[Plan]:
  """Raises DoesNotFit when the analytic estimate exceeds JAX's memory on the run's GPUs; None on CPU.

  mesh: the run's mesh (None: one device, nothing sharded, as the trainer runs without one); devices: the devices
  to read the memory limit from (default: the mesh's, else jax.devices()[:1]).
  """
  import jax
  if devices is None:
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
  devices = list(devices)
  if not devices or devices[0].platform != "gpu":
    return None
  # A multi-process mesh holds other processes' devices too: read the limit from one of this process's.
  local = next((d for d in devices if d.process_index == jax.process_index()), devices[0])
  stats = {}
  try:
    stats = local.memory_stats() or {}
  except Exception:  # noqa: BLE001 - some backends have no memory statistics
    pass
  limit = int(stats.get("bytes_limit", 0))
  if not limit:
    return None
  sizes = (dict(mesh.shape) if mesh is not None else
           cfg.mesh.axis_sizes(len(devices)) if len(devices) > 1 else {"data": 1, "fsdp": 1, "tensor": 1})
  shapes = Shapes.from_config(cfg, sizes["data"] * sizes["fsdp"])
  q = model_config(cfg, TARGETS["h100x1"])  # any GPU target: the attention "auto" picks on a GPU
  model = Model.build(cfg, q, abstract_mesh(sizes))
  plan = Plan(config="", target="this machine", device=devices[0].device_kind, num_devices=len(devices), mesh=sizes,
              model=dataclasses.asdict(q), shapes=dataclasses.asdict(shapes), device_memory=limit, fraction=1.0,
              fraction_source="JAX's allocator limit (bytes_limit)", state=model.state_bytes(), programs=[],
              mode="analytic")
  _add_analytic_programs(plan, analytic_activations(q, shapes, sizes["fsdp"], sizes["tensor"]), shapes, q, {})
  if not plan.fits:
    raise DoesNotFit(failure_message(cfg, plan) + " (analytic estimate; `python -m srpo_jax.plan` compiles the "
                     "programs for a target without the GPU)")
  return plan


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------
def main(argv) -> int:
  from absl import flags
  from srpo_jax import config as config_lib
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    print(f"unexpected arguments: {argv[1:]}", file=sys.stderr)
    return EXIT_BAD_INPUT
  if FLAGS.config is None:
    print("--config=configs/<name>.py is required", file=sys.stderr)
    return EXIT_BAD_INPUT
  target = TARGETS.get(FLAGS.target)
  if target is None:
    print(f"--target={FLAGS.target!r}: expected one of {', '.join(TARGETS)}", file=sys.stderr)
    return EXIT_BAD_INPUT
  try:
    raw = FLAGS.config if FLAGS.mesh is None else config_lib.apply_mesh_layout(FLAGS.config, FLAGS.mesh)
    cfg = planning_config(raw)
  except config_lib.ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  layers = tuple(int(x) for x in FLAGS.layers.split(",")) if FLAGS.layers else None
  if layers is not None and len(layers) not in (1, 2):
    print("--layers: one depth, or two (a,b) to extrapolate from", file=sys.stderr)
    return EXIT_BAD_INPUT
  if layers is not None and len(layers) == 1:
    layers = None if layers[0] == model_config(cfg, target).num_hidden_layers else (layers[0], 2 * layers[0])
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  from ml_collections import config_flags
  name = config_flags.get_config_filename(FLAGS["config"])
  if FLAGS.mesh is not None:
    name += " --mesh=" + config_flags.get_config_filename(FLAGS["mesh"])
  try:
    plan = make_plan(cfg, target, config_name=name or "", analytic=FLAGS.analytic, layers=layers,
                     prepare_rows=FLAGS.prepare_rows, log=log)
  except RuntimeError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  print(format_plan(plan))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(plan.to_json(), f, indent=1)
  if not plan.fits:
    print(failure_message(cfg, plan), file=sys.stderr)
    return EXIT_DOES_NOT_FIT
  return EXIT_FITS


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:param]).", lock_config=True)
  config_flags.DEFINE_config_file("mesh", None, "Optional mesh layout (configs/mesh/*.py[:param]) over the config's "
                                  "mesh section, as srpo_jax.main's --mesh; mesh.num_processes > 1 plans that many "
                                  "nodes of the target's GPUs.", lock_config=True)
  flags.DEFINE_string("target", "h100x8", f"One of {', '.join(TARGETS)}.")
  flags.DEFINE_bool("analytic", False, "Skip the compiler: exact state terms, estimated activations.")
  flags.DEFINE_string("layers", None, "Compile with this many layers (N, or two depths a,b) and extrapolate the "
                      "per-layer terms linearly to the model's depth; default: the full depth.")
  flags.DEFINE_string("json", None, "Also write the plan as JSON here.")
  flags.DEFINE_integer("prepare_rows", None, "What-if: also plan `prepare` on this many rollouts per call (the trainer "
                       "calls it per micro-batch); reported beside, not in the verdict.")


if __name__ == "__main__":
  # Before jax initialises: the deviceless CUDA compile's environment (the CPU target ignores it).
  from srpo_jax import aot as _aot
  _aot.ensure_cuda_env()
  from absl import app
  from srpo_jax import config as _config_lib
  _define_flags()
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=_config_lib.parse_flags)
