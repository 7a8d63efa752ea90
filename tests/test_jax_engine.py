"""JaxEngine (in-process sampler) vs transformers greedy generate and teacher-forced log-probs; sampling laws.

References are independent of the sampler: transformers' `generate` and forward pass (PyTorch fp32) on the same
weights, and distributions computed in NumPy from the logits. Frequencies are checked with a chi-square test at a
fixed seed (p-value threshold 1e-3).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from flax import nnx

import srpo_jax
from srpo_jax.models.qwen3 import init_model
from srpo_jax.rollout import sampling as sampling_lib
from srpo_jax.rollout.engine import SamplingParams
from srpo_jax.rollout.jax_engine import JaxEngine, smallest_bucket
from tests.hf_models import tiny_hf_qwen3

V = 512
EOS = 511  # the engine's EOS in these tests; transformers gets the same id
PROMPTS = [[5, 17, 3, 99, 250, 7, 42], [300, 2, 11], [8, 8, 8, 120, 64]]  # lengths 7, 3, 5: left padding to 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  hf = tiny_hf_qwen3(tied=True, vocab=V, seed=1)
  d = tmp_path_factory.mktemp("hf")
  hf.save_pretrained(d)
  return hf, srpo_jax.load_pretrained(d)


@pytest.fixture(scope="module")
def engine(models):
  _, ours = models
  return JaxEngine(ours, eos_token_ids=(EOS,), pad_token_id=0, prompt_buckets=(8, 16), batch_buckets=(4, 8, 4096))


def _hf_logprobs(hf, prompt, response, temperature=1.0) -> np.ndarray:
  """Teacher-forced log_softmax(logits / T) of each response token (transformers forward, no padding)."""
  ids = torch.tensor([list(prompt) + list(response)])
  with torch.no_grad():
    logits = hf(ids).logits[0, len(prompt) - 1:-1].double() / temperature
  return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0].numpy()


def _hf_next_logits(hf, prompt) -> np.ndarray:
  with torch.no_grad():
    return hf(torch.tensor([list(prompt)])).logits[0, -1].double().numpy()


# -- greedy parity with transformers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("prompts", [PROMPTS, [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]]],
                         ids=["left-padded", "no-padding"])
def test_greedy_matches_transformers_generate(models, engine, prompts):
  hf, _ = models
  new = 8
  got = engine.generate(prompts, SamplingParams(max_new_tokens=new, temperature=0.0))
  width = max(map(len, prompts))
  ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  with torch.no_grad():
    want = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, eos_token_id=EOS,
                       pad_token_id=0)[:, width:].numpy()
  for prompt, (c,), row in zip(prompts, got, want):
    stop = np.flatnonzero(row == EOS)
    expected = row[:stop[0] + 1] if stop.size else row
    np.testing.assert_array_equal(c.token_ids, expected)
    assert c.finish_reason == ("stop" if stop.size else "length")
    # Greedy log-probs are the model's temperature-1 log-softmax of the chosen tokens.
    np.testing.assert_allclose(c.logprobs, _hf_logprobs(hf, prompt, c.token_ids), atol=1e-4)


# -- log-probs ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_teacher_forced(models, engine, temperature):
  hf, _ = models
  out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=temperature, seed=3), n=2)
  for prompt, completions in zip(PROMPTS, out):
    for c in completions:
      assert c.logprobs.dtype == np.float32 and c.logprobs.shape == c.token_ids.shape
      np.testing.assert_allclose(c.logprobs, _hf_logprobs(hf, prompt, c.token_ids, temperature), atol=1e-4)


# -- filters and sampling laws -----------------------------------------------------------------------------------------
def _filtered_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
  """Reference renormalised distribution (NumPy, float64): temperature, then top-k, then top-p over the survivors."""
  x = logits.astype(np.float64) / temperature
  order = np.argsort(-x, kind="stable")
  if top_k:
    order = order[:top_k]
  p = np.exp(x[order] - x[order].max())
  p /= p.sum()
  keep = (np.cumsum(p) - p) < top_p
  out = np.zeros_like(x)
  out[order[keep]] = p[keep] / p[keep].sum()
  return out


def _chisquare_p(samples: np.ndarray, probs: np.ndarray) -> float:
  """Chi-square goodness of fit; categories with expected count < 5 are pooled into one."""
  n = len(samples)
  counts = np.bincount(samples, minlength=len(probs)).astype(np.float64)
  assert counts[probs == 0].sum() == 0, f"sampled a filtered-out token: {np.flatnonzero(counts * (probs == 0))}"
  expected = probs * n
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  return scipy.stats.chisquare(obs, exp).pvalue


@pytest.mark.parametrize("v,temperature,top_k,top_p", [(3000, 1.0, 0, 1.0), (2503, 0.5, 0, 1.0), (3000, 1.0, 0, 0.6),
                                                       (3000, 0.3, 0, 0.9), (3000, 1.0, 20, 1.0), (3000, 0.8, 30, 0.7)],
                         ids=["full", "temp-padded-blocks", "top-p-bisection", "top-p-candidates", "top-k",
                              "top-k+top-p"])
def test_sampling_function_frequencies(v, temperature, top_k, top_p):
  # V = 3,000: two 1,500-token blocks; V = 2,503 (prime): three 1,024-token blocks, the last one padded.
  rng = np.random.default_rng(0)
  logits = (1.5 * rng.standard_normal(v)).astype(np.float32)
  n = 20_000
  strategy = sampling_lib.Strategy.from_params(temperature, top_k, top_p, len(logits))
  assert strategy.top_p == (top_p < 1) and strategy.top_k == top_k
  if top_p < 1 and not top_k:  # each top-p path is exercised: the 256-candidate shortcut only when they hold top_p
    top = np.sort(_filtered_probs(logits, temperature, 0, 1.0))[::-1][:sampling_lib.TOP_P_CANDIDATES].sum()
    assert (top >= top_p) == (temperature < 1), top
  u = jax.random.uniform(jax.random.key(7), (n,))
  tok, logp = jax.jit(lambda lg, u: sampling_lib.sample(strategy, lg, u, jnp.float32(temperature),
                                                        jnp.float32(top_p)))(jnp.broadcast_to(logits, (n, v)), u)
  tok, logp = np.asarray(tok), np.asarray(logp)
  probs = _filtered_probs(logits, temperature, top_k, top_p)
  assert _chisquare_p(tok, probs) > 1e-3
  np.testing.assert_allclose(logp, np.log(probs[tok]), atol=1e-4)


def test_inverse_cdf_blocked_is_exact_on_boundaries():
  # Weights [0, 1, 0, 3 | 0, 0, 4, 0] with block 4: Z = 8; u * Z in [0, 1) → token 1, [1, 4) → 3, [4, 8) → 6.
  x = jnp.log(jnp.array([[0, 1, 0, 3, 0, 0, 4, 0]], jnp.float32))
  u = jnp.array([0.0, 0.12, 0.125, 0.49, 0.5, 0.99, 1.0 - 2 ** -24])
  tok, x_tok, logz = jax.vmap(lambda ui: sampling_lib.inverse_cdf_blocked(x, jnp.max(x, -1), ui[None], block=4))(u)
  np.testing.assert_array_equal(np.asarray(tok)[:, 0], [1, 1, 3, 3, 6, 6, 6])
  np.testing.assert_allclose(np.asarray(x_tok)[:, 0], np.log([1, 1, 3, 3, 4, 4, 4]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(logz), np.log(8.0 / 4.0), rtol=1e-6)  # log Σ exp(x - max)


def test_blocked_argmax_first_maximum():
  x = jnp.array([[0, 5, 1, 5, 2, 5, 0, 0], [0, 0, 0, 0, 0, 0, 0, 7], [3, 3, 3, 3, 3, 3, 3, 3]], jnp.float32)
  tok, mx = sampling_lib.blocked_argmax(x, block=4)
  np.testing.assert_array_equal(np.asarray(tok), [1, 7, 0])
  np.testing.assert_array_equal(np.asarray(mx), [5, 7, 3])


def test_block_width():
  assert sampling_lib.block_width(151936) == 1187  # 128 blocks, no padding on the real vocabulary
  assert sampling_lib.block_width(512) == 512
  assert sampling_lib.block_width(2503) == 1024  # prime: padded blocks


def test_engine_top_k_top_p_frequencies(models, engine):
  hf, _ = models
  prompt, n, temperature, top_k, top_p = PROMPTS[1], 3000, 0.15, 8, 0.9
  out = engine.generate([prompt], SamplingParams(max_new_tokens=1, temperature=temperature, top_k=top_k,
                                                 top_p=top_p, seed=11), n=n)[0]
  tok = np.array([c.token_ids[0] for c in out])
  probs = _filtered_probs(_hf_next_logits(hf, prompt), temperature, top_k, top_p)
  assert 1 < (probs > 0).sum() < top_k  # the nucleus really cuts inside the top-k here
  assert _chisquare_p(tok, probs) > 1e-3
  np.testing.assert_allclose([c.logprobs[0] for c in out], np.log(probs[tok]), atol=1e-4)


def test_top_k_1_is_greedy(engine):
  greedy = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.0))
  top1 = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.0, top_k=1, seed=5))
  for (g,), (t,) in zip(greedy, top1):
    np.testing.assert_array_equal(t.token_ids, g.token_ids)
    np.testing.assert_allclose(t.logprobs, 0.0, atol=1e-6)  # a one-token distribution: log-prob 0


# -- stopping ----------------------------------------------------------------------------------------------------------
def test_stop_token_ends_row_and_rest_is_padding(models, engine):
  hf, _ = models
  sampling = SamplingParams(max_new_tokens=8, seed=2)
  free = engine.generate(PROMPTS, sampling)
  row = free[0][0].token_ids
  stop_id = int(row[3])
  first = int(np.flatnonzero(row == stop_id)[0])
  stopped = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, seed=2, stop_token_ids=(stop_id,)))
  c = stopped[0][0]
  np.testing.assert_array_equal(c.token_ids, row[:first + 1])
  assert c.finish_reason == "stop"
  np.testing.assert_allclose(c.logprobs, _hf_logprobs(hf, PROMPTS[0], c.token_ids), atol=1e-4)
  # Raw buffers: after the stop token, pad id and log-prob 0.
  tokens, logprobs, lengths = engine._run_chunk([np.asarray(p, np.int32) for p in PROMPTS], [0, 1, 2],
                                                SamplingParams(max_new_tokens=8, seed=2, stop_token_ids=(stop_id,)))
  assert lengths[0] == first + 1
  assert (tokens[0, first + 1:] == 0).all() and (logprobs[0, first + 1:] == 0).all()
  # A row that never stops ends with "length" and all N tokens.
  for (c_free,), (c_stop,) in zip(free[1:], stopped[1:]):
    if stop_id not in c_free.token_ids:
      assert c_stop.finish_reason == "length" and len(c_stop.token_ids) == 8


def test_eos_ids_stop_and_out_of_vocab_eos_ignored(models, engine):
  _, ours = models
  greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
  # Real Qwen EOS ids are outside this 512-token vocabulary: never drawn, generation runs to max_new_tokens.
  eng = JaxEngine(ours, prompt_buckets=(8, 16), batch_buckets=(4, 8, 4096))
  eng._programs = engine._programs  # same model and shapes: reuse the compiled programs (stop ids are traced)
  (c,), = eng.generate(PROMPTS[:1], greedy)
  assert c.finish_reason == "length" and len(c.token_ids) == 8
  eng2 = JaxEngine(ours, eos_token_ids=(int(c.token_ids[0]),), pad_token_id=0, prompt_buckets=(8, 16),
                   batch_buckets=(4, 8, 4096))
  eng2._programs = engine._programs
  (c2,), = eng2.generate(PROMPTS[:1], greedy)
  assert c2.finish_reason == "stop" and list(c2.token_ids) == [c.token_ids[0]]


# -- randomness --------------------------------------------------------------------------------------------------------
def test_seed_reproducible_and_streams_distinct(engine):
  sampling = SamplingParams(max_new_tokens=8, seed=123)
  a = engine.generate(PROMPTS, sampling, n=2)
  b = engine.generate(PROMPTS, sampling, n=2)
  for ra, rb in zip(a, b):
    for ca, cb in zip(ra, rb):
      np.testing.assert_array_equal(ca.token_ids, cb.token_ids)
      np.testing.assert_array_equal(ca.logprobs, cb.logprobs)
  # the n samples of one prompt differ, and another seed gives other samples
  for r in a:
    assert not np.array_equal(r[0].token_ids, r[1].token_ids)
  c = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, seed=124), n=2)
  assert any(not np.array_equal(x[0].token_ids, y[0].token_ids) for x, y in zip(a, c))
  # identical prompts in one batch still get their own streams
  same = engine.generate([PROMPTS[0], PROMPTS[0]], sampling)
  assert not np.array_equal(same[0][0].token_ids, same[1][0].token_ids)


def test_chunking_does_not_change_samples(models, engine):
  _, ours = models
  sampling = SamplingParams(max_new_tokens=8, seed=9)
  whole = engine.generate(PROMPTS, sampling, n=2)
  # max_batch 4 splits the 6 rows into chunks of 4 + 2 (bucket 4): row streams depend on the row index only.
  split = JaxEngine(ours, eos_token_ids=(EOS,), pad_token_id=0, prompt_buckets=(8, 16), batch_buckets=(4, 8, 4096),
                    max_batch=4)
  split._programs = engine._programs  # same shapes, same programs: no extra compile
  for rw, rs in zip(whole, split.generate(PROMPTS, sampling, n=2)):
    for cw, cs in zip(rw, rs):
      np.testing.assert_array_equal(cw.token_ids, cs.token_ids)


# -- compiled programs -------------------------------------------------------------------------------------------------
def test_prompt_lengths_in_one_bucket_compile_once(engine):
  sampling = SamplingParams(max_new_tokens=8, seed=1)
  engine.generate([[1, 2, 3]], sampling)
  before = engine.num_compiled_programs
  jitted = list(engine._programs.values())
  engine.generate([[1, 2, 3, 4, 5, 6]], sampling)  # length 6: same 8-token bucket, same 4-row batch bucket
  engine.generate([[4, 5], [6, 7, 8, 9, 10, 11, 12]], sampling)
  assert engine.num_compiled_programs == before
  assert sum(f._cache_size() for f in jitted) == before  # and each program compiled exactly once
  engine.generate([list(range(1, 12))], sampling)  # 11 tokens: the 16-token bucket is a new program
  assert engine.num_compiled_programs == before + 1


def test_smallest_bucket():
  assert smallest_bucket(3, (8, 16)) == 8 and smallest_bucket(8, (8, 16)) == 8 and smallest_bucket(9, (8, 16)) == 16
  assert smallest_bucket(40, (8, 16)) == 48  # past the largest bucket: a multiple of it
  assert smallest_bucket(3, (1, 2, 4), multiple_of=8) == 8


# -- weights -----------------------------------------------------------------------------------------------------------
def test_update_weights_swaps_and_tags_version(models, engine):
  hf, ours = models
  eng = JaxEngine(ours, eos_token_ids=(EOS,), pad_token_id=0, prompt_buckets=(8, 16), batch_buckets=(4, 8, 4096))
  other = init_model(ours.config, seed=42)
  _, other_state = nnx.split(other)
  eng.update_weights(other_state, version=7)
  assert eng.params is other_state  # swapped by reference, no copy
  eng._programs = engine._programs  # same structure and shapes: the compiled programs apply to the new weights
  (c,), = eng.generate(PROMPTS[:1], SamplingParams(max_new_tokens=8, temperature=0.0))
  assert c.weight_version == 7
  # the new weights' own teacher-forced pass: greedy tokens are its argmax, log-probs its log-softmax
  ids = jnp.asarray([PROMPTS[0] + list(c.token_ids)])
  logp = np.asarray(jax.nn.log_softmax(jax.jit(lambda i: other(i))(ids)))[0, len(PROMPTS[0]) - 1:-1]
  np.testing.assert_array_equal(c.token_ids, logp.argmax(-1))
  np.testing.assert_allclose(c.logprobs, logp[np.arange(len(c.token_ids)), c.token_ids], atol=1e-4)
  eng.update_weights(ours, version=8)  # a Qwen3 works too
  (c,), = eng.generate(PROMPTS[:1], SamplingParams(max_new_tokens=8, temperature=0.0))
  assert c.weight_version == 8
  np.testing.assert_allclose(c.logprobs, _hf_logprobs(hf, PROMPTS[0], c.token_ids), atol=1e-4)


def test_update_weights_rejects_wrong_shape_and_dtype(models, engine):
  _, ours = models
  _, state = nnx.split(ours)
  bad = jax.tree.map(lambda x: x, state)
  bad["layers"][1]["mlp"]["up"].set_value(jnp.zeros((3, 3), jnp.float32))
  with pytest.raises(ValueError, match=r"layers.*1.*mlp.*up.*\(3, 3\)"):
    engine.update_weights(bad, version=1)
  bad = jax.tree.map(lambda x: x, state)
  bad["final_norm"]["scale"].set_value(bad["final_norm"]["scale"][...].astype(jnp.bfloat16))
  with pytest.raises(ValueError, match=r"final_norm.*scale.*bfloat16"):
    engine.update_weights(bad, version=1)
  assert engine.version == 0


def test_bad_inputs_named(engine):
  with pytest.raises(ValueError, match=r"prompt_token_ids\[1\]"):
    engine.generate([[1], []], SamplingParams(max_new_tokens=2))
  with pytest.raises(ValueError, match=r"prompt_token_ids\[0\].*9999"):
    engine.generate([[9999]], SamplingParams(max_new_tokens=2))


# -- mesh ----------------------------------------------------------------------------------------------------------------
_MESH_SCRIPT = """
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from srpo_jax.models.qwen3 import Qwen3Config, init_model
from srpo_jax.rollout.engine import SamplingParams
from srpo_jax.rollout.jax_engine import JaxEngine
from srpo_jax.sharding import make_mesh, state_shardings
from flax import nnx
assert len(jax.devices()) == 2, jax.devices()
model = init_model(Qwen3Config.preset("tiny", vocab_size=512), seed=0)
graphdef, state = nnx.split(model)
mesh = make_mesh(data=2)
placed = jax.device_put(state, state_shardings(state, mesh))  # as the trainer places them
kw = dict(eos_token_ids=(511,), pad_token_id=0, prompt_buckets=(8,), batch_buckets=(1, 2, 4))
plain, sharded = JaxEngine((graphdef, state), **kw), JaxEngine((graphdef, placed), mesh=mesh, **kw)
prompts = [[5, 17, 3], [300, 2, 11, 4, 4]]
sp = SamplingParams(max_new_tokens=6, seed=4)
for a, b in zip(plain.generate(prompts, sp, n=2), sharded.generate(prompts, sp, n=2)):
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x.token_ids, y.token_ids)
    np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
print("MESH-OK")
"""


def test_runs_under_two_device_mesh_like_without():
  import os
  import subprocess
  import sys
  env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and "MESH-OK" in proc.stdout, proc.stderr[-3000:]
