"""The jitted math of one training step: `prepare` (old log-probs, teacher entropy) and `update` (grads + AdamW).

Layout of a mini-batch (host-assembled by `srpo_jax.batching`), split into M micro-batches of b rollouts:
  ids_MbS      prompt (left-padded to P) then response (right-padded to R); S = P + R.
  mask_MbS     valid tokens (prompt and response).
  resp_MbR     valid response tokens (the only tokens that carry loss).
  teacher:     the SDPO-routed rollouts of each micro-batch re-read after their teacher prompt, padded to c rows:
               t_ids_McU (teacher prompt left-padded to P_T, then the same response; U = P_T + R), t_mask_McU,
               t_row_Mc (which of the b rows), t_valid_Mc. Absent (None) when no rollout is SDPO-routed: the
               compiled program then runs no teacher forward at all.
Hidden state at position P - 1 + t predicts response token t, in both the student and the teacher sequences.

The objective is a global token mean: each micro-batch contributes `numerator / denominator_of_the_mini_batch`, so
summing micro-batch gradients reproduces the full mini-batch gradient exactly (spec, "SRPO: objective").
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from srpo_jax.algorithms import losses
import importlib

fh = importlib.import_module("srpo_jax.kernels.fused_head")  # the module (the package re-exports the function)


@dataclasses.dataclass(frozen=True)
class LossHParams:
  """Static loss settings (hashable: part of the compiled program's identity)."""
  method: str = "srpo"
  loss_agg: str = "token-mean"
  clip_low: float = 0.2
  clip_high: float = 0.28
  clip_c: float = 3.0
  rollout_is_cap: float = 2.0
  sdpo_is_cap: float = 2.0
  topk: int = 100
  jsd_alpha: float = 0.5
  mix_lambda: float = 0.9
  temperature: float = 1.0
  entropy_coef: float = 0.0
  tile_size: int = fh.DEFAULT_TILE_SIZE


class MicroBatch(NamedTuple):
  ids: jax.Array          # [b, S] int32
  mask: jax.Array         # [b, S] bool
  resp: jax.Array         # [b, R] bool
  old_logp: jax.Array     # [b, R] float32 (π_old, recomputed by `prepare`)
  roll_logp: jax.Array    # [b, R] float32 (π_roll, from the rollout engine)
  adv: jax.Array          # [b] float32
  grpo: jax.Array         # [b] bool
  sdpo: jax.Array         # [b] bool
  dw: jax.Array           # [b, R] float32 DW weights (ones unless method == srpo)
  t_ids: Optional[jax.Array] = None    # [c, U] int32
  t_mask: Optional[jax.Array] = None   # [c, U] bool
  t_row: Optional[jax.Array] = None    # [c] int32
  t_valid: Optional[jax.Array] = None  # [c] bool


def response_hidden(model, ids_BS, mask_BS, resp_len: int) -> jax.Array:
  """Hidden states that predict the R response tokens: positions [S - R - 1, S - 1) → [B, R, D]."""
  h = model.hidden_states(ids_BS, mask_BS)
  return h[:, -resp_len - 1:-1]


def _flat(x):
  return x.reshape((-1,) + x.shape[2:])


def student_logp(model, ids, mask, resp_len: int, hp: LossHParams) -> tuple[jax.Array, jax.Array]:
  """Sampled-token log-probs and entropies [B, R] through the fused head (k=1: no top-k needed here)."""
  b = ids.shape[0]
  h = response_hidden(model, ids, mask, resp_len)
  out = fh.fused_head(_flat(h), model.head_weight(), _flat(ids[:, -resp_len:]), k=1,
                      temperature=hp.temperature, tile_size=hp.tile_size)
  return out.logp_N.reshape(b, resp_len), out.entropy_N.reshape(b, resp_len)


def teacher_entropy(teacher, t_ids, t_mask, resp_len: int, hp: LossHParams) -> jax.Array:
  """Teacher entropy over the full vocabulary [c, R] (for DW weights), one token tile at a time, no gradient."""
  c = t_ids.shape[0]
  h = _flat(response_hidden(teacher, t_ids, t_mask, resp_len))
  w = teacher.head_weight()
  tile = min(hp.tile_size, h.shape[0])
  pad = -h.shape[0] % tile
  h = jnp.pad(h, ((0, pad), (0, 0))).reshape(-1, tile, h.shape[-1])

  def one_tile(h_tD):
    logp = jax.nn.log_softmax(jnp.dot(h_tD, w, preferred_element_type=jnp.float32) / hp.temperature, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)

  return jax.lax.map(one_tile, h).reshape(-1)[:c * resp_len].reshape(c, resp_len)


def micro_objective(params, teacher_params, graphdef, mb: MicroBatch, denominator, hp: LossHParams):
  """This micro-batch's share of the mini-batch objective (numerator / mini-batch denominator) and its metrics."""
  model = nnx.merge(graphdef, params)
  b, resp_len = mb.resp.shape
  h = response_hidden(model, mb.ids, mb.mask, resp_len)  # [b, R, D]
  w = model.head_weight()
  targets = mb.ids[:, -resp_len:]
  out = fh.fused_head(_flat(h), w, _flat(targets), k=1, temperature=hp.temperature, tile_size=hp.tile_size)
  logp = out.logp_N.reshape(b, resp_len)
  entropy = out.entropy_N.reshape(b, resp_len)
  roll_w = losses.rollout_is_weights(mb.old_logp, mb.roll_logp, cap=hp.rollout_is_cap)

  grpo_loss = losses.grpo_token_loss(logp, mb.old_logp, mb.adv, clip_low=hp.clip_low, clip_high=hp.clip_high,
                                     clip_c=hp.clip_c, rollout_is_weights=roll_w)
  sdpo_loss, jsd = None, jnp.zeros((b, resp_len), jnp.float32)
  if mb.t_ids is not None:
    teacher = nnx.merge(graphdef, jax.lax.stop_gradient(teacher_params))
    c = mb.t_ids.shape[0]
    ht = response_hidden(teacher, mb.t_ids, mb.t_mask, resp_len)  # [c, R, D]
    hs = h[mb.t_row]  # the student's hidden states of the same rollouts
    t_out = fh.fused_head(_flat(hs), w, _flat(targets[mb.t_row]), _flat(ht),
                          teacher_head_weight_DV=teacher.head_weight(), k=hp.topk, temperature=hp.temperature,
                          tile_size=hp.tile_size)
    jsd_c = fh.head_divergence(t_out, alpha=hp.jsd_alpha).reshape(c, resp_len)
    # Scatter back to the b rows; padding teacher rows (t_valid false) add nothing.
    jsd = jnp.zeros((b, resp_len), jnp.float32).at[mb.t_row].add(jnp.where(mb.t_valid[:, None], jsd_c, 0.0))
    sdpo_loss = losses.sdpo_token_loss(jsd, logp, mb.old_logp, is_clip=hp.sdpo_is_cap, rollout_is_weights=roll_w)
  grpo_in = grpo_loss if hp.method != "sdpo" else None
  if grpo_in is None and sdpo_loss is None:
    sdpo_loss = jnp.zeros_like(logp)  # sdpo with no teacher rows: every rollout carries zero loss
  num, _ = losses.routed_objective(grpo_in, sdpo_loss, mb.dw, mb.resp, mb.grpo, mb.sdpo, method=hp.method,
                                   loss_agg=hp.loss_agg, mix_lambda=hp.mix_lambda)
  if hp.entropy_coef:
    num = num - hp.entropy_coef * jnp.sum(jnp.where(mb.resp, entropy, 0.0))
  loss = num / jnp.maximum(denominator, 1.0)

  valid = mb.resp
  g_tok = valid & mb.grpo[:, None]
  s_tok = valid & mb.sdpo[:, None]
  gm = losses.grpo_metrics(logp, mb.old_logp, mb.adv, g_tok, clip_low=hp.clip_low, clip_high=hp.clip_high,
                           clip_c=hp.clip_c)
  sums = {  # additive sums over tokens; the caller divides by the counts
      "n_tokens": jnp.sum(valid), "n_grpo_tokens": jnp.sum(g_tok), "n_sdpo_tokens": jnp.sum(s_tok),
      "grpo_loss_sum": jnp.sum(jnp.where(g_tok, grpo_loss, 0.0)),
      "sdpo_loss_sum": jnp.sum(jnp.where(s_tok, sdpo_loss, 0.0)) if sdpo_loss is not None else 0.0,
      "jsd_sum": jnp.sum(jnp.where(s_tok, jsd, 0.0)),
      "entropy_sum": jnp.sum(jnp.where(valid, entropy, 0.0)),
      "clip_frac_sum": gm["clip_frac"] * jnp.sum(g_tok),
      "ratio_sum": gm["ratio_mean"] * jnp.sum(g_tok),
      "roll_is_sum": jnp.sum(jnp.where(valid, roll_w, 0.0)),
      "roll_is_max": jnp.max(jnp.where(valid, roll_w, 0.0)),
      "logp_max": jnp.max(jnp.where(valid, logp, -jnp.inf)),
  }
  return loss, sums


def _stack_tree(trees):
  return jax.tree.map(lambda *x: jnp.stack(x), *trees)


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

  def prepare(params, teacher_params, ids, mask, t_ids, t_mask, resp_len):
    """π_old log-probs [B, R] of every rollout and, when given teacher sequences, their teacher entropy [c, R]."""
    model = nnx.merge(graphdef, params)
    logp, _ = student_logp(model, ids, mask, resp_len, hp)
    if t_ids is None:
      return logp, None
    return logp, teacher_entropy(nnx.merge(graphdef, teacher_params), t_ids, t_mask, resp_len, hp)

  def update(params, opt_state, teacher_params, micro_batches: MicroBatch, denominator):
    """Accumulates gradients over the M stacked micro-batches (lax.scan), then one clipped AdamW step.

    A non-finite loss or gradient norm leaves params and optimizer state unchanged (`finite` is reported).
    """
    grad_fn = jax.value_and_grad(micro_objective, has_aux=True)

    def body(acc, mb):
      (loss, sums), g = grad_fn(params, teacher_params, graphdef, mb, denominator, hp)
      acc_g, acc_loss = acc
      return (jax.tree.map(jnp.add, acc_g, g), acc_loss + loss), sums

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, loss), sums = jax.lax.scan(body, (zeros, jnp.float32(0.0)), micro_batches)
    maxes = {k: jnp.max(v) for k, v in sums.items() if k.endswith("_max")}
    sums = {k: jnp.sum(v) for k, v in sums.items() if not k.endswith("_max")}
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, **sums, **maxes}
    return keep(new_params, params), keep(new_opt_state, opt_state), metrics

  def ema(teacher_params, params, rate):
    """θ_T ← (1 − rate)·θ_T + rate·θ (spec: after all optimizer steps of a training step)."""
    return jax.tree.map(lambda t, p: ((1.0 - rate) * t.astype(jnp.float32) + rate * p.astype(jnp.float32)
                                      ).astype(t.dtype), teacher_params, params)

  # Donating params/optimizer state halves peak memory on accelerators; the CPU backend cannot donate (and warns).
  donate = jax.default_backend() != "cpu"
  return TrainFns(prepare=jax.jit(prepare, static_argnames=("resp_len",)),
                  update=jax.jit(update, donate_argnums=(0, 1) if donate else ()),
                  ema=jax.jit(ema, donate_argnums=(0,) if donate else ()))
