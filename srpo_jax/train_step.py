"""The jitted math of one training step: `prepare` (π_old, DW weights), `update` (grads + AdamW) and `ema`.

Layout of a mini-batch: `srpo_jax.batching.MicroBatch` (M micro-batches of B rollouts, S = P + T positions; the
SDPO-routed rollouts of each micro-batch re-read after their teacher prompts in C teacher rows, absent when no
rollout is SDPO-routed: the compiled program then runs no teacher forward at all). The hidden state at position
P - 1 + t predicts response token t, in both the student and the teacher sequences.

The objective is a global token mean: each micro-batch contributes `numerator / denominator_of_the_mini_batch`, so
summing micro-batch gradients reproduces the full mini-batch gradient exactly (spec, "SRPO: objective"). What each
rollout contributes is the method's (`srpo_jax.methods.Method`, read through `LossHParams.method`).

Letters (srpo_jax/models/qwen3.py): B rollouts, S positions, T response positions, C teacher rows, D width,
M micro-batches, X flattened tokens.
"""
from __future__ import annotations

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


class Prepared(NamedTuple):
  old_logp: jax.Array         # [B, T] π_old
  dw: jax.Array               # [B, T] DW weights (ones off Ω, and for methods without DW)
  dw_stats: Optional[DWStats]  # None without teacher rows


def response_hidden(model, ids_BS, mask_BS, resp_len: int) -> jax.Array:
  """Hidden states that predict the T response tokens: positions [S - T - 1, S - 1) → [B, T, D]."""
  h = model.hidden_states(ids_BS, mask_BS)
  return h[:, -resp_len - 1:-1]


def _flat(x):
  return x.reshape((-1,) + x.shape[2:])


def student_logp(model, ids, mask, resp_len: int, hp: LossHParams) -> tuple[jax.Array, jax.Array]:
  """Sampled-token log-probs and entropies [B, T] through the fused head (k=1: no top-k needed here)."""
  b = ids.shape[0]
  h = response_hidden(model, ids, mask, resp_len)
  out = fh.fused_head(_flat(h), model.head_weight(), _flat(ids[:, -resp_len:]), k=1,
                      temperature=hp.temperature, tile_size=hp.tile_size)
  return out.logp_X.reshape(b, resp_len), out.entropy_X.reshape(b, resp_len)


def teacher_dw(teacher, t: TeacherRows, resp_BT, hp: LossHParams) -> tuple[jax.Array, DWStats]:
  """DW weights [B, T] of a step from the EMA teacher's entropy on its SDPO rows, and their statistics.

  Ω = the valid response tokens of the teacher rows; `losses.dw_weights` normalises over all of Ω at once (the
  normaliser spans micro-batches), rows off Ω keep weight 1 (they carry no SDPO loss anyway).
  """
  b, resp_len = resp_BT.shape
  c = t.ids.shape[0]
  h = jax.lax.stop_gradient(response_hidden(teacher, t.ids, t.mask, resp_len))
  ent_CT = fh.head_entropy(_flat(h), jax.lax.stop_gradient(teacher.head_weight()), temperature=hp.temperature,
                           tile_size=hp.tile_size).reshape(c, resp_len)
  on_CT = resp_BT[t.row] & t.valid[:, None]
  w_CT = losses.dw_weights(ent_CT, on_CT, hp.algo.dw_beta)
  # Padding rows scatter out of bounds and are dropped, so they cannot overwrite row 0.
  dest_C = jnp.where(t.valid, t.row, b)
  dw_BT = jnp.ones((b, resp_len), jnp.float32).at[dest_C].set(jnp.where(on_CT, w_CT, 1.0), mode="drop")
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
  h = response_hidden(model, mb.ids, mb.mask, resp_len)  # [B, T, D]
  w = model.head_weight()
  targets = mb.ids[:, -resp_len:]
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
    ht = response_hidden(teacher, mb.t_ids, mb.t_mask, resp_len)  # [C, T, D]
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
  """AdamW behind a global-norm clip; lr warms up linearly from 0 over `warmup_steps` optimizer steps, then is constant."""
  schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup_steps, 1)), optax.constant_schedule(lr)],
                                  [max(warmup_steps, 1)]) if warmup_steps > 0 else optax.constant_schedule(lr)
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.chain(*parts), schedule


class TrainFns(NamedTuple):
  prepare: Any
  update: Any
  ema: Any


def make_train_fns(graphdef, optimizer, hp: LossHParams) -> TrainFns:
  """Jitted functions closed over the static pieces (graph, optimizer, loss settings)."""

  def prepare(params, teacher_params, ids, mask, resp, teacher_rows: Optional[TeacherRows]) -> Prepared:
    """π_old log-probs [B, T] of every rollout and, given teacher rows (methods with DW), the DW weights."""
    resp_len = resp.shape[1]
    logp, _ = student_logp(nnx.merge(graphdef, params), ids, mask, resp_len, hp)
    if teacher_rows is None:
      return Prepared(old_logp=logp, dw=jnp.ones(resp.shape, jnp.float32), dw_stats=None)
    dw, stats = teacher_dw(nnx.merge(graphdef, teacher_params), teacher_rows, resp, hp)
    return Prepared(old_logp=logp, dw=dw, dw_stats=stats)

  def update(params, opt_state, teacher_params, micro_batches: MicroBatch, denominator):
    """Accumulates gradients over the M stacked micro-batches (lax.scan), then one clipped AdamW step.

    A non-finite loss or gradient norm leaves params and optimizer state unchanged (`finite` is reported).
    """
    grad_fn = jax.value_and_grad(micro_objective, has_aux=True)

    def body(acc, mb):
      (loss, stats), g = grad_fn(params, teacher_params, graphdef, mb, denominator, hp)
      acc_g, acc_loss = acc
      return (jax.tree.map(jnp.add, acc_g, g), acc_loss + loss), stats

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, loss), (sums, maxes) = jax.lax.scan(body, (zeros, jnp.float32(0.0)), micro_batches)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    stats = UpdateStats(loss=loss, grad_norm=grad_norm, finite=finite,
                        sums=jax.tree.map(jnp.sum, sums), maxes=jax.tree.map(jnp.max, maxes))
    return keep(new_params, params), keep(new_opt_state, opt_state), stats

  def ema(teacher_params, params, rate):
    """θ_T ← (1 − rate)·θ_T + rate·θ (spec: after all optimizer steps of a training step)."""
    return jax.tree.map(lambda t, p: ((1.0 - rate) * t.astype(jnp.float32) + rate * p.astype(jnp.float32)
                                      ).astype(t.dtype), teacher_params, params)

  # Donating params/optimizer state halves peak memory on accelerators; the CPU backend cannot donate (and warns).
  donate = jax.default_backend() != "cpu"
  return TrainFns(prepare=jax.jit(prepare),
                  update=jax.jit(update, donate_argnums=(0, 1) if donate else ()),
                  ema=jax.jit(ema, donate_argnums=(0,) if donate else ()))
