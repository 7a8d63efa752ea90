"""The trainer's side of issue 14 (items 1-7, 17) on the tiny config with 0-2 steps: a resume that falls back from a
corrupt newest checkpoint, validates the meta record and checks its config (and continues the stored data
position), nothing non-finite saved / EMA'd / exported, a non-finite reward named, one step-0 evaluation after a
kill, export leftovers removed, and the run directory's lock."""
import json
import logging
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srpo_jax import checkpointing as C
from srpo_jax import metrics as M
from srpo_jax import trainer as trainer_lib
from srpo_jax.rollout.engine import Completion, RolloutEngine
from srpo_jax.tokenizer import load_tokenizer
from tests.e2e_utils import coin_reward, coin_task, fast_config


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer()


class ConstEngine(RolloutEngine):
  """Every sample is the same 3 tokens (no sampler to compile: these tests are about the loop, not the samples)."""

  def generate(self, prompt_token_ids, sampling, n=1):
    return [[Completion(np.array([11, 12, 13], np.int32), np.full(3, -0.5, np.float32), "stop") for _ in range(n)]
            for _ in prompt_token_ids]

  def update_weights(self, params, version):
    pass


def _trainer(run_dir, tokenizer, reward=coin_reward, **overrides):
  cfg = fast_config(run_dir, **{"algo.name": "grpo", **overrides})
  return trainer_lib.Trainer(cfg, tokenizer=tokenizer, task=coin_task(cfg, tokenizer, reward=reward),
                             engine=ConstEngine())


def _flip_bytes(step_dir):
  files = [os.path.join(d, n) for d, _, ns in os.walk(os.path.join(step_dir, "state")) for n in ns]
  data = max(files, key=os.path.getsize)
  raw = bytearray(open(data, "rb").read())
  for i in range(len(raw) // 2, min(len(raw), len(raw) // 2 + 64)):
    raw[i] ^= 0xFF
  open(data, "wb").write(bytes(raw))


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory, tokenizer):
  """A finished 2-step srpo run (checkpoints 1 and 2), copied by each test that damages it."""
  run_dir = tmp_path_factory.mktemp("two_steps") / "run"
  _trainer(run_dir, tokenizer, **{"train.steps": 2}).run()
  return run_dir


def _copy(src, dst):
  import shutil
  shutil.copytree(src, dst)
  os.remove(os.path.join(dst, C.LOCK_FILE))
  return dst


# ---------------------------------------------------------------------------------------------------------------------
# Items 1-3: corrupt newest checkpoint -> the intact older one, reported by path; meta validation.
# ---------------------------------------------------------------------------------------------------------------------
def test_resume_falls_back_from_a_corrupt_newest_checkpoint(two_steps, tmp_path, tokenizer, caplog):
  run_dir = _copy(two_steps, tmp_path / "run")
  step2 = os.path.join(run_dir, "checkpoints", "2")
  _flip_bytes(step2)
  with caplog.at_level(logging.WARNING, logger="srpo_jax"):
    tr = _trainer(run_dir, tokenizer, **{"train.steps": 2, "resume": True})
  assert tr.step == 1 and tr.state.data_position == 2
  assert step2 in caplog.text and "SHA-256" in caplog.text
  # The corrupt copy is kept aside (the resumed run saves step 2 afresh: test_checkpoint_integrity); the metrics
  # after the restored step are dropped.
  assert sorted(os.listdir(os.path.join(run_dir, "checkpoints.bad")))[0].startswith("2-")
  assert tr.checkpointer.all_steps() == [1]
  assert [r["step"] for r in M.read_metrics(str(run_dir))] == [0, 1]
  tr.close()


def _good_meta(step=3):
  return {"step": step, "data_position": 6, "nonfinite_in_row": 0, "counters": {"nonfinite_steps": 0},
          "best_acc": 0.5, "initial_acc": 0.25, "final_acc": None, "wall_time_s": 10.0, "train_time_s": 8.0,
          "seed": 0, "config": {}}


@pytest.mark.parametrize("change, match", [
    (lambda m: m.pop("counters"), r"meta\.counters is missing"),
    (lambda m: m.update(step=2), r"meta\.step=2 disagrees with its directory \(step 3\)"),
    (lambda m: m.update(data_position=-1), r"meta\.data_position=-1 is not a non-negative integer"),
    (lambda m: m.update(best_acc=float("inf")), r"meta\.best_acc=inf is neither null nor a finite number"),
    (lambda m: m.update(counters={"nonfinite_steps": "x"}), r"meta\.counters="),
    (lambda m: m.update(wall_time_s=None), r"meta\.wall_time_s=None"),
    (lambda m: m.update(config=[]), r"meta\.config is a list"),
])
def test_validate_meta_names_the_key(change, match):
  trainer_lib.validate_meta(_good_meta(), 3, "/x/3")
  meta = _good_meta()
  change(meta)
  with pytest.raises(C.CorruptCheckpoint, match=match) as e:
    trainer_lib.validate_meta(meta, 3, "/x/3")
  assert "'/x/3'" in str(e.value)


def test_a_meta_record_that_fails_validation_falls_back(two_steps, tmp_path, tokenizer):
  """Meta written wrong (by a buggy writer: the integrity record matches it): the older checkpoint is used."""
  run_dir = _copy(two_steps, tmp_path / "run")
  ck = C.Checkpointer(os.path.join(run_dir, "checkpoints"))
  meta = ck.read_meta(2)
  del meta["counters"]
  step2 = ck.step_dir(2)
  ck.close()
  (meta_file,) = [os.path.join(d, n) for d, _, ns in os.walk(os.path.join(step2, "meta")) for n in ns
                  if n == "metadata"]
  json.dump(meta, open(meta_file, "w"))
  C._write_integrity(step2, 2)
  tr = _trainer(run_dir, tokenizer, **{"train.steps": 2, "resume": True})
  assert tr.step == 1
  tr.close()


# ---------------------------------------------------------------------------------------------------------------------
# Item 4: a resume checks its config; the stored data position is continued when allowed.
# ---------------------------------------------------------------------------------------------------------------------
def test_resume_with_a_changed_config_lists_fields_and_refuses(two_steps, tmp_path, tokenizer, monkeypatch):
  run_dir = _copy(two_steps, tmp_path / "run")
  changed = {"train.steps": 3, "resume": True, "rollout.prompts_per_step": 4, "seed": 5}
  with pytest.raises(C.ConfigChanged) as e:
    _trainer(run_dir, tokenizer, **changed)
  msg = str(e.value)
  assert "rollout.prompts_per_step: 2 -> 4" in msg and "seed: 0 -> 5" in msg
  assert os.path.join(run_dir, "checkpoints", "2") in msg and "checkpoint.allow_config_change" in msg
  # Harmless changes (more steps, another eval cadence, keep) resume silently.
  _trainer(run_dir, tokenizer, **{"train.steps": 3, "resume": True, "eval.every_steps": 1,
                                  "checkpoint.keep": 2}).close()

  tr = _trainer(run_dir, tokenizer, **changed, **{"checkpoint.allow_config_change": True})
  assert tr.step == 2 and tr.state.data_position == 4  # 2 steps × 2 prompts, not step × 4

  class Read(Exception):
    pass

  def collect(engine, prompt_ids, rows, *a, **k):
    raise Read(rows)
  monkeypatch.setattr(trainer_lib, "collect_rollouts", collect)
  with pytest.raises(Read) as e:
    tr.train_step(tr.step)
  # The step after the resume reads data positions 4..7 (step × 4 would start at 8) under the new seed's order.
  assert e.value.args[0] == trainer_lib.prompt_rows(16, 4, 0, 5, start=4) != trainer_lib.prompt_rows(16, 4, 2, 5)
  assert tr.state.data_position == 4  # a step that did not get its rollouts consumed nothing
  tr.close()


# ---------------------------------------------------------------------------------------------------------------------
# Items 5-6: nothing non-finite is saved, EMA'd or exported; a non-finite reward is named.
# ---------------------------------------------------------------------------------------------------------------------
def test_nonfinite_parameters_are_not_saved_exported_or_emad(tmp_path, tokenizer, monkeypatch):
  tr = _trainer(tmp_path / "run", tokenizer, **{"train.steps": 1})
  tr.state.params = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan) if x.ndim else x, tr.state.params)
  with pytest.raises(C.NonFiniteError, match=r"refusing to save checkpoint 0 .*: params\.\S+ holds 1 NaN/inf"):
    tr.save()
  assert tr.checkpointer.all_steps() == []
  with pytest.raises(C.NonFiniteError, match=r"refusing to export .*hf_final at step 0: params\."):
    tr.export(os.path.join(tmp_path, "run", "hf_final"))
  assert not os.path.exists(os.path.join(tmp_path, "run", "hf_final"))
  # An update that produced NaN (the update itself is test_train_step's): nothing reaches the teacher or the engine.
  nan_params = tr.state.params
  tr.state.params = jax.tree.map(jnp.zeros_like, nan_params)
  monkeypatch.setattr(trainer_lib, "prepare", lambda *a, **k: None)
  monkeypatch.setattr(trainer_lib, "run_updates", lambda fns, st, *a, **k: (nan_params, st.opt_state, [], 0.0))
  teacher = [np.asarray(x) for x in jax.tree.leaves(tr.state.teacher)]
  with pytest.raises(C.NonFiniteError, match=r"training step 0: the parameters after the update are not finite"):
    tr.train_step(0)
  for a, b in zip(teacher, jax.tree.leaves(tr.state.teacher)):  # the teacher never saw them
    np.testing.assert_array_equal(a, np.asarray(b))
  tr.close()


def test_nonfinite_reward_is_named_not_a_json_error(tmp_path, tokenizer):
  def inf_reward(text, answer):
    return math.inf
  tr = _trainer(tmp_path / "run", tokenizer, reward=inf_reward, **{"train.steps": 0})
  with pytest.raises(ValueError, match=r"evaluation at step 0: the reward .*inf_reward of data.task='synthetic' "
                                       r"returned non-finite values \(eval accuracy = mean reward = inf\)"):
    tr.run()


# ---------------------------------------------------------------------------------------------------------------------
# Item 7: one step-0 evaluation after kills; export leftovers removed.
# ---------------------------------------------------------------------------------------------------------------------
def test_kill_before_the_first_checkpoint_leaves_one_step0_evaluation(tmp_path, tokenizer):
  run_dir = tmp_path / "run"
  os.makedirs(run_dir)
  killed = json.dumps({"step": 0, "time_s": 0.0, M.EVAL_ACCURACY: 0.125})
  (run_dir / M.METRICS_FILE).write_text(killed + "\n" + killed + "\n")  # two killed attempts' step-0 rows
  _trainer(run_dir, tokenizer, **{"train.steps": 0, "resume": True}).run()
  steps = [r["step"] for r in M.read_metrics(str(run_dir))]
  assert steps == [0]


def test_interrupted_export_leftovers_are_removed_at_start(tmp_path, tokenizer):
  run_dir = tmp_path / "run"
  for d in (".tmp-export-abc", "weights/.tmp-export-x1", "weights/.tmp-old-y2/x", "hf_best", "weights/3"):
    os.makedirs(run_dir / d)
    (run_dir / d / "f").write_bytes(b"x")
  _trainer(run_dir, tokenizer, **{"train.steps": 0}).close()
  assert sorted(os.listdir(run_dir / "weights")) == ["3"]
  assert not (run_dir / ".tmp-export-abc").exists() and (run_dir / "hf_best" / "f").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Item 17: a second run on the same run_dir.
# ---------------------------------------------------------------------------------------------------------------------
def test_second_trainer_on_a_held_run_dir_names_the_holder_and_touches_nothing(tmp_path, tokenizer):
  run_dir = tmp_path / "run"
  os.makedirs(run_dir / ".tmp-export-live")  # the other run's export in progress
  holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
      import sys, time
      from srpo_jax.checkpointing import RunDirLock
      RunDirLock(sys.argv[1]); print("LOCKED", flush=True); time.sleep(120)
  """), str(run_dir)], stdout=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    assert holder.stdout.readline().strip() == "LOCKED"
    with pytest.raises(C.RunDirInUse, match=rf"pid {holder.pid} on host"):
      _trainer(run_dir, tokenizer, **{"train.steps": 0})
    assert (run_dir / ".tmp-export-live").exists()
  finally:
    holder.kill()
    holder.wait()
