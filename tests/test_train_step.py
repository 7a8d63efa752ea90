"""The jitted train step's pieces: plain micro-batches run no teacher, non-finite steps are skipped, route-pure
micro-batches (equality with the single-pass objective: tests/test_step_efficiency.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from srpo_jax import batching
from srpo_jax.models.qwen3 import Qwen3Config, init_model
from srpo_jax.config import AlgoConfig
from srpo_jax.train_step import LossHParams, make_optimizer, make_train_fns
from tests.e2e_utils import copied

V, PAD = 384, 0


def _model(seed=1):
  return init_model(Qwen3Config.preset("tiny", vocab_size=V, hidden_size=32, intermediate_size=64, head_dim=8), seed=seed)


def _step_arrays(rng, b=8, with_sdpo=True, max_prompt=9):
  prompts = [list(rng.integers(1, V, rng.integers(3, max_prompt))) for _ in range(b)]
  responses = [list(rng.integers(1, V, rng.integers(0 if i == 3 else 1, 6))) for i in range(b)]  # row 3 may be empty
  rewards = rng.integers(0, 2, b).astype(np.float32)
  sdpo = (rewards == 0) & with_sdpo
  sdpo[0] = with_sdpo
  grpo = ~sdpo
  teacher_prompts = {int(i): list(rng.integers(1, V, rng.integers(4, 12))) for i in np.flatnonzero(sdpo)}
  p_len, r_len = batching.pow2_bucket(max(map(len, prompts)), 16), 8
  ids, mask, resp, start = batching.sequences(prompts, responses, p_len, r_len, PAD)
  roll = np.where(resp, -rng.uniform(0.1, 3.0, resp.shape), 0.0).astype(np.float32)
  old = np.where(resp, -rng.uniform(0.1, 3.0, resp.shape), 0.0).astype(np.float32)
  adv = (rewards - rewards.mean()).astype(np.float32)
  return dict(ids=ids, mask=mask, start=start, resp=resp, old_logp=old, roll_logp=roll, adv=adv, grpo=grpo,
              sdpo=sdpo, teacher_prompts=teacher_prompts, responses=responses, pad=PAD)


def _dot_count(jaxpr) -> int:
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == "dot_general"
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          n += _dot_count(inner)
  return n


def _micro(arrays, rows, num_rows=4):
  step = batching.StepArrays(**{k: arrays[k] for k in batching.StepArrays._fields})
  return batching.micro_batch(rows, step, arrays["teacher_prompts"], arrays["responses"], PAD, num_rows=num_rows,
                              seq_len=arrays["ids"].shape[1], resp_len=arrays["resp"].shape[1])


def test_plain_micro_batches_run_no_teacher_forward():
  model = _model()
  graphdef, params = nnx.split(model)
  opt, _ = make_optimizer(1e-3, warmup_steps=0)
  fns = make_train_fns(graphdef, opt, LossHParams(algo=AlgoConfig(name="srpo", topk=16), tile_size=8))
  arrays = _step_arrays(np.random.default_rng(1), with_sdpo=True)
  sdpo_rows = [int(i) for i in np.flatnonzero(arrays["sdpo"])][:4]
  plain_rows = [int(i) for i in np.flatnonzero(~arrays["sdpo"])][:4]
  mb_t, mb_0 = _micro(arrays, sdpo_rows), _micro(arrays, plain_rows)
  assert mb_t.has_teacher and not mb_0.has_teacher
  with pytest.raises(ValueError, match="mix SDPO-routed"):
    _micro(arrays, sdpo_rows[:1] + plain_rows[:1])
  grads = jax.tree.map(jnp.zeros_like, params)
  one, den = jnp.float32(1.0), jnp.float32(10.0)
  # A teacher full of NaNs cannot affect a micro-batch that runs no teacher forward.
  nan_teacher = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
  _, loss, _, _ = fns.accumulate(params, nan_teacher, copied(grads), one, mb_0, den)  # the accumulator is donated
  assert np.isfinite(float(loss))
  # And the compiled program has fewer matmuls: the teacher's layers and head are absent.
  jx_t = jax.make_jaxpr(fns.accumulate)(params, params, grads, one, mb_t, den).jaxpr
  jx_0 = jax.make_jaxpr(fns.accumulate)(params, params, grads, one, mb_0, den).jaxpr
  assert _dot_count(jx_0) < _dot_count(jx_t)
  # With SDPO rows, a NaN teacher does reach the loss (the test above would catch a silently skipped teacher).
  _, loss_t, _, _ = fns.accumulate(params, nan_teacher, copied(grads), one, mb_t, den)
  assert not np.isfinite(float(loss_t))


def test_apply_skips_a_step_whose_new_parameters_are_not_finite():
  """A finite loss and gradient can still write non-finite parameters (lr = inf; eps = 0 with a zero gradient, 0/0):
  the step is skipped and reported, parameters unchanged."""
  graphdef, params = nnx.split(_model())
  ones, zeros = jax.tree.map(jnp.ones_like, params), jax.tree.map(jnp.zeros_like, params)
  cases = [(make_optimizer(float("inf"), warmup_steps=0)[0], ones),
           (make_optimizer(1e-3, warmup_steps=0, eps=0.0, grad_clip=None)[0], zeros),
           (make_optimizer(1e-3, warmup_steps=0)[0], ones)]  # healthy
  for i, (opt, grads) in enumerate(cases):
    fns = make_train_fns(graphdef, opt, LossHParams(tile_size=8))
    new_p, _, gn, finite = fns.apply(copied(params), opt.init(params), copied(grads), jnp.float32(1.0),
                                     jnp.float32(1.0))  # apply donates parameters, optimizer state and gradients
    same = all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(new_p), jax.tree.leaves(params)))
    assert np.isfinite(float(gn))
    assert (bool(finite), same) == ((True, False) if i == 2 else (False, True)), i


def test_route_groups_put_sdpo_rows_first_and_count_teacher_tokens_in_budgets():
  sdpo = np.array([0, 1, 1, 0, 1, 0, 0, 1], bool)
  rows = np.arange(8)
  lengths = np.full(8, 10)
  assert batching.route_groups(rows, sdpo, lengths, micro_size=3) == [[1, 2, 4], [7], [0, 3, 5], [6]]
  # Budget 40 tokens: a plain row costs 10 (bucket 16), an SDPO row 10 + its 20-token teacher sequence.
  t_len = {int(r): 20 for r in np.flatnonzero(sdpo)}
  groups = batching.route_groups(rows, sdpo, lengths, budget=64, teacher_lengths=t_len)
  assert all(all(sdpo[g]) or not any(sdpo[g]) for g in groups)
  assert [len(g) for g in groups] == [2, 2, 4]  # 2 SDPO rows × bucket(30) = 64; 4 plain rows × bucket(10) = 64
  assert sorted(sum(groups, [])) == list(range(8))
  # A route's last micro-batch is cut to a multiple of an eighth of the micro-batch (and of the row shards).
  assert [batching.row_bucket(n, 16) for n in (1, 2, 3, 16)] == [2, 2, 4, 16]
  assert [batching.row_bucket(n, 16, row_multiple=8) for n in (1, 9, 16)] == [8, 16, 16]


