"""`python -m srpo_jax.main --config=configs/tiny.py [--config.algo.name=grpo ...] [--mesh=configs/mesh/8gpu.py]`:
train, evaluate, summarise.

Loads the config file locked, applies `--config.a.b=v` overrides, then the `--mesh` layout (configs/mesh/*.py, its
own `--mesh.fsdp=...` overrides applied) over the mesh section, validates once (every error names the field and
value, before anything compiles), then runs the trainer and prints a summary table and the path of a plot.
"""
from __future__ import annotations

import logging
import sys

from absl import app
from absl import logging as absl_logging
from ml_collections import config_flags

from srpo_jax import config as config_lib, supervise

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:param]).",
                                          lock_config=True)
_MESH = config_flags.DEFINE_config_file("mesh", None, "Optional mesh layout (configs/mesh/*.py[:param]) applied over "
                                        "the config's mesh section.", lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config=configs/<name>.py is required (e.g. configs/tiny.py)")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
  logging.getLogger("srpo_jax").setLevel(logging.INFO)
  try:
    cfg = config_lib.build_config(_CONFIG.value, _MESH.value)
  except config_lib.ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)

  def what_is_kept() -> str:  # for the one line of a stopping process; imported late: the supervisor runs no JAX
    from srpo_jax.checkpointing import describe_newest
    return describe_newest(cfg.checkpoint_dir)

  if cfg.mesh.num_processes > 1 and not supervise.supervised():  # the work runs in a child (srpo_jax/supervise.py)
    sys.exit(supervise.run_supervised([sys.executable, "-m", "srpo_jax.main", *sys.argv[1:]], cfg.mesh.num_processes,
                                      cfg.mesh.process_id, cfg.mesh.coordinator, what_is_kept))
  from srpo_jax import checkpointing, distributed, plan, run
  from srpo_jax.rollout.sglang_engine import SGLangError
  CHECKPOINT_ERRORS = (checkpointing.CheckpointError, checkpointing.RunDirInUse)
  try:
    mesh = run.build_mesh(cfg)
    # Multi-process runs: an error ends this process at once (its peers' next collective then fails; they name it).
    with distributed.exit_on_failure(what_is_kept,
                                     statuses={plan.DoesNotFit: 3, SGLangError: 4, **{t: 6 for t in CHECKPOINT_ERRORS}}):
      run.run(cfg, mesh=mesh)
  except plan.DoesNotFit as e:
    print(f"memory plan: {e}", file=sys.stderr)
    sys.exit(3)
  except SGLangError as e:  # a hung, dead, foreign or misbehaving server: one line naming the URL and the cause
    logging.getLogger("srpo_jax").debug("rollout server error", exc_info=True)
    print(f"rollout server: {e}", file=sys.stderr)
    sys.exit(4)
  except CHECKPOINT_ERRORS as e:  # a full disk, a corrupt or foreign checkpoint, a run_dir in use: said in one line
    logging.getLogger("srpo_jax").debug("checkpoint error", exc_info=True)
    print(f"checkpoint: {e}", file=sys.stderr)
    sys.exit(6)


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)
