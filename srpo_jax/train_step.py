"""The jitted math of one training step: `prepare` (π_old, DW weights), `update` (grads + AdamW) and `ema`.

Layout of a mini-batch: `srpo_jax.batching.MicroBatch` (M micro-batches of B rollouts, S = P + T positions; the
SDPO-routed rollouts of each micro-batch re-read after their teacher prompts in C teacher rows, absent when no
rollout is SDPO-routed: the compiled program then runs no teacher forward at all). Rows are right-padded; the
hidden state at position start[b] - 1 + t predicts response token t (at start[b] + t), in both the student and the
teacher sequences.

The objective is a global token mean: each micro-batch contributes `numerator / denominator_of_the_mini_batch`, so
summing micro-batch gradients reproduces the full mini-batch gradient exactly (spec, "SRPO: objective"). What each
rollout contributes is the method's (`srpo_jax.methods.Method`, read through `LossHParams.method`).

Letters (srpo_jax/models/qwen3.py): B rollouts, S positions, T response positions, C teacher rows, D width,
M micro-batches, X flattened tokens.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from srpo_jax import methods
from srpo_jax.algorithms import losses
from srpo_jax.batching import MicroBatch, TeacherRows
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


class TokenMaxes(NamedTuple):
  """Maxima over the tokens of one update (combine with max)."""
  roll_is: jax.Array
  logp: jax.Array


class UpdateStats(NamedTuple):
  """What one optimizer step reports (device arrays; one host transfer per training step)."""
  loss: jax.Array
  grad_norm: jax.Array
  finite: jax.Array
  sums: TokenSums
  maxes: TokenMaxes


class DWStats(NamedTuple):
  """Teacher entropy and DW weights over Ω (the valid SDPO-routed tokens of the step)."""
  tokens: jax.Array
  entropy_mean: jax.Array
  dw_min: jax.Array
  dw_mean: jax.Array
  dw_max: jax.Array


class PrepareOut(NamedTuple):
  """One `prepare` call's outputs (a chunk of the step's rollouts)."""
  old_logp: jax.Array                  # [B, T] π_old
  teacher_entropy: Optional[jax.Array]  # [C, T] teacher entropy of the chunk's teacher rows (methods with DW)


class Prepared(NamedTuple):
  """The step's π_old and DW weights, assembled from the prepare chunks (host arrays)."""
  old_logp: jax.Array         # [B, T] π_old
  dw: jax.Array               # [B, T] DW weights (ones off Ω, and for methods without DW)
  dw_stats: Optional[DWStats]  # None without teacher rows


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


def student_logp(model, ids, mask, start, resp_len: int, hp: LossHParams) -> tuple[jax.Array, jax.Array]:
  """Sampled-token log-probs and entropies [B, T] through the fused head (k=1: no top-k needed here)."""
  b = ids.shape[0]
  h, targets = response_hidden(model, ids, mask, start, resp_len)
  out = fh.fused_head(_flat(h), model.head_weight(), _flat(targets), k=1,
                      temperature=hp.temperature, tile_size=hp.tile_size)
  return out.logp_X.reshape(b, resp_len), out.entropy_X.reshape(b, resp_len)


def teacher_entropy(teacher, t: TeacherRows, resp_len: int, hp: LossHParams) -> jax.Array:
  """The EMA teacher's full-vocabulary entropy [C, T] at the response tokens of its (teacher-prompted) rows."""
  c = t.ids.shape[0]
  h = jax.lax.stop_gradient(response_hidden(teacher, t.ids, t.mask, t.start, resp_len)[0])
  return fh.head_entropy(_flat(h), jax.lax.stop_gradient(teacher.head_weight()), temperature=hp.temperature,
                         tile_size=hp.tile_size).reshape(c, resp_len)


def dw_for_rows(ent_CT, on_CT, dest_C, num_rows: int, beta: float) -> tuple[jax.Array, DWStats]:
  """DW weights [num_rows, T] from the teacher entropies of all the step's SDPO rows, and their statistics.

  Ω = `on_CT` (the valid response tokens of the teacher rows, gathered from every prepare chunk); `losses.dw_weights`
  normalises over all of Ω at once (the normaliser spans micro-batches and chunks). Teacher row c holds rollout
  `dest_C[c]`; padding rows carry dest = num_rows and are dropped, so they cannot overwrite a real row. Rows off Ω
  keep weight 1 (they carry no SDPO loss anyway).
  """
  w_CT = losses.dw_weights(ent_CT, on_CT, beta)
  dw_BT = jnp.ones((num_rows, ent_CT.shape[1]), jnp.float32).at[dest_C].set(jnp.where(on_CT, w_CT, 1.0), mode="drop")
  n = jnp.sum(on_CT)
  mean_on = lambda x: jnp.sum(jnp.where(on_CT, x, 0.0)) / jnp.maximum(n, 1)
  stats = DWStats(tokens=n, entropy_mean=mean_on(ent_CT), dw_min=jnp.min(jnp.where(on_CT, w_CT, jnp.inf)),
                  dw_mean=mean_on(w_CT), dw_max=jnp.max(jnp.where(on_CT, w_CT, -jnp.inf)))
  return dw_BT, stats


def micro_objective(params, teacher_params, graphdef, mb: MicroBatch, denominator, hp: LossHParams):
  """This micro-batch's share of the mini-batch objective (numerator / mini-batch denominator) and its statistics."""
  method = hp.method
  model = nnx.merge(graphdef, params)
  b, resp_len = mb.resp.shape
  h, targets = response_hidden(model, mb.ids, mb.mask, mb.start, resp_len)  # [B, T, D], [B, T]
  w = model.head_weight()
  out = fh.fused_head(_flat(h), w, _flat(targets), k=1, temperature=hp.temperature, tile_size=hp.tile_size)
  logp = out.logp_X.reshape(b, resp_len)
  entropy = out.entropy_X.reshape(b, resp_len)
  a = hp.algo
  roll_w = losses.rollout_is_weights(mb.old_logp, mb.roll_logp, cap=a.rollout_is_cap)

  grpo_loss = losses.grpo_token_loss(logp, mb.old_logp, mb.adv, clip_low=a.clip_low, clip_high=a.clip_high,
                                     clip_c=a.clip_c, rollout_is_weights=roll_w)
  sdpo_loss, jsd = None, jnp.zeros((b, resp_len), jnp.float32)
  if mb.t_ids is not None:
    teacher = nnx.merge(graphdef, jax.lax.stop_gradient(teacher_params))
    c = mb.t_ids.shape[0]
    ht = response_hidden(teacher, mb.t_ids, mb.t_mask, mb.t_start, resp_len)[0]  # [C, T, D]
    hs = h[mb.t_row]  # the student's hidden states of the same rollouts
    t_out = fh.fused_head(_flat(hs), w, _flat(targets[mb.t_row]), _flat(ht),
                          teacher_head_weight_DV=teacher.head_weight(), k=a.topk, temperature=hp.temperature,
                          tile_size=hp.tile_size)
    jsd_C = losses.head_divergence(t_out, alpha=a.jsd_alpha).reshape(c, resp_len)
    # Scatter back to the B rows; padding teacher rows (t_valid false) add nothing.
    jsd = jnp.zeros((b, resp_len), jnp.float32).at[mb.t_row].add(jnp.where(mb.t_valid[:, None], jsd_C, 0.0))
    sdpo_loss = losses.sdpo_token_loss(jsd, logp, mb.old_logp, is_clip=a.sdpo_is_cap, rollout_is_weights=roll_w)
  grpo_in = grpo_loss if method.grpo_rows != "none" else None
  if grpo_in is None and sdpo_loss is None:
    sdpo_loss = jnp.zeros_like(logp)  # an SDPO-only method with no teacher rows: every rollout carries zero loss
  num, _ = losses.routed_objective(grpo_in, sdpo_loss, mb.dw, mb.resp, mb.grpo, mb.sdpo, method=method,
                                   loss_agg=hp.loss_agg, mix_lambda=a.mix_lambda)
  if a.entropy_coef:
    num = num - a.entropy_coef * jnp.sum(jnp.where(mb.resp, entropy, 0.0))
  loss = num / jnp.maximum(denominator, 1.0)
  return loss, _micro_stats(mb, logp, entropy, roll_w, grpo_loss, sdpo_loss, jsd, a)


def _micro_stats(mb: MicroBatch, logp, entropy, roll_w, grpo_loss, sdpo_loss, jsd, a: AlgoConfig):
  valid = mb.resp
  g_tok = valid & mb.grpo[:, None]
  s_tok = valid & mb.sdpo[:, None]
  n_g = jnp.sum(g_tok)
  gm = losses.grpo_metrics(logp, mb.old_logp, mb.adv, g_tok, clip_low=a.clip_low, clip_high=a.clip_high,
                           clip_c=a.clip_c)
  tok_sum = lambda x, on: jnp.sum(jnp.where(on, x, 0.0))
  sums = TokenSums(
      tokens=jnp.sum(valid), grpo_tokens=n_g, sdpo_tokens=jnp.sum(s_tok), grpo_loss=tok_sum(grpo_loss, g_tok),
      sdpo_loss=tok_sum(sdpo_loss, s_tok) if sdpo_loss is not None else jnp.float32(0.0), jsd=tok_sum(jsd, s_tok),
      entropy=tok_sum(entropy, valid), clip_frac=gm["clip_frac"] * n_g, dual_clip_frac=gm["dual_clip_frac"] * n_g,
      approx_kl=gm["approx_kl"] * n_g, ratio=gm["ratio_mean"] * n_g, roll_is=tok_sum(roll_w, valid))
  maxes = TokenMaxes(roll_is=jnp.max(jnp.where(valid, roll_w, 0.0)), logp=jnp.max(jnp.where(valid, logp, -jnp.inf)))
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
  prepare: Any     # (params, teacher, ids, mask, start, resp, teacher_rows) -> PrepareOut (one chunk)
  update: Any      # (params, opt_state, teacher, stacked micro-batches, denominator) -> (params, opt_state, stats)
  ema: Any         # (teacher, params, rate) -> teacher
  accumulate: Any = None  # (params, teacher, grads, one micro-batch, denominator) -> (grads, loss, sums, maxes)
  dw: Any = None          # (ent_CT, on_CT, dest_C, num_rows) -> (dw [num_rows, T], DWStats): the step's DW weights
  apply: Any = None       # (params, opt_state, grads, loss) -> (params, opt_state, grad_norm, finite)


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
      self._jits[key] = jax.jit(self._fn, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=self._donate)
    return self._jits[key]

  def _mesh_context(self):
    return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

  def __call__(self, *args):
    with self._mesh_context():
      return self._jit(args)(*args)

  def lower(self, *args):
    with self._mesh_context():
      return self._jit(args).lower(*args)


def make_train_fns(graphdef, optimizer, hp: LossHParams, shardings: Optional[TrainShardings] = None) -> TrainFns:
  """Jitted functions closed over the static pieces (graph, optimizer, loss settings).

  With `shardings` (a mesh), every program declares its input and output shardings: no array is replicated by
  accident, and the batch work is split over the devices like the batch.
  """

  def prepare(params, teacher_params, ids, mask, start, resp, teacher_rows: Optional[TeacherRows]) -> PrepareOut:
    """π_old log-probs [B, T] of a chunk of rollouts and, given teacher rows (methods with DW), their teacher
    entropies [C, T] (normalised into DW weights over the whole step by `dw`)."""
    resp_len = resp.shape[1]
    logp, _ = student_logp(nnx.merge(graphdef, params), ids, mask, start, resp_len, hp)
    if teacher_rows is None:
      return PrepareOut(old_logp=logp, teacher_entropy=None)
    return PrepareOut(old_logp=logp, teacher_entropy=teacher_entropy(nnx.merge(graphdef, teacher_params),
                                                                      teacher_rows, resp_len, hp))

  def dw(ent_CT, on_CT, dest_C, num_rows):
    return dw_for_rows(ent_CT, on_CT, dest_C, num_rows, hp.algo.dw_beta)

  grad_fn = jax.value_and_grad(micro_objective, has_aux=True)

  def apply(params, opt_state, grads, loss):
    """One clipped AdamW step from accumulated gradients; a non-finite loss or gradient norm leaves params and
    optimizer state unchanged (`finite` is reported)."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    return keep(new_params, params), keep(new_opt_state, opt_state), grad_norm, finite

  def update(params, opt_state, teacher_params, micro_batches: MicroBatch, denominator):
    """Accumulates gradients over M stacked micro-batches of one shape (lax.scan), then `apply`."""

    def body(acc, mb):
      (loss, stats), g = grad_fn(params, teacher_params, graphdef, mb, denominator, hp)
      acc_g, acc_loss = acc
      return (jax.tree.map(jnp.add, acc_g, g), acc_loss + loss), stats

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, loss), (sums, maxes) = jax.lax.scan(body, (zeros, jnp.float32(0.0)), micro_batches)
    new_params, new_opt_state, grad_norm, finite = apply(params, opt_state, grads, loss)
    stats = UpdateStats(loss=loss, grad_norm=grad_norm, finite=finite,
                        sums=jax.tree.map(jnp.sum, sums), maxes=jax.tree.map(jnp.max, maxes))
    return new_params, new_opt_state, stats

  def accumulate(params, teacher_params, grads, mb: MicroBatch, denominator):
    """grads + ∇(this micro-batch's share of the objective), for micro-batches of varying shapes (token budgets):
    one program per shape bucket; `apply` follows once per mini-batch. Returns (grads, loss, sums, maxes)."""
    (loss, (sums, maxes)), g = grad_fn(params, teacher_params, graphdef, mb, denominator, hp)
    return jax.tree.map(jnp.add, grads, g), loss, sums, maxes

  def ema(teacher_params, params, rate):
    """θ_T ← (1 − rate)·θ_T + rate·θ (spec: after all optimizer steps of a training step)."""
    return jax.tree.map(lambda t, p: ((1.0 - rate) * t.astype(jnp.float32) + rate * p.astype(jnp.float32)
                                      ).astype(t.dtype), teacher_params, params)

  # Donating params/optimizer state halves peak memory on accelerators; the CPU backend cannot donate (and warns).
  donate = jax.default_backend() != "cpu"
  if shardings is None:
    return TrainFns(prepare=jax.jit(prepare),
                    update=jax.jit(update, donate_argnums=(0, 1) if donate else ()),
                    ema=jax.jit(ema, donate_argnums=(0,) if donate else ()),
                    accumulate=jax.jit(accumulate, donate_argnums=(2,) if donate else ()),
                    apply=jax.jit(apply, donate_argnums=(0, 1, 2) if donate else ()),
                    dw=jax.jit(dw, static_argnums=(3,)))
  sh = shardings
  rep = sh.replicated

  def prepare_shardings(params, teacher, ids, mask, start, resp, teacher_rows):
    in_sh = (sh.params, sh.params, *sh.rows((ids, mask, start, resp)), sh.rows(teacher_rows))
    out_sh = PrepareOut(old_logp=sh.rows(resp), teacher_entropy=None if teacher_rows is None else sh.rows(resp))
    return in_sh, out_sh

  def update_shardings(params, opt_state, teacher, micro_batches, denominator):
    return (sh.params, sh.opt_state, sh.params, sh.rows(micro_batches, axis=1), rep), (sh.params, sh.opt_state, rep)

  def ema_shardings(teacher, params, rate):
    return (sh.params, sh.params, rep), sh.params

  def accumulate_shardings(params, teacher, grads, mb, denominator):
    return (sh.params, sh.params, sh.params, sh.rows(mb), rep), (sh.params, rep, rep, rep)

  def apply_shardings(params, opt_state, grads, loss):
    return (sh.params, sh.opt_state, sh.params, rep), (sh.params, sh.opt_state, rep, rep)

  return TrainFns(prepare=_JitPerStructure(prepare, prepare_shardings, mesh=sh.mesh),
                  update=_JitPerStructure(update, update_shardings, donate_argnums=(0, 1) if donate else (),
                                          mesh=sh.mesh),
                  ema=_JitPerStructure(ema, ema_shardings, mesh=sh.mesh, donate_argnums=(0,) if donate else ()),
                  accumulate=_JitPerStructure(accumulate, accumulate_shardings, mesh=sh.mesh,
                                              donate_argnums=(2,) if donate else ()),
                  apply=_JitPerStructure(apply, apply_shardings, donate_argnums=(0, 1, 2) if donate else (),
                                        mesh=sh.mesh),
                  dw=jax.jit(dw, static_argnums=(3,)))  # [C, T] scalars per token: small, on one device
