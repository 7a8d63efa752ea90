"""rollout/sharded.py and SamplingParams.first_prompt, in one process (the two-process run is
tests/test_multiprocess_trainer.py): a share sampled with its offset draws what the same prompts get in one call
over the whole list, and the wrapper returns the inner engine's completions unchanged."""
import numpy as np
import pytest

from srpo_jax.models.qwen3 import Qwen3Config, init_model
from srpo_jax.rollout.engine import SamplingParams
from srpo_jax.rollout.jax_engine import JaxEngine
from srpo_jax.rollout.sharded import ProcessShardedEngine

PROMPTS = [[5, 17, 3, 99, 250, 7, 42], [300, 2, 11], [8, 8, 8, 120, 64], [1, 2, 3, 4], [77, 6]]
SAMPLING = SamplingParams(max_new_tokens=6, temperature=1.0, seed=11)


@pytest.fixture(scope="module")
def engine():
  return JaxEngine(init_model(Qwen3Config.preset("tiny", vocab_size=512), seed=0), eos_token_ids=(511,),
                   pad_token_id=0, prompt_buckets=(8,), batch_buckets=(4, 8, 16))


def _rows(groups):
  return [(c.token_ids.tolist(), c.logprobs, c.finish_reason) for g in groups for c in g]


def test_share_with_its_offset_draws_the_whole_calls_samples(engine):
  whole = _rows(engine.generate(PROMPTS, SAMPLING, n=3))
  tail = _rows(engine.generate(PROMPTS[2:], SamplingParams(**{**SAMPLING.__dict__, "first_prompt": 2}), n=3))
  no_offset = _rows(engine.generate(PROMPTS[2:], SAMPLING, n=3))
  assert [r[0] for r in tail] == [r[0] for r in whole[2 * 3:]]
  for a, b in zip(tail, whole[2 * 3:]):
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)
  assert [r[0] for r in no_offset] != [r[0] for r in tail]  # the offset is what aligns the streams


def test_wrapper_returns_the_inner_engines_completions(engine):
  direct = _rows(engine.generate(PROMPTS, SAMPLING, n=2))
  wrapped = _rows(ProcessShardedEngine(engine).generate(PROMPTS, SAMPLING, n=2))
  assert [(r[0], r[2]) for r in wrapped] == [(r[0], r[2]) for r in direct]
  for a, b in zip(wrapped, direct):
    np.testing.assert_array_equal(a[1], b[1])


def test_first_prompt_must_be_non_negative():
  with pytest.raises(ValueError, match="first_prompt"):
    SamplingParams(max_new_tokens=1, first_prompt=-1)
