"""The jitted train step: micro-batch accumulation equals the full mini-batch; no SDPO rows → no teacher forward."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from srpo_jax import batching
from srpo_jax.algorithms import losses
from srpo_jax.models.qwen3 import Qwen3Config, init_model
from srpo_jax.config import AlgoConfig
from srpo_jax.train_step import LossHParams, make_optimizer, make_train_fns

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
  dw = np.where(resp, rng.uniform(0.5, 1.5, resp.shape), 1.0).astype(np.float32)
  return dict(ids=ids, mask=mask, start=start, resp=resp, old_logp=old, roll_logp=roll, adv=adv, grpo=grpo,
              sdpo=sdpo, dw=dw,
              teacher_prompts=teacher_prompts, responses=responses, pad=PAD)


@pytest.mark.parametrize("method,agg", [("srpo", "token-mean"), ("sdpo", "seq-mean-token-mean"),
                                        ("advantage_mix", "token-mean")])
def test_accumulation_over_1_2_4_micro_batches_gives_the_same_update(method, agg):
  model = _model()
  graphdef, params = nnx.split(model)
  teacher = nnx.split(_model(seed=7))[1]  # a teacher far from the student: the JSD is not lost in fp32 rounding
  # An optimizer that records the accumulated gradient as its state: the gradient is what accumulation must preserve
  # (Adam's g/(|g|+eps) would amplify fp32 noise in tiny gradients, and new − old loses digits to the parameters).
  zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
  opt = optax.GradientTransformation(zeros, lambda g, state, params=None: (zeros(g), g))
  fns = make_train_fns(graphdef, opt, LossHParams(algo=AlgoConfig(name=method, topk=16), loss_agg=agg, tile_size=8))
  arrays = _step_arrays(np.random.default_rng(0))
  rows = np.arange(8)
  den = float(losses.objective_denominator(jnp.asarray(arrays["resp"]), jnp.asarray(arrays["grpo"]),
                                           jnp.asarray(arrays["sdpo"]), loss_agg=agg))
  deltas, lossvals = [], []
  for micro in (8, 4, 2):
    mbs = batching.micro_batches(rows, micro, **arrays)
    assert mbs.ids.shape[0] == 8 // micro
    _, grads, out = fns.update(params, opt.init(params), teacher, mbs, jnp.float32(den))
    assert bool(out.finite)
    deltas.append([np.asarray(g) for g in jax.tree.leaves(grads)])
    lossvals.append(float(out.loss))
  np.testing.assert_allclose(lossvals[1:], lossvals[0], rtol=1e-6, atol=1e-9)
  flat = [np.concatenate([d.ravel() for d in ds]) for ds in deltas]
  assert np.abs(flat[0]).max() > 0
  # Relative in the 2-norm over all parameters. The loss-level test (test_losses.py) holds accumulation to 1e-6; through
  # the whole model the fp32 sums (tied-embedding scatter-add, head-weight gradient over token tiles) run in a
  # different order per micro-batch split, which alone moves the gradient by ~1-2e-6: hence 1e-5 here.
  for f in flat[1:]:
    assert np.linalg.norm(f - flat[0]) <= 1e-5 * np.linalg.norm(flat[0])


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


def test_no_sdpo_rollouts_means_no_teacher_forward():
  model = _model()
  graphdef, params = nnx.split(model)
  opt, _ = make_optimizer(1e-3, warmup_steps=0)
  fns = make_train_fns(graphdef, opt, LossHParams(algo=AlgoConfig(name="srpo", topk=16), tile_size=8))
  with_t = _step_arrays(np.random.default_rng(1), with_sdpo=True)
  without_t = _step_arrays(np.random.default_rng(1), with_sdpo=False)
  rows = np.arange(8)
  mb_t = batching.micro_batches(rows, 4, **with_t)
  mb_0 = batching.micro_batches(rows, 4, **without_t)
  assert mb_t.t_ids is not None and mb_0.t_ids is None
  opt_state = opt.init(params)
  # A teacher full of NaNs cannot affect a step that runs no teacher forward.
  nan_teacher = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
  _, _, out = fns.update(params, opt_state, nan_teacher, mb_0, jnp.float32(10.0))
  assert bool(out.finite)
  # And the compiled program has fewer matmuls: the teacher's layers and head are absent.
  jx_t = jax.make_jaxpr(fns.update)(params, opt_state, params, mb_t, jnp.float32(10.0)).jaxpr
  jx_0 = jax.make_jaxpr(fns.update)(params, opt_state, params, mb_0, jnp.float32(10.0)).jaxpr
  assert _dot_count(jx_0) < _dot_count(jx_t)
  # With SDPO rows, a NaN teacher does reach the loss (the test above would catch a silently skipped teacher).
  _, _, out_t = fns.update(params, opt_state, nan_teacher, mb_t, jnp.float32(10.0))
  assert not bool(out_t.finite)


@pytest.mark.parametrize("method,agg", [("srpo", "token-mean"), ("sdpo", "seq-mean-token-mean")])
def test_token_budget_micro_batches_give_the_whole_mini_batch_gradient(method, agg):
  """Ragged micro-batches (length-sorted groups under a token budget, each cut to its own shape) accumulate the same
  loss and gradient as the whole mini-batch in one micro-batch."""
  graphdef, params = nnx.split(_model())
  teacher = nnx.split(_model(seed=7))[1]
  zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
  opt = optax.GradientTransformation(zeros, lambda g, state, params=None: (zeros(g), g))
  fns = make_train_fns(graphdef, opt, LossHParams(algo=AlgoConfig(name=method, topk=16), loss_agg=agg, tile_size=8))
  arrays = _step_arrays(np.random.default_rng(2), max_prompt=40)  # rows of 4 to 44 tokens: buckets 16, 32, 64
  rows = np.arange(8)
  den = losses.objective_denominator(jnp.asarray(arrays["resp"]), jnp.asarray(arrays["grpo"]),
                                     jnp.asarray(arrays["sdpo"]), loss_agg=agg)
  _, want, out = fns.update(params, opt.init(params), teacher, batching.micro_batches(rows, 8, **arrays), den)

  step = batching.StepArrays(**{k: arrays[k] for k in batching.StepArrays._fields})
  lengths = arrays["mask"].sum(axis=1)
  groups = batching.token_budget_groups(rows, lengths, budget=64)
  assert len(groups) > 1 and sorted(sum(groups, [])) == list(range(8))
  mbs = [batching.micro_batch(g, step, arrays["teacher_prompts"], arrays["responses"], PAD) for g in groups]
  assert len({mb.ids.shape for mb in mbs}) > 1  # ragged: the groups were cut to different shapes
  for mb in mbs:
    assert mb.ids.shape[0] * mb.ids.shape[1] <= 64  # the token budget (one device)
  grads, loss = zeros(params), 0.0
  for mb in mbs:
    grads, mb_loss, _, _ = fns.accumulate(params, teacher, grads, mb, den)
    loss += float(mb_loss)
  assert loss == pytest.approx(float(out.loss), rel=1e-6, abs=1e-9)
  flat = lambda t: np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(t)])
  w, g = flat(want), flat(grads)
  assert np.abs(w).max() > 0
  assert np.linalg.norm(g - w) <= 1e-5 * np.linalg.norm(w)
  assert 0.0 <= batching.padding_fraction(mbs) < batching.padding_fraction([batching.micro_batches(rows, 8, **arrays)])
