"""The training loop: a step made of named stages, each a function of plain inputs (paper Algorithm 1).

    collect_rollouts → score_and_route → build_teacher_prompts → prepare → run_updates → EMA and refit → step_metrics

`Trainer.train_step` calls them in that order; `Trainer.run` adds evaluation, checkpoints, metrics and the summary.
The jitted math lives in `train_step.py`, the task in `task.py`, the warm-start in `warmstart.py`, the evaluation in
`evaluation.py`. `Trainer(cfg, ...)` only wires parts; the task, the initial model and the rollout engine can be
injected (tests pass a task with its own reward instead of patching internals).

Determinism: everything random in a step (data order, sampling seed, sibling choice) is a function of
(`seed`, step), so a run resumed from a checkpoint continues exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import time
import warnings
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from srpo_jax import balance, batching, distributed, metrics as M, methods, paths
from srpo_jax.algorithms import advantages as adv_lib
from srpo_jax.algorithms import losses, routing
from srpo_jax.algorithms.teacher import build_teacher_prompt_ids
from srpo_jax.checkpointing import (Checkpointer, ConfigChanged, CorruptCheckpoint, RunDirLock, config_changes,
                                    require_finite)
from srpo_jax.config import Config
from srpo_jax.data import prompts as prompt_lib
from srpo_jax.evaluation import evaluate
from srpo_jax.models import attention, hf_io
from srpo_jax.models.qwen3 import Qwen3, Qwen3Config, init_model
from srpo_jax.rollout import time_share
from srpo_jax.rollout.engine import RolloutEngine, RolloutInterrupted, SamplingParams
from srpo_jax.task import Task, load_task
from srpo_jax.train_step import (Denominators, LossHParams, TrainFns, TrainShardings, UpdateStats, make_optimizer,
                                 make_train_fns)
from srpo_jax.warmstart import warmstart

log = logging.getLogger("srpo_jax")


class TrainingAborted(RuntimeError):
  """Raised when K non-finite steps in a row stop the run (the last good checkpoint is kept)."""


def seed_for(*xs: int) -> int:
  """A 31-bit seed from several ints (stable across processes and resumes): (seed, step, purpose)."""
  h = hashlib.sha256(json.dumps(list(map(int, xs))).encode()).digest()
  return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


SEED_ROLLOUT, SEED_SIBLING, SEED_EVAL = 1, 2, 3  # the `purpose` of seed_for(seed, step, purpose)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # both stop a run cleanly (`Trainer._on_sigterm`)


# ---------------------------------------------------------------------------------------------------------------------
# State: exactly what a checkpoint holds
# ---------------------------------------------------------------------------------------------------------------------
def default_counters() -> dict[str, int]:
  """Run totals (checkpointed, and in summary.json under these names)."""
  return {"nonfinite_steps": 0,  # training steps with at least one skipped (non-finite) optimizer step
          "teacher_truncated": 0,  # teacher prompts whose sibling solution was cut to algo.teacher_max_tokens
          "teacher_over_budget": 0}  # SDPO-routed rollouts re-routed: the template alone exceeded the budget


@dataclasses.dataclass
class TrainState:
  params: nnx.State
  opt_state: Any  # includes the lr in use (an injected hyperparameter: `set_lr`, `current_lr`)
  teacher: nnx.State  # θ_T, the EMA self-teacher (unused by GRPO)
  step: int = 0  # training steps done
  data_position: int = 0  # training prompts consumed (the next step reads from here: `prompt_rows`)
  nonfinite_in_row: int = 0
  counters: dict[str, int] = dataclasses.field(default_factory=default_counters)
  best_acc: Optional[float] = None
  initial_acc: Optional[float] = None
  final_acc: Optional[float] = None

  def arrays(self) -> dict[str, Any]:
    return {"params": self.params, "opt_state": self.opt_state, "teacher": self.teacher}

  def meta(self, *, wall_time_s: float, train_time_s: float, seed: int, config: dict[str, Any]) -> dict[str, Any]:
    """The JSON half of a checkpoint; both clocks (`Clocks`) are carried so a resumed run continues them, and the
    config (`Config.to_dict()`) so a resume can check its own against it."""
    return {"step": self.step, "data_position": self.data_position, "nonfinite_in_row": self.nonfinite_in_row,
            "counters": self.counters, "best_acc": self.best_acc, "initial_acc": self.initial_acc,
            "final_acc": self.final_acc, "wall_time_s": wall_time_s, "train_time_s": train_time_s, "seed": seed,
            "config": config}

  @classmethod
  def from_checkpoint(cls, arrays: dict[str, Any], meta: dict[str, Any]) -> "TrainState":
    """The state of a checkpoint whose meta passed `validate_meta`."""
    return cls(params=arrays["params"], opt_state=arrays["opt_state"], teacher=arrays["teacher"], step=meta["step"],
               data_position=meta["data_position"], nonfinite_in_row=meta["nonfinite_in_row"],
               counters={**default_counters(), **meta["counters"]}, best_acc=meta["best_acc"],
               initial_acc=meta["initial_acc"], final_acc=meta["final_acc"])


def validate_meta(meta: dict[str, Any], step: int, where: str) -> None:
  """Raises CorruptCheckpoint naming `where` and the key of a meta record `TrainState.from_checkpoint` cannot use:
  a key missing or of the wrong type, a step other than its directory's, a non-finite accuracy or clock."""
  def bad(key: str, why: str):
    raise CorruptCheckpoint(f"checkpoint {where!r}: meta.{key}{why}")

  missing = [k for k in ("step", "data_position", "nonfinite_in_row", "counters", "best_acc", "initial_acc",
                         "final_acc", "wall_time_s", "train_time_s", "seed", "config") if k not in meta]
  if missing:
    bad(missing[0], f" is missing ({len(missing)} missing: {missing})")
  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
  is_real = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
  for key in ("step", "data_position", "nonfinite_in_row"):
    if not (is_int(meta[key]) and meta[key] >= 0):
      bad(key, f"={meta[key]!r} is not a non-negative integer")
  if meta["step"] != step:
    bad("step", f"={meta['step']} disagrees with its directory (step {step}): resuming would replay or skip steps")
  if not is_int(meta["seed"]):
    bad("seed", f"={meta['seed']!r} is not an integer")
  counters = meta["counters"]
  if not isinstance(counters, dict) or not all(is_int(v) and v >= 0 for v in counters.values()):
    bad("counters", f"={counters!r} is not an object of non-negative integers")
  for key in ("best_acc", "initial_acc", "final_acc"):
    if meta[key] is not None and not is_real(meta[key]):
      bad(key, f"={meta[key]!r} is neither null nor a finite number")
  for key in ("wall_time_s", "train_time_s"):
    if not (is_real(meta[key]) and meta[key] >= 0):
      bad(key, f"={meta[key]!r} is not a finite number of seconds >= 0")
  if not isinstance(meta["config"], dict):
    bad("config", f" is a {type(meta['config']).__name__}, not an object")


class Clocks:
  """The run's two clocks, in seconds, carried across resumes (checkpoint meta `wall_time_s`, `train_time_s`).

  `wall_s()`: everything since the run started (evaluation, checkpoints and exports included): `time/wall_s`.
  `train_s()`: the training clock, the wall-clock minus the time spent inside `excluded()` blocks (the trainer puts
  evaluation there, as the official config does not validate before training and the paper's budgets are hours of
  training): the `time_s` of every metrics record, which `metrics.best_within_budgets` and train.max_wall_time_h read.
  """

  def __init__(self, wall_offset_s: float = 0.0, train_offset_s: float = 0.0, now=time.monotonic):
    self._now = now
    self._t0 = now()
    self._wall0, self._train0 = float(wall_offset_s), float(train_offset_s)
    self._excluded_s = 0.0

  def wall_s(self) -> float:
    return self._wall0 + self._now() - self._t0

  def train_s(self) -> float:
    return self._train0 + self._now() - self._t0 - self._excluded_s

  @contextlib.contextmanager
  def excluded(self):
    """Time spent in this block counts on the wall clock only."""
    t = self._now()
    try:
      yield
    finally:
      self._excluded_s += self._now() - t


# ---------------------------------------------------------------------------------------------------------------------
# Parts the trainer wires (each replaceable by injection)
# ---------------------------------------------------------------------------------------------------------------------
def place_on_mesh(model: Qwen3, mesh) -> Qwen3:
  """`model` with every parameter on `mesh`, sharded by the logical-axis rules (in place; no-op without a mesh). In a
  multi-process run every process must pass the same values (a random init of the same seed, the same warm-start)."""
  if mesh is not None:
    from srpo_jax import sharding
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, sharding.state_shardings(state, mesh)))
  return model


def build_model(cfg: Config, mesh=None) -> Qwen3:
  """The configured model, placed on `mesh`, compiled for the platform of the mesh's devices (`Qwen3Config.platform`,
  which picks "auto" attention's kernel)."""
  m = cfg.model
  kw = dict(m.qwen3_overrides, platform=None if mesh is None else attention.platform_of(mesh.devices.flat[0]))
  if m.random_init:
    return place_on_mesh(init_model(Qwen3Config.preset(m.random_init, **kw), seed=cfg.seed), mesh)
  return hf_io.load_pretrained(m.path, mesh=mesh, **kw)


def initial_model(cfg: Config, tokenizer, mesh=None) -> Qwen3:
  """The configured weights, after the supervised format warm-start when train.warmstart_steps > 0 (computed on
  this process's devices, then placed on the mesh; in a multi-process run each process computes it, and only process
  0 uses and fills the cache, so no process reads a cache entry another is writing)."""
  if not cfg.train.warmstart_steps:
    return build_model(cfg, mesh)
  cache = str(paths.cache_root() / "warmstart") if distributed.is_main() else None
  return place_on_mesh(warmstart(build_model(cfg), cfg, tokenizer, cache), mesh)


def eos_ids(tokenizer) -> tuple[int, ...]:
  return tuple(tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))


def build_engine(cfg: Config, graphdef, params, tokenizer, mesh, version: int = 0,
                 released: bool = False) -> RolloutEngine:
  """The configured engine; a launched SGLang server starts from an export of `params`, tagged `version`; `released`:
  an attached one was put to sleep (`sglang_engine.release_attached`).

  In a multi-process run each process gets its own engine (a JaxEngine on its own devices, or its node's SGLang
  server) wrapped in `ProcessShardedEngine`: it samples the process's share of the prompts and all-gathers the rest.
  """
  if distributed.multi_process():
    from srpo_jax.rollout.sharded import ProcessShardedEngine
    local = distributed.local_mesh(mesh)
    to_local = lambda p: distributed.local_replica(p, local)
    return ProcessShardedEngine(_process_engine(cfg, graphdef, to_local(params), tokenizer, local, version,
                                                released), to_local)
  return _process_engine(cfg, graphdef, params, tokenizer, mesh, version, released)


def _process_engine(cfg: Config, graphdef, params, tokenizer, mesh, version: int,
                    released: bool = False) -> RolloutEngine:
  if cfg.rollout.engine == "jax":
    from srpo_jax.rollout.jax_engine import JaxEngine
    buckets = {"prompt_buckets": cfg.rollout.length_buckets} if cfg.rollout.length_buckets else {}
    return JaxEngine((graphdef, params), eos_token_ids=eos_ids(tokenizer), pad_token_id=tokenizer.pad_token_id,
                     mesh=mesh, max_batch=cfg.rollout.jax_max_batch, **buckets)
  from srpo_jax.rollout.sglang_engine import SGLangEngine, ram_exports_dir

  def export_fn(p, out_dir):  # SGLang reads bf16 HF weights; the trainer keeps its own (fp32) master copy
    # In place: out_dir is the engine's recycled oldest export (or a new, empty directory).
    hf_io.save_pretrained(nnx.merge(graphdef, p), out_dir, tokenizer=tokenizer, dtype="bfloat16", in_place=True)

  # Each process's server reads its own exports (a node's local server; one directory per process on a shared disk).
  weights_dir = cfg.run_dir if not distributed.multi_process() else os.path.join(
      cfg.run_dir, f"process{jax.process_index()}")
  first = os.path.join(weights_dir, "weights", "initial")
  if cfg.rollout.sglang_url is None:
    export_fn(params, first)
  python = {"python": cfg.rollout.sglang_python} if cfg.rollout.sglang_python else {}
  r = cfg.rollout
  server_args = list(r.sglang_args) if r.sglang_url else owned_sglang_args(cfg, jax.local_devices())
  # Refit exports in RAM when the node has room for three (two kept, one being written): written at memory speed and
  # reloaded from memory by the server. The server must see the path: it runs on this node (owned, or sglang_url local).
  bf16_bytes = 2 * sum(int(x.size) for x in jax.tree.leaves(params))
  local = r.sglang_url is None or r.sglang_url.split("//", 1)[-1].split(":")[0] in ("127.0.0.1", "localhost")
  ram = ram_exports_dir(weights_dir, 3 * bf16_bytes) if local else None
  return SGLangEngine(first, url=r.sglang_url, server_args=server_args, export_fn=export_fn,
                      exports_dir=ram, remove_exports_dir=ram is not None,
                      run_dir=weights_dir, initial_version=version, vocab_size=int(params["embed"].shape[0]),
                      request_deadline_s=r.request_deadline_s, health_timeout_s=r.health_timeout_s,
                      max_retries=r.request_retries, released=released, **python)


def owned_sglang_args(cfg: Config, devices) -> list[str]:
  """rollout.sglang_args for a server this process launches: on GPUs, plus every GPU of the node as a data-parallel
  rank and SGLang's memory sized beside JAX (`sglang_memory`; the user's own flags win).

  Beside JAX's preallocated share, the GPU's memory is JAX's pool (`bytes_limit`) over the share `srpo_jax.run` set
  (XLA_PYTHON_CLIENT_MEM_FRACTION); time-shared (rollout.sglang_sleep: no pool) it is what nvidia-smi reports, and
  JAX keeps its parameters there while the server generates (their bytes per GPU as the planner counts them).
  Raises when SGLang could not even start; warns when its KV pool holds fewer tokens than the step's rollouts (they
  then run in waves: `python -m srpo_jax.plan`)."""
  args = list(cfg.rollout.sglang_args)
  if not devices or devices[0].platform != "gpu":
    return args
  from srpo_jax import plan
  from srpo_jax.rollout import sglang_memory
  stats = devices[0].memory_stats() or {}
  fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", plan.SGLANG_JAX_MEM_FRACTION))
  q = plan.model_config(cfg, plan.TARGETS["h100x1"])
  jax_state = None
  if cfg.rollout.sglang_sleep:
    total = sglang_memory.gpu_memory_bytes()
    sizes = cfg.mesh.axis_sizes(len(devices) * jax.process_count())
    jax_state = plan.Model.build(cfg, q, plan.abstract_mesh(sizes)).state_bytes()
    fraction = sglang_memory.sleep_jax_fraction(total or 1, sglang_memory.config_tp(cfg))
  else:
    total = int(stats["bytes_limit"] / fraction) if stats.get("bytes_limit") else None
  if not total:
    warnings.warn("SGLang: the GPU reports no memory statistics; launching with rollout.sglang_args unsized")
    return args
  mem = sglang_memory.for_config(cfg, q, device_memory=total, jax_fraction=fraction, gpus=len(devices),
                                 nodes=jax.process_count(), jax_state=jax_state)
  if not mem.starts:
    fix = ("shard the server's weights (--tp-size in rollout.sglang_args)" if mem.sleep else
           f"lower XLA_PYTHON_CLIENT_MEM_FRACTION (JAX's share, now {fraction})")
    raise RuntimeError(f"SGLang cannot start beside JAX: {mem.summary()}. Use a smaller model or {fix}")
  if not mem.fits and mem.sleep:
    log.warning("%s: the step's rollouts run in waves (python -m srpo_jax.plan)", mem.summary())
  elif not mem.fits:
    log.warning("%s: the step's rollouts run in waves; XLA_PYTHON_CLIENT_MEM_FRACTION=%.3f would hold them (if JAX's "
                "programs fit there: python -m srpo_jax.plan)", mem.summary(), mem.jax_fraction_to_fit())
  else:
    log.info("%s", mem.summary())
  return sglang_memory.owned_server_args(args, mem)


# ---------------------------------------------------------------------------------------------------------------------
# Stage 1: collect rollouts
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Rollouts:
  """One step's B = prompts × n rollouts, group-contiguous (rollout i belongs to prompt group_ids[i])."""
  prompt_rows: list[int]           # index into task.train per rollout
  responses: list[np.ndarray]
  rollout_logp: list[np.ndarray]
  finish: list[str]
  texts: list[str]
  group_ids: np.ndarray


def prompt_rows(num_prompts: int, per_step: int, step: int, seed: int, shuffle: bool = True,
                start: Optional[int] = None) -> list[int]:
  """The step's prompts: an epoch-wise permutation seeded by (seed, epoch), read at position `start` (the data
  position: prompts consumed so far; default step × per_step, which it equals unless a resume changed per_step)."""
  start = step * per_step if start is None else start
  rows = []
  for pos in range(start, start + per_step):
    epoch, k = divmod(pos, num_prompts)
    order = np.random.default_rng([seed, epoch]).permutation(num_prompts) if shuffle else np.arange(num_prompts)
    rows.append(int(order[k]))
  return rows


def collect_rollouts(engine: RolloutEngine, prompt_ids: Sequence[Sequence[int]], rows: Sequence[int], tokenizer,
                     sampling: SamplingParams, n: int) -> Rollouts:
  """n samples for each prompt `prompt_ids[r]`, r in rows, decoded."""
  out = engine.generate([prompt_ids[i] for i in rows], sampling, n=n)
  flat = [c for group in out for c in group]
  return Rollouts(prompt_rows=[i for i in rows for _ in range(n)], responses=[np.asarray(c.token_ids) for c in flat],
                  rollout_logp=[np.asarray(c.logprobs, np.float32) for c in flat],
                  finish=[c.finish_reason for c in flat],
                  texts=[tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in flat],
                  group_ids=np.repeat(np.arange(len(rows)), n))


# ---------------------------------------------------------------------------------------------------------------------
# Stage 2: score and route
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Scored:
  rewards: np.ndarray  # [B] float32
  adv: np.ndarray      # [B] float32 group-relative advantages
  grpo: np.ndarray     # [B] bool
  sdpo: np.ndarray     # [B] bool
  sibling: np.ndarray  # [B] int32, -1 without a correct sibling (or without a usable teacher prompt)
  correct: np.ndarray  # [B] bool, c_i
  has_teacher: np.ndarray  # [B] bool, m_i: a correct sibling whose teacher prompt fits (build_teacher_prompts)


def score_and_route(ro: Rollouts, answers: Sequence[str], reward, algo, seed: int) -> Scored:
  """Rewards r_i of every rollout (`answers[k]` is prompt row k's answer), advantages, and the method's routing."""
  rewards = np.array([reward(t, answers[i]) for t, i in zip(ro.texts, ro.prompt_rows)], np.float32)
  num_groups = int(ro.group_ids.max()) + 1
  adv = adv_lib.group_advantages(jnp.asarray(rewards), jnp.asarray(ro.group_ids), num_groups,
                                 norm_adv_by_std=algo.norm_adv_by_std)
  rt = routing.route(rewards, ro.group_ids, method=algo.name, sibling_choice=algo.sibling_choice,
                     rng=jax.random.PRNGKey(seed), correct_threshold=algo.correct_threshold)
  return Scored(rewards=rewards, adv=np.asarray(adv), grpo=np.asarray(rt.grpo_B), sdpo=np.asarray(rt.sdpo_B),
                sibling=np.asarray(rt.sibling_B), correct=np.asarray(rt.correct_B),
                has_teacher=np.asarray(rt.has_teacher_B))


# ---------------------------------------------------------------------------------------------------------------------
# Stage 3: teacher prompts (SDPO-routed rollouts only)
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TeacherPrompts:
  """The teacher prompts of one step's SDPO-routed rollouts."""
  ids: dict[int, list[int]]  # rollout index -> teacher prompt ids (the rollout's response is appended after them)
  truncated: int  # prompts whose sibling solution was cut to fit algo.teacher_max_tokens
  over_budget: int  # rollouts whose template alone exceeded it: no teacher information, re-routed, no prompt


def build_teacher_prompts(ro: Rollouts, sc: Scored, messages_of, tokenizer, teacher_max_tokens: int,
                          method: methods.Method) -> tuple[TeacherPrompts, Scored]:
  """Teacher prompt ids for the SDPO-routed rollouts, and the routing after the ones with no room for a solution.

  `messages_of(prompt_row)` gives the student's chat messages; the sibling's response is the teacher information.
  `teacher_max_tokens` limits the teacher PROMPT alone (the official `max_reprompt_len`); the student's response is
  appended after it. A prompt over the limit has the end of its sibling solution cut (`build_teacher_prompt_ids`).
  When the template alone (system, question, instructions) exceeds the limit, the solution is dropped entirely and
  the rollout has no usable teacher information: its teacher availability m_i is cleared and its routing re-derived
  by the method (`Method.route_masks`: SRPO sends it to the GRPO fallback; SDPO gives it zero loss), it gets no
  teacher sequence, and it is counted (`over_budget`). Returns the prompts and the (possibly) updated `Scored`.
  """
  render = lambda messages: prompt_lib.render_messages(tokenizer, messages)
  encode = lambda text: prompt_lib.encode_text(tokenizer, text)
  out, truncated, no_room = {}, 0, []
  for i in np.flatnonzero(sc.sdpo):
    ids, cut = build_teacher_prompt_ids(messages_of(ro.prompt_rows[i]), ro.texts[sc.sibling[i]], render=render,
                                        encode=encode, max_tokens=teacher_max_tokens)
    if len(ids) > teacher_max_tokens:  # the template alone does not fit: the solution was dropped
      no_room.append(int(i))
      continue
    out[int(i)] = ids
    truncated += int(cut)
  if no_room:
    has_teacher, sibling = sc.has_teacher.copy(), sc.sibling.copy()
    has_teacher[no_room], sibling[no_room] = False, -1
    grpo, sdpo = method.route_masks(sc.correct, has_teacher)
    sc = dataclasses.replace(sc, grpo=np.asarray(grpo), sdpo=np.asarray(sdpo), sibling=sibling,
                             has_teacher=has_teacher)
  return TeacherPrompts(ids=out, truncated=truncated, over_budget=len(no_room)), sc


# ---------------------------------------------------------------------------------------------------------------------
# Stage 4: padded step arrays, π_old (off-policy steps only)
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StepBatch:
  ids: np.ndarray        # [B, S] right-padded: prompt, response, padding
  mask: np.ndarray       # [B, S]
  start: np.ndarray      # [B] where each response starts
  resp: np.ndarray       # [B, T]
  roll_logp: np.ndarray  # [B, T]


def assemble(ro: Rollouts, prompt_ids: Sequence[Sequence[int]], pad: int) -> StepBatch:
  prompts = [prompt_ids[i] for i in ro.prompt_rows]
  p_len = batching.pow2_bucket(max(map(len, prompts)), 16)
  r_len = batching.pow2_bucket(max(max(map(len, ro.responses)), 1), 8)
  seq = batching.sequences(prompts, ro.responses, p_len, r_len, pad)
  roll_logp, _ = batching.pad_right(ro.rollout_logp, r_len, 0.0, np.float32)
  return StepBatch(ids=seq.ids, mask=seq.mask, start=seq.start, resp=seq.resp, roll_logp=roll_logp)


def needs_old_logp(cfg: Config) -> bool:
  """Whether π_old needs its own forward before the update: a step of several optimizer steps (the later ones are
  off-policy), or `optim.recompute_old_logp`. Otherwise π_old = stop_gradient(π_θ) inside the update (exact)."""
  return cfg.optimizer_steps_per_step > 1 or cfg.optim.recompute_old_logp


def row_groups(rows: np.ndarray, lengths: np.ndarray, cfg: Config, row_multiple: int) -> list[list[int]]:
  """`prepare`'s chunks of `rows` (no teacher): length-sorted groups under optim.micro_batch_tokens, else
  consecutive chunks of optim.micro_batch_size rollouts."""
  if cfg.optim.micro_batch_tokens is not None:
    return batching.token_budget_groups(rows, lengths, cfg.optim.micro_batch_tokens, row_multiple)
  return [list(map(int, g)) for g in np.asarray(rows).reshape(-1, cfg.micro_batch_size)]


def mini_batch_rows(batch: StepBatch, cfg: Config) -> list[np.ndarray]:
  """The rollouts of each optimizer step: whole prompt groups in sampling order, or with optim.balance_batch the
  mini-batches verl's balance_batch leaves (`srpo_jax.balance`; lengths = prompt + response tokens, as verl's
  attention mask). Routing and advantages were computed before, on whole groups."""
  num, per = len(batch.mask), cfg.rollouts_per_mini_batch
  if cfg.optim.balance_batch:
    return balance.mini_batches(batch.mask.sum(axis=1), cfg.optim.balance_batch_ranks, per)
  return [np.arange(m * per, (m + 1) * per) for m in range(num // per)]


def update_groups(rows: np.ndarray, batch: StepBatch, sc: Scored, teacher_prompts: dict[int, list[int]],
                  responses: Sequence[np.ndarray], cfg: Config, row_multiple: int) -> list[list[int]]:
  """The route-pure micro-batches of a mini-batch's `rows`, SDPO-routed ones first (`batching.route_groups`); under a
  token budget an SDPO-routed rollout also counts its teacher sequence."""
  t_len = {int(r): len(teacher_prompts[int(r)]) + len(responses[int(r)]) for r in rows if sc.sdpo[r]}
  return batching.route_groups(rows, sc.sdpo, batch.mask[rows].sum(axis=1), micro_size=cfg.micro_batch_size,
                               budget=cfg.optim.micro_batch_tokens, teacher_lengths=t_len, row_multiple=row_multiple)


def prepare(fns: TrainFns, params, batch: StepBatch, groups: Sequence[Sequence[int]], pad: int, cut: bool = False,
            row_multiple: int = 1) -> np.ndarray:
  """π_old [B, T] of every rollout with the current weights, one group of rows at a time (`row_groups`) — a whole
  step of 256 rollouts × 10k tokens is far more than one forward can hold — each group cut to its own length bucket
  when `cut` (token budgets). Only for steps where `needs_old_logp`."""
  num, resp_len = batch.resp.shape
  arrays = batching.StepArrays(ids=batch.ids, mask=batch.mask, start=batch.start, resp=batch.resp,
                               roll_logp=batch.roll_logp, adv=np.zeros(num, np.float32), grpo=np.ones(num, bool),
                               sdpo=np.zeros(num, bool))
  outs = []
  for g in groups:
    shape = {} if cut else dict(num_rows=len(g), seq_len=batch.ids.shape[1], resp_len=resp_len)
    mb = batching.micro_batch(g, arrays, {}, (), pad, with_teacher=False, row_multiple=row_multiple, **shape)
    outs.append((g, fns.prepare(params, mb.ids, mb.mask, mb.start, mb.resp)))
  old_logp = np.zeros(batch.resp.shape, np.float32)
  for g, out in distributed.to_host(outs):  # one host sync for all chunks (rows from every process)
    old_logp[g, :out.shape[1]] = out[:len(g)]
  return old_logp


# ---------------------------------------------------------------------------------------------------------------------
# Stage 5: optimizer steps (one per mini-batch)
# ---------------------------------------------------------------------------------------------------------------------
def dw_scale(parts: Sequence[tuple[Any, Any]]) -> jax.Array:
  """The deferred DW normaliser |Ω| / Σ_Ω exp(−βH) from the teacher micro-batches' sums (train_step docstring)."""
  tokens = sum(p[0].sdpo_tokens for p in parts)
  return dw_normaliser(tokens, sum(p[0].dw_unnorm for p in parts))


def dw_normaliser(tokens, unnorm_sum) -> jax.Array:
  """|Ω| / Σ_Ω exp(−βH), the DW weights' normaliser (mean weight 1 over Ω)."""
  return jnp.float32(tokens) / jnp.maximum(unnorm_sum, jnp.finfo(jnp.float32).tiny)


def denominators(fns: TrainFns, teacher, rows: np.ndarray, batch: StepBatch, sc: Scored,
                 micro_batches: Sequence[batching.MicroBatch], cfg: Config):
  """What the mini-batch of `rows` divides by: the objective's denominator, and with an entropy bonus also the
  bonus's own (`losses.entropy_bonus`) and, for a DW method, the DW normaliser computed up front (`fns.dw_sum`):
  deferring it would scale the teacher micro-batches' entropy bonus too (train_step docstring)."""
  resp = jnp.asarray(batch.resp[rows])
  den = losses.objective_denominator(resp, jnp.asarray(sc.grpo[rows]), jnp.asarray(sc.sdpo[rows]),
                                     loss_agg=cfg.loss_agg)
  if not cfg.algo.entropy_coef:
    return den
  dw_norm, teacher_mbs = None, [mb for mb in micro_batches if mb.has_teacher]
  if cfg.method.dynamic_weighting and teacher_mbs:
    tokens = int(np.sum(batch.resp[rows] & sc.sdpo[rows, None]))
    dw_norm = dw_normaliser(tokens, sum(fns.dw_sum(teacher, mb) for mb in teacher_mbs))
  return Denominators(objective=den, entropy=losses.entropy_bonus(jnp.zeros(resp.shape), resp,
                                                                  loss_agg=cfg.loss_agg)[1], dw_norm=dw_norm)


def run_updates(fns: TrainFns, state: TrainState, batch: StepBatch, old_logp: Optional[np.ndarray], sc: Scored,
                teacher_prompts: dict[int, list[int]], responses: Sequence[np.ndarray], cfg: Config, pad: int,
                row_multiple: int = 1) -> tuple[Any, Any, list[UpdateStats], float]:
  """One optimizer step per mini-batch, each over its route-pure micro-batches (`update_groups`); the denominator
  spans the mini-batch, and with DW the teacher micro-batches' gradient is scaled by the mini-batch's DW normaliser
  before the plain ones are added (with an entropy bonus the normaliser is computed up front instead: `denominators`).

  Micro-batches: `optim.micro_batch_size` rollouts at the step's full length (a route's last one cut to
  `batching.row_bucket` rows), or, with `optim.micro_batch_tokens`, length-sorted groups under that per-device token
  budget, each cut to its own length bucket. `old_logp` None: on-policy (π_old = π_θ in the update). Returns the new
  params and optimizer state, the per-optimizer-step statistics (host values) and the padding fraction of what the
  model was fed.
  """
  method = cfg.method
  params, opt_state, outs, fed = state.params, state.opt_state, [], []
  arrays = batching.StepArrays(ids=batch.ids, mask=batch.mask, start=batch.start, resp=batch.resp,
                               roll_logp=batch.roll_logp, adv=sc.adv, grpo=sc.grpo, sdpo=sc.sdpo, old_logp=old_logp)
  one = jnp.float32(1.0)
  for rows in mini_batch_rows(batch, cfg):
    groups = update_groups(rows, batch, sc, teacher_prompts, responses, cfg, row_multiple)
    shape = lambda g: {} if cfg.optim.micro_batch_tokens is not None else dict(
        num_rows=batching.row_bucket(len(g), cfg.micro_batch_size, row_multiple), seq_len=batch.ids.shape[1],
        resp_len=batch.resp.shape[1])
    mbs = [batching.micro_batch(g, arrays, teacher_prompts, responses, pad, row_multiple=row_multiple, **shape(g))
           for g in groups]
    den = denominators(fns, state.teacher, rows, batch, sc, mbs, cfg)
    grads, loss = jax.tree.map(jnp.zeros_like, params), jnp.float32(0.0)
    up_front = isinstance(den, Denominators) and den.dw_norm is not None
    parts, teacher_parts = [], []
    pending, dw_used = method.dynamic_weighting and not up_front, den.dw_norm if up_front else one
    for mb in mbs:
      scale = one
      if pending and teacher_parts and not mb.has_teacher:  # the first plain micro-batch: normalise the DW part first
        dw_used = scale = dw_scale(teacher_parts)
        loss, pending = loss * scale, False
      grads, mb_loss, sums, maxes = fns.accumulate(params, state.teacher, grads, scale, mb, den)
      loss = loss + mb_loss
      parts.append((sums, maxes))
      if mb.has_teacher:
        teacher_parts.append((sums, maxes))
      fed.append(mb)
    scale = one
    if pending and teacher_parts:  # no plain micro-batch followed: normalise in `apply`
      dw_used = scale = dw_scale(teacher_parts)
      loss = loss * scale
    with warnings.catch_warnings():  # the donated gradients cannot alias an output (the new params alias the old):
      warnings.filterwarnings("ignore", "Some donated buffers were not usable")  # donated to be freed at once
      params, opt_state, grad_norm, finite = fns.apply(params, opt_state, grads, loss, scale)
    outs.append((loss, grad_norm, finite, parts, dw_used))
  # One host sync for all the step's optimizer steps; the micro-batch statistics combine on the host.
  stats = [UpdateStats(loss=loss, grad_norm=grad_norm, finite=finite,
                       sums=jax.tree.map(lambda *x: np.sum(x), *[p[0] for p in parts]),
                       maxes=jax.tree.map(lambda *x: np.max(x), *[p[1] for p in parts]), dw_scale=dw_used)
           for loss, grad_norm, finite, parts, dw_used in jax.device_get(outs)]
  return params, opt_state, stats, batching.padding_fraction(fed)


# ---------------------------------------------------------------------------------------------------------------------
# Stage 6: the EMA teacher (refit of the rollout engine follows in the trainer)
# ---------------------------------------------------------------------------------------------------------------------
def ema_teacher(fns: TrainFns, teacher, params, stats: Sequence[UpdateStats], method: methods.Method,
                rate: float) -> tuple[Any, bool]:
  """θ_T ← (1 − rate)·θ_T + rate·θ after the step's optimizer steps, when the policy did update.

  As the official code: only for methods with a teacher, and only when at least one optimizer step of the training
  step was finite (a skipped step leaves θ unchanged, and the teacher too). Returns (teacher, whether it moved).
  """
  if not method.uses_teacher or not any(bool(s.finite) for s in stats):
    return teacher, False
  return fns.ema(teacher, params, jnp.float32(rate)), True


# ---------------------------------------------------------------------------------------------------------------------
# Stage 7: step metrics
# ---------------------------------------------------------------------------------------------------------------------
def update_metrics(stats: Sequence[UpdateStats]) -> dict[str, float]:
  """Loss, gradient norm, token means, π_old/π_roll mismatch and the teacher's entropy and DW weights over the
  step's optimizer steps (host values)."""
  sums = jax.tree.map(lambda *x: float(np.sum(x)), *[s.sums for s in stats])
  maxes = jax.tree.map(lambda *x: float(np.max(x)), *[s.maxes for s in stats])
  div = lambda a, n: a / n if n else 0.0
  out = {M.LOSS: float(np.mean([s.loss for s in stats])),
         M.OPTIM_GRAD_NORM: float(np.mean([s.grad_norm for s in stats])),
         M.LOSS_GRPO: div(sums.grpo_loss, sums.grpo_tokens), M.LOSS_SDPO: div(sums.sdpo_loss, sums.sdpo_tokens),
         M.SDPO_JSD: div(sums.jsd, sums.sdpo_tokens), M.POLICY_ENTROPY: div(sums.entropy, sums.tokens),
         M.GRPO_CLIP_FRAC: div(sums.clip_frac, sums.grpo_tokens),
         M.GRPO_DUAL_CLIP_FRAC: div(sums.dual_clip_frac, sums.grpo_tokens),
         M.GRPO_APPROX_KL: div(sums.approx_kl, sums.grpo_tokens), M.GRPO_RATIO_MEAN: div(sums.ratio, sums.grpo_tokens),
         M.ROLLOUT_IS_WEIGHT_MEAN: div(sums.roll_is, sums.tokens), M.ROLLOUT_IS_WEIGHT_MAX: maxes.roll_is,
         M.POLICY_LOGP_MAX: maxes.logp, M.ROLLOUT_LOGP_MISMATCH_ABS: div(sums.mismatch, sums.tokens),
         M.ROLLOUT_LOGP_MISMATCH_MAX: maxes.mismatch}
  if sums.sdpo_tokens:
    out[M.TEACHER_ENTROPY_MEAN] = sums.teacher_entropy / sums.sdpo_tokens
  if sums.dw_unnorm:  # DW weights = exp(−βH) × each optimizer step's normaliser
    with_dw = [s for s in stats if float(s.sums.dw_unnorm) > 0]
    out[M.DW_MIN] = min(-float(s.maxes.dw_unnorm_neg) * float(s.dw_scale) for s in with_dw)
    out[M.DW_MAX] = max(float(s.maxes.dw_unnorm) * float(s.dw_scale) for s in with_dw)
    out[M.DW_MEAN] = (sum(float(s.sums.dw_unnorm) * float(s.dw_scale) for s in with_dw)
                      / sum(float(s.sums.sdpo_tokens) for s in with_dw))
  return out


def step_metrics(ro: Rollouts, sc: Scored, stats: Sequence[UpdateStats], rollout_time_s: float) -> dict[str, float]:
  """What a training step logs about its rollouts, routing, teacher, losses and RL health."""
  lengths = np.array([len(x) for x in ro.responses])
  return {
      M.TRAIN_REWARD_MEAN: float(sc.rewards.mean()), M.TRAIN_ACCURACY: float(sc.correct.mean()),
      M.ROUTE_FRAC_GRPO: float((sc.grpo & sc.correct).mean()), M.ROUTE_FRAC_SDPO: float(sc.sdpo.mean()),
      M.ROUTE_FRAC_FALLBACK: float((sc.grpo & ~sc.correct).mean()),
      M.ROLLOUT_RESPONSE_LEN_MEAN: float(lengths.mean()), M.ROLLOUT_RESPONSE_LEN_MAX: int(lengths.max()),
      M.ROLLOUT_TRUNCATION_RATE: float(np.mean([f == "length" for f in ro.finish])),
      M.ROLLOUT_TOKENS_PER_S: max(int(lengths.sum()), 1) / max(rollout_time_s, 1e-9),
      **update_metrics(stats),
  }


def set_lr(opt_state, lr: float):
  """`opt_state` with the lr of the coming training step (`train_step.make_optimizer` injects it as a
  hyperparameter; the trainer sets `schedule(step)` once per training step, before its optimizer steps)."""
  old = opt_state.hyperparams["learning_rate"]
  value = jax.device_put(np.asarray(lr, old.dtype), old.sharding)
  return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": value})


def current_lr(opt_state) -> float:
  """The lr every optimizer step of the last training step used (it stays in `opt_state` when a step is skipped)."""
  return float(opt_state.hyperparams["learning_rate"])


# ---------------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------------
class Trainer:
  """Wires config, task, model, optimizer, engine, checkpoints and metrics; `run()` trains and evaluates."""

  def __init__(self, cfg: Config, *, tokenizer=None, mesh=None, task: Optional[Task] = None,
               model: Optional[Qwen3] = None, engine: Optional[RolloutEngine] = None):
    from srpo_jax.tokenizer import load_tokenizer
    self.cfg, self.mesh = cfg, mesh
    self.method = cfg.method
    self.tokenizer = tokenizer or load_tokenizer(cfg.tokenizer.path)
    self.pad = self.tokenizer.pad_token_id
    self.task = task or load_task(cfg, self.tokenizer)
    # One run per run_dir (process 0 of a multi-host run holds the lock); then what a killed run left is ours.
    self._lock = RunDirLock(cfg.run_dir) if jax.process_index() == 0 else None
    for leftover in (hf_io.remove_export_leftovers(cfg.run_dir, os.path.join(cfg.run_dir, "weights"))
                     if distributed.is_main() else ()):
      log.warning("removed %s, left by an interrupted HF export", leftover)
    self.checkpointer = Checkpointer(cfg.checkpoint_dir, keep=cfg.checkpoint.keep)
    latest = self.checkpointer.latest_step()
    if latest is not None and not cfg.resume:
      raise FileExistsError(f"run_dir {cfg.run_dir!r} already holds checkpoints (latest step {latest}): pass "
                            "--config.resume=true to continue that run, or choose a new run_dir")
    time_shared = cfg.rollout.engine == "sglang" and cfg.rollout.sglang_sleep
    attached_asleep = time_shared and engine is None and cfg.rollout.sglang_url is not None
    if attached_asleep:  # an attached server sleeps before JAX allocates its state beside it
      from srpo_jax.rollout.sglang_engine import release_attached
      release_attached(cfg.rollout.sglang_url, cfg.rollout.health_timeout_s)
    if model is None:  # a resumed run restores its weights: no warm-start needed
      model = build_model(cfg, mesh) if latest is not None else initial_model(cfg, self.tokenizer, mesh)
    else:  # an injected model goes where the programs expect its parameters (each jit declares their shardings)
      model = place_on_mesh(model, mesh)
    self.graphdef, params = nnx.split(model)
    self.optimizer, self.schedule = make_optimizer(
        cfg.lr, warmup_steps=cfg.optim.warmup_steps, weight_decay=cfg.optim.weight_decay, b1=cfg.optim.b1,
        b2=cfg.optim.b2, eps=cfg.optim.eps, grad_clip=cfg.optim.grad_clip)
    # θ_T starts at the base weights.
    # On a mesh every program declares its shardings; batches are split over ("data", "fsdp").
    shardings = None if mesh is None else TrainShardings.build(mesh, params, self.optimizer)
    self.row_shards = 1 if mesh is None else int(mesh.shape["data"] * mesh.shape["fsdp"])
    for name, rows in (("optim.micro_batch_size", cfg.micro_batch_size),
                       ("rollout.prompts_per_step × rollout.n", cfg.rollout.rollouts_per_step)):
      if rows % self.row_shards:
        raise ValueError(f"{name}={rows} must be a multiple of the mesh's row shards mesh.data × mesh.fsdp = "
                         f"{self.row_shards} (each device takes an equal share of the rows)")
    opt_state = self.optimizer.init(params)
    if shardings is not None:
      opt_state = jax.device_put(opt_state, shardings.opt_state)
    self.state = TrainState(params=params, opt_state=opt_state, teacher=jax.tree.map(jnp.copy, params))
    self.fns = make_train_fns(self.graphdef, self.optimizer, LossHParams.from_config(cfg), shardings)
    wall_s, train_s = self._restore() if cfg.resume and latest is not None else (0.0, 0.0)
    if time_shared:  # a launched server sizes its KV pool from the memory JAX leaves it: only the parameters
      self._state_to(time_share.HOST)
    engine = engine or build_engine(cfg, self.graphdef, self.state.params, self.tokenizer, mesh,
                                    version=self.state.step, released=attached_asleep)
    self.engine = (time_share.TimeSharedEngine(engine, lambda: self._state_to(time_share.HOST),
                                               lambda: self._state_to(time_share.DEVICE)) if time_shared else engine)
    try:  # Before the run's first rollout (fresh or resumed): the engine holds exactly these weights, and says so.
      self.engine.ensure_weights(self.state.params, self.state.step)
      if time_shared:  # the server sleeps whenever it does not generate
        self.engine.sleep()
        self._state_to(time_share.DEVICE)
    except BaseException:
      self.engine.close()
      raise
    # Without a checkpoint a resume starts afresh: a killed run's step-0 evaluation is dropped, not appended to.
    self.metrics = M.MetricsWriter(cfg.run_dir, resume_step=self.state.step if latest is not None else None,
                                   time_offset_s=wall_s)
    self.clocks = Clocks(wall_offset_s=wall_s, train_offset_s=train_s)
    self._stop_requested, self._stop_signal, self._stop_agreed = False, None, False

  # Read-only views kept for callers (tests, bench) that look at the arrays.
  params = property(lambda self: self.state.params)
  teacher = property(lambda self: self.state.teacher)
  step = property(lambda self: self.state.step)

  def _state_to(self, kind: str) -> None:
    """The optimizer state and the EMA teacher to memory `kind` (`time_share`: host while the server generates)."""
    self.state.opt_state = time_share.to_memory(self.state.opt_state, kind)
    self.state.teacher = time_share.to_memory(self.state.teacher, kind)

  # -- checkpoint state --------------------------------------------------------------------------------------------
  def save(self):
    """Checkpoints the state (`Checkpointer.save` refuses NaN/inf, naming the leaf, and keeps the previous ones)."""
    meta = self.state.meta(wall_time_s=self.clocks.wall_s(), train_time_s=self.clocks.train_s(), seed=self.cfg.seed,
                           config=self.cfg.to_dict())
    self.checkpointer.save(self.state.step, self.state.arrays(), meta)

  def _restore(self) -> tuple[float, float]:
    """Loads the newest intact checkpoint whose config matches into `self.state` (a corrupt newer one is reported by
    path and set aside); returns the two clocks' values then (wall, training)."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            self.state.arrays())
    found = self.checkpointer.restore_newest_intact(abstract, check_meta=self._check_resume_meta)
    self.state = TrainState.from_checkpoint(found.state, found.meta)
    log.info("resumed from checkpoint step %d (%s)", found.step, self.checkpointer.step_dir(found.step))
    return float(found.meta["wall_time_s"]), float(found.meta["train_time_s"])

  def _check_resume_meta(self, step: int, meta: dict[str, Any]) -> None:
    """A usable meta record (else CorruptCheckpoint: the next older checkpoint is tried) made with this config, but
    for fields that change nothing computed (else ConfigChanged, unless checkpoint.allow_config_change)."""
    where = self.checkpointer.step_dir(step)
    validate_meta(meta, step, where)
    changes = config_changes(meta["config"], self.cfg.to_dict())
    if not changes:
      return
    listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes)
    if not self.cfg.checkpoint.allow_config_change:
      raise ConfigChanged(f"resume: checkpoint {where!r} was made with a different config in {len(changes)} "
                          f"field(s) that change what is computed: {listed}. Resume with the checkpoint's values, or "
                          "pass --config.checkpoint.allow_config_change=true to continue with the new ones")
    log.warning("resume with a changed config (checkpoint.allow_config_change): %s; training continues at data "
                "position %d", listed, meta["data_position"])

  # -- one training step -------------------------------------------------------------------------------------------
  def train_step(self, step: int) -> dict[str, float]:
    """The stages in order; updates `self.state` (step counter excluded) and returns the step's metrics."""
    cfg, task, st = self.cfg, self.task, self.state
    t0 = time.perf_counter()
    r = cfg.rollout
    sampling = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                              top_k=r.top_k, seed=seed_for(cfg.seed, step, SEED_ROLLOUT))
    rows = prompt_rows(len(task.train.ids), r.prompts_per_step, step, cfg.seed, cfg.data.shuffle,
                       start=st.data_position)
    # Rollouts before any change to the state: a stop while waiting on them (RolloutInterrupted) leaves the state
    # exactly as the last completed step left it, which is what then gets checkpointed.
    ro = collect_rollouts(self.engine, task.train.ids, rows, self.tokenizer, sampling, r.n)
    t1 = time.perf_counter()
    st.data_position += r.prompts_per_step
    # The lr of this training step, for all of its optimizer steps (the schedule counts training steps).
    st.opt_state = set_lr(st.opt_state, float(self.schedule(step)))
    sc = score_and_route(ro, [row.answer for row in task.train.rows], task.reward, cfg.algo,
                         seed_for(cfg.seed, step, SEED_SIBLING))
    t2 = time.perf_counter()
    # The teacher prompts may re-route rollouts (no room for a solution): `sc` is the routing from here on.
    tp, sc = build_teacher_prompts(ro, sc, task.messages, self.tokenizer, cfg.algo.teacher_max_tokens, self.method)
    batch = assemble(ro, task.train.ids, self.pad)
    old_logp = None
    if needs_old_logp(cfg):
      groups = row_groups(np.arange(len(ro.responses)), batch.mask.sum(axis=1), cfg, self.row_shards)
      old_logp = prepare(self.fns, st.params, batch, groups, self.pad, cut=cfg.optim.micro_batch_tokens is not None,
                         row_multiple=self.row_shards)
    t3 = time.perf_counter()
    st.params, st.opt_state, stats, padding = run_updates(self.fns, st, batch, old_logp, sc, tp.ids, ro.responses,
                                                          cfg, self.pad, self.row_shards)
    t4 = time.perf_counter()
    # Nothing non-finite reaches the teacher, the rollout engine or (later) a checkpoint.
    require_finite({"params": st.params}, lambda: (
        f"training step {step}: the parameters after the update are not finite (not EMA'd, not sent to the rollout "
        f"engine, not saved); the last good checkpoint is {self.checkpointer.latest_step()} in {cfg.checkpoint_dir}"))
    # EMA teacher after all optimizer steps of the training step (if the policy moved), then refit the engine.
    st.teacher, _ = ema_teacher(self.fns, st.teacher, st.params, stats, self.method, cfg.algo.ema_rate)
    try:
      self.engine.update_weights(st.params, step + 1)
    except RolloutInterrupted:  # The step is complete; the next run pushes these weights before its first rollout.
      log.warning("stop requested during the refit after step %d; the step is kept", step + 1)
    t5 = time.perf_counter()
    finite = all(bool(s.finite) for s in stats)
    st.counters["teacher_truncated"] += tp.truncated
    st.counters["teacher_over_budget"] += tp.over_budget
    st.counters["nonfinite_steps"] += int(not finite)
    st.nonfinite_in_row = 0 if finite else st.nonfinite_in_row + 1
    out = step_metrics(ro, sc, stats, rollout_time_s=t1 - t0)
    out.update({M.OPTIM_LR: current_lr(st.opt_state),
                M.TRAIN_NONFINITE_STEPS: st.counters["nonfinite_steps"], M.TEACHER_PROMPTS_TRUNCATED: tp.truncated,
                M.TEACHER_PROMPTS_OVER_BUDGET: tp.over_budget, M.BATCH_PADDING_FRAC: padding,
                M.TIME_ROLLOUT_S: t1 - t0, M.TIME_ROUTE_S: t2 - t1, M.TIME_TEACHER_S: t3 - t2,
                M.TIME_UPDATE_S: t4 - t3, M.TIME_REFIT_S: t5 - t4})
    out[M.TIME_STEP_S] = time.perf_counter() - t0
    out[M.TIME_TOKENS_PER_S] = max(int(batch.resp.sum()), 1) / out[M.TIME_STEP_S]
    return out

  def evaluate(self, step: int) -> dict[str, float]:
    ev = evaluate(self.engine, self.task, self.tokenizer, self.cfg.eval, self.cfg.eval_max_new_tokens,
                  seed_for(self.cfg.seed, step, SEED_EVAL))
    acc = ev[M.EVAL_ACCURACY]
    if not math.isfinite(acc):  # it would become best_acc, then an invalid checkpoint meta record
      reward = getattr(self.task.reward, "__qualname__", repr(self.task.reward))
      raise ValueError(f"evaluation at step {step}: the reward {reward} of data.task={self.cfg.data.task!r} returned "
                       f"non-finite values (eval accuracy = mean reward = {acc}); rewards must be finite numbers")
    return ev

  # -- the loop ------------------------------------------------------------------------------------------------------
  def run(self) -> dict[str, Any]:
    cfg, st = self.cfg, self.state
    prev = {sig: signal.signal(sig, self._on_sigterm) for sig in STOP_SIGNALS}
    progress = M.Progress(cfg.train.steps, initial_step=st.step, log_every=cfg.train.log_every,
                          enabled=distributed.is_main())
    try:
      if st.step == 0 and cfg.eval.at_start and st.initial_acc is None:
        ev = None
        with self.clocks.excluded(), contextlib.suppress(RolloutInterrupted):  # evaluation is not training time
          ev = self.evaluate(0)  # (a stop during it: no initial accuracy yet; a resume evaluates again)
        if ev is not None:
          st.initial_acc = st.best_acc = ev[M.EVAL_ACCURACY]
          self._write(0, ev)
          progress.update(0, ev)
      while st.step < cfg.train.steps:
        over_budget = bool(cfg.train.max_wall_time_h) and self.clocks.train_s() > cfg.train.max_wall_time_h * 3600
        if distributed.multi_process():  # processes stop together, here: a signal or budget seen by any stops all
          self._stop_agreed, over_budget = distributed.any_process(self._stop_requested, over_budget)
          if self._stop_agreed and self._stop_signal is None:
            self._stop_signal = "a stop signal to another process"
        if self._stopping():
          break
        if over_budget:
          log.info("training-time budget of %.2f h reached", cfg.train.max_wall_time_h)
          break
        try:
          out = self.train_step(st.step)
        except RolloutInterrupted:  # stopped while waiting on the rollouts: the step is dropped, the state untouched
          if not self._stop_requested:
            raise
          break
        st.step += 1
        if st.nonfinite_in_row >= cfg.train.max_nonfinite_in_row:
          raise TrainingAborted(
              f"{st.nonfinite_in_row} non-finite steps in a row (train.max_nonfinite_in_row="
              f"{cfg.train.max_nonfinite_in_row}); stopping. The last good checkpoint is "
              f"{self.checkpointer.latest_step()} in {cfg.checkpoint_dir}")
        last = st.step == cfg.train.steps
        if ((cfg.eval.every_steps and st.step % cfg.eval.every_steps == 0) or last) and not self._stopping():
          # evaluation (and the best-model export it triggers) is not training time; a stop during it: no eval record
          with self.clocks.excluded(), contextlib.suppress(RolloutInterrupted):
            out.update(self.evaluate(st.step))
            st.final_acc = out[M.EVAL_ACCURACY]
            if st.best_acc is None or st.final_acc > st.best_acc:
              st.best_acc = st.final_acc
              if cfg.checkpoint.export_hf:
                self.export(os.path.join(cfg.run_dir, "hf_best"))
        self._write(st.step, out)
        progress.update(st.step, out)
        if st.step % cfg.checkpoint.every_steps == 0 or last:
          self.save()
      if self._stopping():
        log.warning("%s: saving checkpoint at step %d and exiting", self._stop_signal, st.step)
        self.save()
      elif cfg.checkpoint.export_hf:
        self.export(os.path.join(cfg.run_dir, "hf_final"))
      return self.write_summary()
    finally:
      progress.close()
      for sig, handler in prev.items():
        signal.signal(sig, handler)
      self.close()

  def _stopping(self) -> bool:
    """Whether the run stops: at once on a signal (`_on_sigterm`) in one process; in a multi-process run only as
    agreed at the last step boundary (every process must take the same branches: saves are collective)."""
    return self._stop_agreed if distributed.multi_process() else self._stop_requested

  def _write(self, step: int, out: dict[str, Any]) -> None:
    """One metrics record: `time_s` is the training clock, `time/wall_s` the wall clock (`Clocks`)."""
    self.metrics.write(step, {**out, M.TIME_WALL_S: self.clocks.wall_s()}, time_s=self.clocks.train_s())

  def _on_sigterm(self, signum, frame):
    """SIGTERM and SIGINT: stop after the current step, or at once while waiting on the rollout engine (its waits
    poll the flag); the last completed step is checkpointed and the engine's server closed. It only sets flags:
    raising here (Python's KeyboardInterrupt) would land inside whatever runs, e.g. an XLA compile, and crash."""
    name = signal.Signals(signum).name
    if self._stop_requested:
      log.warning("%s: already stopping at the end of the current step (SIGKILL forces it)", name)
    else:
      log.warning("%s: stopping; the last completed step will be checkpointed", name)
    self._stop_requested, self._stop_signal = True, name
    self.engine.interrupt()

  def export(self, path: str):
    """Writes the current weights as an HF directory (process 0; every process of a multi-process run calls it)."""
    require_finite({"params": self.state.params}, f"refusing to export {path} at step {self.state.step}")
    params = self.state.params
    if distributed.multi_process():  # gathered where split across processes (collective), written once
      params = distributed.local_replica(params, distributed.local_mesh(self.mesh))
      if not distributed.is_main():
        return
    hf_io.save_pretrained(nnx.merge(self.graphdef, params), path, tokenizer=self.tokenizer)

  def write_summary(self) -> dict[str, Any]:
    st = self.state
    records = M.read_metrics(self.cfg.run_dir) if distributed.is_main() else []  # process 0 wrote them
    summary = {M.SUMMARY_INITIAL_ACCURACY: st.initial_acc, M.SUMMARY_BEST_ACCURACY: st.best_acc,
               M.SUMMARY_FINAL_ACCURACY: st.final_acc, "steps": st.step, M.SUMMARY_WALL_TIME_S: self.clocks.wall_s(),
               M.SUMMARY_TRAIN_TIME_S: self.clocks.train_s(),
               "algo": self.cfg.algo.name, "task": self.cfg.data.task,
               M.SUMMARY_SKIPPED_DATA_ROWS: self.task.skipped_rows,
               M.SUMMARY_DROPPED_PROMPTS: self.task.dropped_prompts,
               **st.counters, **M.best_within_budgets(records, self.cfg.train.time_budgets_h)}
    if distributed.is_main():
      M.write_summary(self.cfg.run_dir, summary)
    return summary

  def close(self):
    for closer in (self.metrics.close, self.engine.close, self.checkpointer.close,
                   *([self._lock.release] if self._lock is not None else [])):
      try:
        closer()
      except Exception:  # noqa: BLE001 - closing must not mask the original error
        log.exception("error while closing")
