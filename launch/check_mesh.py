"""Checks a launch before a run: every process joins, sees the whole mesh, and a collective spans all processes.

  launch/local.sh 2 4 launch/check_mesh.py --config=configs/tiny.py --mesh=configs/mesh/nodes.py:2 --mesh.fsdp=4
  (in a SLURM job: CHECK=1 in launch/slurm.sbatch runs it on every node before training)

Takes the flags of `srpo_jax.main` (--config, --config.*, --mesh, --mesh.*), joins the run exactly as the trainer does
(`srpo_jax.run.build_mesh`: jax.distributed, gloo on CPU, NCCL on GPUs), then on every process prints one line
`RESULT process=I/N devices=LOCAL/GLOBAL mesh=... fsdp_in_process=yes|no sum=S expected=E` and exits 0 only when
the process count, the device count and the mesh are the configured ones, a sum over every device of the mesh
(each device holding its process index + 1) gives the same value on every process, and each fsdp × tensor group
lies on one process when one process holds enough devices for it (FSDP and TP traffic stays inside a node).
"""
from __future__ import annotations

import sys

from absl import app
from ml_collections import config_flags

from srpo_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:param]).",
                                          lock_config=True)
_MESH = config_flags.DEFINE_config_file("mesh", None, "Optional mesh layout (configs/mesh/*.py[:param]).",
                                        lock_config=True)


def fsdp_groups_in_one_process(mesh) -> bool:
  """Whether every (fsdp, tensor) slice of the mesh (one data index) holds devices of a single process."""
  return all(len({d.process_index for d in mesh.devices[i].flat}) == 1 for i in range(mesh.devices.shape[0]))


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config=configs/<name>.py is required")
  raw = _CONFIG.value if _MESH.value is None else config_lib.apply_mesh_layout(_CONFIG.value, _MESH.value)
  try:
    cfg = config_lib.validate(raw, check_files=False)
  except config_lib.ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from srpo_jax import run, sharding
  mesh = run.build_mesh(cfg)
  if mesh is None:  # one device: build_mesh runs unsharded; check the same layout anyway
    mesh = sharding.make_mesh(**cfg.mesh.axis_sizes(jax.device_count()))
  pid, n = jax.process_index(), jax.process_count()
  problems = []
  if n != cfg.mesh.num_processes:
    problems.append(f"{n} processes joined, mesh.num_processes={cfg.mesh.num_processes}")
  want = cfg.mesh.axis_sizes(jax.device_count())
  if dict(mesh.shape) != want:
    problems.append(f"mesh {dict(mesh.shape)} != configured {want}")
  group = want["fsdp"] * want["tensor"]
  local = jax.local_device_count()
  in_process = fsdp_groups_in_one_process(mesh)
  if local % group == 0 and not in_process:
    problems.append(f"an fsdp × tensor group of {group} devices spans processes although each holds {local}")
  # One value per device: this process's index + 1 on each of its devices; the global sum is the same everywhere.
  spec = NamedSharding(mesh, P(tuple(sharding.MESH_AXES)))
  x = jax.make_array_from_process_local_data(spec, np.full((local,), pid + 1, np.float32), (jax.device_count(),))
  total = float(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x))
  expected = float(sum((d.process_index + 1) for d in jax.devices()))
  if total != expected:
    problems.append(f"cross-process sum {total} != {expected}")
  print(f"RESULT process={pid}/{n} devices={local}/{jax.device_count()} mesh="
        + ",".join(f"{k}={v}" for k, v in mesh.shape.items())
        + f" fsdp_in_process={'yes' if in_process else 'no'} sum={total:g} expected={expected:g}", flush=True)
  for p in problems:
    print(f"check_mesh: process {pid}: {p}", file=sys.stderr)
  return 1 if problems else 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=config_lib.parse_flags)
