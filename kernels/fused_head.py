"""Fused, token-tiled LM head: everything the losses need from the logits, without `[N, V]` logits.

Per response token the train step needs: the sampled token's log-prob (GRPO ratio), the student entropy (metric /
entropy bonus), the student's top-k vocabulary indices with the student's log-probs there plus the tail bucket, the
teacher's log-probs at the same indices plus its tail, and the teacher's entropy over the full vocabulary (DW weights).
`fused_head` computes them in token tiles inside `lax.scan`; a tile's `[tile, V]` logits live only inside the loop
body, in the forward and in the backward (a `jax.custom_vjp` recomputes one tile's logits from the saved
log-sum-exp). Accumulation is float32 whatever the input dtype. The vocabulary is not tiled: `[tile, V]` per tile is
the working set, so memory is set by `tile_size`, plus the float32 `[D, V]` head-weight gradient, accumulated in place
in the backward's loop carry (which XLA aliases with the program output). Its per-tile update `h_tile.T @ dlogits` is
added `DEFAULT_VOCAB_CHUNK` vocabulary columns at a time when D > tile, because XLA:CPU materialises a whole `[D, V]`
product before adding it (see `_add_outer_by_columns`). Pallas variants may replace the tile bodies later; this
pure-XLA version is the reference.

How the losses are formed without recomputing logits (what `head_divergence` does):
  `topk_jsd(h @ W, h_T @ W_T, k, α)  ==  generalized_jsd(out.student_topk_logp, out.teacher_topk_logp, α)`
and the GRPO / SDPO IS ratios use `out.logp`. Values and gradients match the unfused path (tests/test_fused_head.py).

Letters: N tokens (flattened B·T), D model width, V vocabulary, K top-k, K1 = K + 1 (tail bucket last).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

from srpo_jax.algorithms import losses

# bench/loss_memory.py (4,096 tokens, V = 151,936, D = 1,024, CPU): tile 256 runs forward + backward in about the
# naive time with 450 MiB of temporaries (three float32 [256, V] logits-sized buffers in the forward tile body).
DEFAULT_TILE_SIZE = 256
# Vocabulary columns per head-weight-gradient update in the backward (see `_add_outer_by_columns`): [D, chunk] float32
# temporaries (32 MiB at D = 1,024), few enough loop iterations to cost nothing measurable.
DEFAULT_VOCAB_CHUNK = 8192


class HeadOutputs(NamedTuple):
  """Per-token outputs of `fused_head`; teacher fields are None without a teacher."""
  logp_N: jax.Array                    # log π_θ(y_t), float32.
  entropy_N: jax.Array                 # student entropy over the full vocabulary, float32.
  topk_idx_NK: jax.Array               # student top-k vocabulary indices, int32 (descending logits).
  student_topk_logp_NK1: jax.Array     # student log-probs at the top-k, then log(1 - Σ p) (tail bucket).
  teacher_topk_logp_NK1: Optional[jax.Array] = None  # teacher log-probs at the student's top-k, then its tail.
  teacher_entropy_N: Optional[jax.Array] = None      # teacher entropy over the full vocabulary.


def _tile_logits(h_tD: jax.Array, w_DV: jax.Array, temperature: float) -> jax.Array:
  # float32 accumulation: the log-sum-exp over 151,936 entries and the tail mass need it.
  return jnp.dot(h_tD, w_DV, preferred_element_type=jnp.float32) / temperature


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
  pad = rows - x.shape[0]
  return x if pad == 0 else jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))


def _tiles(x: jax.Array, tile: int) -> jax.Array:
  """`[N_padded, ...] -> [N_padded / tile, tile, ...]` for `lax.scan`."""
  return x.reshape((x.shape[0] // tile, tile) + x.shape[1:])


def _untile(x: jax.Array) -> jax.Array:
  return x.reshape((-1,) + x.shape[2:])


# ---------------------------------------------------------------------------------------------------------------
# Student: differentiable, custom VJP that recomputes one tile's logits in the backward.
# ---------------------------------------------------------------------------------------------------------------
def _lse_and_entropy(z_tV):
  """Log-sum-exp and entropy of softmax(z) per row from a single pass of exponentials (the costly part on CPU):
  with e = exp(z - max), lse = max + log Σe and H = lse - Σ e·z / Σ e."""
  max_t = jnp.max(z_tV, axis=-1, keepdims=True)
  e_tV = jnp.exp(z_tV - max_t)
  sum_t = jnp.sum(e_tV, axis=-1)
  lse_t = max_t[:, 0] + jnp.log(sum_t)
  # Σ e·(z - max) rather than Σ e·z: no cancellation against lse when the logits are large.
  entropy_t = jnp.log(sum_t) - jnp.sum(e_tV * (z_tV - max_t), axis=-1) / sum_t
  return lse_t, entropy_t


def _student_tile_forward(h_tD, w_DV, ids_t, k, temperature):
  z_tV = _tile_logits(h_tD, w_DV, temperature)
  lse_t, entropy_t = _lse_and_entropy(z_tV)
  logp_t = jnp.take_along_axis(z_tV, ids_t[:, None], axis=-1)[:, 0] - lse_t
  vals_tK, idx_tK = jax.lax.top_k(z_tV, k)
  topk_tK1 = losses.topk_logprobs_with_tail(vals_tK - lse_t[:, None], add_tail=True)
  return logp_t, entropy_t, idx_tK.astype(jnp.int32), topk_tK1, lse_t


def _student_scan(h_ND, w_DV, ids_N, k, temperature, tile):
  def body(_, xs):
    h_tD, ids_t = xs
    return None, _student_tile_forward(h_tD, w_DV, ids_t, k, temperature)
  _, ys = jax.lax.scan(body, None, (_tiles(h_ND, tile), _tiles(ids_N, tile)))
  return tuple(_untile(y) for y in ys)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _student_head(h_ND, w_DV, ids_N, k, temperature, tile, vocab_chunk):
  logp_N, entropy_N, idx_NK, topk_NK1, _ = _student_scan(h_ND, w_DV, ids_N, k, temperature, tile)
  return logp_N, entropy_N, idx_NK, topk_NK1


def _student_head_fwd(h_ND, w_DV, ids_N, k, temperature, tile, vocab_chunk):
  del vocab_chunk  # backward only.
  logp_N, entropy_N, idx_NK, topk_NK1, lse_N = _student_scan(h_ND, w_DV, ids_N, k, temperature, tile)
  residuals = (h_ND, w_DV, ids_N, lse_N, entropy_N, idx_NK, topk_NK1)
  return (logp_N, entropy_N, idx_NK, topk_NK1), residuals


def _logit_cotangent(z_tV, lse_t, entropy_t, ids_t, idx_tK, topk_tK1, g_logp_t, g_ent_t, g_topk_tK1):
  """d(outputs)/d(scaled logits) contracted with the output cotangents, for one tile `[t, V]`.

  With p = softmax(z), log p = z - lse:  d log p_y = e_y - p;  dH = -p (log p + H);  d topk_j = e_{i_j} - p;
  the tail `log(1 - S)`, S = Σ_j p_{i_j}, has d tail / d topk_j = -p_{i_j} / (1 - S) while the clamp
  `min(logsumexp, -1e-7)` is inactive, else 0.
  """
  num_k = idx_tK.shape[-1]
  topk_lse_t = jax.nn.logsumexp(topk_tK1[:, :num_k], axis=-1)
  tail_active_t = (topk_lse_t < losses.TAIL_LSE_MAX).astype(jnp.float32)
  g_tail_t = g_topk_tK1[:, num_k] * tail_active_t
  g_k_tK = g_topk_tK1[:, :num_k] - g_tail_t[:, None] * jnp.exp(topk_tK1[:, :num_k] - topk_tK1[:, num_k:])
  logp_tV = z_tV - lse_t[:, None]
  p_tV = jnp.exp(logp_tV)
  dz_tV = -p_tV * ((g_logp_t + jnp.sum(g_k_tK, axis=-1))[:, None] + g_ent_t[:, None] * (logp_tV + entropy_t[:, None]))
  rows_t = jnp.arange(z_tV.shape[0])
  dz_tV = dz_tV.at[rows_t, ids_t].add(g_logp_t)
  return dz_tV.at[rows_t[:, None], idx_tK].add(g_k_tK)


def _add_outer_by_columns(acc_DV: jax.Array, h_tD: jax.Array, g_tV: jax.Array, chunk: int) -> jax.Array:
  """`acc_DV + h_tD.T @ g_tV` (float32), `chunk` vocabulary columns at a time, updated in place.

  Written as one `acc + dot(...)`, XLA:CPU materialises the `[D, V]` product as a temporary before the add (593 MiB
  at D = 1,024, V = 151,936: as much as the gradient itself). Column chunks keep that temporary at `[D, chunk]`
  while the accumulator (the loop carry, aliased with the program's output) is updated with dynamic-update-slice.
  When `chunk` does not divide V the last chunk is shifted left to stay in bounds and its columns that the previous
  chunk already added are masked out of `g`.
  """
  vocab = acc_DV.shape[1]
  h_Dt = h_tD.T.astype(jnp.float32)
  if chunk >= vocab or h_tD.shape[1] <= h_tD.shape[0]:
    # One product. With D <= tile the [D, V] temporary is no larger than a [tile, V] logits buffer the backward
    # holds anyway (XLA shares their space; the tiny demo's D = 64 is this case) and one dot is faster.
    return acc_DV + jnp.dot(h_Dt, g_tV, preferred_element_type=jnp.float32)
  num_chunks = -(-vocab // chunk)

  def body(i, acc_DV):
    start = jnp.minimum(i * chunk, vocab - chunk)
    g_tc = jax.lax.dynamic_slice_in_dim(g_tV, start, chunk, axis=1)
    if vocab % chunk:
      g_tc = jnp.where(start + jnp.arange(chunk) >= i * chunk, g_tc, 0.0)
    acc_Dc = jax.lax.dynamic_slice_in_dim(acc_DV, start, chunk, axis=1)
    acc_Dc = acc_Dc + jnp.dot(h_Dt, g_tc, preferred_element_type=jnp.float32)
    return jax.lax.dynamic_update_slice_in_dim(acc_DV, acc_Dc, start, axis=1)

  return jax.lax.fori_loop(0, num_chunks, body, acc_DV)


def _student_head_bwd(k, temperature, tile, vocab_chunk, residuals, cotangents):
  h_ND, w_DV, ids_N, lse_N, entropy_N, idx_NK, topk_NK1 = residuals
  g_logp_N, g_ent_N, _, g_topk_NK1 = cotangents  # the int top-k indices carry no cotangent.

  def body(dw_DV, xs):
    h_tD, ids_t, lse_t, ent_t, idx_tK, topk_tK1, g_logp_t, g_ent_t, g_topk_tK1 = xs
    z_tV = _tile_logits(h_tD, w_DV, temperature)
    dz_tV = _logit_cotangent(z_tV, lse_t, ent_t, ids_t, idx_tK, topk_tK1, g_logp_t, g_ent_t, g_topk_tK1)
    dlogits_tV = dz_tV / temperature
    dh_tD = jnp.dot(dlogits_tV, w_DV.T.astype(jnp.float32), preferred_element_type=jnp.float32)
    return _add_outer_by_columns(dw_DV, h_tD, dlogits_tV, vocab_chunk), dh_tD.astype(h_ND.dtype)

  xs = tuple(_tiles(x, tile) for x in (h_ND, ids_N, lse_N, entropy_N, idx_NK, topk_NK1, g_logp_N, g_ent_N,
                                       g_topk_NK1))
  dw_DV, dh_nD = jax.lax.scan(body, jnp.zeros(w_DV.shape, jnp.float32), xs)
  return _untile(dh_nD), dw_DV.astype(w_DV.dtype), None


_student_head.defvjp(_student_head_fwd, _student_head_bwd)


# ---------------------------------------------------------------------------------------------------------------
# Teacher: forward only (stop-gradient).
# ---------------------------------------------------------------------------------------------------------------
def _teacher_head(h_ND, w_DV, idx_NK, temperature, tile):
  def body(_, xs):
    h_tD, idx_tK = xs
    z_tV = _tile_logits(h_tD, w_DV, temperature)
    lse_t, entropy_t = _lse_and_entropy(z_tV)
    topk_tK1 = losses.topk_logprobs_with_tail(jnp.take_along_axis(z_tV, idx_tK, axis=-1) - lse_t[:, None],
                                              add_tail=True)
    return None, (topk_tK1, entropy_t)
  _, (topk, entropy) = jax.lax.scan(body, None, (_tiles(h_ND, tile), _tiles(idx_NK, tile)))
  return _untile(topk), _untile(entropy)


# ---------------------------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------------------------
def fused_head(student_hidden_ND: jax.Array, head_weight_DV: jax.Array, token_ids_N: jax.Array,
               teacher_hidden_ND: Optional[jax.Array] = None, *, teacher_head_weight_DV: Optional[jax.Array] = None,
               k: int = 100, temperature: float = 1.0, tile_size: int = DEFAULT_TILE_SIZE) -> HeadOutputs:
  """Head statistics per token without materialising `[N, V]` logits (see the module docstring).

  Logits are `hidden @ head_weight / temperature`. Gradients flow to `student_hidden_ND` and `head_weight_DV`
  through `logp_N`, `entropy_N` and `student_topk_logp_NK1`. The teacher (its hidden states aligned to the same N
  response tokens; its head weight defaults to the student's, e.g. tied or at EMA initialisation) is stop-gradient.
  `N` need not divide `tile_size` (rows are zero-padded and dropped).
  """
  num, width = student_hidden_ND.shape
  chex.assert_shape(head_weight_DV, (width, None))
  chex.assert_shape(token_ids_N, (num,))
  vocab = head_weight_DV.shape[1]
  if not 0 < k <= vocab:
    raise ValueError(f"fused_head: k must be in [1, V={vocab}], got {k}")
  if tile_size <= 0:
    raise ValueError(f"fused_head: tile_size must be > 0, got {tile_size}")
  tile = min(tile_size, max(num, 1))
  padded = -(-num // tile) * tile
  logp, entropy, idx, topk = _student_head(_pad_rows(student_hidden_ND, padded), head_weight_DV,
                                           _pad_rows(token_ids_N.astype(jnp.int32), padded), k, float(temperature),
                                           tile, DEFAULT_VOCAB_CHUNK)
  out = HeadOutputs(logp[:num], entropy[:num], idx[:num], topk[:num])
  if teacher_hidden_ND is None:
    return out
  chex.assert_shape(teacher_hidden_ND, (num, width))
  t_weight = head_weight_DV if teacher_head_weight_DV is None else teacher_head_weight_DV
  chex.assert_shape(t_weight, (width, vocab))
  t_topk, t_entropy = _teacher_head(jax.lax.stop_gradient(_pad_rows(teacher_hidden_ND, padded)),
                                    jax.lax.stop_gradient(t_weight), idx, float(temperature), tile)
  return out._replace(teacher_topk_logp_NK1=t_topk[:num], teacher_entropy_N=t_entropy[:num])


def head_divergence(out: HeadOutputs, *, alpha: float = 0.5, add_tail: bool = True) -> jax.Array:
  """Per-token SDPO divergence `[N]` from `fused_head` outputs; equals `losses.topk_jsd` on the full logits."""
  if out.teacher_topk_logp_NK1 is None:
    raise ValueError("head_divergence: fused_head was called without teacher_hidden_ND")
  student, teacher = out.student_topk_logp_NK1, out.teacher_topk_logp_NK1
  if not add_tail:
    # Drop the tail and renormalise the top-k, as `losses.topk_logprobs_with_tail(add_tail=False)`.
    num_k = out.topk_idx_NK.shape[-1]
    student = losses.topk_logprobs_with_tail(student[..., :num_k], add_tail=False)
    teacher = losses.topk_logprobs_with_tail(teacher[..., :num_k], add_tail=False)
  return losses.generalized_jsd(student, teacher, alpha=alpha)


def fused_topk_jsd(student_hidden_ND: jax.Array, head_weight_DV: jax.Array, teacher_hidden_ND: jax.Array, *,
                   teacher_head_weight_DV: Optional[jax.Array] = None, k: int = 100, alpha: float = 0.5,
                   add_tail: bool = True, temperature: float = 1.0,
                   tile_size: int = DEFAULT_TILE_SIZE) -> jax.Array:
  """`losses.topk_jsd(h @ W, h_T @ W_T, ...)` `[N]` through the fused head (no `[N, V]` array)."""
  ids = jnp.zeros(student_hidden_ND.shape[:1], jnp.int32)
  out = fused_head(student_hidden_ND, head_weight_DV, ids, teacher_hidden_ND,
                   teacher_head_weight_DV=teacher_head_weight_DV, k=k, temperature=temperature, tile_size=tile_size)
  return head_divergence(out, alpha=alpha, add_tail=add_tail)
