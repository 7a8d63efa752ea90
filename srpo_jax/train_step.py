"""The jitted math of one training step: `prepare` (π_old), `accumulate` + `apply` (grads + AdamW) and `ema`.

Layout of a micro-batch: `srpo_jax.batching.MicroBatch`, route-pure (B rollouts, S = P + T positions): a teacher
micro-batch holds SDPO-routed rollouts only, each beside its teacher-prompted sequence, and runs the EMA teacher's
forward once and one head pass per row that gives the student's log-probs, entropy and top-k and the teacher's top-k
and entropy; a plain micro-batch runs no teacher at all. Rows are right-padded; the hidden state at position
start[b] - 1 + t predicts response token t (at start[b] + t), in both the student and the teacher sequences.

The objective is a global token mean: each micro-batch contributes `numerator / denominator_of_the_mini_batch`, so
summing micro-batch gradients reproduces the full mini-batch gradient exactly (spec, "SRPO: objective"). What each
rollout contributes is the method's (`srpo_jax.methods.Method`, read through `LossHParams.method`).

Deferred DW: the DW weight of an SDPO token is `exp(−βH) / mean_Ω exp(−βH)`, with Ω spanning the whole mini-batch.
A teacher micro-batch's numerator uses the unnormalised `exp(−βH)` and reports `Σ_Ω exp(−βH)`; the trainer runs
the mini-batch's teacher micro-batches first and then scales the accumulated gradient (and loss) once by
`|Ω| / Σ_Ω exp(−βH)` (`accumulate`'s / `apply`'s `scale`) before the plain micro-batches add theirs. The SDPO part
is linear in its weights, so this equals normalising first, with one teacher forward per rollout instead of two.
An entropy bonus (`algo.entropy_coef > 0`) is not an SDPO term and must not be scaled: with DW, such a mini-batch
computes the normaliser up front instead (`dw_sum`, one teacher forward per SDPO-routed rollout) and passes it in
`Denominators.dw_norm`; nothing is deferred then.

On-policy steps (one optimizer step per training step) pass no π_old: the update uses `stop_gradient(π_θ)`, as the
official code's `log_prob.detach()`, so the GRPO ratio and the SDPO IS ratio are exactly 1.

Letters (srpo_jax/models/qwen3.py): B rollouts, S positions, T response positions, D width, X flattened tokens.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from srpo_jax import methods
from srpo_jax.algorithms import losses
from srpo_jax.batching import MicroBatch
from srpo_jax.config import AlgoConfig
from srpo_jax.kernels import fused_head as fh


@dataclasses.dataclass(frozen=True)
class LossHParams:
  """Static loss settings (hashable: part of the compiled program's identity), read from the config, not copied."""
  algo: AlgoConfig = AlgoConfig()
  loss_agg: str = "token-mean"
  temperature: float = 1.0  # rollout.temperature: the logits of every log-prob and of the top-k loss are divided by it
  tile_size: int = fh.DEFAULT_TILE_SIZE

  @property
  def method(self) -> methods.Method:
    return methods.get(self.algo.name)

  @classmethod
  def from_config(cls, cfg) -> "LossHParams":
    return cls(algo=cfg.algo, loss_agg=cfg.loss_agg, temperature=cfg.rollout.temperature)


class TokenSums(NamedTuple):
  """Additive sums over tokens (and rollouts) of one update; divide by the counts for means."""
  tokens: jax.Array
  grpo_tokens: jax.Array
  sdpo_tokens: jax.Array
  grpo_loss: jax.Array
  sdpo_loss: jax.Array
  jsd: jax.Array
  entropy: jax.Array
  clip_frac: jax.Array
  dual_clip_frac: jax.Array
  approx_kl: jax.Array
  ratio: jax.Array
  roll_is: jax.Array
  mismatch: jax.Array         # |log π_old − log π_roll| (the rollout engine's log-prob mismatch)
  teacher_entropy: jax.Array  # teacher entropy H over the SDPO tokens
  dw_unnorm: jax.Array        # exp(−βH) over the SDPO tokens (DW methods; the normaliser's sum)


class TokenMaxes(NamedTuple):
  """Maxima over the tokens of one update (combine with max)."""
  roll_is: jax.Array
  logp: jax.Array
  mismatch: jax.Array
  dw_unnorm: jax.Array      # max exp(−βH) over the SDPO tokens
  dw_unnorm_neg: jax.Array  # max −exp(−βH): minus the minimum


class UpdateStats(NamedTuple):
  """What one optimizer step reports (device arrays; one host transfer per training step)."""
  loss: jax.Array
  grad_norm: jax.Array
  finite: jax.Array
  sums: TokenSums
  maxes: TokenMaxes
  dw_scale: jax.Array  # |Ω| / Σ_Ω exp(−βH): what the deferred DW numerator was scaled by (1 without DW)


def response_positions(start_B, resp_len: int, seq_len: int) -> jax.Array:
  """[B, T] positions of the response tokens (start + t), clipped into the row (padding rows and tokens past a short
  response point at real positions whose outputs the masks drop)."""
  return jnp.clip(start_B[:, None] + jnp.arange(resp_len)[None, :], 0, seq_len - 1)


def response_hidden(model, ids_BS, mask_BS, start_B, resp_len: int) -> tuple[jax.Array, jax.Array]:
  """Hidden states that predict the T response tokens [B, T, D] (positions start - 1 + t) and those tokens [B, T]."""
  h_BSD = model.hidden_states(ids_BS, mask_BS, right_padded=True)
  s = ids_BS.shape[1]
  pos_BT = response_positions(start_B, resp_len, s)
  h_BTD = jnp.take_along_axis(h_BSD, jnp.clip(pos_BT - 1, 0, s - 1)[..., None], axis=1)
  return h_BTD, jnp.take_along_axis(ids_BS, pos_BT, axis=1)


def _flat(x):
  return x.reshape((-1,) + x.shape[2:])


def student_logp(model, ids, mask, start, resp_len: int, hp: LossHParams) -> jax.Array:
  """Sampled-token log-probs [B, T] through the fused head (k=1: no top-k needed here): π_old."""
  b = ids.shape[0]
  h, targets = response_hidden(model, ids, mask, start, resp_len)
  out = fh.fused_head(_flat(h), model.head_weight(), _flat(targets), k=1,
                      temperature=hp.temperature, tile_size=hp.tile_size)
  return out.logp_X.reshape(b, resp_len)


def check_dw_beta(beta: float, vocab: int) -> None:
  """The deferred DW numerator uses exp(−βH) unshifted; H ≤ ln V, so it stays a normal fp32 number while
  β·ln V ≤ 80 (β = 1 in the paper: 11.9 at V = 151,936)."""
  if beta * math.log(vocab) > 80.0:
    raise ValueError(f"algo.dw_beta={beta}: exp(-β·H) underflows float32 for teacher entropies up to ln V = "
                     f"{math.log(vocab):.2f} (V={vocab}); use dw_beta <= {80.0 / math.log(vocab):.2f}")


class Denominators(NamedTuple):
  """What a micro-batch's share of the mini-batch loss is divided or weighted by, known before the mini-batch runs
  (replicated scalars). `accumulate` also takes a bare scalar: the objective's denominator, shared by the entropy
  bonus, the DW normaliser deferred."""
  objective: Any  # `losses.routed_objective`'s denominator over the mini-batch
  entropy: Any    # `losses.entropy_bonus`'s denominator over the mini-batch (every valid token / non-empty rollout)
  dw_norm: Any = None  # |Ω| / Σ_Ω exp(−βH) computed up front (`dw_sum`); None: deferred (module docstring)

  @classmethod
  def of(cls, denominator) -> "Denominators":
    return denominator if isinstance(denominator, cls) else cls(objective=denominator, entropy=denominator)


def micro_objective(params, teacher_params, graphdef, mb: MicroBatch, denominator, hp: LossHParams):
  """This micro-batch's share of the mini-batch objective (numerator / mini-batch denominator) and its statistics.

  A teacher micro-batch's DW weights are the unnormalised exp(−βH) (module docstring: deferred DW), times
  `denominator.dw_norm` when that is given. The entropy bonus is aggregated as verl does (`losses.entropy_bonus`)."""
  method = hp.method
  a = hp.algo
  den = Denominators.of(denominator)
  if a.entropy_coef and method.dynamic_weighting and mb.has_teacher and den.dw_norm is None:
    raise ValueError("micro_objective: with algo.entropy_coef > 0 a teacher micro-batch needs the DW normaliser up "
                     "front (Denominators.dw_norm): a deferred normaliser would scale its entropy bonus too")
  model = nnx.merge(graphdef, params)
  b, resp_len = mb.resp.shape
  h, targets = response_hidden(model, mb.ids, mb.mask, mb.start, resp_len)  # [B, T, D], [B, T]
  w = model.head_weight()
  jsd = t_entropy = None
  if mb.has_teacher:
    # One head pass per row: the student's log-prob, entropy and top-k, and the teacher's top-k and entropy.
    teacher = nnx.merge(graphdef, jax.lax.stop_gradient(teacher_params))
    ht = response_hidden(teacher, mb.t_ids, mb.t_mask, mb.t_start, resp_len)[0]  # [B, T, D]
    out = fh.fused_head(_flat(h), w, _flat(targets), _flat(ht), teacher_head_weight_DV=teacher.head_weight(),
                        k=a.topk, temperature=hp.temperature, tile_size=hp.tile_size)
    jsd = losses.head_divergence(out, alpha=a.jsd_alpha).reshape(b, resp_len)
    t_entropy = out.teacher_entropy_X.reshape(b, resp_len)
  else:
    out = fh.fused_head(_flat(h), w, _flat(targets), k=1, temperature=hp.temperature, tile_size=hp.tile_size)
  logp = out.logp_X.reshape(b, resp_len)
  entropy = out.entropy_X.reshape(b, resp_len)
  old_logp = jax.lax.stop_gradient(logp) if mb.old_logp is None else mb.old_logp
  roll_w = losses.rollout_is_weights(old_logp, mb.roll_logp, cap=a.rollout_is_cap)
  grpo_loss = losses.grpo_token_loss(logp, old_logp, mb.adv, clip_low=a.clip_low, clip_high=a.clip_high,
                                     clip_c=a.clip_c, rollout_is_weights=roll_w)
  sdpo_loss = dw = None
  if jsd is not None:
    sdpo_loss = losses.sdpo_token_loss(jsd, logp, old_logp, is_clip=a.sdpo_is_cap, rollout_is_weights=roll_w)
  if method.dynamic_weighting:
    check_dw_beta(a.dw_beta, w.shape[1])
    dw = jnp.ones_like(logp) if t_entropy is None else jnp.exp(-a.dw_beta * t_entropy)
  grpo_in = grpo_loss if method.grpo_rows != "none" else None
  if grpo_in is None and sdpo_loss is None:
    sdpo_loss = jnp.zeros_like(logp)  # an SDPO-only method's plain micro-batch: every rollout carries zero loss
  dw_loss = dw if dw is None or den.dw_norm is None else dw * den.dw_norm
  num, _ = losses.routed_objective(grpo_in, sdpo_loss, dw_loss, mb.resp, mb.grpo, mb.sdpo, method=method,
                                   loss_agg=hp.loss_agg, mix_lambda=a.mix_lambda)
  loss = num / jnp.maximum(den.objective, 1.0)
  if a.entropy_coef:
    bonus, _ = losses.entropy_bonus(entropy, mb.resp, loss_agg=hp.loss_agg)
    loss = loss - a.entropy_coef * bonus / jnp.maximum(den.entropy, 1.0)
  return loss, _micro_stats(mb, logp, old_logp, entropy, roll_w, grpo_loss, sdpo_loss, jsd, t_entropy, dw, a)


def _micro_stats(mb: MicroBatch, logp, old_logp, entropy, roll_w, grpo_loss, sdpo_loss, jsd, t_entropy, dw,
                 a: AlgoConfig):
  valid = mb.resp
  g_tok = valid & mb.grpo[:, None]
  s_tok = valid & mb.sdpo[:, None]
  n_g = jnp.sum(g_tok)
  gm = losses.grpo_metrics(logp, old_logp, mb.adv, g_tok, clip_low=a.clip_low, clip_high=a.clip_high,
                           clip_c=a.clip_c)
  zero = jnp.float32(0.0)
  tok_sum = lambda x, on: zero if x is None else jnp.sum(jnp.where(on, x, 0.0))
  tok_max = lambda x, on: jnp.float32(-jnp.inf) if x is None else jnp.max(jnp.where(on, x, -jnp.inf))
  mismatch = jnp.abs(old_logp - mb.roll_logp)
  dw_on = None if (dw is None or t_entropy is None) else dw
  sums = TokenSums(
      tokens=jnp.sum(valid), grpo_tokens=n_g, sdpo_tokens=jnp.sum(s_tok), grpo_loss=tok_sum(grpo_loss, g_tok),
      sdpo_loss=tok_sum(sdpo_loss, s_tok), jsd=tok_sum(jsd, s_tok),
      entropy=tok_sum(entropy, valid), clip_frac=gm["clip_frac"] * n_g, dual_clip_frac=gm["dual_clip_frac"] * n_g,
      approx_kl=gm["approx_kl"] * n_g, ratio=gm["ratio_mean"] * n_g, roll_is=tok_sum(roll_w, valid),
      mismatch=tok_sum(mismatch, valid), teacher_entropy=tok_sum(t_entropy, s_tok), dw_unnorm=tok_sum(dw_on, s_tok))
  maxes = TokenMaxes(roll_is=jnp.max(jnp.where(valid, roll_w, 0.0)), logp=tok_max(logp, valid),
                     mismatch=jnp.max(jnp.where(valid, mismatch, 0.0)), dw_unnorm=tok_max(dw_on, s_tok),
                     dw_unnorm_neg=tok_max(None if dw_on is None else -dw_on, s_tok))
  return sums, maxes


def make_optimizer(lr: float, *, warmup_steps: int = 10, weight_decay: float = 0.01, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, grad_clip: float | None = 1.0):
  """AdamW behind a global-norm clip, and the lr schedule over TRAINING steps (verl steps its scheduler once per step).

  Returns `(optimizer, schedule)`. `schedule(s)` is the lr of training step s (0-based): a linear warm-up from 0 over
  `warmup_steps` training steps (`lr · s / warmup_steps`, so step 0 runs at lr 0 as verl's
  `get_constant_schedule_with_warmup`), then constant. The optimizer does not count its own updates: its lr is an
  injected hyperparameter (`optax.inject_hyperparams`) that the trainer sets once per training step
  (`trainer.set_lr(opt_state, schedule(step))`), so every optimizer step of a training step (GRPO: 4 mini-batches)
  uses the same lr, and `opt_state` holds the lr in use (checkpointed with it; `trainer.current_lr` reads it back).
  """
  schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup_steps, 1)), optax.constant_schedule(lr)],
                                  [max(warmup_steps, 1)]) if warmup_steps > 0 else optax.constant_schedule(lr)

  def clipped_adamw(learning_rate):
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
    parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)

  return optax.inject_hyperparams(clipped_adamw)(learning_rate=float(schedule(0))), schedule


class TrainFns(NamedTuple):
  prepare: Any     # (params, ids, mask, start, resp) -> π_old [B, T] (one chunk of rollouts)
  accumulate: Any  # (params, teacher, grads, scale, one micro-batch, denominator(s)) -> (grads, loss, sums, maxes)
  apply: Any       # (params, opt_state, grads, loss, scale) -> (params, opt_state, grad_norm, finite)
  ema: Any         # (teacher, params, rate) -> teacher
  dw_sum: Any = None  # (teacher, one teacher micro-batch) -> Σ_Ω exp(−βH): the DW normaliser up front


class TrainShardings(NamedTuple):
  """Where the step's state lives on a mesh: parameters (and the teacher) by the logical-axis rules, the optimizer
  state like the parameters it tracks, batches split over ("data", "fsdp") on their row axis."""
  mesh: Any
  params: Any     # a NamedSharding per parameter (a tree prefix of the nnx.State)
  opt_state: Any  # the same for the optimizer state (moments like their parameters, counters replicated)
  replicated: Any

  @classmethod
  def build(cls, mesh, params, optimizer) -> "TrainShardings":
    from jax.sharding import NamedSharding, PartitionSpec
    from srpo_jax import sharding
    p_sh = sharding.state_shardings(params, mesh)
    rep = NamedSharding(mesh, PartitionSpec())
    o_sh = optax.tree_map_params(optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, params), p_sh,
                                 transform_non_params=lambda _: rep, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return cls(mesh=mesh, params=p_sh, opt_state=o_sh, replicated=rep)

  def rows(self, tree, axis: int = 0):
    """Every array of `tree` split over ("data", "fsdp") on `axis` (None fields stay None)."""
    from jax.sharding import NamedSharding, PartitionSpec
    spec = PartitionSpec(*([None] * axis), ("data", "fsdp"))
    return jax.tree.map(lambda _: NamedSharding(self.mesh, spec), tree)


class _JitPerStructure:
  """`jax.jit` with declared in/out shardings, one compiled function per input structure (a batch with or without
  teacher rows). `lower(*args)` is the AOT entry the planner uses."""

  def __init__(self, fn, shardings_for, donate_argnums=(), mesh=None):
    self._fn, self._shardings_for, self._donate, self._jits = fn, shardings_for, donate_argnums, {}
    self.mesh = mesh  # traced under `jax.set_mesh(mesh)`: the model splits its activations' rows over it

  def _jit(self, args):
    key = jax.tree.structure(args)
    if key not in self._jits:
      in_sh, out_sh = self._shardings_for(*args)
      self._jits[key] = (jax.jit(self._fn, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=self._donate),
                         in_sh)
    return self._jits[key]

  def _mesh_context(self):
    return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

  def __call__(self, *args):
    with self._mesh_context():
      fn, in_sh = self._jit(args)
      if jax.process_count() > 1:  # host values (batches, scalars) become global arrays: jit takes no others there
        args = jax.tree.map(lambda sh, sub: jax.tree.map(lambda x: global_array(x, sh), sub), in_sh, args)
      return fn(*args)

  def lower(self, *args):
    with self._mesh_context():
      return self._jit(args)[0].lower(*args)


def global_array(x, sharding):
  """`x` as a jax.Array with `sharding`. A host value (numpy, a scalar, or an array of this process alone) must be
  the same on every process of a multi-process run (the trainer's host code is: distributed.py); each process then
  transfers only the shards its own devices hold (`jax.make_array_from_callback`), nothing crosses hosts."""
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.device_put(x, sharding)  # already global: a reshard
  value = np.asarray(x)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def tree_all_finite(tree) -> jax.Array:
  """True when every floating-point leaf of `tree` is finite (a scalar bool; integer leaves are always finite)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def make_train_fns(graphdef, optimizer, hp: LossHParams, shardings: Optional[TrainShardings] = None) -> TrainFns:
  """Jitted functions closed over the static pieces (graph, optimizer, loss settings).

  With `shardings` (a mesh), every program declares its input and output shardings: no array is replicated by
  accident, and the batch work is split over the devices like the batch.
  """

  def prepare(params, ids, mask, start, resp):
    """π_old log-probs [B, T] of a chunk of rollouts (steps with several optimizer steps, or when forced)."""
    return student_logp(nnx.merge(graphdef, params), ids, mask, start, resp.shape[1], hp)

  grad_fn = jax.value_and_grad(micro_objective, has_aux=True)

  def accumulate(params, teacher_params, grads, scale, mb: MicroBatch, denominator):
    """grads · scale + ∇(this micro-batch's share of the objective): one program per micro-batch shape; `apply`
    follows once per mini-batch. `scale` is 1 except where the trainer applies the deferred DW normaliser."""
    (loss, (sums, maxes)), g = grad_fn(params, teacher_params, graphdef, mb, denominator, hp)
    return jax.tree.map(lambda acc, x: acc * scale + x, grads, g), loss, sums, maxes

  def dw_sum(teacher_params, mb: MicroBatch):
    """Σ exp(−βH) over a teacher micro-batch's SDPO-routed tokens (H: the teacher's entropy, the same head tiles as
    `accumulate`'s): the DW normaliser's sum when it cannot be deferred (an entropy bonus; module docstring)."""
    teacher = nnx.merge(graphdef, teacher_params)
    b, resp_len = mb.resp.shape
    ht = response_hidden(teacher, mb.t_ids, mb.t_mask, mb.t_start, resp_len)[0]
    t_entropy = fh.head_entropy(_flat(ht), teacher.head_weight(), temperature=hp.temperature,
                                tile_size=hp.tile_size).reshape(b, resp_len)
    check_dw_beta(hp.algo.dw_beta, teacher.head_weight().shape[1])
    return jnp.sum(jnp.where(mb.resp & mb.sdpo[:, None], jnp.exp(-hp.algo.dw_beta * t_entropy), 0.0))

  def apply(params, opt_state, grads, loss, scale):
    """One clipped AdamW step from the accumulated gradients (times `scale`). A step whose loss, gradient norm, new
    parameters or new optimizer state is not finite leaves params and optimizer state unchanged (`finite` says)."""
    grads = jax.tree.map(lambda x: x * scale, grads)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & tree_all_finite(new_params)
              & tree_all_finite(new_opt_state))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    return keep(new_params, params), keep(new_opt_state, opt_state), grad_norm, finite

  def ema(teacher_params, params, rate):
    """θ_T ← (1 − rate)·θ_T + rate·θ (spec: after all optimizer steps of a training step)."""
    return jax.tree.map(lambda t, p: ((1.0 - rate) * t.astype(jnp.float32) + rate * p.astype(jnp.float32)
                                      ).astype(t.dtype), teacher_params, params)

  # Donating params/optimizer state/gradients/teacher halves peak memory on accelerators. The CPU backend donates
  # too (jax 0.10.2), so every platform runs the same programs and a use after donation fails in the CPU tests.
  if shardings is None:
    return TrainFns(prepare=jax.jit(prepare), accumulate=jax.jit(accumulate, donate_argnums=(2,)),
                    apply=jax.jit(apply, donate_argnums=(0, 1, 2)), ema=jax.jit(ema, donate_argnums=(0,)),
                    dw_sum=jax.jit(dw_sum))
  sh = shardings
  rep = sh.replicated

  def prepare_shardings(params, ids, mask, start, resp):
    return (sh.params, *sh.rows((ids, mask, start, resp))), sh.rows(resp)

  def accumulate_shardings(params, teacher, grads, scale, mb, denominator):
    return (sh.params, sh.params, sh.params, rep, sh.rows(mb), rep), (sh.params, rep, rep, rep)

  def apply_shardings(params, opt_state, grads, loss, scale):
    return (sh.params, sh.opt_state, sh.params, rep, rep), (sh.params, sh.opt_state, rep, rep)

  def ema_shardings(teacher, params, rate):
    return (sh.params, sh.params, rep), sh.params

  def dw_sum_shardings(teacher, mb):
    return (sh.params, sh.rows(mb)), rep

  return TrainFns(prepare=_JitPerStructure(prepare, prepare_shardings, mesh=sh.mesh),
                  accumulate=_JitPerStructure(accumulate, accumulate_shardings, mesh=sh.mesh, donate_argnums=(2,)),
                  apply=_JitPerStructure(apply, apply_shardings, donate_argnums=(0, 1, 2), mesh=sh.mesh),
                  ema=_JitPerStructure(ema, ema_shardings, mesh=sh.mesh, donate_argnums=(0,)),
                  dw_sum=_JitPerStructure(dw_sum, dw_sum_shardings, mesh=sh.mesh))
