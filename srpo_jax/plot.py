"""Training curves of one or more runs in one figure.

    python -m srpo_jax.plot runs/srpo runs/grpo runs/sdpo --out curves.png

Six panels, one line per run (label: the run directory's name, plus its algorithm when summary.json or config.json
names one that the directory name does not): eval accuracy vs step, eval accuracy vs time on both clocks (solid: the
wall clock `time/wall_s`, the paper's; dashed: the training clock `time_s`, evaluation excluded; see metrics.py),
routing fractions (GRPO solid, SDPO dashed, GRPO-fallback
dotted), teacher entropy, response length, step time. A panel whose metric no run logged says "no data".

`plot_seed_bands` draws several seeds per method (`srpo_jax.compare --seeds=N`): per method the mean over seeds as a
line and the min-max over seeds as a band, for eval accuracy, train reward, the SDPO-routed fraction and the SDPO JSD.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from srpo_jax import metrics as M  # noqa: E402

ROUTES = ((M.ROUTE_FRAC_GRPO, "GRPO", "-"), (M.ROUTE_FRAC_SDPO, "SDPO", "--"),
          (M.ROUTE_FRAC_FALLBACK, "GRPO fallback", ":"))
# (metric, title, y label) of the per-step panels after the two accuracy panels and the routing panel.
STEP_PANELS = ((M.TEACHER_ENTROPY_MEAN, "Teacher entropy (SDPO tokens)", "nats"),
               (M.ROLLOUT_RESPONSE_LEN_MEAN, "Response length", "tokens"),
               (M.TIME_STEP_S, "Step time", "s"))
NUM_PANELS = 6


def _series(records: Sequence[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
  """(xs, ys) of the records that carry a finite numeric `key`."""
  xs, ys = [], []
  for r in records:
    v = r.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and x in r:
      xs.append(r[x])
      ys.append(float(v))
  return xs, ys


def _algo_of(run_dir: str) -> Optional[str]:
  summary = M.read_summary(run_dir)
  if isinstance(summary.get("algo"), str):
    return summary["algo"]
  path = os.path.join(run_dir, "config.json")
  if os.path.exists(path):
    try:
      with open(path) as f:
        return json.load(f).get("algo", {}).get("name")
    except (json.JSONDecodeError, AttributeError):
      return None
  return None


def run_label(run_dir: str) -> str:
  name = os.path.basename(os.path.normpath(run_dir))
  algo = _algo_of(run_dir)
  return f"{name} ({algo})" if algo and algo not in name else name


def _no_data(ax) -> None:
  ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray", fontsize=12)


def _time_unit(runs: dict[str, list[dict]]) -> tuple[str, float]:
  """Hours for paper-length runs, minutes for the CPU demo."""
  t_max = max((r.get(at, 0.0) for recs in runs.values() for r in recs for at in M.CLOCKS.values()), default=0.0)
  return ("h", 3600.0) if t_max >= 2 * 3600 else ("min", 60.0)


def plot_runs(run_dirs: Sequence[str], out: str) -> plt.Figure:
  """Draws the six panels for `run_dirs` into `out` (PNG/PDF by extension); returns the figure (closed)."""
  runs = {d: M.read_metrics(d) for d in run_dirs}
  labels = {d: run_label(d) for d in run_dirs}
  colors = {d: f"C{i % 10}" for i, d in enumerate(run_dirs)}
  fig, axes = plt.subplots(2, 3, figsize=(16, 9), constrained_layout=True)
  ax_acc, ax_time, ax_route, *ax_rest = axes.ravel()

  def lines(ax, key, x="step", xscale=1.0, style="-", suffix="") -> bool:
    drawn = False
    for d, recs in runs.items():
      xs, ys = _series(recs, key, x)
      if xs:
        ax.plot([v / xscale for v in xs], ys, style, color=colors[d], label=labels[d] + suffix,
                marker="o" if len(xs) < 30 else None, markersize=3)
        drawn = True
    return drawn

  ax_acc.set(title="Eval accuracy (avg@n) vs step", xlabel="step", ylabel="accuracy")
  if not lines(ax_acc, M.EVAL_ACCURACY):
    _no_data(ax_acc)
  unit, scale = _time_unit(runs)
  ax_time.set(title="Eval accuracy vs time (— wall clock, -- training clock)",
              xlabel=f"time ({unit}); the training clock leaves evaluation out", ylabel="accuracy")
  drawn = [lines(ax_time, M.EVAL_ACCURACY, x=M.CLOCKS[clock], xscale=scale, style=style, suffix=f" ({clock})")
           for clock, style in (("wall", "-"), ("train", "--"))]
  if not any(drawn):
    _no_data(ax_time)
  ax_route.set(title="Routing fractions (— GRPO, -- SDPO, ·· fallback)", xlabel="step",
               ylabel="fraction of rollouts")
  drawn = [lines(ax_route, key, style=style, suffix=f" {name}") for key, name, style in ROUTES]
  if not any(drawn):
    _no_data(ax_route)
  for ax, (key, title, ylabel) in zip(ax_rest, STEP_PANELS):
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    if not lines(ax, key):
      _no_data(ax)
  return _finish(fig, axes.ravel(), out)


def _finish(fig, axes, out: str):
  """Grid and legend on every panel, then the PNG at `out` (its directory created)."""
  for ax in axes:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return fig


# (metric, title, y label, only the steps where this metric is > 0) of the panels of `plot_seed_bands`. The JSD is
# logged as 0 on a step without SDPO-routed tokens: not a measurement, left out.
BAND_PANELS = ((M.EVAL_ACCURACY, "Eval accuracy (avg@n)", "accuracy", None),
               (M.TRAIN_REWARD_MEAN, "Train reward", "mean reward", None),
               (M.ROUTE_FRAC_SDPO, "SDPO-routed fraction", "fraction of rollouts", None),
               (M.SDPO_JSD, "Teacher-student JSD (SDPO-routed tokens)", "JSD", M.ROUTE_FRAC_SDPO))


def seed_band(records_per_seed: Sequence[Sequence[dict]], key: str, only_if: Optional[str] = None
              ) -> tuple[list[float], list[float], list[float], list[float]]:
  """(steps, mean, min, max) over the seeds that logged `key` at each step (the union of their steps); with
  `only_if`, only the records where that metric is > 0."""
  by_step: dict[float, list[float]] = {}
  for recs in records_per_seed:
    if only_if is not None:
      recs = [r for r in recs if isinstance(r.get(only_if), (int, float)) and r[only_if] > 0]
    for x, y in zip(*_series(recs, key)):
      by_step.setdefault(x, []).append(y)
  steps = sorted(by_step)
  return (steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], [min(by_step[s]) for s in steps],
          [max(by_step[s]) for s in steps])


def plot_seed_bands(runs_by_method: dict[str, Sequence[str]], out: str) -> plt.Figure:
  """One figure of `BAND_PANELS` vs step: per method (its run directories, one per seed) the mean over seeds as a
  line, the min-max over seeds as a band of the same colour. Returns the figure (closed)."""
  recs = {m: [M.read_metrics(d) for d in dirs] for m, dirs in runs_by_method.items()}
  fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
  for ax, (key, title, ylabel, only_if) in zip(axes.ravel(), BAND_PANELS):
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    drawn = False
    for i, (m, per_seed) in enumerate(recs.items()):
      steps, mean, lo, hi = seed_band(per_seed, key, only_if)
      if not steps:
        continue
      color = f"C{i % 10}"
      ax.fill_between(steps, lo, hi, color=color, alpha=0.2, linewidth=0)
      ax.plot(steps, mean, "-", color=color, label=f"{m} (mean of {len(per_seed)}; band min-max)",
              marker="o" if len(steps) < 30 else None, markersize=3)
      drawn = True
    if not drawn:
      _no_data(ax)
  return _finish(fig, axes.ravel(), out)


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("run_dirs", nargs="+", help="run directories holding metrics.jsonl")
  parser.add_argument("--out", required=True, help="output image (e.g. curves.png)")
  args = parser.parse_args(argv)
  for d in args.run_dirs:
    if not os.path.exists(os.path.join(d, M.METRICS_FILE)):
      parser.error(f"{d}: no {M.METRICS_FILE} there")
  plot_runs(args.run_dirs, args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
