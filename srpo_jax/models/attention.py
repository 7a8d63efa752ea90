"""Causal grouped-query attention, four ways: `naive` (the reference), `blockwise` (every backend), `cudnn` (NVIDIA
GPUs) and `splash` (TPUs).

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

- `splash` is Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`): causal, GQA, the
  padding given as segment ids (valid tokens 1, padding 0: a token attends only tokens of its own kind, so no row is
  empty), S padded to its 128-multiple block. For the no-cache forward (keys = the queries' own positions, any
  padding layout). It runs inside `jax.shard_map` over the mesh's row axes (a Pallas call is not partitioned by XLA).
  Off TPU it runs in Pallas's interpreter (`interpret=True`), the reference mode the CPU tests compare. A padding
  query averages the padding keys up to it instead of all keys (rows that carry no loss either way).

`select(impl, right_padded, query_len, platform, self_attention)` resolves the choice per call: "auto" is cuDNN on
GPUs for right-padded full-sequence forwards, splash on TPUs for full-sequence forwards, `naive` for a single decode
query (its scores are only [B, N, 1, S]), `blockwise` otherwise. "cudnn" and "splash" force their kernel wherever the
layout allows it (the sampler's prefill falls back to blockwise, its decode to naive). `platform` is the platform the
program is compiled for (`Qwen3Config.platform`, which the trainer and the planner set from the mesh's devices), so
that a deviceless compile for a GPU or TPU target, whose host backend is the CPU, takes that target's kernel; None
means `jax.default_backend()`.

Letters (srpo_jax/models/qwen3.py): B, S (key slots), N, K, H; locally Q query positions, R query heads per
key/value head, J key blocks, I query chunks.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "naive", "blockwise", "cudnn", "splash")
PLATFORMS = ("cpu", "gpu", "tpu")
DEFAULT_BLOCK = 512
DEFAULT_QUERY_BLOCK = 2048
_MASKED = jnp.finfo(jnp.float32).min  # finite: a fully masked row averages its keys instead of producing NaN


def platform_of(device) -> str:
  """"cpu" | "gpu" | "tpu" of a device (a deviceless CUDA topology's devices say "cuda")."""
  p = device.platform.lower()
  return "gpu" if p in ("gpu", "cuda", "rocm") else p


def select(impl: str, *, right_padded: bool, query_len: int, platform: str | None = None,
           dtype=jnp.bfloat16, self_attention: bool = False) -> str:
  """The implementation used for one call, given the requested one, the call's layout (`self_attention`: the keys
  are the queries' own positions, no cache), the platform and the compute dtype (cuDNN flash attention takes
  bf16/fp16 only: a float32 model on a GPU runs blockwise)."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {impl!r}: expected one of {IMPLEMENTATIONS}")
  if impl in ("naive", "blockwise"):
    return impl
  if query_len == 1:
    return "naive"
  platform = platform or jax.default_backend()
  if (impl == "splash" or (impl == "auto" and platform == "tpu")) and self_attention:
    return "splash"
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if right_padded and half and (impl == "cudnn" or (impl == "auto" and platform == "gpu")):
    return "cudnn"
  return "blockwise"


def attention(q_BQNH, k_BSKH, v_BSKH, q_slots_BQ, kv_valid_BS, *, impl: str = "auto", right_padded: bool = False,
              block: int = DEFAULT_BLOCK, query_block: int = DEFAULT_QUERY_BLOCK, platform: str | None = None,
              self_attention: bool = False):
  """Causal GQA attention output [B, Q, N, H] (see the module docstring); scores in float32, output in q's dtype.
  With `self_attention` (no cache) q_slots_BQ must be the positions 0..S-1 of each row."""
  impl = select(impl, right_padded=right_padded, query_len=q_BQNH.shape[1], platform=platform, dtype=q_BQNH.dtype,
                self_attention=self_attention)
  if impl == "naive":
    return naive_attention(q_BQNH, k_BSKH, v_BSKH, q_slots_BQ, kv_valid_BS)
  if impl == "blockwise":
    return blockwise_attention(q_BQNH, k_BSKH, v_BSKH, q_slots_BQ, kv_valid_BS, block=block, query_block=query_block)
  if impl == "splash":
    return splash_attention(q_BQNH, k_BSKH, v_BSKH, kv_valid_BS, interpret=(platform or jax.default_backend()) != "tpu")
  # cuDNN has no defined output for a length-0 row (a micro-batch's padding rows): clamp to 1 (those rows carry no
  # loss; their single visible key is padding).
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


# ---------------------------------------------------------------------------------------------------------------------
# Splash (Pallas, TPU)
# ---------------------------------------------------------------------------------------------------------------------
SPLASH_LANES = 128  # the TPU's lane width: splash blocks (and so the padded sequence) are multiples of it


def _splash_kernel(num_heads: int, seq: int, interpret: bool):
  """A causal splash-attention kernel over [N, seq, H] queries (GQA: keys and values [K, seq, H]), with the largest
  block of 512, 256 or 128 that divides `seq` (a multiple of SPLASH_LANES)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  blk = next(b for b in (512, 256, SPLASH_LANES) if seq % b == 0)
  sizes = splash.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                            block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
  mask = splash.MultiHeadMask([splash.CausalMask((seq, seq))] * num_heads)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q_BQNH, k_BSKH, v_BSKH, kv_valid_BS, *, interpret: bool = False):
  """Pallas splash attention of a no-cache forward (query q at slot q; see the module docstring for padding).

  Under a mesh context whose row axes ("data", "fsdp") split the batch, the kernel runs per device inside
  `jax.shard_map` (rows split, heads whole); elsewhere it is called directly."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  from srpo_jax import sharding
  b, s, n, h = q_BQNH.shape
  pad = -s % SPLASH_LANES
  kernel = _splash_kernel(n, s + pad, interpret)
  dt = q_BQNH.dtype

  def per_device(q_BQNH, k_BSKH, v_BSKH, valid_BS):
    seq = lambda x: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, pad), (0, 0)))  # [B, heads, S + pad, H]
    segments_BS = jnp.pad(valid_BS.astype(jnp.int32), ((0, 0), (0, pad)))  # padding tail: its own segment (0)
    one = lambda q, k, v, seg: kernel(q, k, v, segment_ids=splash.SegmentIds(q=seg, kv=seg))
    out = jax.vmap(one)(seq(q_BQNH * jnp.asarray(h ** -0.5, dt)), seq(k_BSKH.astype(dt)), seq(v_BSKH.astype(dt)),
                        segments_BS)
    return jnp.swapaxes(out[:, :, :s], 1, 2).astype(dt)  # [B, S, N, H]

  mesh = jax.sharding.get_abstract_mesh()
  rows = sharding.ROW_AXES
  if mesh.empty or not set(rows) <= set(mesh.axis_names) or b % math.prod(mesh.shape[a] for a in rows):
    return per_device(q_BQNH, k_BSKH, v_BSKH, kv_valid_BS)
  from jax.sharding import PartitionSpec as P
  spec = P(rows)
  return jax.shard_map(per_device, in_specs=(spec, spec, spec, spec), out_specs=spec, check_vma=False)(
      q_BQNH, k_BSKH, v_BSKH, kv_valid_BS)
