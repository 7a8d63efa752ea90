"""Fused token-tiled head vs the unfused full-logits path: same statistics, losses and gradients; no [X, V] array."""
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srpo_jax.algorithms import losses
from srpo_jax.algorithms.losses import head_divergence
from srpo_jax.kernels import fused_head as fh
from srpo_jax.kernels.fused_head import fused_head

jax.config.update("jax_default_matmul_precision", "highest")
TOL = 1e-5


def fused_topk_jsd(student_hidden_XD: jax.Array, head_weight_DV: jax.Array, teacher_hidden_XD: jax.Array, *,
                   teacher_head_weight_DV: Optional[jax.Array] = None, k: int = 100, alpha: float = 0.5,
                   add_tail: bool = True, temperature: float = 1.0,
                   tile_size: int = fh.DEFAULT_TILE_SIZE) -> jax.Array:
  """`losses.topk_jsd(h @ W, h_T @ W_T, ...)` `[X]` through the fused head (no `[X, V]` array)."""
  ids = jnp.zeros(student_hidden_XD.shape[:1], jnp.int32)
  out = fused_head(student_hidden_XD, head_weight_DV, ids, teacher_hidden_XD,
                   teacher_head_weight_DV=teacher_head_weight_DV, k=k, temperature=temperature, tile_size=tile_size)
  return head_divergence(out, alpha=alpha, add_tail=add_tail)


def _inputs(n=13, d=16, v=300, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s, scale=1.0: jnp.asarray(scale * rng.normal(size=s), jnp.float32)
  return dict(h=f(n, d), w=f(d, v, scale=0.5), ht=f(n, d), wt=f(d, v, scale=0.5),
              ids=jnp.asarray(rng.integers(0, v, n), jnp.int32), c=f(5, n))


def _unfused_stats(h, w, ht, wt, ids, k, temperature):
  """The straightforward full-logits computation (the reference)."""
  z = (h @ w) / temperature
  zt = jax.lax.stop_gradient((ht @ wt) / temperature)
  lp, lpt = jax.nn.log_softmax(z), jax.nn.log_softmax(zt)
  idx = jax.lax.top_k(z, k)[1]
  return dict(logp=jnp.take_along_axis(lp, ids[:, None], -1)[:, 0], entropy=-jnp.sum(jnp.exp(lp) * lp, -1),
              idx=idx, s_topk=jnp.take_along_axis(lp, idx, -1), t_topk=jnp.take_along_axis(lpt, idx, -1),
              t_entropy=-jnp.sum(jnp.exp(lpt) * lpt, -1))


def _fused_stats(h, w, ht, wt, ids, k, temperature, tile):
  o = fused_head(h, w, ids, ht, teacher_head_weight_DV=wt, k=k, temperature=temperature, tile_size=tile)
  return dict(logp=o.logp_X, entropy=o.entropy_X, idx=o.topk_idx_XE, s_topk=o.student_topk_logp_XE1[:, :k],
              t_topk=o.teacher_topk_logp_XE1[:, :k], t_entropy=o.teacher_entropy_X), o


def _assert_close(a, b, tol=TOL):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(1.0, float(np.max(np.abs(b))))
  assert float(np.max(np.abs(a - b))) <= tol * scale, f"max diff {np.max(np.abs(a - b)):.3e}"


@pytest.mark.parametrize("tile", [4, 5, 64])  # 13 tokens: exact tiles, a ragged last tile, one oversized tile
def test_statistics_match_unfused(tile):
  x = _inputs()
  got, out = jax.jit(lambda: _fused_stats(x["h"], x["w"], x["ht"], x["wt"], x["ids"], 7, 0.7, tile))()
  want = _unfused_stats(x["h"], x["w"], x["ht"], x["wt"], x["ids"], 7, 0.7)
  np.testing.assert_array_equal(got.pop("idx"), want.pop("idx"))
  for name in want:
    _assert_close(got[name], want[name])
  assert bool(jnp.all(out.logp_X <= 0.0)) and bool(jnp.all(out.student_topk_logp_XE1 <= 0.0))
  assert bool(jnp.all(out.teacher_topk_logp_XE1 <= 0.0))
  assert bool(jnp.all(out.entropy_X >= 0.0)) and bool(jnp.all(out.entropy_X <= np.log(300) + 1e-5))


@pytest.mark.parametrize("alpha,add_tail", [(0.5, True), (0.0, True), (1.0, False)])
def test_losses_and_gradients_match_unfused(alpha, add_tail):
  """A GRPO + SDPO + entropy objective on the fused outputs equals the same objective on full logits."""
  x = _inputs()
  old = jnp.full((13,), -6.0)
  adv = x["c"][4]
  temperature = 0.8

  def objective(logp, entropy, jsd, c):
    grpo = losses.grpo_token_loss(logp, old, adv)
    sdpo = losses.sdpo_token_loss(jsd, logp, old)
    return jnp.sum(c[0] * grpo + c[1] * sdpo + c[2] * entropy)

  def fused(h, w):
    o = fused_head(h, w, x["ids"], x["ht"], teacher_head_weight_DV=x["wt"], k=9, temperature=temperature,
                   tile_size=4)
    return objective(o.logp_X, o.entropy_X, head_divergence(o, alpha=alpha, add_tail=add_tail), x["c"])

  def unfused(h, w):
    s = _unfused_stats(h, w, x["ht"], x["wt"], x["ids"], 9, temperature)
    jsd = losses.topk_jsd(h @ w, x["ht"] @ x["wt"], k=9, alpha=alpha, add_tail=add_tail, temperature=temperature)
    return objective(s["logp"], s["entropy"], jsd, x["c"])

  v_f, g_f = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(x["h"], x["w"])
  v_u, g_u = jax.jit(jax.value_and_grad(unfused, argnums=(0, 1)))(x["h"], x["w"])
  _assert_close(v_f, v_u)
  for a, b in zip(g_f, g_u):
    _assert_close(a, b)
  assert float(jnp.max(jnp.abs(g_f[1]))) > 0.0


def test_teacher_is_stop_gradient_and_defaults_to_student_head():
  x = _inputs()
  loss = lambda ht, wt: jnp.sum(fused_topk_jsd(x["h"], x["w"], ht, teacher_head_weight_DV=wt, k=5, tile_size=8))
  g_ht, g_wt = jax.grad(loss, argnums=(0, 1))(x["ht"], x["wt"])
  assert float(jnp.max(jnp.abs(g_ht))) == 0.0 and float(jnp.max(jnp.abs(g_wt))) == 0.0
  tied = fused_head(x["h"], x["w"], x["ids"], x["ht"], k=5).teacher_entropy_X
  explicit = fused_head(x["h"], x["w"], x["ids"], x["ht"], teacher_head_weight_DV=x["w"], k=5).teacher_entropy_X
  np.testing.assert_array_equal(tied, explicit)
  assert fused_head(x["h"], x["w"], x["ids"], k=5).teacher_topk_logp_XE1 is None


def test_no_tokens_by_vocab_array_in_forward_or_backward():
  n, v, tile = 48, 1000, 16
  x = _inputs(n=n, v=v)
  loss = lambda h, w: jnp.sum(fused_topk_jsd(h, w, x["ht"], teacher_head_weight_DV=x["wt"], k=5, tile_size=tile))
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x["h"], x["w"]).compile().as_text()
  shapes = set(re.findall(r"\[([0-9,]+)\]", hlo))
  assert f"{tile},{v}" in shapes  # one tile's logits exist ...
  assert f"{n},{v}" not in shapes and f"{v},{n}" not in shapes  # ... the whole batch's never do


def test_real_vocab_few_tokens():
  x = _inputs(n=3, d=8, v=151936, seed=1)
  got, out = jax.jit(lambda: _fused_stats(x["h"], x["w"], x["ht"], x["wt"], x["ids"], 100, 1.0, 2))()
  want = _unfused_stats(x["h"], x["w"], x["ht"], x["wt"], x["ids"], 100, 1.0)
  np.testing.assert_array_equal(got.pop("idx"), want.pop("idx"))
  for name in want:
    _assert_close(got[name], want[name])
  assert bool(jnp.all(out.logp_X <= 0.0)) and bool(jnp.all(out.student_topk_logp_XE1 <= 0.0))
  jsd_f = fused_topk_jsd(x["h"], x["w"], x["ht"], teacher_head_weight_DV=x["wt"], tile_size=2)
  _assert_close(jsd_f, losses.topk_jsd(x["h"] @ x["w"], x["ht"] @ x["wt"]))


def test_bfloat16_inputs_accumulate_in_float32():
  x = _inputs()
  o = fused_head(x["h"].astype(jnp.bfloat16), x["w"].astype(jnp.bfloat16), x["ids"], k=5, tile_size=4)
  assert o.logp_X.dtype == jnp.float32 and o.entropy_X.dtype == jnp.float32
  want = _unfused_stats(x["h"].astype(jnp.bfloat16).astype(jnp.float32),
                        x["w"].astype(jnp.bfloat16).astype(jnp.float32), x["ht"], x["wt"], x["ids"], 5, 1.0)
  _assert_close(o.logp_X, want["logp"], tol=1e-4)
  g = jax.grad(lambda w: jnp.sum(fused_head(x["h"].astype(jnp.bfloat16), w, x["ids"], k=5).logp_X))(
      x["w"].astype(jnp.bfloat16))
  assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


def _student_grads(x, tile):
  """Compiled gradient (hidden, head weight) of a top-k + log-prob + entropy objective on one fused head."""
  def loss(h, w):
    o = fused_head(h, w, x["ids"], k=9, temperature=0.8, tile_size=tile)
    return jnp.sum(o.student_topk_logp_XE1 * x["c"][0][:, None]) + jnp.sum(x["c"][1] * o.logp_X + o.entropy_X)
  return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x["h"], x["w"]).compile()


@pytest.mark.parametrize("chunk", [64, 100])  # V = 300: a shifted, masked last chunk; exact chunks
def test_weight_gradient_in_vocab_chunks_matches_unfused(monkeypatch, chunk):
  """D = 16 > tile = 4 takes the column-chunked weight-gradient update; it equals the full-logits gradient."""
  monkeypatch.setattr(fh, "DEFAULT_VOCAB_CHUNK", chunk)
  x = _inputs()
  got = _student_grads(x, 4)(x["h"], x["w"])

  def unfused(h, w):
    s = _unfused_stats(h, w, x["ht"], x["wt"], x["ids"], 9, 0.8)
    topk = losses.topk_logprobs_with_tail(s["s_topk"], add_tail=True)
    return jnp.sum(topk * x["c"][0][:, None]) + jnp.sum(x["c"][1] * s["logp"] + s["entropy"])

  want = jax.grad(unfused, argnums=(0, 1))(x["h"], x["w"])
  for a, b in zip(got, want):
    _assert_close(a, b)


def test_backward_has_no_second_weight_sized_buffer(monkeypatch):
  """The chunked update removes the [D, V] product temporary that `acc + h.T @ g` costs; no [X, V] array either."""
  n, d, v, tile = 64, 128, 4096, 16
  x = _inputs(n=n, d=d, v=v)
  monkeypatch.setattr(fh, "DEFAULT_VOCAB_CHUNK", v)  # one product per token tile: the old behaviour
  whole = _student_grads(x, tile)
  monkeypatch.setattr(fh, "DEFAULT_VOCAB_CHUNK", 512)
  chunked = _student_grads(x, tile)
  saved = whole.memory_analysis().temp_size_in_bytes - chunked.memory_analysis().temp_size_in_bytes
  assert saved >= 0.75 * d * v * 4, f"chunked backward saves only {saved} bytes of temporaries"
  assert chunked.memory_analysis().output_size_in_bytes >= d * v * 4  # the gradient is the output, not a temp
  shapes = set(re.findall(r"\[([0-9,]+)\]", chunked.as_text()))
  assert f"{n},{v}" not in shapes and f"{v},{n}" not in shapes


@pytest.mark.parametrize("tile", [4, 5, 64])  # 13 tokens: exact tiles, a ragged last tile, one oversized tile
def test_head_entropy_matches_full_logits_and_fused_teacher_entropy(tile):
  """The standalone teacher entropy equals the full-logits entropy and `fused_head(...).teacher_entropy_X`."""
  x = _inputs()
  temperature = 0.7
  got = jax.jit(lambda h, w: fh.head_entropy(h, w, temperature=temperature, tile_size=tile))(x["ht"], x["wt"])
  lp = jax.nn.log_softmax((x["ht"] @ x["wt"]) / temperature)
  assert got.shape == (13,) and got.dtype == jnp.float32
  _assert_close(got, -jnp.sum(jnp.exp(lp) * lp, -1))
  fused = fused_head(x["h"], x["w"], x["ids"], x["ht"], teacher_head_weight_DV=x["wt"], k=7, temperature=temperature,
                     tile_size=tile).teacher_entropy_X
  np.testing.assert_allclose(np.asarray(got), np.asarray(fused), rtol=0, atol=1e-6)
  g = jax.grad(lambda h, w: jnp.sum(fh.head_entropy(h, w, tile_size=tile)), argnums=(0, 1))(x["ht"], x["wt"])
  assert all(float(jnp.max(jnp.abs(a))) == 0.0 for a in g)  # no gradient
  assert fh.head_entropy(x["ht"][:0], x["wt"]).shape == (0,)


@pytest.mark.parametrize("alpha", [0.5, 0.0])
@pytest.mark.parametrize("k", [5, 8])  # V = 5: k = V, and k > V (allowed: it means the whole vocabulary, E = V)
def test_topk_covering_the_vocabulary_has_no_tail_and_is_the_full_vocabulary_jsd(k, alpha):
  """k >= V: no invented tail bucket (the clamped log(-expm1(min(lse, -1e-7))) gave one of mass ~1e-7 in both
  distributions); the divergence and its gradient are the full-vocabulary JSD's."""
  v, temperature = 5, 0.8
  x = _inputs(n=13, d=6, v=v, seed=3)
  out = fused_head(x["h"], x["w"], x["ids"], x["ht"], teacher_head_weight_DV=x["wt"], k=k, temperature=temperature,
                   tile_size=4)
  assert out.topk_idx_XE.shape == (13, v)
  assert out.student_topk_logp_XE1.shape == (13, v) and out.teacher_topk_logp_XE1.shape == (13, v)  # no tail
  np.testing.assert_array_equal(np.sort(np.asarray(out.topk_idx_XE), -1), np.tile(np.arange(v), (13, 1)))

  def full_vocab(h, w):  # the reference: the generalized JSD of the two full softmaxes
    s = jax.nn.log_softmax((h @ w) / temperature)
    t = jax.lax.stop_gradient(jax.nn.log_softmax((x["ht"] @ x["wt"]) / temperature))
    return losses.generalized_jsd(s, t, alpha=alpha)

  ref = full_vocab(x["h"], x["w"])
  zs, zt = [np.asarray(a, np.float64) / temperature for a in (x["h"] @ x["w"], x["ht"] @ x["wt"])]
  ps, pt = [np.exp(z - z.max(-1, keepdims=True)) / np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
            for z in (zs, zt)]
  m = (1 - alpha) * ps + alpha * pt
  ref64 = ((1 - alpha) * (ps * np.log(ps / m)).sum(-1) + alpha * (pt * np.log(pt / m)).sum(-1) if alpha > 0
           else (pt * np.log(pt / ps)).sum(-1))
  _assert_close(ref, ref64, tol=1e-6)
  _assert_close(head_divergence(out, alpha=alpha), ref64, tol=1e-6)
  _assert_close(losses.topk_jsd(x["h"] @ x["w"], x["ht"] @ x["wt"], k=k, alpha=alpha, temperature=temperature),
                ref64, tol=1e-6)

  c = x["c"][0]
  fused = lambda h, w: jnp.sum(c * head_divergence(fused_head(
      h, w, x["ids"], x["ht"], teacher_head_weight_DV=x["wt"], k=k, temperature=temperature, tile_size=4),
      alpha=alpha))
  unfused_topk = lambda h, w: jnp.sum(c * losses.topk_jsd(h @ w, x["ht"] @ x["wt"], k=k, alpha=alpha,
                                                          temperature=temperature))
  want = jax.grad(lambda h, w: jnp.sum(c * full_vocab(h, w)), argnums=(0, 1))(x["h"], x["w"])
  for got in (jax.jit(jax.grad(fused, argnums=(0, 1)))(x["h"], x["w"]),
              jax.grad(unfused_topk, argnums=(0, 1))(x["h"], x["w"])):
    for a, b in zip(got, want):
      _assert_close(a, b)
  assert float(jnp.max(jnp.abs(want[1]))) > 0.0
