"""GRPO, SDPO and SRPO losses as pure functions of arrays (spec: `docs/srpo_spec.md`).

Every loss returns per-token values; the caller reduces them with `routed_objective`, which returns a
(numerator, denominator) pair so that gradient accumulation over micro-batches reproduces the full mini-batch loss
exactly (divide every micro-batch's numerator by the mini-batch's total denominator, known up-front from the masks).

Steps, as the spec lists them:
1. GRPO token loss: clipped surrogate with asymmetric clip and dual clip (`grpo_token_loss`), times the truncated
   rollout importance weight (`rollout_is_weights`).
2. SDPO token loss: generalized JSD between student and teacher on the student's top-k support plus a tail bucket
   (`topk_jsd`, or `topk_logprobs_with_tail` + `generalized_jsd` when the log-probs come from the fused head),
   times the stop-gradient IS clip `min(exp(logp - old_logp), 2)` and the rollout weight (`sdpo_token_loss`).
3. Entropy-aware dynamic weights `exp(-βH)` normalised to mean 1 over the SDPO tokens (`dw_weights`).
4. Routed objective (`routed_objective`) for every `srpo_jax.methods.Method`: which rows carry which loss comes
   from the routing masks; whether SDPO tokens are DW-weighted and how two losses on one rollout combine from the
   record.

Departures from the paper (which is silent there; the SDPO code decides): `add_tail=False` renormalises the top-k,
as the SDPO code does; the endpoints α = 0 and α = 1 are the plain KLs KL(P_T‖P_S) and KL(P_S‖P_T), not limits of
the JSD formula (which would be 0). Log-ratios are clipped to ±20 before every `exp` (the spec's GRPO ratio; the
SDPO code's IS ratio; for the rollout weight too, which changes nothing above `exp(-20)`).

Precision note: when the top-k holds nearly all the mass (1 - Σp ~ 1e-5), the tail log-prob loses relative precision
in float32 (torch float32 equally); the divergence then differs from a float64 evaluation by ~1e-4 at α = 0.

Letters (srpo_jax/models/qwen3.py): B rollouts, T response positions, V vocabulary, E top-k entries (E1 = E + 1 with
the tail bucket).
"""
from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from srpo_jax import methods
# The tail-bucket maths lives with the fused head (its kernel owns it); re-exported here as `losses.*`.
from srpo_jax.kernels.fused_head import TAIL_LSE_MAX, HeadOutputs, tail_log_prob, topk_logprobs_with_tail

LOG_RATIO_CLIP = 20.0  # spec: ratio = exp(clip(logp - old_logp, -20, 20)).
LOSS_AGGS = methods.LOSS_AGGS


# ---------------------------------------------------------------------------------------------------------------
# Small helpers.
# ---------------------------------------------------------------------------------------------------------------
def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `x` over `mask` (same shape); 0 when the mask is empty."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(jnp.where(mask > 0, x, 0.0) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _broadcast_to_tokens(x: jax.Array, like_BT: jax.Array) -> jax.Array:
  """A per-rollout `[B]` array becomes `[B, 1]`; a per-token array passes through."""
  x = jnp.asarray(x, jnp.float32)
  if x.ndim == like_BT.ndim - 1:
    x = x[..., None]
  return jnp.broadcast_to(x, like_BT.shape)


# ---------------------------------------------------------------------------------------------------------------
# GRPO branch.
# ---------------------------------------------------------------------------------------------------------------
def rollout_is_weights(old_logp: jax.Array, rollout_logp: jax.Array, cap: float = 2.0) -> jax.Array:
  """Truncated rollout IS weight `min(exp(logp_old - logp_roll), cap)`, stop-gradient, per token."""
  chex.assert_equal_shape([old_logp, rollout_logp])
  log_ratio = jnp.clip(old_logp.astype(jnp.float32) - rollout_logp.astype(jnp.float32),
                       -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
  return jax.lax.stop_gradient(jnp.minimum(jnp.exp(log_ratio), cap))


def _policy_ratio(logp: jax.Array, old_logp: jax.Array) -> jax.Array:
  # float32: the ratio is an exponential of a difference of two nearby log-probs.
  return jnp.exp(jnp.clip(logp.astype(jnp.float32) - old_logp.astype(jnp.float32), -LOG_RATIO_CLIP, LOG_RATIO_CLIP))


def _grpo_surrogates(logp, old_logp, advantages, clip_low, clip_high, clip_c):
  """(unclipped, clipped, dual-clipped) per-token losses, before the rollout weight."""
  ratio = _policy_ratio(logp, old_logp)
  adv = _broadcast_to_tokens(advantages, ratio)
  loss_unclipped = -adv * ratio
  loss_clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  loss_ppo = jnp.maximum(loss_unclipped, loss_clipped)
  # Dual clip bounds the loss of a negative-advantage token whose ratio exploded: min(ℓ, -c·A).
  loss_dual = jnp.where(adv < 0, jnp.minimum(loss_ppo, -clip_c * adv), loss_ppo)
  return loss_unclipped, loss_clipped, loss_ppo, loss_dual


def grpo_token_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, *, clip_low: float = 0.2,
                    clip_high: float = 0.28, clip_c: float = 3.0,
                    rollout_is_weights: Optional[jax.Array] = None) -> jax.Array:
  """Per-token GRPO loss `[B, T]`.

  `ℓ = max(-A·ρ, -A·clip(ρ, 1-ε_low, 1+ε_high))`, then `min(ℓ, -c·A)` where `A < 0`, times the stop-gradient
  rollout IS weight when given. `advantages` is `[B]` (per rollout) or `[B, T]`.
  """
  chex.assert_equal_shape([logp, old_logp])
  loss = _grpo_surrogates(logp, old_logp, advantages, clip_low, clip_high, clip_c)[-1]
  if rollout_is_weights is not None:
    chex.assert_equal_shape([logp, rollout_is_weights])
    loss = loss * jax.lax.stop_gradient(rollout_is_weights)
  return loss


def grpo_metrics(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *,
                 clip_low: float = 0.2, clip_high: float = 0.28, clip_c: float = 3.0) -> dict[str, jax.Array]:
  """RL health metrics over the masked tokens (stop-gradient scalars).

  `clip_frac`: share of tokens where the clipped surrogate is the active one (verl's `pg_clipfrac`);
  `dual_clip_frac`: share where the dual clip bound `-c·A` is active (A < 0); `approx_kl`: mean of
  `old_logp - logp`; `ratio_mean`: mean policy ratio.
  """
  logp, old_logp = jax.lax.stop_gradient(logp), jax.lax.stop_gradient(old_logp)
  unclipped, clipped, ppo, _ = _grpo_surrogates(logp, old_logp, advantages, clip_low, clip_high, clip_c)
  adv = _broadcast_to_tokens(advantages, logp)
  dual_active = (adv < 0) & (ppo > -clip_c * adv)
  return {
      "clip_frac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
      "dual_clip_frac": masked_mean(dual_active.astype(jnp.float32), mask),
      "approx_kl": masked_mean(old_logp.astype(jnp.float32) - logp.astype(jnp.float32), mask),
      "ratio_mean": masked_mean(_policy_ratio(logp, old_logp), mask),
  }


# ---------------------------------------------------------------------------------------------------------------
# SDPO branch.
# ---------------------------------------------------------------------------------------------------------------
def _kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
  """KL(P‖Q) = Σ p (log p - log q) over the last axis."""
  return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def generalized_jsd(student_logp: jax.Array, teacher_logp: jax.Array, *, alpha: float = 0.5) -> jax.Array:
  """Generalized JSD over the last axis between two distributions given as log-probs `[..., E1] -> [...]`.

  `M = (1-α) P_S + α P_T`, `ℓ = (1-α) KL(P_S‖M) + α KL(P_T‖M)`; α = 0 is KL(P_T‖P_S), α = 1 is KL(P_S‖P_T).
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"generalized_jsd: alpha must be in [0, 1], got {alpha}")
  if alpha == 0.0:
    return _kl(teacher_logp, student_logp)
  if alpha == 1.0:
    return _kl(student_logp, teacher_logp)
  log_m = jnp.logaddexp(student_logp + jnp.log1p(-alpha), teacher_logp + jnp.log(alpha))
  return (1.0 - alpha) * _kl(student_logp, log_m) + alpha * _kl(teacher_logp, log_m)


def topk_jsd(student_logits: jax.Array, teacher_logits: jax.Array, *, k: int = 100, alpha: float = 0.5,
             add_tail: bool = True, temperature: float = 1.0) -> jax.Array:
  """Per-token SDPO divergence `[..., V] -> [...]` on the student's top-k vocabulary support.

  Both logit arrays are divided by `temperature` and log-softmaxed over the FULL vocabulary in float32 (a bf16
  log-sum-exp over 151,936 entries loses the small probabilities the tail bucket is made of); both are gathered at
  the student's top-k indices; the tail bucket is appended; the generalized JSD with `alpha` follows. The teacher
  is stop-gradient. `k >= V` covers the vocabulary (k = V): no tail bucket, the full-vocabulary divergence.
  """
  chex.assert_equal_shape([student_logits, teacher_logits])
  s_logits = student_logits.astype(jnp.float32) / temperature
  t_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32) / temperature)
  s_logp = jax.nn.log_softmax(s_logits, axis=-1)
  t_logp = jax.nn.log_softmax(t_logits, axis=-1)
  vocab = s_logits.shape[-1]
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(s_logits), min(k, vocab))
  s_topk = jnp.take_along_axis(s_logp, idx, axis=-1)
  t_topk = jnp.take_along_axis(t_logp, idx, axis=-1)
  return generalized_jsd(topk_logprobs_with_tail(s_topk, add_tail=add_tail, vocab_size=vocab),
                         topk_logprobs_with_tail(t_topk, add_tail=add_tail, vocab_size=vocab), alpha=alpha)


def head_divergence(out: HeadOutputs, *, alpha: float = 0.5, add_tail: bool = True) -> jax.Array:
  """Per-token SDPO divergence `[X]` from `kernels.fused_head` outputs; equals `topk_jsd` on the full logits."""
  if out.teacher_topk_logp_XE1 is None:
    raise ValueError("head_divergence: fused_head was called without teacher_hidden_XD")
  student, teacher = out.student_topk_logp_XE1, out.teacher_topk_logp_XE1
  if not add_tail:
    # Drop the tail and renormalise the top-k, as `topk_logprobs_with_tail(add_tail=False)`.
    num_e = out.topk_idx_XE.shape[-1]
    student = topk_logprobs_with_tail(student[..., :num_e], add_tail=False)
    teacher = topk_logprobs_with_tail(teacher[..., :num_e], add_tail=False)
  return generalized_jsd(student, teacher, alpha=alpha)


def sdpo_token_loss(divergence: jax.Array, logp: jax.Array, old_logp: jax.Array, *, is_clip: float = 2.0,
                    rollout_is_weights: Optional[jax.Array] = None) -> jax.Array:
  """Per-token SDPO loss `[B, T]`: divergence times `min(exp(logp - old_logp), is_clip)` (stop-gradient; exactly 1
  on-policy) times the stop-gradient rollout IS weight when given."""
  chex.assert_equal_shape([divergence, logp, old_logp])
  is_ratio = jax.lax.stop_gradient(jnp.minimum(_policy_ratio(logp, old_logp), is_clip))
  loss = divergence.astype(jnp.float32) * is_ratio
  if rollout_is_weights is not None:
    chex.assert_equal_shape([logp, rollout_is_weights])
    loss = loss * jax.lax.stop_gradient(rollout_is_weights)
  return loss


# ---------------------------------------------------------------------------------------------------------------
# SRPO: dynamic weights and the routed objective.
# ---------------------------------------------------------------------------------------------------------------
@jax.jit
def dw_weights(teacher_entropy: jax.Array, mask: jax.Array, beta: float = 1.0) -> jax.Array:
  """Entropy-aware weights `[B, T]`: `exp(-βH)` normalised to mean 1 over `mask` (all valid SDPO-routed tokens of
  the mini-batch), 0 off the mask, stop-gradient; all zeros when the mask is empty.

  Computed as `|Ω| · softmax_Ω(-βH)` so that large entropies cannot underflow the normaliser. For micro-batched
  training call it once on the whole mini-batch's teacher entropies (the normaliser spans micro-batches).
  """
  chex.assert_equal_shape([teacher_entropy, mask])
  on = mask.astype(bool)
  score = jnp.where(on, -beta * teacher_entropy.astype(jnp.float32), -jnp.inf)
  shift = jnp.where(on.any(), jnp.max(score), 0.0)  # finite even for an empty mask.
  unnorm = jnp.where(on, jnp.exp(score - shift), 0.0)
  weights = unnorm * (jnp.sum(on.astype(jnp.float32)) / jnp.maximum(jnp.sum(unnorm), jnp.finfo(jnp.float32).tiny))
  return jax.lax.stop_gradient(weights)


def routed_token_loss(grpo_loss_BT: Optional[jax.Array], sdpo_loss_BT: Optional[jax.Array],
                      dw_BT: Optional[jax.Array], grpo_route_B: jax.Array, sdpo_route_B: jax.Array, *,
                      method: str | methods.Method = "srpo", mix_lambda: float = 0.9) -> jax.Array:
  """The combined per-token loss `[B, T]` of each method before aggregation (see `routed_objective`).

  Losses of rollouts off a route are selected away with `where` (not multiplied by 0), so garbage there — e.g. an
  SDPO loss for rollouts that had no teacher forward — cannot leak NaNs.
  """
  method = methods.get(method)
  like = grpo_loss_BT if grpo_loss_BT is not None else sdpo_loss_BT
  zero = jnp.zeros(like.shape, jnp.float32)
  g_on = grpo_route_B.astype(bool)[:, None]
  s_on = sdpo_route_B.astype(bool)[:, None]
  grpo = zero if grpo_loss_BT is None else jnp.where(g_on, grpo_loss_BT.astype(jnp.float32), 0.0)
  sdpo = zero if sdpo_loss_BT is None else jnp.where(s_on, sdpo_loss_BT.astype(jnp.float32), 0.0)
  if method.dynamic_weighting:
    if dw_BT is None:
      raise ValueError(f"routed_objective: method {method.name!r} needs dw_BT (DW weights)")
    sdpo = sdpo * jnp.where(s_on, jax.lax.stop_gradient(dw_BT), 0.0)
  if method.combine == "mix":
    # λ·ℓ^GRPO + (1-λ)·ℓ^SDPO where the rollout has teacher information, ℓ^GRPO alone elsewhere.
    return jnp.where(s_on, mix_lambda * grpo + (1.0 - mix_lambda) * sdpo, grpo)
  return grpo + sdpo


def routed_objective(grpo_loss_BT: Optional[jax.Array], sdpo_loss_BT: Optional[jax.Array],
                     dw_BT: Optional[jax.Array], token_mask_BT: jax.Array, grpo_route_B: jax.Array,
                     sdpo_route_B: jax.Array, *, method: str | methods.Method = "srpo",
                     loss_agg: str = "token-mean",
                     mix_lambda: float = 0.9) -> tuple[jax.Array, jax.Array]:
  """(numerator, denominator) of the method's objective on this (micro-)batch; the loss is `num / den`.

  `token-mean` (SRPO): `num = Σ_{i,t} valid·ℓ_{i,t}`, `den` = number of valid tokens of routed rollouts
  (`Σ z^GRPO + Σ z^SDPO`; every valid token for `advantage_mix`, where a rollout counts once).
  `seq-mean-token-mean` (baselines): `num = Σ_i (Σ_t valid·ℓ_{i,t}) / T_i`, `den` = number of rollouts with at
  least one valid token, zero-loss rollouts included (so `sdpo`'s teacher-less rollouts dilute the mean, as in the
  SDPO code); padding rows and empty responses count nowhere.

  Both sums are additive over rollouts, so with micro-batches: `loss_mb = num_mb / den_total` where `den_total` is
  the sum of the micro-batches' `den` (it depends on masks only; compute it up-front), and the sum of the
  micro-batch losses and gradients equals the full mini-batch's.
  """
  if loss_agg not in LOSS_AGGS:
    raise ValueError(f"routed_objective: loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
  chex.assert_rank(token_mask_BT, 2)
  chex.assert_shape([grpo_route_B, sdpo_route_B], token_mask_BT.shape[:1])
  token_loss = routed_token_loss(grpo_loss_BT, sdpo_loss_BT, dw_BT, grpo_route_B, sdpo_route_B, method=method,
                                 mix_lambda=mix_lambda)
  chex.assert_equal_shape([token_loss, token_mask_BT])
  return aggregate(token_loss, token_mask_BT, loss_agg=loss_agg,
                   rows_B=grpo_route_B.astype(bool) | sdpo_route_B.astype(bool))


def aggregate(token_BT: jax.Array, token_mask_BT: jax.Array, *, loss_agg: str,
              rows_B: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """verl's `agg_loss` of a per-token quantity as (numerator, denominator), additive over rollouts.

  `token-mean`: (Σ valid·x, valid tokens of the rollouts in `rows_B`, all when None); `seq-mean-token-mean`:
  (Σ_i mean_t x_i, rollouts with at least one valid token). The entropy bonus takes it over every valid token of
  the (mini-)batch (`entropy_bonus`); `routed_objective` over the routed rollouts.
  """
  valid = token_mask_BT.astype(bool)
  summed_B = jnp.sum(jnp.where(valid, token_BT, 0.0), axis=1)
  length_B = jnp.sum(valid.astype(jnp.float32), axis=1)
  if loss_agg == "token-mean":
    counted_B = length_B if rows_B is None else jnp.where(rows_B, length_B, 0.0)
    return jnp.sum(summed_B), jnp.sum(counted_B)
  return jnp.sum(summed_B / jnp.maximum(length_B, 1.0)), jnp.sum((length_B > 0).astype(jnp.float32))


def entropy_bonus(entropy_BT: jax.Array, token_mask_BT: jax.Array, *, loss_agg: str) -> tuple[jax.Array, jax.Array]:
  """(numerator, denominator) of the entropy bonus: the student entropy aggregated as verl's actor does,
  `agg_loss(entropy, response_mask, loss_agg_mode)` over every valid response token whatever its route; the loss is
  `num / den − entropy_coef · bonus_num / bonus_den` (never weighted by DW: it is not an SDPO token loss)."""
  return aggregate(entropy_BT, token_mask_BT, loss_agg=loss_agg)


def objective_denominator(token_mask_BT: jax.Array, grpo_route_B: jax.Array, sdpo_route_B: jax.Array, *,
                          loss_agg: str = "token-mean") -> jax.Array:
  """The denominator of `routed_objective` alone (masks only), e.g. for a whole mini-batch before micro-batching."""
  zero = jnp.zeros(token_mask_BT.shape, jnp.float32)
  return routed_objective(zero, zero, zero, token_mask_BT, grpo_route_B, sdpo_route_B, method="srpo_no_dw",
                          loss_agg=loss_agg)[1]
