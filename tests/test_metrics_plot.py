"""metrics.jsonl contents, resume truncation, summary, progress lines, summary table, and the plot."""
import io
import json
import math
import os

import numpy as np
import pytest

from srpo_jax import metrics as M
from srpo_jax import plot


def _lines(run_dir):
  with open(os.path.join(run_dir, M.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def test_jsonl_records_types_and_nonfinite(tmp_path):
  run = str(tmp_path / "run")
  with M.MetricsWriter(run, enabled=True) as w:
    w.write(1, {M.TRAIN_REWARD_MEAN: np.float32(0.25), "count": np.int64(3), "bad": float("nan"),
                "big": float("inf"), "neg": -math.inf}, time_s=1.5)
    w.write(2, {M.EVAL_ACCURACY: 0.5})
  recs = _lines(run)
  assert recs[0] == {"step": 1, "time_s": 1.5, M.TRAIN_REWARD_MEAN: 0.25, "count": 3, "bad": "nan", "big": "inf",
                     "neg": "-inf"}
  assert recs[1]["step"] == 2 and recs[1][M.EVAL_ACCURACY] == 0.5 and 0.0 <= recs[1]["time_s"] < 60
  back = M.read_metrics(run)
  assert math.isnan(back[0]["bad"]) and back[0]["big"] == math.inf and back[0]["neg"] == -math.inf
  assert os.listdir(os.path.join(run, M.TB_DIR))  # TensorBoard event file written
  with pytest.raises(ValueError, match="reserved"):
    M.MetricsWriter(run, resume_step=2, enabled=True, tensorboard=False).write(3, {"step": 1})


def test_resume_drops_records_after_resumed_step_and_appends(tmp_path):
  run = str(tmp_path / "run")
  with M.MetricsWriter(run, enabled=True, tensorboard=False) as w:
    for s in range(1, 8):
      w.write(s, {"x": float(s)}, time_s=float(s))
  with open(os.path.join(run, M.METRICS_FILE), "a") as f:
    f.write('{"step": 8, "x": 1')  # a line torn by the crash
  with M.MetricsWriter(run, resume_step=5, time_offset_s=100.0, enabled=True, tensorboard=False) as w:
    w.write(6, {"x": 60.0})
  recs = _lines(run)
  assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
  assert recs[-1]["x"] == 60.0 and recs[-1]["time_s"] >= 100.0  # the offset carries the earlier wall time
  # A new (non-resumed) run replaces the file.
  with M.MetricsWriter(run, enabled=True, tensorboard=False) as w:
    w.write(1, {"x": 0.0})
  assert [r["step"] for r in _lines(run)] == [1]


def test_disabled_writer_writes_nothing(tmp_path):
  run = str(tmp_path / "run")
  with M.MetricsWriter(run, enabled=False) as w:
    w.write(1, {"x": 1.0})
  assert not os.path.exists(run)


def test_summary_best_within_budgets_and_table(tmp_path):
  """Both clocks: the wall clock counts evaluation time (the paper's reading), the training clock does not; the
  step-10 accuracy 0.6 came in at 3,000 s of training but 3,700 s of wall clock."""
  wall = M.TIME_WALL_S
  recs = [{"step": 5, "time_s": 1800.0, wall: 2100.0, M.EVAL_ACCURACY: 0.4},
          {"step": 10, "time_s": 3000.0, wall: 3700.0, M.EVAL_ACCURACY: 0.6},
          {"step": 15, "time_s": 4000.0, wall: 5000.0, M.EVAL_ACCURACY: 0.7}, {"step": 16, "time_s": 4100.0}]
  best = M.best_within_budgets(recs, (0.25, 1, 5))
  assert best == {"best_at_0.25h_wall": None, "best_at_0.25h_train": None, "best_at_1h_wall": 0.4,
                  "best_at_1h_train": 0.6, "best_at_5h_wall": 0.7, "best_at_5h_train": 0.7}
  assert M.budget_key(10.0, "wall") == "best_at_10h_wall"
  with pytest.raises(ValueError, match="clock"):
    M.budget_key(1, "cpu")
  path = M.write_summary(str(tmp_path / "a"), {"algo": "srpo", **best, "loss": float("nan")})
  assert json.load(open(path))["loss"] == "nan"
  s = M.read_summary(str(tmp_path / "a"))
  assert s["algo"] == "srpo" and math.isnan(s["loss"])
  table = M.summary_table({"srpo": {"acc": 0.81234, "steps": 10}, "grpo": {"acc": 0.7}},
                          columns=["acc", "steps"])
  lines = table.splitlines()
  assert lines[0].split() == ["run", "acc", "steps"]
  assert lines[2].split() == ["srpo", "0.8123", "10"] and lines[3].split() == ["grpo", "0.7", "-"]
  assert len({len(line) for line in lines}) == 1  # aligned columns


def test_progress_plain_lines_every_n_steps():
  buf = io.StringIO()
  p = M.Progress(total_steps=5, log_every=2, stream=buf, force_tty=False)
  out = [p.update(s, {M.TRAIN_REWARD_MEAN: 0.5, M.ROLLOUT_TOKENS_PER_S: 1234.4,
                      **({M.EVAL_ACCURACY: 0.25} if s == 2 else {})}) for s in range(1, 6)]
  p.close()
  assert [o is not None for o in out] == [False, True, False, True, True]  # every 2nd step and the last
  assert out[1] == "step 2/5 | reward 0.500 | tok/s 1234 | acc 0.250"
  assert "acc 0.250" in out[4]  # the latest eval accuracy persists between evals
  assert buf.getvalue().count("\n") == 3
  bar_buf = io.StringIO()
  bar = M.Progress(total_steps=3, stream=bar_buf, force_tty=True)
  bar.update(1, {M.TRAIN_REWARD_MEAN: 0.1})
  bar.close()
  assert "reward=0.100" in bar_buf.getvalue()


def _fake_run(root, name, algo, with_routing):
  run = str(root / name)
  with M.MetricsWriter(run, enabled=True, tensorboard=False) as w:
    for s in range(1, 11):
      m = {M.TRAIN_REWARD_MEAN: s / 10, M.ROLLOUT_RESPONSE_LEN_MEAN: 100 + s, M.TIME_STEP_S: 2.0}
      if with_routing:
        m.update({M.ROUTE_FRAC_GRPO: 0.5 + s / 40, M.ROUTE_FRAC_SDPO: 0.4 - s / 40, M.ROUTE_FRAC_FALLBACK: 0.1,
                  M.TEACHER_ENTROPY_MEAN: 1.0 / s})
      if s % 5 == 0:
        m[M.EVAL_ACCURACY] = s / 20
      m[M.TIME_WALL_S] = 70.0 * s  # evaluation and checkpoints on top of the training clock
      w.write(s, m, time_s=60.0 * s)
  M.write_summary(run, {"algo": algo})
  return run


def test_plot_two_runs_png_with_six_axes_and_no_data_panels(tmp_path):
  a = _fake_run(tmp_path, "run_a", "srpo", with_routing=True)
  b = _fake_run(tmp_path, "grpo_b", "grpo", with_routing=False)
  out = str(tmp_path / "curves.png")
  fig = plot.plot_runs([a, b], out)
  with open(out, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  axes = fig.get_axes()
  assert len(axes) == plot.NUM_PANELS == 6
  acc_ax, time_ax, route_ax, entropy_ax = axes[:4]
  assert [line.get_label() for line in acc_ax.get_lines()] == ["run_a (srpo)", "grpo_b"]
  # Accuracy against both clocks, each line saying which: the wall clock solid, the training clock dashed.
  assert [(line.get_label(), line.get_linestyle()) for line in time_ax.get_lines()] == [
      ("run_a (srpo) (wall)", "-"), ("grpo_b (wall)", "-"), ("run_a (srpo) (train)", "--"), ("grpo_b (train)", "--")]
  assert list(time_ax.get_lines()[0].get_xdata()) == [70.0 * 5 / 60, 70.0 * 10 / 60]  # minutes
  assert len(route_ax.get_lines()) == 3  # only run_a logged routing: GRPO, SDPO, fallback
  assert len(entropy_ax.get_lines()) == 1
  # A run directory with none of the keys: every panel says "no data" instead of raising.
  empty = tmp_path / "empty"
  with M.MetricsWriter(str(empty), enabled=True, tensorboard=False) as w:
    w.write(1, {"other": 1.0})
  fig = plot.plot_runs([str(empty)], str(tmp_path / "empty.png"))
  assert all(any(t.get_text() == "no data" for t in ax.texts) for ax in fig.get_axes())


def test_plot_cli(tmp_path):
  a = _fake_run(tmp_path, "run_a", "srpo", with_routing=True)
  out = tmp_path / "cli.png"
  plot.main([a, "--out", str(out)])
  assert out.stat().st_size > 10_000
  with pytest.raises(SystemExit):
    plot.main([str(tmp_path / "missing"), "--out", str(out)])
