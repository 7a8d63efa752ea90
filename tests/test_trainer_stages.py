"""The trainer's stages called with plain inputs: prompt order, rollouts, scoring and routing, teacher prompts, the
prepare program (π_old), the lr of a training step, the EMA teacher, the clocks and the step's metrics.
No trainer, no monkey-patching."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from srpo_jax import batching, methods, metrics as M
from srpo_jax import trainer as T
from srpo_jax.algorithms import losses
from srpo_jax.config import AlgoConfig
from srpo_jax.models.qwen3 import Qwen3Config, init_model
from srpo_jax.rollout.engine import Completion, RolloutEngine
from srpo_jax.tokenizer import load_tokenizer
from srpo_jax.train_step import LossHParams, TokenMaxes, TokenSums, UpdateStats, make_optimizer, make_train_fns

V, PAD = 384, 0


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer()


class ScriptedEngine(RolloutEngine):
  """Returns the scripted responses in order: prompt p, sample j -> responses[p * n + j]."""

  def __init__(self, responses):
    self.responses, self.calls = responses, []

  def generate(self, prompt_token_ids, sampling, n=1):
    self.calls.append((list(map(list, prompt_token_ids)), sampling, n))
    it = iter(self.responses)
    return [[Completion(np.asarray(next(it), np.int32), np.full(3, -0.5, np.float32), "stop") for _ in range(n)]
            for _ in prompt_token_ids]

  def update_weights(self, params, version):
    pass


def test_prompt_rows_cover_each_epoch_once_and_are_deterministic():
  rows = [T.prompt_rows(5, 2, s, seed=3) for s in range(5)]  # 10 positions = 2 epochs of 5 prompts
  flat = sum(rows, [])
  assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:]) == list(range(5))
  assert rows == [T.prompt_rows(5, 2, s, seed=3) for s in range(5)]
  assert flat[:5] != flat[5:] or flat[:5] != list(range(5))  # reshuffled per epoch (seed 3)
  assert sum((T.prompt_rows(5, 2, s, seed=3, shuffle=False) for s in range(3)), []) == [0, 1, 2, 3, 4, 0]


def test_collect_rollouts_groups_and_decodes(tokenizer):
  texts = ["<answer>A</answer>", "<answer>B</answer>", "x", "<answer>C</answer>"]
  engine = ScriptedEngine([tokenizer.encode(t, add_special_tokens=False) for t in texts])
  prompts = [[1, 2], [3], [4, 5, 6]]
  sampling = T.SamplingParams(max_new_tokens=4)
  ro = T.collect_rollouts(engine, prompts, [2, 0], tokenizer, sampling, n=2)
  assert engine.calls[0][0] == [[4, 5, 6], [1, 2]] and engine.calls[0][2] == 2
  assert ro.prompt_rows == [2, 2, 0, 0] and ro.group_ids.tolist() == [0, 0, 1, 1]
  assert ro.texts == texts and ro.finish == ["stop"] * 4


def _rollouts(texts, groups):
  n = len(texts)
  return T.Rollouts(prompt_rows=list(groups), responses=[np.arange(1, 2 + i % 3) for i in range(n)],
                    rollout_logp=[np.full(1 + i % 3, -0.5, np.float32) for i in range(n)], finish=["stop"] * n,
                    texts=list(texts), group_ids=np.asarray(groups))


@pytest.mark.parametrize("method", ["srpo", "grpo_sdpo_all", "grpo"])
def test_score_and_route(method):
  texts = ["A", "B", "B", "A", "B", "B"]  # group 0: one correct; group 1: one correct
  ro = _rollouts(texts, [0, 0, 0, 1, 1, 1])
  reward = lambda text, answer: float(text == answer)
  sc = T.score_and_route(ro, ["A", "A"], reward, AlgoConfig(name=method), seed=0)
  np.testing.assert_array_equal(sc.rewards, [1, 0, 0, 1, 0, 0])
  np.testing.assert_allclose(sc.adv, [2 / 3, -1 / 3, -1 / 3] * 2, rtol=1e-6)
  failed_with_teacher = np.array([0, 1, 1, 0, 1, 1], bool)
  expect_sdpo = {"srpo": failed_with_teacher, "grpo_sdpo_all": failed_with_teacher, "grpo": np.zeros(6, bool)}
  np.testing.assert_array_equal(sc.sdpo, expect_sdpo[method])
  np.testing.assert_array_equal(sc.grpo, ~sc.sdpo)
  np.testing.assert_array_equal(sc.sibling, [-1, 0, 0, -1, 3, 3])
  np.testing.assert_array_equal(sc.has_teacher, [False, True, True, False, True, True])


def _scored(correct, sibling, method):
  """Scored for a group layout: m_i from the siblings, masks from the method (as score_and_route)."""
  correct, sibling = np.asarray(correct, bool), np.asarray(sibling, np.int32)
  grpo, sdpo = methods.get(method).route_masks(correct, sibling >= 0)
  return T.Scored(rewards=correct.astype(np.float32), adv=np.zeros(len(correct), np.float32), grpo=grpo, sdpo=sdpo,
                  sibling=sibling, correct=correct, has_teacher=sibling >= 0)


def test_build_teacher_prompts_only_for_sdpo_rows_and_counts_cuts(tokenizer):
  texts = ["<answer>A</answer>", "nope", "<answer>A</answer> " + "long " * 300]
  ro = _rollouts(texts, [0, 0, 0])
  sc = _scored([True, False, True], [2, 0, 0], "srpo")
  messages = lambda row: [{"role": "user", "content": f"question {row}"}]
  srpo = methods.get("srpo")
  tp, sc1 = T.build_teacher_prompts(ro, sc, messages, tokenizer, 4096, srpo)
  assert list(tp.ids) == [1] and (tp.truncated, tp.over_budget) == (0, 0) and sc1 is sc
  text = tokenizer.decode(tp.ids[1])
  assert "question 0" in text and "Correct solution:" in text and "<answer>A</answer>" in text
  # The sibling of rollout 1 is now the long one; a small budget cuts its solution (and counts it).
  sc.sibling[1] = 2
  tp, _ = T.build_teacher_prompts(ro, sc, messages, tokenizer, 80, srpo)
  assert tp.truncated == 1 and len(tp.ids[1]) <= 80 and tp.over_budget == 0


def test_teacher_budget_is_the_prompt_alone_not_prompt_plus_response(tokenizer):
  """Official max_reprompt_len: the budget bounds the teacher prompt; the student's response comes after it."""
  sibling = "<answer>A</answer> " + "step " * 120
  ro = _rollouts([sibling, "nope"], [0, 0])
  ro.responses[1] = np.arange(1, 3001)  # a 3,000-token student response
  messages = lambda row: [{"role": "user", "content": "question"}]
  full = T.build_teacher_prompts(ro, _scored([True, False], [-1, 0], "srpo"), messages, tokenizer, 10240,
                                 methods.get("srpo"))[0].ids[1]
  budget = len(full) + 10  # the prompt fits; prompt + response (3,000 more tokens) would not
  tp, _ = T.build_teacher_prompts(ro, _scored([True, False], [-1, 0], "srpo"), messages, tokenizer, budget,
                                  methods.get("srpo"))
  assert tp.truncated == 0 and tp.ids[1] == full  # the old budget (10 tokens left after the response) cut it


@pytest.mark.parametrize("method", ["srpo", "sdpo", "advantage_mix", "grpo_sdpo_all"])
def test_template_over_budget_reroutes_through_the_method_and_is_counted(tokenizer, method):
  """A question longer than the budget leaves no room for any solution: no teacher information for that rollout."""
  texts = ["<answer>A</answer>", "<answer>A</answer>", "nope", "<answer>A</answer>", "nope"]
  ro = _rollouts(texts, [0, 0, 0, 1, 1])
  long_q = "why " * 200  # prompt row 0's question alone is over the budget; row 1's is short
  messages = lambda row: [{"role": "user", "content": long_q if row == 0 else "short question"}]
  sc = _scored([True, True, False, True, False], [1, 0, 0, -1, 3], method)  # sdpo etc. also route rows 0, 1
  tp, sc2 = T.build_teacher_prompts(ro, sc, messages, tokenizer, 100, methods.get(method))
  sdpo_rows = set(np.flatnonzero(sc.sdpo))
  rerouted = {i for i in sdpo_rows if i < 3}  # group 0 (the long question)
  assert tp.over_budget == len(rerouted) > 0
  assert set(tp.ids) == sdpo_rows - rerouted  # no teacher sequence for a re-routed rollout (old code: one for each)
  assert set(np.flatnonzero(sc2.sdpo)) == set(tp.ids)
  has_teacher = sc.has_teacher.copy()
  has_teacher[sorted(rerouted)] = False
  np.testing.assert_array_equal(sc2.has_teacher, has_teacher)
  assert (sc2.sibling[sorted(rerouted)] == -1).all()
  grpo, sdpo = methods.get(method).route_masks(sc.correct, has_teacher)
  np.testing.assert_array_equal(sc2.grpo, grpo)
  np.testing.assert_array_equal(sc2.sdpo, sdpo)
  if method == "srpo":  # failed rollouts without teacher information take the GRPO fallback
    np.testing.assert_array_equal(sc2.grpo, [True, True, True, True, False])
  for i in tp.ids:
    assert len(tp.ids[i]) <= 100


def _tiny():
  model = init_model(Qwen3Config.preset("tiny", vocab_size=V, hidden_size=32, intermediate_size=64, head_dim=8), seed=1)
  return nnx.split(model)


def test_prepare_gives_pi_old_in_chunks_and_cut_groups():
  graphdef, params = _tiny()
  opt, _ = make_optimizer(1e-3, warmup_steps=0)
  fns = make_train_fns(graphdef, opt, LossHParams(tile_size=8))
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(1, V, rng.integers(3, 9))) for _ in range(6)]
  responses = [rng.integers(1, V, k) for k in (3, 0, 5, 2, 4, 1)]  # row 1 is empty
  ro = T.Rollouts(prompt_rows=list(range(6)), responses=responses,
                  rollout_logp=[np.full(len(r), -1.0, np.float32) for r in responses], finish=["stop"] * 6,
                  texts=[""] * 6, group_ids=np.zeros(6, int))
  batch = T.assemble(ro, prompts, PAD)
  old = T.prepare(fns, params, batch, [[0, 1, 2], [3, 4, 5]], PAD)
  # Ragged groups cut to their own shapes (token budgets) give the same π_old.
  cut = T.prepare(fns, params, batch, [[5, 0], [1, 2, 3, 4]], PAD, cut=True)
  np.testing.assert_allclose(cut, old, atol=1e-5)
  # π_old: the student's own log-probs of the sampled tokens (full-logits reference).
  model = nnx.merge(graphdef, params)
  r_len = batch.resp.shape[1]
  pos = np.clip(batch.start[:, None] + np.arange(r_len), 0, batch.ids.shape[1] - 1)
  full = np.asarray(jax.nn.log_softmax(model(jnp.asarray(batch.ids), jnp.asarray(batch.mask))))
  full = np.take_along_axis(full, np.maximum(pos - 1, 0)[..., None], 1)
  ref_logp = np.take_along_axis(full, np.take_along_axis(batch.ids, pos, 1)[..., None], -1)[..., 0]
  np.testing.assert_allclose(old[batch.resp], ref_logp[batch.resp], atol=1e-5)


def _stats(loss, grad_norm, dw_scale=1.0, maxes=None, **sums):
  zero = {f: 0.0 for f in TokenSums._fields}
  mx = dict(roll_is=sums.get("roll_is", 0.0) / 2, logp=-0.1, mismatch=0.0, dw_unnorm=-np.inf, dw_unnorm_neg=-np.inf)
  return UpdateStats(loss=loss, grad_norm=grad_norm, finite=True, sums=TokenSums(**{**zero, **sums}),
                     maxes=TokenMaxes(**{**mx, **(maxes or {})}), dw_scale=dw_scale)


def test_update_metrics_are_token_means_over_all_optimizer_steps():
  a = _stats(1.0, 2.0, tokens=10, grpo_tokens=4, sdpo_tokens=6, grpo_loss=2.0, sdpo_loss=3.0, jsd=1.2,
             clip_frac=1.0, dual_clip_frac=0.0, approx_kl=0.4, ratio=4.0, roll_is=10.0, entropy=5.0)
  b = _stats(3.0, 4.0, tokens=6, grpo_tokens=6, sdpo_tokens=0, grpo_loss=1.0, clip_frac=2.0, dual_clip_frac=1.0,
             approx_kl=0.6, ratio=6.0, roll_is=6.0, entropy=3.0)
  m = T.update_metrics([a, b])
  assert m[M.LOSS] == 2.0 and m[M.OPTIM_GRAD_NORM] == 3.0
  assert m[M.LOSS_GRPO] == pytest.approx(0.3) and m[M.LOSS_SDPO] == pytest.approx(0.5)
  assert m[M.SDPO_JSD] == pytest.approx(0.2) and m[M.POLICY_ENTROPY] == pytest.approx(0.5)
  assert m[M.GRPO_CLIP_FRAC] == pytest.approx(0.3) and m[M.GRPO_DUAL_CLIP_FRAC] == pytest.approx(0.1)
  assert m[M.GRPO_APPROX_KL] == pytest.approx(0.1) and m[M.GRPO_RATIO_MEAN] == pytest.approx(1.0)
  assert m[M.ROLLOUT_IS_WEIGHT_MEAN] == pytest.approx(1.0) and m[M.ROLLOUT_IS_WEIGHT_MAX] == 5.0


def test_step_metrics_route_fractions_logp_mismatch_and_dw():
  ro = _rollouts(["a"] * 4, [0, 0, 1, 1])
  sc = T.Scored(rewards=np.array([1, 0, 0, 0], np.float32), adv=np.zeros(4, np.float32),
                grpo=np.array([True, False, True, True]), sdpo=np.array([False, True, False, False]),
                sibling=np.array([-1, 0, -1, -1], np.int32), correct=np.array([True, False, False, False]),
                has_teacher=np.array([False, True, False, False]))
  m = T.step_metrics(ro, sc, [_stats(1.0, 1.0, tokens=4, mismatch=1.0, maxes=dict(mismatch=0.5))], rollout_time_s=2.0)
  assert (m[M.ROUTE_FRAC_GRPO], m[M.ROUTE_FRAC_SDPO], m[M.ROUTE_FRAC_FALLBACK]) == (0.25, 0.25, 0.5)
  assert m[M.ROLLOUT_LOGP_MISMATCH_ABS] == pytest.approx(0.25) and m[M.ROLLOUT_LOGP_MISMATCH_MAX] == 0.5
  assert m[M.TRAIN_ACCURACY] == 0.25
  assert m[M.ROLLOUT_TOKENS_PER_S] == sum(len(r) for r in ro.responses) / 2.0
  assert M.DW_MEAN not in m and M.TEACHER_ENTROPY_MEAN not in m
  # DW: exp(−βH) sums and extremes of each optimizer step, times that step's normaliser |Ω| / Σ exp(−βH).
  a = _stats(1.0, 1.0, tokens=4, sdpo_tokens=4, teacher_entropy=8.0, dw_unnorm=2.0, dw_scale=2.0,
             maxes=dict(dw_unnorm=0.8, dw_unnorm_neg=-0.2))
  b = _stats(1.0, 1.0, tokens=2, sdpo_tokens=2, teacher_entropy=1.0, dw_unnorm=1.0, dw_scale=2.0,
             maxes=dict(dw_unnorm=0.6, dw_unnorm_neg=-0.4))
  m = T.update_metrics([a, b])
  assert m[M.TEACHER_ENTROPY_MEAN] == pytest.approx(1.5) and m[M.DW_MEAN] == pytest.approx(1.0)
  assert m[M.DW_MIN] == pytest.approx(0.4) and m[M.DW_MAX] == pytest.approx(1.6)


def test_lr_warms_up_over_training_steps_constant_within_a_step():
  """verl steps its scheduler once per training step: GRPO's 4 optimizer steps per training step share one lr, and
  the 10-step warm-up ends at training step 10, not 2.5."""
  opt, schedule = make_optimizer(1.0, warmup_steps=10, weight_decay=0.0, grad_clip=None)
  params = {"w": jnp.zeros(3)}
  grads = {"w": jnp.ones(3)}
  state = opt.init(params)
  for step in range(13):
    state = T.set_lr(state, float(schedule(step)))
    for _ in range(4):  # Adam on a constant gradient: each update is -lr (to fp32 bias-correction rounding)
      updates, state = opt.update(grads, state, params)
      np.testing.assert_allclose(-np.asarray(updates["w"]), min(step / 10, 1.0), rtol=1e-4, atol=1e-7)
    assert T.current_lr(state) == pytest.approx(min(step / 10, 1.0))  # the lr the step used, as logged


def test_lr_of_a_skipped_step_stays_in_the_state():
  """A non-finite step keeps the old optimizer state (train_step.update) and with it the lr it was given."""
  opt, schedule = make_optimizer(2.0, warmup_steps=4)
  state = T.set_lr(opt.init({"w": jnp.zeros(2)}), float(schedule(3)))
  assert T.current_lr(state) == pytest.approx(1.5)
  assert T.current_lr(T.set_lr(state, float(schedule(9)))) == 2.0


def _tree(x):
  return {"a": jnp.full((2,), x, jnp.float32), "b": jnp.full((3,), x, jnp.float32)}


@pytest.mark.parametrize("finite,moved", [((False, False), False), ((False, True), True), ((True,), True)])
def test_ema_teacher_only_after_a_policy_update(finite, moved):
  """θ_T moves only when at least one optimizer step of the training step was applied (official code)."""
  fns = T.TrainFns(prepare=None, accumulate=None, apply=None,
                   ema=jax.jit(lambda t, p, rate: jax.tree.map(lambda a, b: (1 - rate) * a + rate * b, t, p)))
  stats = [_stats(1.0, 1.0)._replace(finite=np.bool_(f)) for f in finite]
  teacher, did = T.ema_teacher(fns, _tree(0.0), _tree(1.0), stats, methods.get("srpo"), 0.05)
  assert did == moved
  np.testing.assert_allclose(teacher["a"], 0.05 if moved else 0.0, rtol=1e-6)
  # GRPO has no teacher: never updated.
  assert T.ema_teacher(fns, _tree(0.0), _tree(1.0), stats, methods.get("grpo"), 0.05)[1] is False


def test_clocks_exclude_evaluation_from_the_training_clock_and_carry_offsets():
  now = [100.0]
  clocks = T.Clocks(wall_offset_s=50.0, train_offset_s=40.0, now=lambda: now[0])
  now[0] += 3.0  # training
  with clocks.excluded():  # evaluation
    now[0] += 5.0
  now[0] += 2.0
  assert clocks.wall_s() == pytest.approx(60.0) and clocks.train_s() == pytest.approx(45.0)
