"""Fused, token-tiled LM head: everything the losses need from the logits, without `[X, V]` logits.

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

This module also owns the tail-bucket maths (`TAIL_LSE_MAX`, `tail_log_prob`, `topk_logprobs_with_tail`), which the
losses module (algorithms/losses.py) re-exports, and `head_entropy`, the teacher-entropy half alone (no gradient, no
top-k). It imports nothing from the algorithms package. How the losses are formed without recomputing logits (what
`losses.head_divergence` does):
  `topk_jsd(h @ W, h_T @ W_T, k, α)  ==  generalized_jsd(out.student_topk_logp_XE1, out.teacher_topk_logp_XE1, α)`
and the GRPO / SDPO IS ratios use `out.logp_X`. Values and gradients match the unfused path (tests/test_fused_head.py).

A top-k that covers the whole vocabulary (k >= V; k > V is allowed and means k = V) has no tail: E = V entries hold
all the mass, and no tail bucket is appended (a clamped `log(-expm1(min(lse, -1e-7)))` would invent a bucket of mass
~1e-7 in both distributions), so the divergence is exactly the full-vocabulary one.

Letters (the alphabet of `srpo_jax.models.qwen3`): X flattened tokens (B·T), D model width, V vocabulary, E = min(k, V)
top-k entries, E1 = E + 1 (tail bucket last) when E < V, E1 = E = V when the top-k covers the vocabulary (no tail);
a lowercase t is the rows of one token tile.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp


# bench/loss_memory.py (4,096 tokens, V = 151,936, D = 1,024, CPU): tile 256 runs forward + backward in about the
# naive time with 450 MiB of temporaries (three float32 [256, V] logits-sized buffers in the forward tile body).
DEFAULT_TILE_SIZE = 256
# Vocabulary columns per head-weight-gradient update in the backward (see `_add_outer_by_columns`): [D, chunk] float32
# temporaries (32 MiB at D = 1,024), few enough loop iterations to cost nothing measurable.
DEFAULT_VOCAB_CHUNK = 8192
TAIL_LSE_MAX = -1e-7  # spec: tail = log(-expm1(min(logsumexp(top-k), -1e-7))).


class HeadOutputs(NamedTuple):
  """Per-token outputs of `fused_head`; teacher fields are None without a teacher."""
  logp_X: jax.Array                    # log π_θ(y_t), float32.
  entropy_X: jax.Array                 # student entropy over the full vocabulary, float32.
  topk_idx_XE: jax.Array               # student top-k vocabulary indices, int32 (descending logits), E = min(k, V).
  student_topk_logp_XE1: jax.Array     # student log-probs at the top-k, then log(1 - Σ p) (tail bucket; none if E = V).
  teacher_topk_logp_XE1: Optional[jax.Array] = None  # teacher log-probs at the student's top-k, then its tail.
  teacher_entropy_X: Optional[jax.Array] = None      # teacher entropy over the full vocabulary.


# ---------------------------------------------------------------------------------------------------------------
# The tail bucket: top-k log-probs to a distribution (the SDPO divergence's support).
# ---------------------------------------------------------------------------------------------------------------
def tail_log_prob(topk_logp: jax.Array) -> jax.Array:
  """`log(1 - Σ_e p)` over the last axis `[..., E] -> [...]`, as `log(-expm1(min(logsumexp, -1e-7)))`."""
  lse = jax.nn.logsumexp(topk_logp, axis=-1)
  return jnp.log(-jnp.expm1(jnp.minimum(lse, TAIL_LSE_MAX)))


def covers_vocab(num_entries: int, vocab_size: Optional[int]) -> bool:
  """Whether `num_entries` top-k entries are the whole vocabulary (then there is no tail)."""
  return vocab_size is not None and num_entries >= vocab_size


def topk_logprobs_with_tail(topk_logp: jax.Array, *, add_tail: bool = True,
                            vocab_size: Optional[int] = None) -> jax.Array:
  """Top-k log-probs `[..., E]` (normalised over the full vocabulary) to a distribution's log-probs.

  `add_tail=True`: `[..., E1]`, the tail bucket appended (no renormalisation). `add_tail=False`: `[..., E]`
  renormalised over the top-k (the SDPO code's behaviour without a tail). `vocab_size` (V), when given: if the E
  entries cover it (E >= V) the top-k already is the whole distribution and is returned as it is, with no tail
  bucket in either mode (`[..., E]`; the clamped tail would otherwise add a bucket of mass ~1e-7).
  """
  if covers_vocab(topk_logp.shape[-1], vocab_size):
    return topk_logp
  if add_tail:
    return jnp.concatenate([topk_logp, tail_log_prob(topk_logp)[..., None]], axis=-1)
  return topk_logp - jax.nn.logsumexp(topk_logp, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------------------------
# Tiling helpers and the tile body shared by the student, the teacher and `head_entropy`.
# ---------------------------------------------------------------------------------------------------------------
def _tile_logits(h_tD: jax.Array, w_DV: jax.Array, temperature: float) -> jax.Array:
  # float32 accumulation: the log-sum-exp over 151,936 entries and the tail mass need it.
  return jnp.dot(h_tD, w_DV, preferred_element_type=jnp.float32) / temperature


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
  pad = rows - x.shape[0]
  return x if pad == 0 else jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))


def _tiling(caller: str, num: int, tile_size: int) -> tuple[int, int]:
  """(tile rows, padded row count) for `num` rows: the tile shrinks to `num` when smaller; padded % tile == 0."""
  if tile_size <= 0:
    raise ValueError(f"{caller}: tile_size must be > 0, got {tile_size}")
  tile = min(tile_size, max(num, 1))
  return tile, -(-num // tile) * tile


def _tiles(x: jax.Array, tile: int) -> jax.Array:
  """`[X_padded, ...] -> [X_padded / tile, tile, ...]` for `lax.scan`, strided: tile i holds rows i, i + n, i + 2n, ...
  (n = X_padded / tile). When the rows are sharded over devices in contiguous blocks (a batch split over
  ("data", "fsdp")), every tile then spans all devices and each device works on its own rows of every tile: the
  scan needs no resharding and the head's work is split like the batch (a contiguous tile would live on one device)."""
  return jnp.swapaxes(x.reshape((tile, x.shape[0] // tile) + x.shape[1:]), 0, 1)


def _untile(x: jax.Array) -> jax.Array:
  """Inverse of `_tiles`: `[X_padded / tile, tile, ...] -> [X_padded, ...]`."""
  return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])


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


# ---------------------------------------------------------------------------------------------------------------
# Student: differentiable, custom VJP that recomputes one tile's logits in the backward.
# ---------------------------------------------------------------------------------------------------------------
def _student_tile_forward(h_tD, w_DV, ids_t, k, temperature):
  z_tV = _tile_logits(h_tD, w_DV, temperature)
  lse_t, entropy_t = _lse_and_entropy(z_tV)
  logp_t = jnp.take_along_axis(z_tV, ids_t[:, None], axis=-1)[:, 0] - lse_t
  vals_tE, idx_tE = jax.lax.top_k(z_tV, k)
  topk_tE1 = topk_logprobs_with_tail(vals_tE - lse_t[:, None], add_tail=True, vocab_size=z_tV.shape[-1])
  return logp_t, entropy_t, idx_tE.astype(jnp.int32), topk_tE1, lse_t


def _student_scan(h_XD, w_DV, ids_X, k, temperature, tile):
  def body(_, xs):
    h_tD, ids_t = xs
    return None, _student_tile_forward(h_tD, w_DV, ids_t, k, temperature)
  _, ys = jax.lax.scan(body, None, (_tiles(h_XD, tile), _tiles(ids_X, tile)))
  return tuple(_untile(y) for y in ys)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _student_head(h_XD, w_DV, ids_X, k, temperature, tile, vocab_chunk):
  logp_X, entropy_X, idx_XE, topk_XE1, _ = _student_scan(h_XD, w_DV, ids_X, k, temperature, tile)
  return logp_X, entropy_X, idx_XE, topk_XE1


def _student_head_fwd(h_XD, w_DV, ids_X, k, temperature, tile, vocab_chunk):
  del vocab_chunk  # backward only.
  logp_X, entropy_X, idx_XE, topk_XE1, lse_X = _student_scan(h_XD, w_DV, ids_X, k, temperature, tile)
  residuals = (h_XD, w_DV, ids_X, lse_X, entropy_X, idx_XE, topk_XE1)
  return (logp_X, entropy_X, idx_XE, topk_XE1), residuals


def _logit_cotangent(z_tV, lse_t, entropy_t, ids_t, idx_tE, topk_tE1, g_logp_t, g_ent_t, g_topk_tE1):
  """d(outputs)/d(scaled logits) contracted with the output cotangents, for one tile `[t, V]`.

  With p = softmax(z), log p = z - lse:  d log p_y = e_y - p;  dH = -p (log p + H);  d topk_j = e_{i_j} - p;
  the tail `log(1 - S)`, S = Σ_j p_{i_j}, has d tail / d topk_j = -p_{i_j} / (1 - S) while the clamp
  `min(logsumexp, -1e-7)` is inactive, else 0. A top-k covering the vocabulary has no tail column (E1 = E).
  """
  num_e = idx_tE.shape[-1]
  if topk_tE1.shape[-1] == num_e:  # no tail bucket: k >= V
    g_k_tE = g_topk_tE1
  else:
    topk_lse_t = jax.nn.logsumexp(topk_tE1[:, :num_e], axis=-1)
    tail_active_t = (topk_lse_t < TAIL_LSE_MAX).astype(jnp.float32)
    g_tail_t = g_topk_tE1[:, num_e] * tail_active_t
    g_k_tE = g_topk_tE1[:, :num_e] - g_tail_t[:, None] * jnp.exp(topk_tE1[:, :num_e] - topk_tE1[:, num_e:])
  logp_tV = z_tV - lse_t[:, None]
  p_tV = jnp.exp(logp_tV)
  dz_tV = -p_tV * ((g_logp_t + jnp.sum(g_k_tE, axis=-1))[:, None] + g_ent_t[:, None] * (logp_tV + entropy_t[:, None]))
  rows_t = jnp.arange(z_tV.shape[0])
  dz_tV = dz_tV.at[rows_t, ids_t].add(g_logp_t)
  return dz_tV.at[rows_t[:, None], idx_tE].add(g_k_tE)


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
  h_XD, w_DV, ids_X, lse_X, entropy_X, idx_XE, topk_XE1 = residuals
  g_logp_X, g_ent_X, _, g_topk_XE1 = cotangents  # the int top-k indices carry no cotangent.

  def body(dw_DV, xs):
    h_tD, ids_t, lse_t, ent_t, idx_tE, topk_tE1, g_logp_t, g_ent_t, g_topk_tE1 = xs
    z_tV = _tile_logits(h_tD, w_DV, temperature)
    dz_tV = _logit_cotangent(z_tV, lse_t, ent_t, ids_t, idx_tE, topk_tE1, g_logp_t, g_ent_t, g_topk_tE1)
    dlogits_tV = dz_tV / temperature
    dh_tD = jnp.dot(dlogits_tV, w_DV.T.astype(jnp.float32), preferred_element_type=jnp.float32)
    return _add_outer_by_columns(dw_DV, h_tD, dlogits_tV, vocab_chunk), dh_tD.astype(h_XD.dtype)

  xs = tuple(_tiles(x, tile) for x in (h_XD, ids_X, lse_X, entropy_X, idx_XE, topk_XE1, g_logp_X, g_ent_X,
                                       g_topk_XE1))
  dw_DV, dh_XD = jax.lax.scan(body, jnp.zeros(w_DV.shape, jnp.float32), xs)
  return _untile(dh_XD), dw_DV.astype(w_DV.dtype), None


_student_head.defvjp(_student_head_fwd, _student_head_bwd)


# ---------------------------------------------------------------------------------------------------------------
# Teacher: forward only (the callers stop the gradient).
# ---------------------------------------------------------------------------------------------------------------
def _teacher_head(h_XD, w_DV, idx_XE, temperature, tile):
  def body(_, xs):
    h_tD, idx_tE = xs
    z_tV = _tile_logits(h_tD, w_DV, temperature)
    lse_t, entropy_t = _lse_and_entropy(z_tV)
    topk_tE1 = topk_logprobs_with_tail(jnp.take_along_axis(z_tV, idx_tE, axis=-1) - lse_t[:, None], add_tail=True,
                                       vocab_size=z_tV.shape[-1])
    return None, (topk_tE1, entropy_t)
  _, (topk, entropy) = jax.lax.scan(body, None, (_tiles(h_XD, tile), _tiles(idx_XE, tile)))
  return _untile(topk), _untile(entropy)


def _entropy_scan(h_XD, w_DV, temperature, tile):
  def body(_, h_tD):
    return None, _lse_and_entropy(_tile_logits(h_tD, w_DV, temperature))[1]
  _, entropy = jax.lax.scan(body, None, _tiles(h_XD, tile))
  return _untile(entropy)


# ---------------------------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------------------------
def fused_head(student_hidden_XD: jax.Array, head_weight_DV: jax.Array, token_ids_X: jax.Array,
               teacher_hidden_XD: Optional[jax.Array] = None, *, teacher_head_weight_DV: Optional[jax.Array] = None,
               k: int = 100, temperature: float = 1.0, tile_size: int = DEFAULT_TILE_SIZE) -> HeadOutputs:
  """Head statistics per token without materialising `[X, V]` logits (see the module docstring); E = min(k, V).

  Logits are `hidden @ head_weight / temperature`. Gradients flow to `student_hidden_XD` and `head_weight_DV`
  through `logp_X`, `entropy_X` and `student_topk_logp_XE1`. The teacher (its hidden states aligned to the same X
  response tokens; its head weight defaults to the student's, e.g. tied or at EMA initialisation) is stop-gradient.
  `X` need not divide `tile_size` (rows are zero-padded and dropped). `k >= V` covers the vocabulary: E = V entries
  and no tail bucket (`student_topk_logp_XE1` is then `[X, V]`).
  """
  num, width = student_hidden_XD.shape
  chex.assert_shape(head_weight_DV, (width, None))
  chex.assert_shape(token_ids_X, (num,))
  vocab = head_weight_DV.shape[1]
  if k <= 0:
    raise ValueError(f"fused_head: k must be >= 1, got {k}")
  k = min(k, vocab)
  tile, padded = _tiling("fused_head", num, tile_size)
  logp, entropy, idx, topk = _student_head(_pad_rows(student_hidden_XD, padded), head_weight_DV,
                                           _pad_rows(token_ids_X.astype(jnp.int32), padded), k, float(temperature),
                                           tile, DEFAULT_VOCAB_CHUNK)
  out = HeadOutputs(logp[:num], entropy[:num], idx[:num], topk[:num])
  if teacher_hidden_XD is None:
    return out
  chex.assert_shape(teacher_hidden_XD, (num, width))
  t_weight = head_weight_DV if teacher_head_weight_DV is None else teacher_head_weight_DV
  chex.assert_shape(t_weight, (width, vocab))
  t_topk, t_entropy = _teacher_head(jax.lax.stop_gradient(_pad_rows(teacher_hidden_XD, padded)),
                                    jax.lax.stop_gradient(t_weight), idx, float(temperature), tile)
  return out._replace(teacher_topk_logp_XE1=t_topk[:num], teacher_entropy_X=t_entropy[:num])


def head_entropy(hidden_XD: jax.Array, head_weight_DV: jax.Array, *, temperature: float = 1.0,
                 tile_size: int = DEFAULT_TILE_SIZE) -> jax.Array:
  """Entropy of `softmax(hidden @ head_weight / temperature)` per token `[X]`, float32, without `[X, V]` logits.

  No gradient (both inputs are stop-gradient): it is the teacher-entropy input of the DW weights, the same tiles and
  tile body as `fused_head(...).teacher_entropy_X`, without the top-k. `X` need not divide `tile_size`.
  """
  num, width = hidden_XD.shape
  chex.assert_shape(head_weight_DV, (width, None))
  tile, padded = _tiling("head_entropy", num, tile_size)
  entropy = _entropy_scan(jax.lax.stop_gradient(_pad_rows(hidden_XD, padded)), jax.lax.stop_gradient(head_weight_DV),
                          float(temperature), tile)
  return entropy[:num]
