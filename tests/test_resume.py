"""Exact resume with real processes: a run of N steps, and a run SIGKILLed after a checkpoint then resumed, end
with bitwise-identical parameters, optimizer state and teacher (CPU)."""
import os
import signal
import time

import numpy as np
import orbax.checkpoint as ocp
import jax

from srpo_jax import metrics as M
from tests.e2e_utils import start_driver

STEPS = 4


def _start(run_dir, resume):
  return start_driver(run_dir, STEPS, resume)


def _state(run_dir, step):
  tree = ocp.PyTreeCheckpointer().restore(os.path.join(run_dir, "checkpoints", str(step), "state"))
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
  full, killed = tmp_path / "full", tmp_path / "killed"
  a = _start(full, resume=False)
  b = _start(killed, resume=False)
  ckpt = killed / "checkpoints" / "2"
  deadline = time.time() + 600
  while not ckpt.exists() and b.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert ckpt.exists(), b.communicate()[0].decode()[-3000:]
  b.send_signal(signal.SIGKILL)
  b.wait()
  assert b.returncode == -signal.SIGKILL
  assert not (killed / M.SUMMARY_FILE).exists(), "the run finished before it was killed: the test proves nothing"

  out_a = a.communicate(timeout=600)[0].decode()
  assert a.returncode == 0, out_a[-3000:]
  c = _start(killed, resume=True)
  out_c = c.communicate(timeout=600)[0].decode()
  assert c.returncode == 0, out_c[-3000:]
  assert "start step 0" in out_a and ("start step 2" in out_c or "start step 3" in out_c), out_c[-2000:]

  want, got = _state(full, STEPS), _state(killed, STEPS)
  assert len(want) == len(got) > 0
  for x, y in zip(want, got):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)
  # The resumed run's metrics file has each step once, in order, and the same numbers.
  steps = [r["step"] for r in M.read_metrics(str(killed))]
  assert steps == sorted(set(steps)) and steps[-1] == STEPS
  ref = {r["step"]: r for r in M.read_metrics(str(full))}
  for r in M.read_metrics(str(killed)):
    for k in (M.TRAIN_REWARD_MEAN, M.LOSS, M.EVAL_ACCURACY, M.OPTIM_LR):
      if k in r:
        assert r[k] == ref[r["step"]][k], (r["step"], k)
  # Both clocks continue across the resume (checkpoint meta); evaluation counts on the wall clock only.
  recs = M.read_metrics(str(killed))
  train, wall = [r["time_s"] for r in recs], [r[M.TIME_WALL_S] for r in recs]
  assert train == sorted(train) and wall == sorted(wall)
  assert all(t <= w for t, w in zip(train, wall)) and wall[-1] - train[-1] > 0


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  run_dir = tmp_path / "term"
  p = start_driver(run_dir, 50, resume=False)
  first = run_dir / "checkpoints" / "1"
  deadline = time.time() + 600
  while not first.exists() and p.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert first.exists(), p.communicate()[0].decode()[-3000:]
  p.send_signal(signal.SIGTERM)
  out = p.communicate(timeout=300)[0].decode()
  assert p.returncode == 0, out[-3000:]
  steps = sorted(int(d) for d in os.listdir(run_dir / "checkpoints") if d.isdigit())
  summary = M.read_summary(str(run_dir))
  # Stopped early, at a step boundary, with that step checkpointed and reported.
  assert 1 <= summary["steps"] < 50 and steps[-1] == summary["steps"]
