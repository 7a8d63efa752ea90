"""End to end: every method trains a few steps on the tiny config; non-finite steps (and the EMA teacher after them);
the lr of each training step; evaluation off the training clock."""
import json
import math
import os
import time

import jax
import numpy as np
import pytest

from srpo_jax import metrics as M
from srpo_jax import trainer as trainer_lib
from srpo_jax.tokenizer import load_tokenizer
from srpo_jax import methods
from tests.e2e_utils import coin_reward, coin_task, fast_config


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer()


def _records(run_dir):
  return M.read_metrics(str(run_dir))


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("method", methods.NAMES)
def test_method_runs_end_to_end(method, tmp_path, tokenizer):
  cfg = fast_config(tmp_path, **{"algo.name": method})
  # The coin reward gives mixed groups, so every branch of the routing is exercised.
  tr = trainer_lib.Trainer(cfg, tokenizer=tokenizer, task=coin_task(cfg, tokenizer))
  params0, teacher0 = _leaves(tr.params), _leaves(tr.teacher)
  summary = tr.run()

  recs = [r for r in _records(tmp_path) if r["step"] > 0]
  assert [r["step"] for r in recs] == [1, 2]
  for r in recs:
    assert math.isfinite(r[M.LOSS]) and r[M.OPTIM_GRAD_NORM] > 0
    fr = r[M.ROUTE_FRAC_GRPO] + r[M.ROUTE_FRAC_SDPO] + r[M.ROUTE_FRAC_FALLBACK]
    assert r[M.POLICY_LOGP_MAX] <= 0.0
    if method == "grpo":
      assert r[M.ROUTE_FRAC_SDPO] == 0 and fr == pytest.approx(1.0)
    if method in ("srpo", "srpo_no_dw", "grpo_sdpo_all"):
      assert fr == pytest.approx(1.0)
    if method == "sdpo":
      assert r[M.ROUTE_FRAC_GRPO] == 0 and r[M.ROUTE_FRAC_FALLBACK] == 0
  assert any(r[M.ROUTE_FRAC_SDPO] > 0 for r in recs) == (method != "grpo")
  for r in recs:
    assert 0.0 <= r[M.GRPO_DUAL_CLIP_FRAC] <= 1.0 and math.isfinite(r[M.GRPO_APPROX_KL])
  assert any(M.DW_MEAN in r for r in recs) == (method == "srpo")
  for r in recs:
    if M.DW_MEAN in r:
      assert r[M.DW_MEAN] == pytest.approx(1.0, abs=1e-5) and r[M.DW_MIN] <= 1.0 <= r[M.DW_MAX]
  # Parameters moved; the EMA teacher moved too (every method but GRPO), by 5% of the way.
  assert any(not np.array_equal(a, b) for a, b in zip(params0, _leaves(tr.params)))
  teacher_moved = any(not np.array_equal(a, b) for a, b in zip(teacher0, _leaves(tr.teacher)))
  assert teacher_moved == (method != "grpo")
  assert summary["steps"] == 2 and summary["initial_eval_accuracy"] is not None
  saved = json.load(open(os.path.join(tmp_path, M.SUMMARY_FILE)))
  assert saved["final_eval_accuracy"] == summary["final_eval_accuracy"]
  assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints")))[-1] == "2"


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, tokenizer):
  cfg = fast_config(tmp_path, **{"algo.name": "srpo", "train.steps": 5, "train.max_nonfinite_in_row": 2})
  # The step-0 evaluation and training step 1 score healthy rewards; every reward after that is NaN (so are the
  # advantages and the loss).
  healthy = cfg.eval.max_questions * cfg.eval.n_samples + cfg.rollout.prompts_per_step * cfg.rollout.n
  calls = {"n": 0}

  def poisoned(text, answer):
    calls["n"] += 1
    return coin_reward(text, answer) if calls["n"] <= healthy else float("nan")

  tr = trainer_lib.Trainer(cfg, tokenizer=tokenizer, task=coin_task(cfg, tokenizer, reward=poisoned))
  with pytest.raises(trainer_lib.TrainingAborted, match="2 non-finite steps in a row"):
    tr.run()
  recs = {r["step"]: r for r in _records(tmp_path) if r["step"] > 0}
  assert recs[1][M.TRAIN_NONFINITE_STEPS] == 0 and recs[2][M.TRAIN_NONFINITE_STEPS] == 1
  # The last good checkpoint (step 1) is intact and finite; skipped steps did not change the parameters.
  from srpo_jax.checkpointing import Checkpointer
  ck = Checkpointer(cfg.checkpoint_dir)
  assert ck.latest_step() == 2
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tr.state.arrays())
  s1, _ = ck.restore(1, abstract)
  s2, _ = ck.restore(2, abstract)
  for a, b in zip(_leaves(s1["params"]), _leaves(s2["params"])):
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
  # The policy did not update at step 2, so neither did the EMA teacher (official code; it used to move toward θ).
  for a, b in zip(_leaves(s1["teacher"]), _leaves(s2["teacher"])):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(_leaves(s1["teacher"]), _leaves(s1["params"])))


class _SlowEvalTrainer(trainer_lib.Trainer):
  """Every evaluation takes 1 s and scores 0.5."""

  def evaluate(self, step):
    time.sleep(1.0)
    return {M.EVAL_ACCURACY: 0.5, M.EVAL_TIME_S: 1.0}


def test_lr_per_training_step_and_evaluation_off_the_training_clock(tmp_path, tokenizer):
  # GRPO's mini-batches as verl's balance_batch cuts them (2 workers): the update path the paper config takes.
  cfg = fast_config(tmp_path, **{"algo.name": "grpo", "train.steps": 3, "optim.warmup_steps": 2, "optim.lr": 1e-3,
                                 "eval.every_steps": 1, "optim.balance_batch": True, "optim.balance_batch_ranks": 2})
  assert cfg.optimizer_steps_per_step == 2
  summary = _SlowEvalTrainer(cfg, tokenizer=tokenizer, task=coin_task(cfg, tokenizer)).run()
  recs = {r["step"]: r for r in _records(tmp_path)}
  # Training step s (record s + 1) runs both its optimizer steps at lr · min(s / 2, 1); counting optimizer steps
  # instead, the first record would report lr · 2 / 2.
  assert [recs[s][M.OPTIM_LR] for s in (1, 2, 3)] == pytest.approx([0.0, 5e-4, 1e-3])
  # Step 0 and each of the 3 steps evaluated (1 s each): on the wall clock only.
  for s, r in recs.items():
    assert r[M.TIME_WALL_S] - r["time_s"] >= (s + 1) * 1.0 - 0.05, (s, r)
    assert r["time_s"] < r[M.TIME_WALL_S]
  assert summary[M.SUMMARY_WALL_TIME_S] - summary[M.SUMMARY_TRAIN_TIME_S] >= 4.0 - 0.05
  # The paper's metric on both clocks, named by clock.
  assert summary == {**summary, **M.best_within_budgets(recs.values(), cfg.train.time_budgets_h)}
  longest = max(cfg.train.time_budgets_h)  # far more than this run's seconds: every evaluation is inside it
  assert summary[M.budget_key(longest, "wall")] == summary[M.budget_key(longest, "train")] == 0.5


def test_token_budget_micro_batches_train_end_to_end(tmp_path, tokenizer):
  """optim.micro_batch_tokens: length-sorted micro-batches under a per-device token budget, padding logged."""
  cfg = fast_config(tmp_path, **{"algo.name": "srpo", "optim.micro_batch_tokens": 256, "train.steps": 1})
  tr = trainer_lib.Trainer(cfg, tokenizer=tokenizer, task=coin_task(cfg, tokenizer))
  tr.run()
  (rec,) = [r for r in _records(tmp_path) if r["step"] == 1]
  assert math.isfinite(rec[M.LOSS]) and rec[M.OPTIM_GRAD_NORM] > 0
  assert 0.0 <= rec[M.BATCH_PADDING_FRAC] < 1.0


def test_an_injected_model_is_placed_on_the_mesh(tmp_path, tokenizer):
  """Trainer(model=..., mesh=...): the injected model's parameters go on the mesh by the logical-axis rules, where
  every jitted program declares them (a process-local model would not fit a multi-process mesh's programs)."""
  from jax.sharding import NamedSharding
  from srpo_jax import sharding
  from srpo_jax.models.qwen3 import Qwen3Config, init_model
  cfg = fast_config(tmp_path, **{"train.steps": 0})
  mesh = sharding.make_mesh(1, 1, 1)
  model = init_model(Qwen3Config.preset("tiny"), seed=3)
  tr = trainer_lib.Trainer(cfg, tokenizer=tokenizer, mesh=mesh, task=coin_task(cfg, tokenizer), model=model)
  try:
    want = sharding.state_shardings(tr.params, mesh)
    got = jax.tree.map(lambda x: x.sharding, tr.params)
    assert all(isinstance(s, NamedSharding) and s.mesh == mesh for s in jax.tree.leaves(got))
    assert jax.tree.leaves(got) == jax.tree.leaves(want)
  finally:
    tr.close()
