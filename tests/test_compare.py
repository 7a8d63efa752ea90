"""The multi-seed comparison (`srpo_jax.compare`) from fake run directories: run layout, aggregation over seeds,
the comparison table and the band figure. No training."""
import math
import os

import pytest

from srpo_jax import compare
from srpo_jax import metrics as M

# method -> per seed (best, final, JSD per step): grpo has no SDPO rows.
FAKE = {"grpo": [(0.5, 0.5, None), (0.6, 0.4, None), (0.7, 0.6, None)],
        "srpo": [(0.7, 0.7, 0.01), (0.8, 0.6, 0.02), (0.6, 0.6, 0.03)]}


def _fake_run(run_dir, method, seed, best, final, jsd):
  with M.MetricsWriter(run_dir, enabled=True, tensorboard=False) as w:
    w.write(0, {M.EVAL_ACCURACY: 0.3}, time_s=0.0)
    for s in range(1, 11):
      m = {M.TRAIN_REWARD_MEAN: 0.1 * s + 0.01 * seed, M.ROUTE_FRAC_SDPO: 0.0 if jsd is None else 0.3,
           M.SDPO_JSD: 0.0 if jsd is None else jsd * (2.0 if s % 2 else 0.0)}
      if s == 3:  # a step with no SDPO-routed rollout (its logged JSD, 0, is not a measurement)
        m[M.ROUTE_FRAC_SDPO], m[M.SDPO_JSD] = 0.0, 0.0
      if s % 5 == 0:
        m[M.EVAL_ACCURACY] = best if s == 5 else final
      w.write(s, m, time_s=10.0 * s)
  M.write_summary(run_dir, {"algo": method, "steps": 10, M.SUMMARY_INITIAL_ACCURACY: 0.3,
                            M.SUMMARY_BEST_ACCURACY: max(best, final), M.SUMMARY_FINAL_ACCURACY: final})


@pytest.fixture
def fake_runs(tmp_path):
  root = str(tmp_path / "cmp")
  runs = compare.run_dirs(root, list(FAKE), [0, 1, 2])
  for method, by_seed in runs.items():
    for seed, d in by_seed.items():
      _fake_run(d, method, seed, *FAKE[method][seed])
  return root, runs


def test_run_dirs_one_seed_keeps_the_old_layout(tmp_path):
  assert compare.run_dirs("r", ["grpo", "srpo"], [4]) == {"grpo": {4: "r/grpo"}, "srpo": {4: "r/srpo"}}
  assert compare.run_dirs("r", ["srpo"], [0, 1]) == {"srpo": {0: "r/srpo/seed0", 1: "r/srpo/seed1"}}


def test_mean_std_and_jsd_mean():
  mean, std = compare.mean_std([0.5, 0.6, None, 0.7])
  assert mean == pytest.approx(0.6) and std == pytest.approx(0.1)  # sample std (ddof = 1)
  assert compare.mean_std([0.4]) == (0.4, None) and compare.mean_std([None]) == (None, None)
  recs = [{M.ROUTE_FRAC_SDPO: 0.5, M.SDPO_JSD: 0.2}, {M.ROUTE_FRAC_SDPO: 0.0, M.SDPO_JSD: 0.0},
          {M.ROUTE_FRAC_SDPO: 0.1, M.SDPO_JSD: 0.4}, {M.EVAL_ACCURACY: 0.3}]
  assert compare.mean_sdpo_jsd(recs) == pytest.approx(0.3)  # steps without SDPO rows do not count
  assert compare.mean_sdpo_jsd(recs[1:2]) is None


def test_comparison_table_and_figure_from_run_directories(fake_runs):
  root, runs = fake_runs
  results = compare.collect(runs)
  g, s = results["grpo"], results["srpo"]
  assert g.seeds == [0, 1, 2] and g.best == [0.5, 0.6, 0.7] and g.final == [0.5, 0.4, 0.6]
  assert g.sdpo_jsd == [None] * 3
  # srpo seed 0: JSD 0.02 on odd steps, 0 on even ones, step 3 not SDPO-routed -> mean over 9 steps.
  assert s.sdpo_jsd[0] == pytest.approx(0.02 * 4 / 9)

  text = compare.write_comparison(root, runs)
  assert open(os.path.join(root, compare.COMPARISON_TXT)).read() == text
  lines = text.splitlines()
  header = next(i for i, line in enumerate(lines) if line.startswith("method"))
  grpo_row, srpo_row = lines[header + 2], lines[header + 3]
  assert grpo_row.startswith("grpo") and srpo_row.startswith("srpo")
  # best: mean ± sample std over the seeds; final too; per-seed values listed.
  assert "0.600 ± 0.100" in grpo_row and "0.500 ± 0.100" in grpo_row and "0.500 0.600 0.700" in grpo_row
  best = [max(b, f) for b, f, _ in FAKE["srpo"]]
  mean, std = sum(best) / 3, math.sqrt(sum((b - sum(best) / 3) ** 2 for b in best) / 2)
  assert f"{mean:.3f} ± {std:.3f}" in srpo_row and "0.300" in srpo_row  # step-0 accuracy
  jsd = [j * 2 * 4 / 9 for _, _, j in FAKE["srpo"]]
  assert f"{sum(jsd) / 3:.3g} ± " in srpo_row and grpo_row.split()[11] == "-"  # grpo: no SDPO steps
  assert "srpo/seed2" in text  # the per-run rows follow
  assert compare.CLOCKS_NOTE in text  # which clock each time-budget column reads

  png = os.path.join(root, compare.COMPARISON_PNG)
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_seed_band_figure_has_a_mean_line_and_a_band_per_method(fake_runs):
  from srpo_jax import plot
  root, runs = fake_runs
  fig = plot.plot_seed_bands({m: list(by_seed.values()) for m, by_seed in runs.items()},
                             os.path.join(root, "bands.png"))
  acc_ax, reward_ax, _, jsd_ax = fig.get_axes()
  assert [line.get_label().split()[0] for line in acc_ax.get_lines()] == ["grpo", "srpo"]
  assert len(acc_ax.collections) == 2  # one min-max band per method
  steps, mean, lo, hi = plot.seed_band([M.read_metrics(d) for d in runs["grpo"].values()], M.EVAL_ACCURACY)
  assert steps == [0, 5, 10] and mean == pytest.approx([0.3, 0.6, 0.5])
  assert lo == pytest.approx([0.3, 0.5, 0.4]) and hi == pytest.approx([0.3, 0.7, 0.6])
  xs, ys = acc_ax.get_lines()[0].get_data()
  assert list(xs) == steps and list(ys) == pytest.approx(mean)
  assert [line.get_label().split()[0] for line in jsd_ax.get_lines()] == ["srpo"]  # grpo: no SDPO steps
  xs, _ = jsd_ax.get_lines()[0].get_data()
  assert 3 not in list(xs) and len(xs) == 9


def test_one_seed_writes_the_six_panel_figure(tmp_path):
  root = str(tmp_path / "one")
  runs = compare.run_dirs(root, ["grpo", "srpo"], [0])
  for m, by_seed in runs.items():
    _fake_run(by_seed[0], m, 0, *FAKE[m][0])
  text = compare.write_comparison(root, runs)
  rows = text.split("runs (")[0].splitlines()[2:]
  assert text.startswith("1 seed(s)") and rows and not any(" ± " in r for r in rows)
  assert os.path.exists(os.path.join(root, compare.COMPARISON_PNG))
