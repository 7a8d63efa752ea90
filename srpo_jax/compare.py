"""`python -m srpo_jax.compare --config=configs/tiny.py`: GRPO, SDPO and SRPO with the same seed, one plot + table.

Each method runs in `<run_dir>/<method>` with its own defaults for what the spec ties to the method (loss
aggregation, mini-batch); the learning rate and everything else come from the config, so the comparison isolates the
update rule.
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from srpo_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
_METHODS = flags.DEFINE_list("methods", ["grpo", "sdpo", "srpo"], "Methods to compare.")


def main(argv):
  del argv
  from srpo_jax import metrics, plot, run
  from absl import logging as absl_logging
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  absl_logging.set_verbosity(absl_logging.WARNING)
  base = _CONFIG.value
  root = base.run_dir + "_compare"
  try:  # validate every run before training any
    cfgs = {m: config_lib.validate(config_lib.apply_overrides(base, {"algo.name": m, "run_dir": os.path.join(root, m)}))
            for m in _METHODS.value}
  except config_lib.ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)
  mesh = run.build_mesh(next(iter(cfgs.values())))
  summaries = {m: run.run(cfg, mesh=mesh) for m, cfg in cfgs.items()}
  table = metrics.summary_table(summaries)
  print(table)
  with open(os.path.join(root, "comparison.txt"), "w") as f:
    f.write(table + "\n")
  out = os.path.join(root, "comparison.png")
  plot.plot_runs([c.run_dir for c in cfgs.values()], out)
  print(f"comparison plot: {out}")


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)
