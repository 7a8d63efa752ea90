"""Blockwise (online-softmax, recomputing backward) attention equals the naive reference in values and gradients:
causal, GQA, left / right / no padding, key blocks that do and do not divide S, the sampler's cache layout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srpo_jax.models import attention as A
from srpo_jax.models.qwen3 import Qwen3Config, init_model


def _inputs(seed, b=3, s=13, n=4, k=2, h=8):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, s, n, h)), jnp.float32)
  kk = jnp.asarray(rng.normal(size=(b, s, k, h)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, s, k, h)), jnp.float32)
  lengths = [s, s - 4, 5]
  right = np.arange(s)[None, :] < np.array(lengths)[:, None]
  left = right[:, ::-1].copy()
  return q, kk, v, {"none": np.ones((b, s), bool), "right": right, "left": left}


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("block,query_block", [(4, 2048), (5, 2048), (13, 2048), (64, 2048), (4, 4), (5, 6),
                                               (3, 13), (4, 12)])
def test_blockwise_equals_naive_values_and_gradients(padding, block, query_block):
  """query_block < S takes the chunked path (the last chunk padded unless it divides S = 13)."""
  q, k, v, masks = _inputs(0)
  valid = jnp.asarray(masks[padding])
  slots = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
  cot = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  # Only rows with at least one valid key count (left-padding queries carry no loss); their outputs are finite anyway.
  live = (jnp.cumsum(valid, axis=1) > 0)[:, :, None, None]

  def loss(fn, q, k, v):
    return jnp.sum(jnp.where(live, fn(q, k, v, slots, valid), 0.0) * cot)

  naive = lambda *a: A.naive_attention(*a)
  blockwise = lambda *a: A.blockwise_attention(*a, block=block, query_block=query_block)
  out_n, out_b = naive(q, k, v, slots, valid), blockwise(q, k, v, slots, valid)
  assert bool(jnp.all(jnp.isfinite(out_b)))
  np.testing.assert_allclose(np.where(live, out_b, 0), np.where(live, out_n, 0), atol=1e-5)
  g_n = jax.grad(lambda *a: loss(naive, *a), argnums=(0, 1, 2))(q, k, v)
  g_b = jax.grad(lambda *a: loss(blockwise, *a), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_b, g_n):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_blockwise_on_cache_slots_equals_naive():
  """The sampler's prefill: queries at slots [0, P) of a longer cache whose later slots are not yet valid."""
  q, k, v, masks = _inputs(2, s=16)
  p = 9
  valid = jnp.asarray(masks["left"]) & (jnp.arange(16) < p)[None]
  slots = jnp.broadcast_to(jnp.arange(p), (3, p))
  out_n = A.naive_attention(q[:, :p], k, v, slots, valid)
  for query_block in (2048, 4):
    out_b = A.blockwise_attention(q[:, :p], k, v, slots, valid, block=4, query_block=query_block)
    np.testing.assert_allclose(out_b, out_n, atol=1e-5)


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_splash_interpret_equals_naive_and_blockwise(padding):
  """Pallas splash attention in its reference mode (the interpreter on CPU): the valid queries' outputs and every
  gradient (the padding queries carry no loss) equal the naive and blockwise attention's."""
  q, k, v, masks = _inputs(4)
  valid = jnp.asarray(masks[padding])
  slots = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
  cot = jnp.where(valid[:, :, None, None], jnp.asarray(np.random.default_rng(5).normal(size=q.shape), jnp.float32), 0)
  fns = {"naive": lambda q, k, v: A.naive_attention(q, k, v, slots, valid),
         "blockwise": lambda q, k, v: A.blockwise_attention(q, k, v, slots, valid, block=4, query_block=6),
         "splash": lambda q, k, v: A.splash_attention(q, k, v, valid, interpret=True)}
  outs = {name: np.where(np.asarray(valid)[:, :, None, None], f(q, k, v), 0) for name, f in fns.items()}
  grads = {name: jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cot), argnums=(0, 1, 2))(q, k, v) for name, f in fns.items()}
  assert bool(jnp.all(jnp.isfinite(fns["splash"](q, k, v))))
  for ref in ("naive", "blockwise"):
    np.testing.assert_allclose(outs["splash"], outs[ref], atol=1e-5)
    for a, b in zip(grads["splash"], grads[ref]):
      np.testing.assert_allclose(a, b, atol=1e-5)


def test_select():
  assert A.select("auto", right_padded=False, query_len=8) == "blockwise"
  assert A.select("auto", right_padded=True, query_len=1) == "naive"
  assert A.select("auto", right_padded=True, query_len=8, platform="cpu") == "blockwise"
  assert A.select("auto", right_padded=True, query_len=8, platform="gpu") == "cudnn"
  assert A.select("auto", right_padded=False, query_len=8, platform="gpu") == "blockwise"  # left-padded prefill
  assert A.select("cudnn", right_padded=True, query_len=8, platform="cpu") == "cudnn"  # a deviceless GPU compile
  assert A.select("cudnn", right_padded=False, query_len=8) == "blockwise"
  assert A.select("naive", right_padded=True, query_len=8, platform="gpu") == "naive"
  # cuDNN flash attention takes bf16/fp16 only: a float32 model on a GPU runs blockwise.
  assert A.select("auto", right_padded=True, query_len=8, platform="gpu", dtype=jnp.float32) == "blockwise"
  assert A.select("cudnn", right_padded=True, query_len=8, platform="gpu", dtype=jnp.float16) == "cudnn"
  # TPUs: splash for a full-sequence forward whatever its padding; the sampler's prefill (a cache) and decode not.
  assert A.select("auto", right_padded=False, query_len=8, platform="tpu", self_attention=True) == "splash"
  assert A.select("auto", right_padded=True, query_len=8, platform="tpu", self_attention=True) == "splash"
  assert A.select("auto", right_padded=False, query_len=8, platform="tpu") == "blockwise"
  assert A.select("auto", right_padded=False, query_len=1, platform="tpu", self_attention=True) == "naive"
  assert A.select("auto", right_padded=True, query_len=8, platform="gpu", self_attention=True) == "cudnn"
  assert A.select("splash", right_padded=False, query_len=8, platform="cpu", self_attention=True) == "splash"
  with pytest.raises(ValueError, match="attention implementation"):
    A.select("flash", right_padded=False, query_len=8)


def test_platform_is_a_parameter_of_the_model():
  """A model compiled for a TPU takes splash (traced here on the CPU, as a deviceless compile traces), one for a GPU
  takes cuDNN on its right-padded forward; the platform comes from the config, not the host's backend."""
  import dataclasses
  from flax import nnx
  seen = []
  real_select = A.select

  def recording(*a, **kw):  # records the choice, then traces the reference (cuDNN's lowering needs cuDNN here)
    seen.append(real_select(*a, **kw))
    return "naive"

  cfg = Qwen3Config.preset("tiny", num_hidden_layers=1, dtype="bfloat16")
  ids, mask = jnp.zeros((2, 8), jnp.int32), jnp.ones((2, 8), bool)
  for platform, want in (("tpu", "splash"), ("gpu", "cudnn"), ("cpu", "blockwise")):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: init_model(dataclasses.replace(cfg, platform=platform))))
    seen.clear()
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(A, "select", recording)
      jax.eval_shape(lambda s: nnx.merge(graphdef, s).hidden_states(ids, mask, right_padded=True), state)
    assert seen == [want], (platform, seen)
  with pytest.raises(ValueError, match="platform='cuda'"):
    Qwen3Config.preset("tiny", platform="cuda")


def test_model_hidden_states_blockwise_equals_naive():
  cfg = Qwen3Config.preset("tiny", vocab_size=97, hidden_size=32, intermediate_size=64, head_dim=8,
                           attention_block=4)
  ids = jnp.asarray(np.random.default_rng(3).integers(0, 97, (2, 11)))
  mask = jnp.asarray(np.arange(11)[None] >= np.array([[0], [3]]))
  import dataclasses
  from flax import nnx
  model_b = init_model(dataclasses.replace(cfg, attention="blockwise"), seed=0)
  graphdef, state = nnx.split(model_b)
  model_n = nnx.merge(nnx.split(init_model(dataclasses.replace(cfg, attention="naive"), seed=0))[0], state)
  hb, hn = model_b.hidden_states(ids, mask), model_n.hidden_states(ids, mask)
  np.testing.assert_allclose(np.asarray(hb)[np.asarray(mask)], np.asarray(hn)[np.asarray(mask)], atol=1e-5)


def test_cudnn_never_sees_a_length_zero_row_of_a_padded_micro_batch(monkeypatch):
  """A micro-batch padded with empty rows (batching.micro_batch) reaches cuDNN attention with every sequence length
  >= 1 (cuDNN has no defined output for a length-0 row), and those rows carry no loss (no response positions).
  cuDNN cannot run here: the call is recorded and computed by XLA's implementation with the same lengths."""
  from srpo_jax import batching
  seen = []
  real = jax.nn.dot_product_attention

  def recording(q, k, v, **kw):
    assert kw.pop("implementation") == "cudnn"
    jax.debug.callback(lambda ql, kl: seen.append((np.asarray(ql), np.asarray(kl))), kw["query_seq_lengths"],
                       kw["key_value_seq_lengths"])
    return real(q, k, v, implementation="xla", **kw)

  monkeypatch.setattr(A.jax.nn, "dot_product_attention", recording)
  cfg = Qwen3Config.preset("tiny", attention="cudnn", dtype="bfloat16", num_hidden_layers=1)
  model = init_model(cfg)
  arr = batching.StepArrays(
      ids=np.array([[5, 6, 7, 8]], np.int32), mask=np.array([[1, 1, 1, 0]], bool), start=np.array([2], np.int32),
      resp=np.array([[1, 0]], bool), roll_logp=np.zeros((1, 2), np.float32), adv=np.ones(1, np.float32),
      grpo=np.ones(1, bool), sdpo=np.zeros(1, bool))
  mb = batching.micro_batch([0], arr, {}, [[7]], pad=0, num_rows=4, with_teacher=False)
  empty = ~mb.mask.any(axis=1)
  assert empty.sum() == 3 and not mb.resp[empty].any()  # padding rows: no valid token, no loss position
  hidden = model.hidden_states(jnp.asarray(mb.ids), jnp.asarray(mb.mask), right_padded=True)
  jax.effects_barrier()
  assert seen, "the cudnn path was not taken"
  for q_len, kv_len in seen:
    assert (q_len >= 1).all() and (kv_len >= 1).all(), (q_len, kv_len)
    np.testing.assert_array_equal(kv_len[~empty], mb.mask[~empty].sum(axis=1))  # real rows keep their lengths
  assert bool(jnp.all(jnp.isfinite(hidden[~empty])))
