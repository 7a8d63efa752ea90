"""One teacher forward and one student head pass per rollout, no π_old pass on-policy, deferred DW — and the same
update as the single-pass formulation (today's before the change: π_old and the DW weights from a separate
`prepare` pass, the teacher run again for the top-k, the student head run twice on SDPO rows), whose loss equals the
PyTorch reference written from the spec (tests/torch_ref_losses.py) with an entropy bonus.

The models are sharpened (tests/sharp_model.py): at random init every DW weight is 1.000 and a wrong DW normaliser
or SDPO term could not fail these tests; here the DW weights spread over > 10% and the SDPO term is > 1% of the loss
(asserted), and the negative cases show the comparison failing when DW normalisation or the SDPO term is broken."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from srpo_jax import batching, methods, metrics as M
from srpo_jax import trainer as T
from srpo_jax.algorithms import losses
from srpo_jax.config import AlgoConfig, CheckpointConfig, Config, OptimConfig, RolloutConfig, TrainConfig
from srpo_jax.kernels import fused_head as fh
from srpo_jax.models.qwen3 import Qwen3Config, init_model
from srpo_jax.train_step import LossHParams, make_train_fns, response_hidden, student_logp
from tests import torch_ref_losses as ref
from tests.e2e_utils import fresh
from tests.sharp_model import broken, dw_spread, share, sharpen

V, PAD, N = 384, 0, 8
TILE = 64  # ≥ every test's token count: one head tile, so XLA's cost analysis (a loop body once) counts it all
ENTROPY_COEF = 0.01


def _model(seed):
  # One layer: what is tested is the step around the model; compile time scales with the unrolled layers.
  return sharpen(init_model(Qwen3Config.preset("tiny", vocab_size=V, hidden_size=32, intermediate_size=64,
                                               head_dim=8, num_hidden_layers=1), seed=seed))


def _flat(x):
  return x.reshape((-1,) + x.shape[2:])


def _recording_optimizer():
  """An optimizer whose new state is the gradient it was given: what accumulation must preserve."""
  zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
  return optax.GradientTransformation(zeros, lambda g, state, params=None: (zeros(g), g))


def _step(rng, sdpo_frac=None):
  """A step of N rollouts in 2 groups (prompts, responses, rewards, routing, teacher prompts)."""
  prompts = [list(rng.integers(1, V, rng.integers(3, 30))) for _ in range(N)]
  responses = [rng.integers(1, V, rng.integers(1, 7)).astype(np.int32) for _ in range(N)]
  # Each group has correct rollouts (its failed siblings have a teacher); srpo routes 4 of 8 to SDPO by default, so
  # every micro-batch of a route has the same row count and the test compiles few programs.
  correct = np.array([1, 0, 0, 1, 1, 0, 0, 1], bool)
  if sdpo_frac is not None:
    correct = np.arange(N) >= round(sdpo_frac * N)
    correct[[0, 4]] = True
  has_teacher = np.ones(N, bool)
  ro = T.Rollouts(prompt_rows=list(range(N)), responses=responses,
                  rollout_logp=[-rng.uniform(0.1, 3.0, len(r)).astype(np.float32) for r in responses],
                  finish=["stop"] * N, texts=[""] * N, group_ids=np.repeat([0, 1], N // 2))
  teacher_prompts = {i: list(rng.integers(1, V, rng.integers(4, 40))) for i in range(N)}
  return prompts, ro, correct, has_teacher, teacher_prompts


def _sampled_from(graphdef, params, batch, rng):
  """`batch` with rollout log-probs near the model's own (as if it had sampled these responses): the rollout IS
  weights min(π_old / π_roll, 2) then stay near 1 instead of scaling the sharpened model's terms by random factors."""
  t, hp = batch.resp.shape[1], LossHParams(tile_size=TILE)
  logp = jax.jit(lambda p: student_logp(nnx.merge(graphdef, p), batch.ids, batch.mask, batch.start, t, hp))(params)
  roll = np.where(batch.resp, np.asarray(logp) + rng.normal(0, 0.05, batch.resp.shape), 0.0).astype(np.float32)
  return dataclasses.replace(batch, roll_logp=roll)


def _scored(method, correct, has_teacher, rng):
  grpo, sdpo = methods.get(method).route_masks(correct, has_teacher)
  return T.Scored(rewards=correct.astype(np.float32), adv=rng.normal(size=N).astype(np.float32), grpo=grpo, sdpo=sdpo,
                  sibling=np.zeros(N, np.int32), correct=correct, has_teacher=has_teacher)


def _reference_loss(params, teacher_params, graphdef, batch, old_logp, sc, teacher_prompts, responses, den,
                    hp: LossHParams):
  """The mini-batch objective in one pass, as the update computed it before: mixed rows, the head at k=1 on every
  row and again at top-k on the SDPO rows, the DW weights normalised over Ω from a separate teacher-entropy pass;
  the entropy bonus as verl's actor (`agg_loss` of the entropy over every valid token, the method's aggregation).
  Returns (loss, {"sdpo": the SDPO term, "entropy": the entropy bonus term, "dw": DW weights over Ω or None})."""
  method, a = hp.method, hp.algo
  model = nnx.merge(graphdef, params)
  b, t = batch.resp.shape
  h, targets = response_hidden(model, batch.ids, batch.mask, batch.start, t)
  w = model.head_weight()
  out = fh.fused_head(_flat(h), w, _flat(targets), k=1, tile_size=TILE)
  logp, entropy = out.logp_X.reshape(b, t), out.entropy_X.reshape(b, t)
  old = jax.lax.stop_gradient(logp) if old_logp is None else old_logp
  roll_w = losses.rollout_is_weights(old, batch.roll_logp, cap=a.rollout_is_cap)
  grpo_loss = losses.grpo_token_loss(logp, old, sc.adv, clip_low=a.clip_low, clip_high=a.clip_high, clip_c=a.clip_c,
                                     rollout_is_weights=roll_w)
  sdpo_loss, dw, dw_omega = None, jnp.ones((b, t), jnp.float32), None
  rows = np.flatnonzero(sc.sdpo)
  if len(rows):
    teacher = nnx.merge(graphdef, jax.lax.stop_gradient(teacher_params))
    tr = batching.teacher_sequences(rows, teacher_prompts, responses, t, PAD, num_rows=len(rows))
    ht = response_hidden(teacher, tr.ids, tr.mask, tr.start, t)[0]
    t_out = fh.fused_head(_flat(h[rows]), w, _flat(targets[rows]), _flat(ht),
                          teacher_head_weight_DV=teacher.head_weight(), k=a.topk, tile_size=TILE)
    jsd = jnp.zeros((b, t)).at[rows].set(losses.head_divergence(t_out, alpha=a.jsd_alpha).reshape(len(rows), t))
    sdpo_loss = losses.sdpo_token_loss(jsd, logp, old, is_clip=a.sdpo_is_cap, rollout_is_weights=roll_w)
    if method.dynamic_weighting:
      ent = fh.head_entropy(_flat(ht), teacher.head_weight(), tile_size=TILE).reshape(len(rows), t)
      on = batch.resp[rows]
      dw_omega = losses.dw_weights(ent, on, a.dw_beta)[on]
      dw = dw.at[rows].set(jnp.where(on, losses.dw_weights(ent, on, a.dw_beta), 1.0))
  grpo_in = grpo_loss if method.grpo_rows != "none" else None
  if grpo_in is None and sdpo_loss is None:
    sdpo_loss = jnp.zeros_like(logp)
  objective = lambda g, s: losses.routed_objective(g, s, dw, batch.resp, sc.grpo, sc.sdpo, method=method,
                                                   loss_agg=hp.loss_agg, mix_lambda=a.mix_lambda)[0] / den
  loss = objective(grpo_in, sdpo_loss)
  sdpo_term = objective(None, sdpo_loss) if sdpo_loss is not None else jnp.float32(0.0)
  bonus = jnp.float32(0.0)
  if a.entropy_coef:
    valid = jnp.asarray(batch.resp)
    per_row = jnp.sum(jnp.where(valid, entropy, 0.0), axis=1)
    lengths = jnp.sum(valid, axis=1)
    bonus = (jnp.sum(per_row) / jnp.sum(lengths) if hp.loss_agg == "token-mean" else
             jnp.sum(per_row / jnp.maximum(lengths, 1)) / jnp.sum(lengths > 0))
  loss = loss - a.entropy_coef * bonus
  return loss, {"sdpo": sdpo_term, "entropy": a.entropy_coef * bonus, "dw": dw_omega}


def _torch_reference_loss(params, teacher_params, graphdef, batch, sc, teacher_prompts, responses, cfg) -> float:
  """The same on-policy objective from the two models' full-vocabulary logits, every loss in PyTorch float64
  (tests/torch_ref_losses.py, written from the spec; the entropy bonus as verl's actor)."""
  import torch
  a = cfg.algo
  b, t = batch.resp.shape
  model, teacher = nnx.merge(graphdef, params), nnx.merge(graphdef, teacher_params)
  as_torch = lambda x: torch.tensor(np.asarray(x, np.float64))
  h, targets = response_hidden(model, batch.ids, batch.mask, batch.start, t)
  logits = as_torch(h @ model.head_weight())  # [B, T, V]
  targets = torch.tensor(np.asarray(targets), dtype=torch.long)
  logp_all = torch.log_softmax(logits, -1)
  logp = torch.gather(logp_all, -1, targets[..., None])[..., 0]
  entropy = -(logp_all.exp() * logp_all).sum(-1)
  old = logp.detach()  # on-policy
  w_roll = ref.rollout_is_weight(old, as_torch(batch.roll_logp), a.rollout_is_cap)
  adv = as_torch(sc.adv)[:, None].expand(b, t)
  grpo = ref.grpo_token_loss(logp, old, adv, a.clip_low, a.clip_high, a.clip_c, w_roll)
  jsd, t_entropy = torch.zeros(b, t, dtype=torch.float64), torch.zeros(b, t, dtype=torch.float64)
  rows = np.flatnonzero(sc.sdpo)
  if len(rows):
    tr = batching.teacher_sequences(rows, teacher_prompts, responses, t, PAD, num_rows=len(rows))
    t_logits = as_torch(response_hidden(teacher, tr.ids, tr.mask, tr.start, t)[0] @ teacher.head_weight())
    jsd[rows] = ref.topk_jsd(logits[rows], t_logits, k=a.topk, alpha=a.jsd_alpha)
    t_logp = torch.log_softmax(t_logits, -1)
    t_entropy[rows] = -(t_logp.exp() * t_logp).sum(-1)
  sdpo = ref.sdpo_token_loss(jsd, logp, old, a.sdpo_is_cap, w_roll)
  valid = torch.tensor(batch.resp)
  omega = valid & torch.tensor(sc.sdpo)[:, None]
  dw = ref.dw_weights(t_entropy, omega, a.dw_beta)
  return float(ref.objective(grpo, sdpo, dw, valid, list(sc.grpo), list(sc.sdpo), cfg.algo.name, cfg.loss_agg,
                             a.mix_lambda, entropy_BT=entropy, entropy_coef=a.entropy_coef))


def _config(**kw):
  return Config(run_dir="unused", train=TrainConfig(steps=1), checkpoint=CheckpointConfig(every_steps=1), **kw)


def _cfg(method, entropy_coef=0.0, **optim):
  return _config(algo=AlgoConfig(name=method, topk=16, dw_beta=0.7, entropy_coef=entropy_coef),
                 rollout=RolloutConfig(prompts_per_step=2, n=N // 2), optim=OptimConfig(mini_batch_prompts=2, **optim))


def _flat_tree(t):
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(t)])


def _loss_scale(loss, aux) -> float:
  """|GRPO term| + |SDPO term| + |entropy bonus|: the loss is their signed sum and can nearly cancel (fp32 rounding
  is relative to the terms, not to their sum)."""
  sdpo, ent = float(aux["sdpo"]), float(aux["entropy"])
  return abs(float(loss) - sdpo + ent) + abs(sdpo) + abs(ent)


# Relative 2-norm bound on the whole-model gradient. The loss agrees to 1e-6; the gradient of micro-batches of 2
# rollouts sums the same fp32 terms (tied-embedding scatter-add, head-weight tiles) in another order than one pass,
# which alone moves it by up to ~1.3e-6 (measured): 2e-6 is that floor, not slack for a wrong normaliser (a DW
# normaliser of one micro-batch instead of the mini-batch, or a second teacher, moves it by > 1e-2).
GRAD_RTOL = 2e-6


def _check_updates(method, settings, seed=3, entropy_coef=0.0, torch_check=False):
  rng = np.random.default_rng(seed)
  graphdef, params = nnx.split(_model(1))
  teacher = nnx.split(_model(7))[1]  # far from the student: the JSD is not lost in fp32 rounding
  prompts, ro, correct, has_teacher, tps = _step(rng)
  sc = _scored(method, correct, has_teacher, rng)
  assert sc.sdpo.any() or method == "grpo"
  batch = _sampled_from(graphdef, params, T.assemble(ro, prompts, PAD), rng)
  given_old = np.where(batch.resp, batch.roll_logp + rng.normal(0, 0.2, batch.resp.shape), 0).astype(np.float32)
  opt = _recording_optimizer()
  state = T.TrainState(params=params, opt_state=opt.init(params), teacher=teacher)
  base = _cfg(method, entropy_coef)
  hp = LossHParams(algo=base.algo, loss_agg=base.loss_agg, tile_size=TILE)
  fns = make_train_fns(graphdef, opt, hp)
  den = losses.objective_denominator(jnp.asarray(batch.resp), jnp.asarray(sc.grpo), jnp.asarray(sc.sdpo),
                                     loss_agg=base.loss_agg)
  for on_policy, optims in settings:
    old_logp = None if on_policy else given_old
    reference = lambda p, t: _reference_loss(p, t, graphdef, batch, old_logp, sc, tps, ro.responses, den, hp)
    (want_loss, aux), want = jax.jit(jax.value_and_grad(reference, has_aux=True))(params, teacher)
    w = _flat_tree(want)
    assert np.abs(w).max() > 0
    # What a wrong DW normaliser or SDPO term would move is material here (module docstring).
    if methods.get(method).uses_teacher:
      assert share(float(aux["sdpo"]), float(want_loss) - float(aux["sdpo"])) > 0.01, aux
    if methods.get(method).dynamic_weighting:
      assert dw_spread(aux["dw"]) > 1.1, aux["dw"]
    scale = _loss_scale(want_loss, aux)
    if torch_check and on_policy:
      torch_loss = _torch_reference_loss(params, teacher, graphdef, batch, sc, tps, ro.responses, base)
      assert abs(float(want_loss) - torch_loss) <= 1e-5 * scale, (float(want_loss), torch_loss)
    for optim in optims:
      _, grads, stats, _ = T.run_updates(fns, fresh(state), batch, old_logp, sc, tps, ro.responses,
                                         _cfg(method, entropy_coef, **optim), PAD)
      assert len(stats) == 1 and bool(stats[0].finite)
      assert abs(float(stats[0].loss) - float(want_loss)) <= 1e-6 * scale, (optim, on_policy, float(stats[0].loss),
                                                                          float(want_loss))
      g = _flat_tree(grads)
      assert np.linalg.norm(g - w) <= GRAD_RTOL * np.linalg.norm(w), (optim, on_policy)


@pytest.mark.parametrize("method", methods.NAMES)
def test_update_equals_the_single_pass_objective_for_every_method(method):
  """Route-pure micro-batches, deferred DW and the on-policy π_old give the single-pass objective's loss and
  gradient, with the whole mini-batch in one micro-batch and in micro-batches of 2 rollouts; with an entropy bonus
  (entropy_coef = 0.01: for srpo the DW normaliser is then computed up front) too, and that loss equals PyTorch's."""
  if methods.get(method).dynamic_weighting:  # the deferred normaliser without a bonus, then the up-front one with it
    _check_updates(method, [(True, [{}, dict(micro_batch_size=2)])])
    _check_updates(method, [(True, [dict(micro_batch_size=2)])], entropy_coef=ENTROPY_COEF, torch_check=True)
  else:
    _check_updates(method, [(True, [{}, dict(micro_batch_size=2)])], entropy_coef=ENTROPY_COEF, torch_check=True)


@pytest.mark.parametrize("method,kind", [("srpo", "dw_per_micro_batch"), ("srpo", "sdpo_term_dropped"),
                                         ("sdpo", "sdpo_term_dropped")])
def test_the_comparison_fails_when_dw_or_the_sdpo_term_is_broken(method, kind):
  """Negative cases (tests/sharp_model.py `broken`): the same comparison with the DW normaliser taken over the last
  teacher micro-batch instead of the mini-batch, or with the SDPO term dropped, fails; on a flat random-init model
  neither would."""
  with broken(kind), pytest.raises(AssertionError, match="micro_batch_size"):  # the update's loss or gradient
    _check_updates(method, [(True, [dict(micro_batch_size=2)])])


@pytest.mark.parametrize("method", ["srpo", "grpo"])
def test_update_equals_the_single_pass_objective_token_budget_and_given_pi_old(method):
  """Ragged token-budget micro-batches (teacher sequences counted in the budget), and a π_old from `prepare`."""
  _check_updates(method, [(True, [dict(micro_batch_tokens=64)]), (False, [dict(micro_batch_size=2)])], seed=4)


def test_on_policy_steps_have_ratio_exactly_one_and_skip_the_pi_old_pass():
  rng = np.random.default_rng(4)
  graphdef, params = nnx.split(_model(1))
  prompts, ro, correct, has_teacher, tps = _step(rng)
  sc = _scored("srpo", correct, has_teacher, rng)
  batch = T.assemble(ro, prompts, PAD)
  opt = _recording_optimizer()
  cfg = _cfg("srpo", micro_batch_size=2)
  fns = make_train_fns(graphdef, opt, LossHParams(algo=cfg.algo, loss_agg=cfg.loss_agg, tile_size=TILE))
  state = T.TrainState(params=params, opt_state=opt.init(params), teacher=params)
  _, _, stats, _ = T.run_updates(fns, fresh(state), batch, None, sc, tps, ro.responses, cfg, PAD)
  m = T.update_metrics(jax.device_get(stats))
  assert m[M.GRPO_RATIO_MEAN] == 1.0 and m[M.GRPO_CLIP_FRAC] == 0.0 and m[M.GRPO_APPROX_KL] == 0.0
  assert m[M.DW_MEAN] == pytest.approx(1.0, rel=1e-6)
  # Which steps compute π_old in a pass of their own: several optimizer steps, or when forced.
  assert not T.needs_old_logp(cfg)
  assert T.needs_old_logp(_cfg("srpo", recompute_old_logp=True))
  grpo = _config(algo=AlgoConfig(name="grpo"), rollout=RolloutConfig(prompts_per_step=32, n=8))
  assert grpo.optimizer_steps_per_step == 4 and T.needs_old_logp(grpo)


def _flops(fn, *args) -> float:
  return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


def test_compiled_flops_one_teacher_forward_per_sdpo_rollout():
  """XLA's cost analysis of the compiled programs: a teacher micro-batch costs a plain one plus one teacher forward
  (its layers and its head), not two; an on-policy srpo step compiles no π_old program at all."""
  rng = np.random.default_rng(5)
  graphdef, params = nnx.split(_model(1))
  prompts, ro, correct, has_teacher, tps = _step(rng, sdpo_frac=0.75)
  cfg = _cfg("srpo")
  hp = LossHParams(algo=cfg.algo, loss_agg=cfg.loss_agg, tile_size=TILE)
  fns = make_train_fns(graphdef, _recording_optimizer(), hp)
  batch = T.assemble(ro, prompts, PAD)
  rows = [1, 2, 3]  # failed rollouts with a correct sibling: SDPO-routed
  sc = _scored("srpo", correct, has_teacher, rng)
  assert sc.sdpo[rows].all()
  arrays = batching.StepArrays(ids=batch.ids, mask=batch.mask, start=batch.start, resp=batch.resp,
                               roll_logp=batch.roll_logp, adv=sc.adv, grpo=sc.grpo, sdpo=sc.sdpo)
  kw = dict(num_rows=4, seq_len=batch.ids.shape[1], resp_len=batch.resp.shape[1])
  mb_t = batching.micro_batch(rows, arrays, tps, ro.responses, PAD, **kw)
  plain = batching.micro_batch(rows, arrays._replace(sdpo=np.zeros(N, bool), grpo=np.ones(N, bool)), tps,
                               ro.responses, PAD, **kw)
  assert mb_t.has_teacher and not plain.has_teacher
  grads = jax.tree.map(jnp.zeros_like, params)
  acc = lambda mb: _flops(fns.accumulate, params, params, grads, jnp.float32(1.0), mb, jnp.float32(10.0))
  f_teacher_mb, f_plain_mb = acc(mb_t), acc(plain)

  def teacher_forward(tp, ids, mask, start):  # the teacher's layers and full-vocabulary head on its sequences
    m = nnx.merge(graphdef, tp)
    h = response_hidden(m, ids, mask, start, batch.resp.shape[1])[0]
    return fh.head_entropy(_flat(h), m.head_weight(), tile_size=TILE)

  f_teacher = _flops(teacher_forward, params, mb_t.t_ids, mb_t.t_mask, mb_t.t_start)
  extra = f_teacher_mb - f_plain_mb
  # One teacher forward, plus the top-k JSD's small elementwise work; two forwards would be ≥ 2 × f_teacher.
  assert 0.9 * f_teacher <= extra <= 1.25 * f_teacher, (extra / f_teacher)
