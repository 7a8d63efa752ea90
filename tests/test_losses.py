"""SRPO / GRPO / SDPO losses: JAX vs the PyTorch reference written from the spec, TRL, identities, accumulation."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from srpo_jax import methods
from srpo_jax.algorithms import advantages, losses, routing
from tests import torch_ref_losses as ref

jax.config.update("jax_default_matmul_precision", "highest")
TOL = 1e-5


def _close(jax_value, torch_value, tol=TOL):
  """Max abs difference relative to the reference's scale (at least 1)."""
  a = np.asarray(jax_value, np.float64)
  b = torch_value.detach().double().numpy() if isinstance(torch_value, torch.Tensor) else np.asarray(torch_value)
  scale = max(1.0, float(np.max(np.abs(b))) if b.size else 1.0)
  err = float(np.max(np.abs(a - b))) if b.size else 0.0
  assert err <= tol * scale, f"max abs diff {err:.3e} > {tol} * {scale:.3g}"


def _logits(seed, shape, scale=3.0):
  return np.asarray(jax.random.normal(jax.random.key(seed), shape) * scale, np.float32)


def _jsd_value_and_grad_jax(s, t, **kw):
  fn = lambda x: losses.topk_jsd(x, jnp.asarray(t), **kw)
  weights = jnp.linspace(0.5, 1.5, int(np.prod(s.shape[:-1]))).reshape(s.shape[:-1])
  value = fn(jnp.asarray(s))
  grad = jax.grad(lambda x: jnp.sum(weights * fn(x)))(jnp.asarray(s))
  return value, grad, torch.tensor(np.asarray(weights))


# ---------------------------------------------------------------------------------------------------------------
# Top-k JSD.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("add_tail,temperature", [(True, 0.7), (False, 1.0)])
def test_topk_jsd_matches_torch(alpha, add_tail, temperature):
  # Scale 1.5: with much sharper logits the top-20 holds 1 - 1e-5 of the mass and the tail log-prob's float32
  # cancellation (in torch float32 as much as here) dominates the comparison with the float64 reference.
  s, t = _logits(0, (3, 4, 257), 1.5), _logits(1, (3, 4, 257), 1.5)
  kw = dict(k=20, alpha=alpha, add_tail=add_tail, temperature=temperature)
  value, grad, weights = _jsd_value_and_grad_jax(s, t, **kw)
  t_value, t_grad = _ref_jsd(s, t, weights, **kw)
  _close(value, t_value)
  _close(grad, t_grad)
  assert np.all(np.asarray(value) >= -1e-6)


def _ref_jsd(s, t, weights, **kw):
  x = torch.tensor(s, dtype=torch.float64, requires_grad=True)
  value = ref.topk_jsd(x, torch.tensor(t, dtype=torch.float64), **kw)
  (weights.double() * value).sum().backward()
  return value, x.grad


def test_topk_jsd_real_vocab():
  """At Qwen3's vocabulary 151,936, k = 100, a few tokens."""
  s, t = _logits(2, (3, 151936), 2.0), _logits(3, (3, 151936), 2.0)
  value, grad, weights = _jsd_value_and_grad_jax(s, t, k=100)
  t_value, t_grad = _ref_jsd(s, t, weights, k=100)
  _close(value, t_value)
  _close(grad, t_grad)


def test_topk_jsd_identical_is_zero_and_teacher_gets_no_gradient():
  s = jnp.asarray(_logits(4, (5, 64)))
  np.testing.assert_allclose(losses.topk_jsd(s, s, k=8), 0.0, atol=1e-6)
  t_grad = jax.grad(lambda t: jnp.sum(losses.topk_jsd(s + 1.0 * jnp.arange(64) / 64, t, k=8)))(s)
  assert float(jnp.max(jnp.abs(t_grad))) == 0.0


def test_topk_jsd_matches_trl():
  """TRL's `trl.experimental.sdpo` top-k self-distillation loss (an independent PyTorch implementation)."""
  os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
  try:
    from trl.experimental.sdpo.loss_utils import compute_topk_self_distillation_loss
  except Exception as e:  # noqa: BLE001 — any import failure means TRL is unusable here.
    pytest.skip(f"trl.experimental.sdpo does not import ({type(e).__name__}: {e}); install trl==1.16.0")
  s, t = _logits(5, (2, 3, 300), 1.5), _logits(6, (2, 3, 300), 1.5)
  for alpha, add_tail in ((0.0, True), (0.5, True), (1.0, True), (0.5, False)):
    x = torch.tensor(s, requires_grad=True)  # TRL in float32, as it runs
    trl_value = compute_topk_self_distillation_loss(x, torch.tensor(t), distillation_topk=25,
                                                    distillation_alpha=alpha, distillation_add_tail=add_tail)
    trl_value.sum().backward()
    fn = lambda z: losses.topk_jsd(z, jnp.asarray(t), k=25, alpha=alpha, add_tail=add_tail)
    _close(fn(jnp.asarray(s)), trl_value)
    _close(jax.grad(lambda z: jnp.sum(fn(z)))(jnp.asarray(s)), x.grad)


def test_tail_bucket_log_probs_are_nonpositive_and_sum_to_one():
  logp = jax.nn.log_softmax(jnp.asarray(_logits(7, (6, 50))))
  topk = jax.lax.top_k(logp, 10)[0]
  dist = losses.topk_logprobs_with_tail(topk)
  assert dist.shape == (6, 11)
  assert bool(jnp.all(dist <= 0.0))
  np.testing.assert_allclose(jnp.sum(jnp.exp(dist), -1), 1.0, atol=1e-5)
  # All mass in the top-k: the clamp keeps the tail finite (log(1 - exp(-1e-7)) ≈ -16.1).
  full = losses.topk_logprobs_with_tail(jnp.log(jnp.array([[0.5, 0.5]])))
  assert bool(jnp.all(jnp.isfinite(full)))


# ---------------------------------------------------------------------------------------------------------------
# GRPO and SDPO token losses.
# ---------------------------------------------------------------------------------------------------------------
def _policy_inputs(seed, shape=(4, 6)):
  k = jax.random.split(jax.random.key(seed), 4)
  old = -jnp.abs(jax.random.normal(k[0], shape)) - 0.1
  # Log-ratios in [-1, 2]: many tokens fall outside [1 - 0.2, 1 + 0.28] and some past the dual-clip bound 3.
  logp = old + jax.random.uniform(k[1], shape, minval=-1.0, maxval=2.0)
  roll = old + 0.3 * jax.random.normal(k[2], shape)
  adv = jnp.array([0.7, -1.2, -0.4, 1.1])  # both signs
  return np.asarray(logp), np.asarray(old), np.asarray(roll), np.asarray(adv)


def test_grpo_token_loss_matches_torch_and_exercises_every_clip():
  logp, old, roll, adv = _policy_inputs(0)
  w = losses.rollout_is_weights(jnp.asarray(old), jnp.asarray(roll))
  fn = lambda lp: losses.grpo_token_loss(lp, jnp.asarray(old), jnp.asarray(adv), rollout_is_weights=w)
  value, grad = fn(jnp.asarray(logp)), jax.grad(lambda lp: jnp.sum(fn(lp)))(jnp.asarray(logp))
  x = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
  t_old = torch.tensor(old, dtype=torch.float64)
  t_w = ref.rollout_is_weight(t_old, torch.tensor(roll, dtype=torch.float64))
  t_adv = torch.tensor(adv, dtype=torch.float64)[:, None].expand(x.shape)
  t_value = ref.grpo_token_loss(x, t_old, t_adv, w_roll=t_w)
  t_value.sum().backward()
  _close(w, t_w)
  _close(value, t_value)
  _close(grad, x.grad)
  metrics = losses.grpo_metrics(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.ones(logp.shape))
  assert 0.0 < float(metrics["clip_frac"]) < 1.0
  assert float(metrics["dual_clip_frac"]) > 0.0
  assert float(jnp.max(w)) <= 2.0


def test_grpo_token_loss_on_policy_is_minus_advantage():
  logp = jnp.asarray(_policy_inputs(1)[0])
  adv = jnp.array([0.5, -1.0, 0.0, 2.0])
  value = losses.grpo_token_loss(logp, logp, adv)
  np.testing.assert_allclose(value, -jnp.broadcast_to(adv[:, None], logp.shape), rtol=1e-6)
  grad = jax.grad(lambda lp: jnp.sum(losses.grpo_token_loss(lp, jax.lax.stop_gradient(lp), adv)))(logp)
  np.testing.assert_allclose(grad, -jnp.broadcast_to(adv[:, None], logp.shape), rtol=1e-6)


def test_sdpo_token_loss_matches_torch():
  logp, old, roll, _ = _policy_inputs(2)
  jsd = np.abs(_logits(8, logp.shape, 0.5))
  w = losses.rollout_is_weights(jnp.asarray(old), jnp.asarray(roll))
  fn = lambda d, lp: losses.sdpo_token_loss(d, lp, jnp.asarray(old), rollout_is_weights=w)
  value = fn(jnp.asarray(jsd), jnp.asarray(logp))
  g_d, g_lp = jax.grad(lambda d, lp: jnp.sum(fn(d, lp)), argnums=(0, 1))(jnp.asarray(jsd), jnp.asarray(logp))
  d = torch.tensor(jsd, dtype=torch.float64, requires_grad=True)
  t_old = torch.tensor(old, dtype=torch.float64)
  t_w = ref.rollout_is_weight(t_old, torch.tensor(roll, dtype=torch.float64))
  t_value = ref.sdpo_token_loss(d, torch.tensor(logp, dtype=torch.float64), t_old, w_roll=t_w)
  t_value.sum().backward()
  _close(value, t_value)
  _close(g_d, d.grad)
  assert float(jnp.max(jnp.abs(g_lp))) == 0.0  # the IS ratio is stop-gradient.


# ---------------------------------------------------------------------------------------------------------------
# DW weights, advantages.
# ---------------------------------------------------------------------------------------------------------------
def test_dw_weights_match_torch_mean_one_and_empty_mask_finite():
  ent = jnp.abs(jnp.asarray(_logits(9, (4, 7), 2.0)))
  mask = jnp.asarray(np.random.default_rng(0).random((4, 7)) < 0.6)
  w = losses.dw_weights(ent, mask, beta=1.3)
  _close(w, ref.dw_weights(torch.tensor(np.asarray(ent)), torch.tensor(np.asarray(mask)), beta=1.3))
  np.testing.assert_allclose(jnp.sum(w) / jnp.sum(mask), 1.0, rtol=1e-6)
  assert bool(jnp.all(jnp.where(mask, True, w == 0.0)))
  empty = losses.dw_weights(ent, jnp.zeros_like(mask))
  assert bool(jnp.all(empty == 0.0))
  # exp(-1.3 * (H + 100)) underflows float32: a naive normaliser would divide 0 by 0.
  np.testing.assert_allclose(losses.dw_weights(ent + 100.0, mask, beta=1.3), w, rtol=1e-4)
  assert float(jnp.max(jnp.abs(jax.grad(lambda e: jnp.sum(losses.dw_weights(e, mask)))(ent)))) == 0.0


@pytest.mark.parametrize("norm", [False, True])
def test_group_advantages_match_torch(norm):
  rng = np.random.default_rng(1)
  rewards = rng.integers(0, 2, 13).astype(float)
  rewards[0] = 0.3
  groups = rng.permutation(np.repeat([0, 1, 2, 3], [4, 4, 4, 1]))
  got = advantages.group_advantages(rewards, groups, 4, norm_adv_by_std=norm)
  _close(got, np.array(ref.group_advantages(list(rewards), list(groups), norm_adv_by_std=norm)))
  all_wrong = advantages.group_advantages(np.zeros(4), np.zeros(4, int), 1, norm_adv_by_std=norm)
  assert bool(jnp.all(all_wrong == 0.0))


# ---------------------------------------------------------------------------------------------------------------
# Routed objective.
# ---------------------------------------------------------------------------------------------------------------
def _batch(seed, num_groups=3, group=4, length=6):
  rng = np.random.default_rng(seed)
  b = num_groups * group
  rewards = rng.integers(0, 2, b).astype(float)
  rewards[:group] = 0.0  # one all-wrong group
  rewards[group:2 * group] = [1.0] + [0.0] * (group - 1)  # one group with a single correct rollout
  groups = np.repeat(np.arange(num_groups), group)
  lengths = rng.integers(0, length + 1, b)
  lengths[1] = 0  # a zero-length response
  valid = np.arange(length)[None, :] < lengths[:, None]
  return rewards, groups, valid


@pytest.mark.parametrize("method", methods.NAMES)
@pytest.mark.parametrize("loss_agg", losses.LOSS_AGGS)
def test_routed_objective_matches_torch(method, loss_agg):
  rewards, groups, valid = _batch(3)
  r = routing.route(rewards, groups, method=method)
  g_loss, s_loss = _logits(10, valid.shape, 1.0), np.abs(_logits(11, valid.shape, 1.0))
  dw = losses.dw_weights(jnp.abs(jnp.asarray(_logits(12, valid.shape))), jnp.asarray(valid) & r.sdpo_B[:, None])

  def loss(g, s):
    num, den = losses.routed_objective(g, s, dw, jnp.asarray(valid), r.grpo_B, r.sdpo_B, method=method,
                                       loss_agg=loss_agg)
    return num / jnp.maximum(den, 1.0)

  value, grads = jax.value_and_grad(loss, argnums=(0, 1))(jnp.asarray(g_loss), jnp.asarray(s_loss))
  tg = torch.tensor(g_loss, dtype=torch.float64, requires_grad=True)
  ts = torch.tensor(s_loss, dtype=torch.float64, requires_grad=True)
  t_value = ref.objective(tg, ts, torch.tensor(np.asarray(dw), dtype=torch.float64), torch.tensor(valid),
                          list(np.asarray(r.grpo_B)), list(np.asarray(r.sdpo_B)), method, loss_agg)
  t_value.backward()
  _close(value, t_value)
  zero = torch.zeros_like(tg)  # torch leaves .grad None for an input the loss never used
  _close(grads[0], zero if tg.grad is None else tg.grad)
  _close(grads[1], zero if ts.grad is None else ts.grad)


def test_objective_ignores_off_route_garbage_and_zero_length_rows():
  rewards, groups, valid = _batch(4)
  r = routing.route(rewards, groups, method="srpo")
  g_loss = jnp.asarray(_logits(13, valid.shape, 1.0))
  s_loss = jnp.where(r.sdpo_B[:, None], 1.0, jnp.nan)  # no teacher forward for the GRPO-routed rows
  dw = losses.dw_weights(jnp.ones(valid.shape), jnp.asarray(valid) & r.sdpo_B[:, None])
  num, den = losses.routed_objective(g_loss, s_loss, dw, jnp.asarray(valid), r.grpo_B, r.sdpo_B)
  assert bool(jnp.isfinite(num)) and float(den) == float(valid.sum())
  grad = jax.grad(lambda g: losses.routed_objective(g, s_loss, dw, jnp.asarray(valid), r.grpo_B, r.sdpo_B)[0])(g_loss)
  assert float(jnp.max(jnp.abs(grad[1]))) == 0.0  # row 1 has a zero-length response
  assert bool(jnp.all(jnp.where(jnp.asarray(valid), True, grad == 0.0)))


@pytest.mark.parametrize("method", ["srpo", "sdpo", "grpo"])
def test_empty_branches_give_finite_losses(method):
  valid = np.ones((4, 3), bool)
  for rewards in (np.zeros(4), np.ones(4)):  # all wrong: no SDPO; all correct: no SDPO either
    r = routing.route(rewards, np.zeros(4, int), method=method)
    dw = losses.dw_weights(jnp.ones((4, 3)), jnp.asarray(valid) & r.sdpo_B[:, None])
    for agg in losses.LOSS_AGGS:
      num, den = losses.routed_objective(jnp.ones((4, 3)), jnp.ones((4, 3)), dw, jnp.asarray(valid), r.grpo_B,
                                         r.sdpo_B, method=method, loss_agg=agg)
      assert bool(jnp.isfinite(num / jnp.maximum(den, 1.0)))
  # An SDPO-only batch (srpo: every rollout failed but has a correct sibling is impossible; use masks directly).
  num, den = losses.routed_objective(None, jnp.ones((4, 3)), jnp.ones((4, 3)), jnp.asarray(valid),
                                     jnp.zeros(4, bool), jnp.ones(4, bool), method="srpo")
  assert float(num / den) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# Gradient accumulation reproduces the mini-batch.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,loss_agg", [("srpo", "token-mean"), ("sdpo", "seq-mean-token-mean")])
def test_micro_batch_accumulation_matches_full_batch(method, loss_agg):
  rewards, groups, valid = _batch(5, num_groups=2, group=4, length=5)
  b, t = valid.shape
  v, d = 40, 8
  rng = np.random.default_rng(5)  # numpy set-up: eager JAX ops would cost seconds of per-op compiles
  hidden = rng.normal(size=(b, t, d)).astype(np.float32)
  teacher_logits = (2.0 * rng.normal(size=(b, t, v))).astype(np.float32)
  params = jnp.asarray(0.5 * rng.normal(size=(d, v)), jnp.float32)
  ids = rng.integers(0, v, (b, t))
  z = hidden @ np.asarray(params)
  logp0 = np.take_along_axis(z - np.log(np.exp(z).sum(-1, keepdims=True)), ids[..., None], -1)[..., 0]
  old = (logp0 - 0.05).astype(np.float32)
  roll = (old + 0.1 * rng.normal(size=(b, t))).astype(np.float32)
  r = routing.route(rewards, groups, method=method)
  adv = advantages.group_advantages(rewards, groups, 2)
  valid_j = jnp.asarray(valid)
  t_logp = teacher_logits - np.log(np.exp(teacher_logits).sum(-1, keepdims=True))
  t_ent = jnp.asarray(-np.sum(np.exp(t_logp) * t_logp, -1))
  dw = losses.dw_weights(t_ent, valid_j & r.sdpo_B[:, None])  # over the whole mini-batch, before splitting
  den_total = losses.objective_denominator(valid_j, r.grpo_B, r.sdpo_B, loss_agg=loss_agg)

  @functools.partial(jax.jit, static_argnums=(1, 2))
  @functools.partial(jax.value_and_grad)
  def micro_loss(p, start, size):
    sl = slice(start, start + size)
    logits = hidden[sl] @ p
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), ids[sl][..., None], -1)[..., 0]
    w = losses.rollout_is_weights(old[sl], roll[sl])
    g = losses.grpo_token_loss(logp, old[sl], adv[sl], rollout_is_weights=w)
    s = losses.sdpo_token_loss(losses.topk_jsd(logits, teacher_logits[sl], k=5), logp, old[sl],
                               rollout_is_weights=w)
    num, _ = losses.routed_objective(g, s, dw[sl], valid_j[sl], r.grpo_B[sl], r.sdpo_B[sl], method=method,
                                     loss_agg=loss_agg)
    return num / den_total

  results = []
  for parts in (1, 2, 4):
    size = b // parts
    value, grad = 0.0, jnp.zeros_like(params)
    for i in range(parts):
      vi, gi = micro_loss(params, i * size, size)
      value, grad = value + vi, grad + gi
    results.append((float(value), grad))
  for value, grad in results[1:]:
    assert abs(value - results[0][0]) <= 1e-6 * abs(results[0][0])
    assert float(jnp.max(jnp.abs(grad - results[0][1]))) <= 1e-6 * float(jnp.max(jnp.abs(results[0][1])))
  assert abs(results[0][0]) > 0.0
