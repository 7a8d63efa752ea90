"""The training loop: rollout → reward → route → teacher prompts → old log-probs → updates → EMA → refit → metrics.

Reads top to bottom as the paper's Algorithm 1 (one call of `Trainer.train_step` per step). The jitted math lives in
`train_step.py`; this file is the imperative shell: data, engines, checkpoints, evaluation, logging.

Determinism: everything random in a step (data order, sampling seed, sibling choice) is a function of
(`seed`, step), so a run resumed from a checkpoint continues exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from srpo_jax import batching, metrics as M, paths
from srpo_jax.algorithms import advantages as adv_lib
from srpo_jax.algorithms import losses, routing
from srpo_jax.algorithms.teacher import build_teacher_prompt_ids
from srpo_jax.checkpointing import Checkpointer
from srpo_jax.config import Config
from srpo_jax.data import benchmarks, prompts as prompt_lib, synthetic
from srpo_jax.models import hf_io
from srpo_jax.models.qwen3 import Qwen3, Qwen3Config, init_model
from srpo_jax.rewards import mcq_reward, tooluse_reward
from srpo_jax.rewards.mcq import extract_answer
from srpo_jax.rollout.engine import RolloutEngine, SamplingParams
from srpo_jax.train_step import LossHParams, make_optimizer, make_train_fns, student_logp

log = logging.getLogger("srpo_jax")


class TrainingAborted(RuntimeError):
  """Raised when K non-finite steps in a row stop the run (the last good checkpoint is kept)."""


# ---------------------------------------------------------------------------------------------------------------------
# Task: prompts and rewards
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Task:
  train: prompt_lib.RenderedPrompts
  test: prompt_lib.RenderedPrompts
  reward: Callable[[str, str], float]  # (response text, row.answer) -> reward in [0, 1]


def load_task(cfg: Config, tokenizer) -> Task:
  d = cfg.data
  if d.task == "synthetic":
    train_rows, test_rows = synthetic.make_train_test(d.synthetic_train_size, d.synthetic_test_size, seed=cfg.seed,
                                                      difficulty=d.synthetic_difficulty)
  else:
    train_rows = list(benchmarks.load_split(d.task, "train", d.data_dir, on_error=d.on_error))
    test_rows = list(benchmarks.load_split(d.task, "test", d.data_dir, on_error=d.on_error))
  if cfg.eval.max_questions:
    test_rows = test_rows[:cfg.eval.max_questions]
  render = lambda rows: prompt_lib.render_prompts(rows, tokenizer, d.max_prompt_tokens, d.tooluse_system_prompt)
  train, test = render(train_rows), render(test_rows)
  if train.dropped or test.dropped:
    log.warning("dropped prompts longer than %d tokens: train %d, test %d", d.max_prompt_tokens, train.dropped,
                test.dropped)
  if not train.ids:
    raise ValueError(f"data.task={d.task!r}: no training prompt fits data.max_prompt_tokens={d.max_prompt_tokens}")
  if d.task == "tooluse":
    reward = lambda text, answer: tooluse_reward(text, answer, strict=d.tooluse_strict_reward)
  else:
    reward = mcq_reward
  return Task(train=train, test=test, reward=reward)


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------
def build_model(cfg: Config, mesh=None) -> Qwen3:
  m = cfg.model
  if m.random_init:
    qcfg = Qwen3Config.preset(m.random_init, **m.qwen3_overrides)
    model = init_model(qcfg, seed=cfg.seed)
    if mesh is not None:
      from srpo_jax import sharding
      state = nnx.state(model)
      nnx.update(model, jax.device_put(state, sharding.state_shardings(state, mesh)))
    return model
  return hf_io.load_pretrained(m.path, mesh=mesh, **m.qwen3_overrides)


# ---------------------------------------------------------------------------------------------------------------------
# Supervised format warm-start (tiny demo only; cached, deterministic)
# ---------------------------------------------------------------------------------------------------------------------
def warmstart(model: Qwen3, cfg: Config, tokenizer, cache_root: str) -> Qwen3:
  """Teaches the answer FORMAT (random letters) and reading a given solution (teacher prompts), not the answers.

  Cached by a hash of everything that determines it, as an HF directory under `cache_root`.
  """
  t = cfg.train
  key = hashlib.sha1(json.dumps([dataclasses.asdict(cfg.model), t.warmstart_steps, t.warmstart_lr, cfg.seed,
                                 cfg.data.synthetic_difficulty, "v1"], sort_keys=True).encode()).hexdigest()[:16]
  path = os.path.join(cache_root, f"warmstart-{key}")
  if os.path.isfile(os.path.join(path, "config.json")):
    log.info("warm-start: loading cached %s", path)
    return hf_io.load_pretrained(path, **cfg.model.qwen3_overrides)
  log.info("warm-start: %d supervised format steps (cached afterwards at %s)", t.warmstart_steps, path)
  batch = 32
  examples = synthetic.warmstart_examples(t.warmstart_steps * batch, seed=cfg.seed,
                                          difficulty=cfg.data.synthetic_difficulty)
  eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
  prompts = [prompt_lib.encode_text(tokenizer, prompt_lib.render_messages(tokenizer, e.messages)) for e in examples]
  targets = [prompt_lib.encode_text(tokenizer, e.target) + [eos] for e in examples]
  p_len = batching.bucket(max(map(len, prompts)), 16)
  r_len = batching.bucket(max(map(len, targets)), 8)
  graphdef, params = nnx.split(model)
  opt = optax.adam(t.warmstart_lr)
  opt_state = opt.init(params)
  hp = LossHParams()

  @jax.jit
  def sft_step(params, opt_state, ids, mask, resp):
    def loss_fn(p):
      logp, _ = student_logp(nnx.merge(graphdef, p), ids, mask, r_len, hp)
      return -jnp.sum(jnp.where(resp, logp, 0.0)) / jnp.sum(resp)
    loss, g = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  pad = tokenizer.pad_token_id
  for s in range(t.warmstart_steps):
    sl = slice(s * batch, (s + 1) * batch)
    ids, mask, resp = batching.sequences(prompts[sl], targets[sl], p_len, r_len, pad)
    params, opt_state, loss = sft_step(params, opt_state, ids, mask, resp)
    if s % 50 == 0 or s == t.warmstart_steps - 1:
      log.info("warm-start step %d/%d  loss %.4f", s + 1, t.warmstart_steps, float(loss))
  model = nnx.merge(graphdef, params)
  hf_io.save_pretrained(model, path)
  return model


# ---------------------------------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------------------------------
def build_engine(cfg: Config, graphdef, params, tokenizer, mesh) -> RolloutEngine:
  eos = tuple(tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
  if cfg.rollout.engine == "jax":
    from srpo_jax.rollout.jax_engine import JaxEngine
    return JaxEngine((graphdef, params), eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id, mesh=mesh)
  from srpo_jax.rollout.sglang_engine import SGLangEngine

  def export_fn(p, out_dir):  # SGLang reads bf16 HF weights; the trainer keeps its own (fp32) master copy
    hf_io.save_pretrained(nnx.merge(graphdef, p), out_dir, tokenizer=tokenizer, dtype="bfloat16")

  first = os.path.join(cfg.run_dir, "weights", "initial")
  if cfg.rollout.sglang_url is None:
    export_fn(params, first)
  return SGLangEngine(first, url=cfg.rollout.sglang_url, server_args=list(cfg.rollout.sglang_args),
                      export_fn=export_fn, run_dir=cfg.run_dir)


# ---------------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StepRollouts:
  """One step's B = prompts × n rollouts, group-contiguous (rollout i belongs to prompt group_ids[i])."""
  prompt_rows: list[int]           # index into task.train per rollout
  responses: list[np.ndarray]
  rollout_logp: list[np.ndarray]
  finish: list[str]
  texts: list[str]
  rewards: np.ndarray
  group_ids: np.ndarray


class Trainer:

  def __init__(self, cfg: Config, *, tokenizer=None, mesh=None):
    from srpo_jax.tokenizer import load_tokenizer
    self.cfg = cfg
    self.mesh = mesh
    self.tokenizer = tokenizer or load_tokenizer(cfg.tokenizer.path)
    self.pad = self.tokenizer.pad_token_id
    self.task = load_task(cfg, self.tokenizer)
    self.checkpointer = Checkpointer(cfg.checkpoint_dir, keep=cfg.checkpoint.keep)
    latest = self.checkpointer.latest_step()
    if latest is not None and not cfg.resume:
      raise FileExistsError(f"run_dir {cfg.run_dir!r} already holds checkpoints (latest step {latest}): pass "
                            "--config.resume=true to continue that run, or choose a new run_dir")
    model = build_model(cfg, mesh)
    if cfg.train.warmstart_steps and latest is None:
      model = warmstart(model, cfg, self.tokenizer, str(paths.cache_root() / "warmstart"))
    self.graphdef, self.params = nnx.split(model)
    self.teacher = jax.tree.map(jnp.copy, self.params)  # θ_T initialised to the base weights
    self.optimizer, self.schedule = make_optimizer(
        cfg.lr, warmup_steps=cfg.optim.warmup_steps, weight_decay=cfg.optim.weight_decay, b1=cfg.optim.b1,
        b2=cfg.optim.b2, eps=cfg.optim.eps, grad_clip=cfg.optim.grad_clip)
    self.opt_state = self.optimizer.init(self.params)
    a = cfg.algo
    self.hp = LossHParams(method=a.name, loss_agg=cfg.loss_agg, clip_low=a.clip_low, clip_high=a.clip_high,
                          clip_c=a.clip_c, rollout_is_cap=a.rollout_is_cap, sdpo_is_cap=a.sdpo_is_cap, topk=a.topk,
                          jsd_alpha=a.jsd_alpha, mix_lambda=a.mix_lambda, temperature=cfg.rollout.temperature,
                          entropy_coef=a.entropy_coef)
    self.fns = make_train_fns(self.graphdef, self.optimizer, self.hp)
    self.step = 0
    self.nonfinite_in_row = 0
    self.counters = {"nonfinite_steps": 0, "teacher_truncated": 0}
    self.best_acc, self.initial_acc, self.final_acc = None, None, None
    resumed_time = 0.0
    if cfg.resume and self.checkpointer.latest_step() is not None:
      resumed_time = self._restore(self.checkpointer.latest_step())
    self.engine = build_engine(cfg, self.graphdef, self.params, self.tokenizer, mesh)
    self.metrics = M.MetricsWriter(cfg.run_dir, resume_step=self.step if cfg.resume else None,
                                   time_offset_s=resumed_time)
    self._stop_requested = False

  # -- checkpoint state --------------------------------------------------------------------------------------------
  def _state(self):
    return {"params": self.params, "opt_state": self.opt_state, "teacher": self.teacher}

  def _meta(self):
    return {"step": self.step, "data_position": self.step * self.cfg.rollout.prompts_per_step,
            "nonfinite_in_row": self.nonfinite_in_row, "counters": self.counters, "best_acc": self.best_acc,
            "initial_acc": self.initial_acc, "final_acc": self.final_acc, "wall_time_s": self.metrics.elapsed_s(),
            "seed": self.cfg.seed}

  def save(self):
    self.checkpointer.save(self.step, self._state(), self._meta())

  def _restore(self, step: int) -> float:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self._state())
    state, meta = self.checkpointer.restore(step, abstract)
    self.params, self.opt_state, self.teacher = state["params"], state["opt_state"], state["teacher"]
    self.step = meta["step"]
    self.nonfinite_in_row = meta["nonfinite_in_row"]
    self.counters = meta["counters"]
    self.best_acc, self.initial_acc, self.final_acc = meta["best_acc"], meta["initial_acc"], meta["final_acc"]
    log.info("resumed from checkpoint step %d", step)
    return float(meta["wall_time_s"])

  # -- 1. rollouts ---------------------------------------------------------------------------------------------------
  def prompt_rows_for(self, step: int) -> list[int]:
    """The step's prompts: an epoch-wise permutation seeded by (seed, epoch), read at position step × P."""
    n, per = len(self.task.train.ids), self.cfg.rollout.prompts_per_step
    rows = []
    for pos in range(step * per, (step + 1) * per):
      epoch, k = divmod(pos, n)
      order = np.random.default_rng([self.cfg.seed, epoch]).permutation(n) if self.cfg.data.shuffle else np.arange(n)
      rows.append(int(order[k]))
    return rows

  def rollout(self, step: int) -> StepRollouts:
    r = self.cfg.rollout
    rows = self.prompt_rows_for(step)
    sampling = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                              top_k=r.top_k, seed=_mix(self.cfg.seed, step, 1))
    out = self.engine.generate([self.task.train.ids[i] for i in rows], sampling, n=r.n)
    flat = [c for group in out for c in group]
    prompt_rows = [i for i in rows for _ in range(r.n)]
    texts = [self.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in flat]
    rewards = np.array([self.task.reward(t, self.task.train.rows[i].answer) for t, i in zip(texts, prompt_rows)],
                       np.float32)
    return StepRollouts(prompt_rows=prompt_rows, responses=[np.asarray(c.token_ids) for c in flat],
                        rollout_logp=[np.asarray(c.logprobs, np.float32) for c in flat],
                        finish=[c.finish_reason for c in flat], texts=texts, rewards=rewards,
                        group_ids=np.repeat(np.arange(len(rows)), r.n))

  # -- 2. one training step ------------------------------------------------------------------------------------------
  def train_step(self, step: int) -> dict[str, float]:
    cfg, t0 = self.cfg, time.perf_counter()
    timings = {}
    ro = self.rollout(step)
    timings["time/rollout_s"] = time.perf_counter() - t0

    # Advantages and routing (host; tiny arrays).
    t1 = time.perf_counter()
    num_groups = int(ro.group_ids.max()) + 1
    adv = np.asarray(adv_lib.group_advantages(jnp.asarray(ro.rewards), jnp.asarray(ro.group_ids), num_groups,
                                              norm_adv_by_std=cfg.algo.norm_adv_by_std))
    rng = jax.random.PRNGKey(_mix(cfg.seed, step, 2))
    rt = routing.route(ro.rewards, ro.group_ids, method=cfg.algo.name, sibling_choice=cfg.algo.sibling_choice,
                       rng=rng, correct_threshold=cfg.algo.correct_threshold)
    grpo_B, sdpo_B, sibling_B, correct = (np.asarray(x) for x in (rt.grpo_B, rt.sdpo_B, rt.sibling_B, rt.correct_B))
    timings["time/reward_route_s"] = time.perf_counter() - t1

    # Teacher prompts: only for SDPO-routed rollouts.
    t2 = time.perf_counter()
    teacher_prompts, truncated = {}, 0
    for i in np.flatnonzero(sdpo_B):
      row = self.task.train.rows[ro.prompt_rows[i]]
      messages = prompt_lib.build_messages(row, cfg.data.tooluse_system_prompt)
      budget = max(cfg.algo.teacher_max_tokens - len(ro.responses[i]), 16)
      ids, cut = build_teacher_prompt_ids(messages, ro.texts[sibling_B[i]], self.tokenizer, max_tokens=budget)
      teacher_prompts[int(i)] = ids
      truncated += int(cut)
    self.counters["teacher_truncated"] += truncated

    # Pad to buckets; recompute π_old (and the teacher entropy for DW) with the current weights.
    prompts = [self.task.train.ids[i] for i in ro.prompt_rows]
    p_len = batching.bucket(max(map(len, prompts)), 16)
    r_len = batching.bucket(max(max(map(len, ro.responses)), 1), 8)
    ids, mask, resp = batching.sequences(prompts, ro.responses, p_len, r_len, self.pad)
    roll_logp, _ = batching.pad_right(ro.rollout_logp, r_len, 0.0, np.float32)
    old_logp, dw, teacher_stats = self._prepare(ids, mask, resp, sdpo_B, teacher_prompts, ro.responses, r_len)
    timings["time/teacher_s"] = time.perf_counter() - t2

    # Mini-batch updates: global denominators per mini-batch, micro-batch gradient accumulation inside the jit.
    t3 = time.perf_counter()
    order = np.arange(len(ro.rewards))
    per_mb = cfg.rollouts_per_mini_batch
    step_metrics: dict[str, float] = {}
    acc, outs = _Accumulator(), []
    for m in range(cfg.optimizer_steps_per_step):
      rows = order[m * per_mb:(m + 1) * per_mb]
      den = losses.objective_denominator(jnp.asarray(resp[rows]), jnp.asarray(grpo_B[rows]),
                                         jnp.asarray(sdpo_B[rows]), loss_agg=cfg.loss_agg)
      mbs = batching.micro_batches(rows, cfg.micro_batch_size, ids=ids, mask=mask, resp=resp, old_logp=old_logp,
                                   roll_logp=roll_logp, adv=adv, grpo=grpo_B, sdpo=sdpo_B, dw=dw,
                                   teacher_prompts=teacher_prompts, responses=ro.responses, pad=self.pad)
      self.params, self.opt_state, out = self.fns.update(self.params, self.opt_state, self.teacher, mbs, den)
      outs.append(out)
    for out in jax.device_get(outs):  # one host sync for the whole step
      acc.add(out)
    upd = acc.result()
    finite = upd.pop("all_finite")
    timings["time/update_s"] = time.perf_counter() - t3

    # EMA teacher after all optimizer steps of the training step, then refit the rollout engine.
    t4 = time.perf_counter()
    if cfg.algo.uses_teacher:
      self.teacher = self.fns.ema(self.teacher, self.params, jnp.float32(cfg.algo.ema_rate))
    self.engine.update_weights(self.params, step + 1)
    timings["time/refit_s"] = time.perf_counter() - t4
    if not finite:
      self.counters["nonfinite_steps"] += 1
      self.nonfinite_in_row += 1
    else:
      self.nonfinite_in_row = 0

    lengths = np.array([len(x) for x in ro.responses])
    n_tok = max(int(lengths.sum()), 1)
    old_flat, roll_flat = old_logp[resp], roll_logp[resp]
    step_metrics.update({
        M.TRAIN_REWARD_MEAN: float(ro.rewards.mean()), M.TRAIN_ACCURACY: float(correct.mean()),
        M.ROUTE_FRAC_GRPO: float((grpo_B & correct).mean()) if cfg.algo.name != "sdpo" else 0.0,
        M.ROUTE_FRAC_SDPO: float(sdpo_B.mean()),
        M.ROUTE_FRAC_FALLBACK: float((grpo_B & ~correct).mean()),
        M.ROLLOUT_RESPONSE_LEN_MEAN: float(lengths.mean()), "rollout/response_len_max": int(lengths.max()),
        "rollout/truncation_rate": float(np.mean([f == "length" for f in ro.finish])),
        M.ROLLOUT_TOKENS_PER_S: n_tok / max(timings["time/rollout_s"], 1e-9),
        "rollout/logp_mismatch_abs": float(np.abs(old_flat - roll_flat).mean()) if old_flat.size else 0.0,
        "rollout/logp_mismatch_max": float(np.abs(old_flat - roll_flat).max()) if old_flat.size else 0.0,
        M.OPTIM_LR: self.current_lr(),
        "train/nonfinite_steps": self.counters["nonfinite_steps"],
        "teacher/prompts_truncated": truncated,
        **teacher_stats, **upd, **timings,
    })
    step_metrics[M.TIME_STEP_S] = time.perf_counter() - t0
    step_metrics["time/tokens_per_s"] = n_tok / step_metrics[M.TIME_STEP_S]
    return step_metrics

  def current_lr(self) -> float:
    """The schedule's value at the optimizer's step count (skipped non-finite steps do not advance it)."""
    count = optax.tree_utils.tree_get(
        self.opt_state, "count", filtering=lambda path, _: path[-1].tuple_name == "ScaleByScheduleState")
    return float(self.schedule(int(count)))

  def _prepare(self, ids, mask, resp, sdpo_B, teacher_prompts, responses, r_len):
    """π_old log-probs for every rollout; DW weights from the EMA teacher's entropy (srpo only).

    The teacher rows are padded to a bucket, so DW is computed on bucketed shapes (no new program per step).
    """
    rows = np.flatnonzero(sdpo_B)
    need_teacher = self.cfg.algo.uses_dynamic_weighting and len(rows) > 0
    t_ids = t_mask = None
    if need_teacher:
      c = batching.bucket(len(rows), 1)
      t_ids, t_mask = batching.teacher_sequences(rows, teacher_prompts, responses, c,
                                                 batching.teacher_prompt_len(teacher_prompts, rows), r_len, self.pad)
    old_logp, t_ent = self.fns.prepare(self.params, self.teacher, ids, mask, t_ids, t_mask, resp_len=r_len)
    old_logp = np.asarray(old_logp)
    dw = np.ones(resp.shape, np.float32)
    if not need_teacher:
      return old_logp, dw, {}
    on_cR = np.zeros(t_ent.shape, bool)  # Ω: the valid tokens of the SDPO-routed rollouts (padding rows off)
    on_cR[:len(rows)] = resp[rows]
    w = np.asarray(losses.dw_weights(t_ent, jnp.asarray(on_cR), self.cfg.algo.dw_beta))
    dw[rows] = np.where(on_cR, w, 1.0)[:len(rows)]
    if not on_cR.any():
      return old_logp, dw, {}
    ent = np.asarray(t_ent)[on_cR]
    return old_logp, dw, {M.TEACHER_ENTROPY_MEAN: float(ent.mean()), "dw/min": float(w[on_cR].min()),
                          "dw/mean": float(w[on_cR].mean()), "dw/max": float(w[on_cR].max())}

  # -- 3. evaluation -------------------------------------------------------------------------------------------------
  def evaluate(self, step: int) -> dict[str, float]:
    """avg@n: mean reward over n samples per test question (temperature 0.6, top-p 0.95 by default)."""
    e, t0 = self.cfg.eval, time.perf_counter()
    sampling = SamplingParams(max_new_tokens=self.cfg.eval_max_new_tokens, temperature=e.temperature, top_p=e.top_p,
                              top_k=e.top_k, seed=_mix(self.cfg.seed, step, 3))
    out = self.engine.generate(self.task.test.ids, sampling, n=e.n_samples)
    scores, favourite = [], []
    for row, group in zip(self.task.test.rows, out):
      for c in group:
        text = self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        scores.append(self.task.reward(text, row.answer))
        favourite.append(extract_answer(text)[:8] or None)
    letters = [f for f in favourite if f]
    chance = max((letters.count(x) for x in set(letters)), default=0) / max(len(favourite), 1)
    acc = float(np.mean(scores)) if scores else 0.0
    return {M.EVAL_ACCURACY: acc, "eval/favourite_answer_share": chance, "eval/time_s": time.perf_counter() - t0}

  # -- the loop ------------------------------------------------------------------------------------------------------
  def run(self) -> dict[str, Any]:
    cfg = self.cfg
    prev = signal.signal(signal.SIGTERM, self._on_sigterm)
    progress = M.Progress(cfg.train.steps, initial_step=self.step, log_every=cfg.train.log_every)
    try:
      if self.step == 0 and cfg.eval.at_start and self.initial_acc is None:
        ev = self.evaluate(0)
        self.initial_acc = self.best_acc = ev[M.EVAL_ACCURACY]
        self.metrics.write(0, ev)
        progress.update(0, ev)
      while self.step < cfg.train.steps and not self._stop_requested:
        if cfg.train.max_wall_time_h and self.metrics.elapsed_s() > cfg.train.max_wall_time_h * 3600:
          log.info("wall-clock budget of %.2f h reached", cfg.train.max_wall_time_h)
          break
        out = self.train_step(self.step)
        self.step += 1
        if self.nonfinite_in_row >= cfg.train.max_nonfinite_in_row:
          raise TrainingAborted(
              f"{self.nonfinite_in_row} non-finite steps in a row (train.max_nonfinite_in_row="
              f"{cfg.train.max_nonfinite_in_row}); stopping. The last good checkpoint is "
              f"{self.checkpointer.latest_step()} in {cfg.checkpoint_dir}")
        last = self.step == cfg.train.steps
        if (cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0) or last:
          out.update(self.evaluate(self.step))
          self.final_acc = out[M.EVAL_ACCURACY]
          if self.best_acc is None or self.final_acc > self.best_acc:
            self.best_acc = self.final_acc
            if cfg.checkpoint.export_hf:
              self.export(os.path.join(cfg.run_dir, "hf_best"))
        self.metrics.write(self.step, out)
        progress.update(self.step, out)
        if self.step % cfg.checkpoint.every_steps == 0 or last:
          self.save()
      if self._stop_requested:
        log.warning("SIGTERM: saving checkpoint at step %d and exiting", self.step)
        self.save()
      elif cfg.checkpoint.export_hf:
        self.export(os.path.join(cfg.run_dir, "hf_final"))
      return self.write_summary()
    finally:
      progress.close()
      signal.signal(signal.SIGTERM, prev)
      self.close()

  def _on_sigterm(self, signum, frame):
    self._stop_requested = True

  def export(self, path: str):
    hf_io.save_pretrained(nnx.merge(self.graphdef, self.params), path, tokenizer=self.tokenizer)

  def write_summary(self) -> dict[str, Any]:
    records = M.read_metrics(self.cfg.run_dir)
    summary = {"initial_eval_accuracy": self.initial_acc, "best_eval_accuracy": self.best_acc,
               "final_eval_accuracy": self.final_acc, "steps": self.step, "wall_time_s": self.metrics.elapsed_s(),
               "algo": self.cfg.algo.name, "task": self.cfg.data.task, **self.counters,
               **M.best_within_budgets(records, self.cfg.train.time_budgets_h)}
    M.write_summary(self.cfg.run_dir, summary)
    return summary

  def close(self):
    for closer in (self.metrics.close, self.engine.close, self.checkpointer.close):
      try:
        closer()
      except Exception:  # noqa: BLE001 - closing must not mask the original error
        log.exception("error while closing")


# ---------------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------------
class _Accumulator:
  """Sums the update's token sums over mini-batches and turns them into means."""

  def __init__(self):
    self.sums: dict[str, float] = {}
    self.finite = True
    self.grad_norms: list[float] = []
    self.losses: list[float] = []

  def add(self, out):
    self.finite &= bool(out["finite"])
    self.grad_norms.append(float(out["grad_norm"]))
    self.losses.append(float(out["loss"]))
    for k, v in out.items():
      if k in ("finite", "grad_norm", "loss"):
        continue
      self.sums[k] = max(self.sums.get(k, -np.inf), float(v)) if k.endswith("_max") else self.sums.get(k, 0.0) + float(v)

  def result(self) -> dict[str, Any]:
    s = self.sums
    div = lambda a, b: s.get(a, 0.0) / s[b] if s.get(b) else 0.0
    return {M.LOSS: float(np.mean(self.losses)), M.OPTIM_GRAD_NORM: float(np.mean(self.grad_norms)),
            "loss/grpo": div("grpo_loss_sum", "n_grpo_tokens"), "loss/sdpo": div("sdpo_loss_sum", "n_sdpo_tokens"),
            "sdpo/jsd": div("jsd_sum", "n_sdpo_tokens"), "policy/entropy": div("entropy_sum", "n_tokens"),
            "grpo/clip_frac": div("clip_frac_sum", "n_grpo_tokens"), "grpo/ratio_mean": div("ratio_sum", "n_grpo_tokens"),
            "rollout/is_weight_mean": div("roll_is_sum", "n_tokens"), "rollout/is_weight_max": s.get("roll_is_max", 0.0),
            "policy/logp_max": s.get("logp_max", 0.0), "all_finite": self.finite}


def _mix(*xs: int) -> int:
  """A 31-bit seed from several ints (stable across processes and resumes)."""
  h = hashlib.sha256(json.dumps(list(map(int, xs))).encode()).digest()
  return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


