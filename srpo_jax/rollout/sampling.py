"""Sampling strategies for the JAX sampler: each one maps logits of one decode step to (token, log-prob).

Letters (the alphabet of `srpo_jax.models.qwen3`): B batch (rows), V vocabulary, E top-k candidates; locally U vocab
blocks of W tokens each, A the last axis of a generic helper (E, U or W).

Every strategy is exact: it draws from the stated distribution, and returns the log-prob of the drawn token under
that same distribution (after temperature, top-k and top-p renormalisation), which the trainer needs for the rollout
importance weight. Greedy returns the model's own log-softmax (temperature 1) of the argmax token: greedy has no
"distribution it was drawn from", and the temperature-1 log-prob is the one a teacher-forced pass would compute.

Randomness is one uniform u ~ U[0, 1) per row and step, turned into a token by inverse-CDF: the token whose
cumulative probability interval contains u. Over a 151,936-token vocabulary this is far cheaper on CPU than
`jax.random.categorical`, which draws V Gumbel variates per row (64 rows: ~7 ms vs ~390 ms for the draw alone on the
2-core dev box, logits given): the cumulative sum runs over U vocab blocks, then
over the W tokens of the one block that holds u (`inverse_cdf_blocked`). Every pass over the full [B, V] logits is a
plain fused reduction (max, sum of exp); nothing else of size V is materialised per step.

The code path is chosen by the static `Strategy` (greedy / full / top-k / top-p / top-k + top-p), so the common RL
case (temperature 1, no filters) touches the vocabulary only with fused reductions; nothing sorts the full
vocabulary (top-p alone uses a 256-candidate top-k when that holds the nucleus, else the bisection threshold of
`nucleus_threshold`); temperature and top-p values are traced.
"""
from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp

MAX_BLOCK = 2048  # widest vocab block of the blocked passes


@dataclasses.dataclass(frozen=True)
class Strategy:
  """Static (compile-time) choice of sampling code path; hashable, part of the compiled-program key.

  greedy: argmax (temperature 0). top_k: 0 = off, else keep the top_k most likely tokens. top_p: whether the nucleus
  filter is on (its value is a traced argument, so 0.9 and 0.95 share a program).
  """
  greedy: bool = False
  top_k: int = 0
  top_p: bool = False

  @classmethod
  def from_params(cls, temperature: float, top_k: int, top_p: float, vocab_size: int) -> "Strategy":
    if temperature == 0.0:
      return cls(greedy=True)
    k = top_k if 0 < top_k < vocab_size else 0  # top_k >= V keeps every token: the filter is off
    return cls(greedy=False, top_k=k, top_p=top_p < 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Inverse-CDF draws and blocked reductions over the vocabulary
# ---------------------------------------------------------------------------------------------------------------------
def _count_at_or_below(cum_BA: jax.Array, target_B: jax.Array) -> jax.Array:
  """Index of the first entry of the non-decreasing `cum` that exceeds `target` (= how many are <= target)."""
  return jnp.sum(cum_BA <= target_B[:, None], axis=-1).astype(jnp.int32)


def _last_positive(w_BA: jax.Array) -> jax.Array:
  """Index of the last entry > 0 per row (the guard for u * Z rounding up to Z)."""
  n = w_BA.shape[-1]
  return (n - 1 - jnp.argmax((w_BA > 0)[:, ::-1], axis=-1)).astype(jnp.int32)


def inverse_cdf(w_BA: jax.Array, u_B: jax.Array) -> jax.Array:
  """Index i with probability w_i / Σ w (unnormalised weights w >= 0), from uniforms u in [0, 1)."""
  cum_BA = jnp.cumsum(w_BA, axis=-1)
  idx = _count_at_or_below(cum_BA, u_B * cum_BA[:, -1])
  return jnp.minimum(idx, _last_positive(w_BA))




def block_width(v: int) -> int:
  """W for a vocabulary of V tokens: the largest divisor of V up to MAX_BLOCK, so that [B, V] -> [B, U, W] is a free
  reshape (padding [B, V] would copy it every step). 151,936 = 128 × 1,187 -> W = 1,187, U = 128. A vocabulary
  without a divisor in [128, MAX_BLOCK] gets W = 1,024 and is padded."""
  w = max(d for d in range(1, min(v, MAX_BLOCK) + 1) if v % d == 0)
  return w if w >= min(v, 128) else 1024


def to_blocks(x_BV: jax.Array, block: int) -> jax.Array:
  """[B, V] -> [B, U, W], padding with -inf (weight 0) only when W does not divide V."""
  b, v = x_BV.shape
  u = -(-v // block)
  if u * block != v:
    x_BV = jnp.pad(x_BV, ((0, 0), (0, u * block - v)), constant_values=-jnp.inf)
  return x_BV.reshape(b, u, block)


def _take_block(x_BUW: jax.Array, blk_B: jax.Array) -> jax.Array:
  """Block blk_B of each row: [B, W]."""
  return jnp.take_along_axis(x_BUW, blk_B[:, None, None], axis=1)[:, 0]


def blocked_argmax(x_BV: jax.Array, block: int | None = None) -> tuple[jax.Array, jax.Array]:
  """(first index of the maximum, the maximum) per row. XLA's CPU argmax over 151,936 tokens is a slow variadic
  reduce; a max per block, an argmax over the U block maxima and one within the winning block are exact and cheap."""
  x_BUW = to_blocks(x_BV, block or block_width(x_BV.shape[-1]))
  bmax_BU = jnp.max(x_BUW, axis=-1)
  blk_B = jnp.argmax(bmax_BU, axis=-1).astype(jnp.int32)
  in_blk_B = jnp.argmax(_take_block(x_BUW, blk_B), axis=-1).astype(jnp.int32)
  return blk_B * x_BUW.shape[-1] + in_blk_B, jnp.max(bmax_BU, axis=-1)


def inverse_cdf_blocked(x_BV: jax.Array, max_B: jax.Array, u_B: jax.Array, block: int | None = None):
  """Draws token v with probability exp(x_v - max) / Z using two short cumulative sums.

  Returns (tokens [B], x at the token [B], log Z [B]). x may hold -inf (masked tokens: weight 0). Step 1 sums
  exp(x - max) per block of W tokens and picks the block whose cumulative interval holds u * Z; step 2 recomputes exp
  over that block only and picks the token in it.
  """
  x_BUW = to_blocks(x_BV, block or block_width(x_BV.shape[-1]))
  mass_BU = jnp.sum(jnp.exp(x_BUW - max_B[:, None, None]), axis=-1)
  cum_BU = jnp.cumsum(mass_BU, axis=-1)
  z_B = cum_BU[:, -1]
  target_B = u_B * z_B
  blk_B = jnp.minimum(_count_at_or_below(cum_BU, target_B), _last_positive(mass_BU))
  before_B = jnp.where(blk_B > 0, jnp.take_along_axis(cum_BU, jnp.maximum(blk_B - 1, 0)[:, None], 1)[:, 0], 0.0)
  xb_BW = _take_block(x_BUW, blk_B)
  w_BW = jnp.exp(xb_BW - max_B[:, None])
  # Rounding can leave the remainder a hair past the block's own sum: clamp to the block's last positive token.
  in_blk_B = jnp.minimum(_count_at_or_below(jnp.cumsum(w_BW, -1), target_B - before_B), _last_positive(w_BW))
  return blk_B * x_BUW.shape[-1] + in_blk_B, _take(xb_BW, in_blk_B), jnp.log(z_B)


def _take(x_BV: jax.Array, idx_B: jax.Array) -> jax.Array:
  return jnp.take_along_axis(x_BV, idx_B[:, None], axis=-1)[:, 0]


# ---------------------------------------------------------------------------------------------------------------------
# Strategies: (logits [B, V] float32, uniforms [B], temperature, top_p) -> (tokens [B] int32, log-probs [B] float32)
# ---------------------------------------------------------------------------------------------------------------------
def sample_greedy(logits_BV, u_B, temperature, top_p):
  """Argmax; log-prob = the model's log-softmax at temperature 1 (not the degenerate 0 of a point mass)."""
  del u_B, temperature, top_p
  tok_B, max_B = blocked_argmax(logits_BV)
  x_BUW = to_blocks(logits_BV, block_width(logits_BV.shape[-1]))
  logz_B = jnp.log(jnp.sum(jnp.exp(x_BUW - max_B[:, None, None]), axis=(1, 2)))
  return tok_B, -logz_B  # the argmax logit minus log-sum-exp: (max - max) - log Σ exp(x - max)


def sample_full(logits_BV, u_B, temperature, top_p):
  """Softmax(logits / T) over the whole vocabulary, drawn by blocked inverse-CDF (no sort)."""
  del top_p
  x_BV = logits_BV / temperature
  max_B = jnp.max(x_BV, axis=-1)
  tok_B, x_B, logz_B = inverse_cdf_blocked(x_BV, max_B, u_B)
  return tok_B, x_B - max_B - logz_B


def nucleus_keep(probs_BA: jax.Array, top_p) -> jax.Array:
  """Top-p keep mask over probabilities sorted in decreasing order: the smallest prefix whose mass reaches top_p.

  A token is kept when the mass strictly before it is < top_p, so the first token is always kept.
  Example: probs [.5 .3 .15 .05], top_p .8 → mass before [0 .5 .8 .95] → keep [1 1 0 0].
  """
  before_BA = jnp.cumsum(probs_BA, axis=-1) - probs_BA
  return before_BA < top_p


def _sample_sorted(x_BE, idx_BE, u_B, top_p, use_top_p: bool, logz_B=None):
  """Draws from candidates sorted by decreasing scaled logit x (token ids idx), optionally nucleus-filtered.

  logz_B: log Σ exp(x) over the distribution the nucleus is measured in (the whole vocabulary for top-p alone);
  None = the candidates themselves (top-k first, then top-p inside the renormalised top-k).
  """
  logp_BE = jax.nn.log_softmax(x_BE, axis=-1) if logz_B is None else x_BE - logz_B[:, None]
  if use_top_p:
    keep_BE = nucleus_keep(jnp.exp(logp_BE), top_p)
    logp_BE = jax.nn.log_softmax(jnp.where(keep_BE, x_BE, -jnp.inf), axis=-1)
  pos_B = inverse_cdf(jnp.exp(logp_BE), u_B)
  return _take(idx_BE, pos_B).astype(jnp.int32), _take(logp_BE, pos_B)


def sample_top_k(k: int, use_top_p: bool):
  """Keep the k (= E) largest logits (ties broken by lower token id), then optionally top-p inside them."""
  def fn(logits_BV, u_B, temperature, top_p):
    x_BE, idx_BE = jax.lax.top_k(logits_BV / temperature, k)
    return _sample_sorted(x_BE, idx_BE, u_B, top_p, use_top_p)
  return fn


def _order_key(x: jax.Array) -> jax.Array:
  """Maps float32 to uint32 so that unsigned order equals float order (sign bit flipped; negatives inverted)."""
  b = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.where(b >> 31 == 0, b | jnp.uint32(0x80000000), ~b)


def nucleus_threshold(x_BV: jax.Array, max_B: jax.Array, top_p) -> jax.Array:
  """The top-p cut without sorting: the order key k* such that the nucleus is {v : key(x_v) >= k*}.

  With A(t) = mass of the tokens strictly above t, token v is kept iff A(x_v) < top_p (the mass before it in
  descending order; `nucleus_keep`). A is non-increasing, so the kept set is everything at or above one token's
  value. Bisection over the 2^32 float order keys keeps A(lo) >= top_p > A(hi) and ends with hi = that value's key:
  at most 32 passes of compare-and-sum over [B, V] (a full sort of 151,936 tokens per row costs ~100× more on CPU).
  Tied values are kept or dropped together (a sort would split a tie at the boundary; measure-zero for real logits).
  """
  key_BV = _order_key(x_BV)
  e_BV = jnp.exp(x_BV - max_B[:, None])
  need_B = top_p * jnp.sum(e_BV, axis=-1)
  lo_B = _order_key(jnp.min(x_BV, axis=-1)) - 1  # A(lo) = 1 >= top_p  (min(x) is a finite logit, key > 0)
  hi_B = _order_key(max_B)  # A(max) = 0 < top_p

  def cond(c):
    lo_B, hi_B = c
    return jnp.any(hi_B - lo_B > 1)

  def body(c):
    lo_B, hi_B = c
    mid_B = lo_B + (hi_B - lo_B) // 2
    above_B = jnp.sum(jnp.where(key_BV > mid_B[:, None], e_BV, 0.0), axis=-1)
    small_B = above_B < need_B
    return jnp.where(small_B, lo_B, mid_B), jnp.where(small_B, mid_B, hi_B)

  _, hi_B = jax.lax.while_loop(cond, body, (lo_B, hi_B))
  return hi_B


TOP_P_CANDIDATES = 256  # top-p tries the 256 most likely tokens first (exact when they hold >= top_p of the mass)


def sample_top_p(logits_BV, u_B, temperature, top_p):
  """Nucleus over the whole vocabulary (top_p < 1, top-k off), exact on either path.

  The nucleus is a prefix of the descending order, so when the 256 most likely tokens already hold >= top_p of the
  mass in every row, it lies inside them (peaked distributions: one top-k plus a sort of 256). Otherwise (flat
  distributions, e.g. a freshly initialised model) the bisection threshold of `nucleus_threshold` cuts the vocabulary.
  """
  x_BV = logits_BV / temperature
  max_B = jnp.max(x_BV, axis=-1)

  def bisection():
    kept_BV = jnp.where(_order_key(x_BV) >= nucleus_threshold(x_BV, max_B, top_p)[:, None], x_BV, -jnp.inf)
    tok_B, x_B, logz_B = inverse_cdf_blocked(kept_BV, max_B, u_B)
    return tok_B, x_B - max_B - logz_B

  if x_BV.shape[-1] <= 4 * TOP_P_CANDIDATES:
    return bisection()
  x_BE, idx_BE = jax.lax.top_k(x_BV, TOP_P_CANDIDATES)
  logz_B = max_B + jnp.log(jnp.sum(jnp.exp(to_blocks(x_BV, block_width(x_BV.shape[-1])) - max_B[:, None, None]),
                                   axis=(1, 2)))
  covered = jnp.all(jnp.sum(jnp.exp(x_BE - logz_B[:, None]), axis=-1) >= top_p)
  return jax.lax.cond(covered, lambda: _sample_sorted(x_BE, idx_BE.astype(jnp.int32), u_B, top_p, True, logz_B),
                      bisection)


def strategy_fn(strategy: Strategy):
  """The sampling function of a static strategy."""
  if strategy.greedy:
    return sample_greedy
  if strategy.top_k:
    return sample_top_k(strategy.top_k, strategy.top_p)
  return sample_top_p if strategy.top_p else sample_full


def sample(strategy: Strategy, logits_BV, u_B, temperature, top_p):
  """Entry point: checks shapes, dispatches on the static strategy. Returns (tokens [B] int32, log-probs [B])."""
  chex.assert_rank(logits_BV, 2)
  chex.assert_shape(u_B, logits_BV.shape[:1])
  tok_B, logp_B = strategy_fn(strategy)(logits_BV.astype(jnp.float32), u_B, temperature, top_p)
  return tok_B.astype(jnp.int32), logp_B.astype(jnp.float32)
