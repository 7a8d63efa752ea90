"""Causal grouped-query attention, three ways: `naive` (the reference), `blockwise` (every backend) and `cudnn`.

All three compute, per query q at slot `q_slot` and key at slot s,

    softmax_s( q·k_s / sqrt(H)  where  s <= q_slot and kv_valid[s] ) · v

with the same convention for a query that sees no valid key (a left-padding query): a uniform average over the S
real keys, which is what a finite mask fill gives (such rows carry no loss; the point is that they stay finite).

- `naive` materialises the `[B, K, R, Q, S]` float32 scores: 13 GiB per sequence per layer at S = 10,240 with 32
  heads. Kept as the reference the others are tested against.
- `blockwise` scans over key blocks of `block` slots with an online softmax (running max and sum, float32), and a
  custom VJP that recomputes each block's probabilities from the saved log-sum-exp in the backward (flash
  attention's recurrence), `query_block` queries at a time, so forward and backward hold
  `[B, K, R, query_block, block]` scores at a time: memory O(S) (the output and its log-sum-exp), any padding layout.
- `cudnn` is `jax.nn.dot_product_attention(implementation="cudnn")` (cuDNN flash attention, NVIDIA GPUs only,
  bf16/fp16). It takes per-row sequence lengths, so it needs RIGHT-padded rows (valid tokens a prefix of each row,
  queries = keys = slots 0..S-1); callers say so with `right_padded=True`.

`select(impl, right_padded, query_len, platform)` resolves the choice per call: "auto" is cuDNN on GPUs for
right-padded full-sequence forwards, `naive` for a single decode query (its scores are only [B, N, 1, S]),
`blockwise` otherwise; "cudnn" forces cuDNN wherever the layout allows it (right-padded forwards; the sampler's
left-padded prefill falls back to blockwise, its decode to naive), which is how a deviceless compile for a GPU
target (whose host backend is the CPU) asks for it.

Letters (srpo_jax/models/qwen3.py): B, S (key slots), N, K, H; locally Q query positions, R query heads per
key/value head, J key blocks, I query chunks.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "naive", "blockwise", "cudnn")
DEFAULT_BLOCK = 512
DEFAULT_QUERY_BLOCK = 2048
_MASKED = jnp.finfo(jnp.float32).min  # finite: a fully masked row averages its keys instead of producing NaN


def select(impl: str, *, right_padded: bool, query_len: int, platform: str | None = None,
           dtype=jnp.bfloat16) -> str:
  """The implementation used for one call, given the requested one, the call's layout, the platform and the compute
  dtype (cuDNN flash attention takes bf16/fp16 only: a float32 model on a GPU runs blockwise)."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {impl!r}: expected one of {IMPLEMENTATIONS}")
  if impl in ("naive", "blockwise"):
    return impl
  if query_len == 1:
    return "naive"
  on_gpu = (platform or jax.default_backend()) == "gpu"
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if right_padded and half and (impl == "cudnn" or on_gpu):
    return "cudnn"
  return "blockwise"


def attention(q_BQNH, k_BSKH, v_BSKH, q_slots_BQ, kv_valid_BS, *, impl: str = "auto", right_padded: bool = False,
              block: int = DEFAULT_BLOCK, query_block: int = DEFAULT_QUERY_BLOCK):
  """Causal GQA attention output [B, Q, N, H] (see the module docstring); scores in float32, output in q's dtype."""
  impl = select(impl, right_padded=right_padded, query_len=q_BQNH.shape[1], dtype=q_BQNH.dtype)
  if impl == "naive":
    return naive_attention(q_BQNH, k_BSKH, v_BSKH, q_slots_BQ, kv_valid_BS)
  if impl == "blockwise":
    return blockwise_attention(q_BQNH, k_BSKH, v_BSKH, q_slots_BQ, kv_valid_BS, block=block, query_block=query_block)
  # >= 1: a micro-batch's padding rows are empty (no loss), and cuDNN has no defined output for a length-0 row.
  lengths_B = jnp.maximum(jnp.sum(kv_valid_BS, axis=1, dtype=jnp.int32), 1)
  return jax.nn.dot_product_attention(q_BQNH, k_BSKH.astype(q_BQNH.dtype), v_BSKH.astype(q_BQNH.dtype),
                                      is_causal=True, query_seq_lengths=lengths_B, key_value_seq_lengths=lengths_B,
                                      implementation="cudnn")


def _grouped(q_BQNH, num_kv_heads: int):
  b, nq, n, h = q_BQNH.shape
  return q_BQNH.reshape(b, nq, num_kv_heads, n // num_kv_heads, h)  # [B, Q, K, R, H]


def naive_attention(q_BQNH, k_BSKH, v_BSKH, q_slots_BQ, kv_valid_BS):
  """The reference: full [B, K, R, Q, S] scores."""
  b, nq, n, h = q_BQNH.shape
  q = _grouped(q_BQNH, k_BSKH.shape[2])
  scores = jnp.einsum("BQKRH,BSKH->BKRQS", q, k_BSKH.astype(q.dtype)).astype(jnp.float32) * h ** -0.5
  slots_S = jnp.arange(k_BSKH.shape[1])
  mask_BQS = (slots_S[None, None, :] <= q_slots_BQ[:, :, None]) & kv_valid_BS[:, None, :]
  scores = jnp.where(mask_BQS[:, None, None], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum("BKRQS,BSKH->BQKRH", probs, v_BSKH.astype(q.dtype)).reshape(b, nq, n, h)


# ---------------------------------------------------------------------------------------------------------------------
# Blockwise (online softmax) with a recomputing backward
# ---------------------------------------------------------------------------------------------------------------------
def _key_blocks(k_BSKH, v_BSKH, kv_valid_BS, block):
  """Keys, values, validity and slot ids split into J blocks of `block` slots (the last one padded)."""
  s = k_BSKH.shape[1]
  block = min(block, s)
  pad = -s % block
  if pad:
    k_BSKH = jnp.pad(k_BSKH, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v_BSKH = jnp.pad(v_BSKH, ((0, 0), (0, pad), (0, 0), (0, 0)))
    kv_valid_BS = jnp.pad(kv_valid_BS, ((0, 0), (0, pad)))
  j = (s + pad) // block
  split = lambda x: jnp.moveaxis(x.reshape((x.shape[0], j, block) + x.shape[2:]), 1, 0)  # [J, B, block, ...]
  slots_JW = jnp.arange(s + pad).reshape(j, block)
  return split(k_BSKH), split(v_BSKH), split(kv_valid_BS), slots_JW, s


def _block_scores(q_BQKRH, k_BWKH, valid_BW, slots_W, q_slots_BQ, num_real_keys, scale):
  """Masked float32 scores [B, K, R, Q, W] of one key block: masked keys get the finite fill, block padding -inf.

  The mask is ADDED as a [B, Q, W] bias (0, the fill or -inf) rather than selected against a constant: XLA hoists a
  constant broadcast to the full [B, K, R, Q, W] out of the key-block loop and keeps it for the whole loop, two such
  buffers (0.6 GiB each at 10,240 tokens and 32 heads) per attention call. fill + s rounds to the fill for any score
  of a sane magnitude (|s| < 1e31), so the values equal a select's."""
  s = jnp.einsum("BQKRH,BWKH->BKRQW", q_BQKRH, k_BWKH.astype(q_BQKRH.dtype)).astype(jnp.float32) * scale
  allowed_BQW = (slots_W[None, None, :] <= q_slots_BQ[:, :, None]) & valid_BW[:, None, :]
  bias_BQW = jnp.where(allowed_BQW, 0.0, _MASKED)
  bias_BQW = jnp.where((slots_W < num_real_keys)[None, None, :], bias_BQW, -jnp.inf)
  return s + bias_BQW[:, None, None]


def _blockwise_forward(q_BQKRH, k_blocks, v_blocks, valid_blocks, slots_JW, q_slots_BQ, num_real_keys, scale):
  b, nq, kh, r, h = q_BQKRH.shape
  init = (jnp.full((b, kh, r, nq), -jnp.inf, jnp.float32), jnp.zeros((b, kh, r, nq), jnp.float32),
          jnp.zeros((b, kh, r, nq, h), jnp.float32))

  def body(carry, xs):
    m, l, acc = carry
    k_BWKH, v_BWKH, valid_BW, slots_W = xs
    s = _block_scores(q_BQKRH, k_BWKH, valid_BW, slots_W, q_slots_BQ, num_real_keys, scale)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))  # finite from the first block on (it holds real keys)
    p = jnp.exp(s - m_new[..., None])
    corr = jnp.exp(m - m_new)
    l = l * corr + jnp.sum(p, axis=-1)
    acc = acc * corr[..., None] + jnp.einsum("BKRQW,BWKH->BKRQH", p.astype(v_BWKH.dtype), v_BWKH,
                                             preferred_element_type=jnp.float32)
    return (m_new, l, acc), None

  (m, l, acc), _ = jax.lax.scan(body, init, (k_blocks, v_blocks, valid_blocks, slots_JW))
  out = acc / l[..., None]
  return out, m + jnp.log(l)  # [B, K, R, Q, H] float32, log-sum-exp [B, K, R, Q]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _blockwise(q_BQKRH, k_BSKH, v_BSKH, q_slots_BQ, kv_valid_BS, block, scale):
  k_blocks, v_blocks, valid_blocks, slots_JW, s = _key_blocks(k_BSKH, v_BSKH, kv_valid_BS, block)
  out, _ = _blockwise_forward(q_BQKRH, k_blocks, v_blocks, valid_blocks, slots_JW, q_slots_BQ, s, scale)
  return out


def _blockwise_fwd(q_BQKRH, k_BSKH, v_BSKH, q_slots_BQ, kv_valid_BS, block, scale):
  k_blocks, v_blocks, valid_blocks, slots_JW, s = _key_blocks(k_BSKH, v_BSKH, kv_valid_BS, block)
  out, lse = _blockwise_forward(q_BQKRH, k_blocks, v_blocks, valid_blocks, slots_JW, q_slots_BQ, s, scale)
  return out, (q_BQKRH, k_BSKH, v_BSKH, q_slots_BQ, kv_valid_BS, out, lse)


def _blockwise_bwd(block, scale, res, g_BKRQH):
  q_BQKRH, k_BSKH, v_BSKH, q_slots_BQ, kv_valid_BS, out, lse = res
  k_blocks, v_blocks, valid_blocks, slots_JW, s = _key_blocks(k_BSKH, v_BSKH, kv_valid_BS, block)
  g = g_BKRQH.astype(jnp.float32)
  delta = jnp.sum(g * out, axis=-1)  # [B, K, R, Q]: Σ_h dO·O, the softmax backward's row term
  q32 = q_BQKRH.astype(jnp.float32)

  def body(dq, xs):
    k_BWKH, v_BWKH, valid_BW, slots_W = xs
    sc = _block_scores(q_BQKRH, k_BWKH, valid_BW, slots_W, q_slots_BQ, s, scale)
    p = jnp.exp(sc - lse[..., None])  # the forward's probabilities of this block, recomputed
    dv = jnp.einsum("BKRQW,BKRQH->BWKH", p, g)
    dp = jnp.einsum("BKRQH,BWKH->BKRQW", g, v_BWKH.astype(jnp.float32))
    ds = p * (dp - delta[..., None]) * scale
    dq = dq + jnp.einsum("BKRQW,BWKH->BQKRH", ds, k_BWKH.astype(jnp.float32))
    dk = jnp.einsum("BKRQW,BQKRH->BWKH", ds, q32)
    return dq, (dk, dv)

  dq, (dk_J, dv_J) = jax.lax.scan(body, jnp.zeros(q_BQKRH.shape, jnp.float32),
                                  (k_blocks, v_blocks, valid_blocks, slots_JW))
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape((x.shape[1], -1) + x.shape[3:])[:, :s]
  return (dq.astype(q_BQKRH.dtype), unblock(dk_J).astype(k_BSKH.dtype), unblock(dv_J).astype(v_BSKH.dtype),
          None, None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(q_BQNH, k_BSKH, v_BSKH, q_slots_BQ, kv_valid_BS, *, block: int = DEFAULT_BLOCK,
                        query_block: int = DEFAULT_QUERY_BLOCK):
  """Online-softmax attention over key blocks, `query_block` queries at a time; equals `naive_attention` (values and
  gradients).

  Queries go in I chunks of `query_block` (a `lax.map`, differentiated through `_blockwise`'s own VJP per chunk), so
  a key block's scores are [B, K, R, query_block, W] rather than [B, K, R, Q, W]: 0.13 GiB instead of 0.67 GiB in
  float32 at 10,240 tokens, 32 heads and W = 512; the backward holds three of them."""
  b, nq, n, h = q_BQNH.shape
  q = _grouped(q_BQNH, k_BSKH.shape[2])
  q_slots_BQ, kv_valid_BS = q_slots_BQ.astype(jnp.int32), kv_valid_BS.astype(bool)
  run = lambda q_BQKRH, slots_BQ: _blockwise(q_BQKRH, k_BSKH, v_BSKH, slots_BQ, kv_valid_BS, int(block),
                                             float(h ** -0.5))
  if nq <= query_block:
    out_BKRQH = run(q, q_slots_BQ)
  else:
    pad = -nq % query_block  # padding queries at slot -1 see no key (the masked fill) and are dropped below
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    slots = jnp.pad(q_slots_BQ, ((0, 0), (0, pad)), constant_values=-1)
    chunks = lambda x: jnp.moveaxis(x.reshape((b, -1, query_block) + x.shape[2:]), 1, 0)  # [I, B, query_block, ...]
    out_IBKRQH = jax.lax.map(lambda xs: run(*xs), (chunks(q), chunks(slots)))
    out_BKRIQH = jnp.moveaxis(out_IBKRQH, 0, 3)
    out_BKRQH = out_BKRIQH.reshape(out_BKRIQH.shape[:3] + (-1, h))[:, :, :, :nq]
  return jnp.einsum("BKRQH->BQKRH", out_BKRQH).reshape(b, nq, n, h).astype(q_BQNH.dtype)
