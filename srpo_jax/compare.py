"""`python -m srpo_jax.compare --config=configs/tiny.py [--seeds=N]`: the methods side by side, on N seeds.

Each method runs with its own defaults for what the spec ties to the method (loss aggregation, mini-batch); the
learning rate and everything else come from the config, so the comparison isolates the update rule.

Runs: `--seeds=1` (the default) runs each method once with the config's seed in `<run_dir>_compare/<method>`, as
before. `--seeds=N` runs every method on the seeds s, s+1, ..., s+N-1 (s = the config's seed: 0..N-1 by default) in
`<run_dir>_compare/<method>/seed<k>`, seed-major (all methods on seed s first). A run whose summary.json reports all
`train.steps` done is not run again and an interrupted one resumes from its last checkpoint, so a comparison that was
stopped continues where it was (`make compare` starts afresh: it removes the directory first).

Outputs in `<run_dir>_compare/` (`write_comparison`, which reads only the run directories):
  comparison.txt   per method: the step-0, best and final avg@n as mean ± sample standard deviation over the seeds
                   (ddof = 1; no ± with one seed), the per-seed best and final values, and the self-teacher's signal:
                   the mean of `sdpo/jsd` (the step's mean top-k JSD between teacher and student over SDPO-routed
                   tokens) over the steps that routed any rollout to SDPO, averaged over the seeds ("-" for a method
                   without SDPO rows); then one row per run (`metrics.summary_table`), whose best_at_<h>h_wall /
                   best_at_<h>h_train columns are the best avg@n within h hours of each clock (`CLOCKS_NOTE`).
  comparison.png   one seed: the six panels of `plot.plot_runs`; several: `plot.plot_seed_bands` (per method, the mean
                   over seeds as a line and the min-max over seeds as a band).
"""
from __future__ import annotations

import dataclasses
import glob
import logging
import math
import os
import sys
from typing import Mapping, Optional, Sequence

from absl import app, flags
from ml_collections import config_flags

from srpo_jax import config as config_lib
from srpo_jax import metrics as M

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
_METHODS = flags.DEFINE_list("methods", ["grpo", "sdpo", "srpo"], "Methods to compare.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds per method (config seed, +1, ...); 1 = one run per method.",
                              lower_bound=1)

COMPARISON_TXT = "comparison.txt"
CLOCKS_NOTE = ("best_at_<h>h_wall: best avg@n within h hours of wall clock, evaluation included (the paper's budgets); "
               "best_at_<h>h_train: of the training clock, evaluation excluded")
COMPARISON_PNG = "comparison.png"


def run_dirs(root: str, methods: Sequence[str], seeds: Sequence[int]) -> dict[str, dict[int, str]]:
  """{method: {seed: run_dir}}: `<root>/<method>` for a single seed, `<root>/<method>/seed<k>` for several."""
  if len(seeds) == 1:
    return {m: {seeds[0]: os.path.join(root, m)} for m in methods}
  return {m: {s: os.path.join(root, m, f"seed{s}") for s in seeds} for m in methods}


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation over seeds (run directories only: no training, no jax)
# ---------------------------------------------------------------------------------------------------------------------
def mean_sdpo_jsd(records: Sequence[Mapping]) -> Optional[float]:
  """Mean of `sdpo/jsd` over the steps that routed some rollout to SDPO (None when no step did)."""
  vals = [r[M.SDPO_JSD] for r in records
          if isinstance(r.get(M.SDPO_JSD), (int, float)) and math.isfinite(r[M.SDPO_JSD])
          and isinstance(r.get(M.ROUTE_FRAC_SDPO), (int, float)) and r[M.ROUTE_FRAC_SDPO] > 0]
  return sum(vals) / len(vals) if vals else None


@dataclasses.dataclass
class MethodResult:
  """One method's figures, one entry per seed (None where a run did not report it)."""
  method: str
  seeds: list[int]
  initial: list[Optional[float]]
  best: list[Optional[float]]
  final: list[Optional[float]]
  sdpo_jsd: list[Optional[float]]


def collect(runs: Mapping[str, Mapping[int, str]]) -> dict[str, MethodResult]:
  """Reads each run's summary.json and metrics.jsonl: {method: MethodResult}."""
  out = {}
  for method, by_seed in runs.items():
    seeds = sorted(by_seed)
    summaries = [M.read_summary(by_seed[s]) for s in seeds]
    out[method] = MethodResult(
        method=method, seeds=seeds, initial=[s.get(M.SUMMARY_INITIAL_ACCURACY) for s in summaries],
        best=[s.get(M.SUMMARY_BEST_ACCURACY) for s in summaries],
        final=[s.get(M.SUMMARY_FINAL_ACCURACY) for s in summaries],
        sdpo_jsd=[mean_sdpo_jsd(M.read_metrics(by_seed[s])) for s in seeds])
  return out


def mean_std(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
  """Mean and sample standard deviation (ddof = 1) of the values that are not None; std None with fewer than 2."""
  xs = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
  if not xs:
    return None, None
  mean = sum(xs) / len(xs)
  if len(xs) < 2:
    return mean, None
  return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def _pm(values: Sequence[Optional[float]], fmt: str = "{:.3f}") -> str:
  mean, std = mean_std(values)
  if mean is None:
    return "-"
  return fmt.format(mean) + ("" if std is None else " ± " + fmt.format(std))


def _each(values: Sequence[Optional[float]]) -> str:
  return " ".join("-" if v is None else f"{v:.3f}" for v in values)


COLUMNS = ("method", "seeds", "step-0 avg@n", "best avg@n", "final avg@n", "sdpo/jsd (SDPO steps)", "best per seed",
           "final per seed")


def comparison_table(results: Mapping[str, MethodResult]) -> str:
  """A fixed-width table, one row per method (see the module docstring)."""
  rows = [[r.method, ",".join(map(str, r.seeds)), _pm(r.initial), _pm(r.best), _pm(r.final),
           _pm(r.sdpo_jsd, "{:.3g}"), _each(r.best), _each(r.final)] for r in results.values()]
  widths = [max(len(row[i]) for row in [list(COLUMNS), *rows]) for i in range(len(COLUMNS))]
  fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
  return "\n".join([fmt(COLUMNS), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])


def write_comparison(root: str, runs: Mapping[str, Mapping[int, str]]) -> str:
  """Writes `<root>/comparison.txt` and `<root>/comparison.png` from the run directories; returns the text."""
  from srpo_jax import plot  # Local: matplotlib only when a figure is drawn.
  results = collect(runs)
  per_run = {os.path.relpath(d, root): M.read_summary(d) for by_seed in runs.values() for d in by_seed.values()}
  n_seeds = max(len(r.seeds) for r in results.values())
  text = (f"{n_seeds} seed(s) per method; mean ± sample std over seeds (ddof=1)\n\n" + comparison_table(results)
          + "\n\nruns (" + CLOCKS_NOTE + "):\n" + M.summary_table(per_run) + "\n")
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, COMPARISON_TXT), "w") as f:
    f.write(text)
  out = os.path.join(root, COMPARISON_PNG)
  if n_seeds == 1:
    plot.plot_runs([d for by_seed in runs.values() for d in by_seed.values()], out)
  else:
    plot.plot_seed_bands({m: [by_seed[s] for s in sorted(by_seed)] for m, by_seed in runs.items()}, out)
  return text


def _finished(run_dir: str, steps: int) -> bool:
  return M.read_summary(run_dir).get("steps") == steps


def main(argv):
  del argv
  from srpo_jax import run
  from absl import logging as absl_logging
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  absl_logging.set_verbosity(absl_logging.WARNING)
  base = _CONFIG.value
  root = base.run_dir + "_compare"
  seeds = [base.seed + k for k in range(_SEEDS.value)]
  runs = run_dirs(root, _METHODS.value, seeds)
  try:  # validate every run before training any
    # An interrupted run (checkpoints there) continues from its last checkpoint; the others start fresh.
    overrides = lambda m, s, d: {"algo.name": m, "seed": s, "run_dir": d,
                                 "resume": bool(glob.glob(os.path.join(d, "checkpoints", "[0-9]*")))}
    cfgs = {(m, s): config_lib.validate(config_lib.apply_overrides(base, overrides(m, s, d)))
            for m, by_seed in runs.items() for s, d in by_seed.items()}
  except config_lib.ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)
  mesh = run.build_mesh(next(iter(cfgs.values())))
  for s in seeds:
    for m in _METHODS.value:
      cfg = cfgs[(m, s)]
      if _finished(cfg.run_dir, cfg.train.steps):
        logging.info("%s: finished earlier, not run again", cfg.run_dir)
        continue
      run.run(cfg, mesh=mesh)
  print(write_comparison(root, runs))
  print(f"comparison plot: {os.path.join(root, COMPARISON_PNG)}")


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)
