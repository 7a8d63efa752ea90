"""Run metrics: `metrics.jsonl` + TensorBoard, `summary.json`, a progress line, and a text table of runs.

Files under the run directory:
  metrics.jsonl   one JSON object per line: {"step": int, "time_s": float, "<name>": float, ...}. Non-finite values
                  are written as the strings "nan" / "inf" / "-inf" (JSON has no NaN); `read_metrics` turns them back
                  into floats.
  tb/             TensorBoard event files (tensorboardX), one scalar per metric name.
  summary.json    `write_summary(run_dir, dict)`: the run's final figures (best accuracy within time budgets, ...).

The two clocks of a trainer run (`trainer.Clocks`; both carried across resumes through the checkpoint's meta):
  `time_s`        the TRAINING clock: wall-clock seconds since the run started, minus the time spent evaluating (and
                  exporting the best model that an evaluation finds); train.max_wall_time_h reads it.
  `time/wall_s`   (TIME_WALL_S) the wall clock: everything, evaluation, checkpoints and exports included.
summary.json has both at the end (SUMMARY_TRAIN_TIME_S, SUMMARY_WALL_TIME_S), and the paper's metric, the best
avg@16 within 1 h / 5 h / 10 h, on each clock (`best_within_budgets`: `best_at_<h>h_wall`, the paper's wall-clock
reading, and `best_at_<h>h_train`). The plots draw accuracy against both. A `MetricsWriter` used alone (no trainer)
writes its own elapsed wall-clock as `time_s`.

The metric names below are the contract between the trainer, the plots and the tests; use the constants.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import sys
import time
from typing import Any, Iterable, Mapping, Optional, Sequence, TextIO

import numpy as np

# -- metric names: every key the trainer logs is one of these (trainer, plot, summary and tests use the constants) ----
# evaluation
EVAL_ACCURACY = "eval/accuracy"  # avg@n_samples on the test split (mean accuracy over samples and questions)
EVAL_FAVOURITE_SHARE = "eval/favourite_answer_share"  # share of the model's favourite answer (the chance level)
EVAL_TIME_S = "eval/time_s"  # wall-clock of the evaluation
# rollouts and rewards
TRAIN_REWARD_MEAN = "train/reward_mean"  # mean reward of the step's rollouts
TRAIN_ACCURACY = "train/accuracy"  # fraction of the step's rollouts with r >= 0.5
TRAIN_NONFINITE_STEPS = "train/nonfinite_steps"  # training steps skipped so far for a non-finite loss or gradient
ROLLOUT_RESPONSE_LEN_MEAN = "rollout/response_len_mean"  # mean response length (tokens)
ROLLOUT_RESPONSE_LEN_MAX = "rollout/response_len_max"
ROLLOUT_TRUNCATION_RATE = "rollout/truncation_rate"  # share of responses cut at max_new_tokens
ROLLOUT_TOKENS_PER_S = "rollout/tokens_per_s"  # generated tokens per second of rollout time
ROLLOUT_LOGP_MISMATCH_ABS = "rollout/logp_mismatch_abs"  # mean |log π_old − log π_roll| (trainer vs engine)
ROLLOUT_LOGP_MISMATCH_MAX = "rollout/logp_mismatch_max"
BATCH_PADDING_FRAC = "batch/padding_frac"  # share of the positions fed to the update that are padding
ROLLOUT_IS_WEIGHT_MEAN = "rollout/is_weight_mean"  # truncated rollout IS weight min(π_old / π_roll, cap)
ROLLOUT_IS_WEIGHT_MAX = "rollout/is_weight_max"
# routing
ROUTE_FRAC_GRPO = "route/frac_grpo"  # correct rollouts that take the GRPO loss
ROUTE_FRAC_SDPO = "route/frac_sdpo"  # rollouts that take the SDPO loss (for SRPO: failed with a correct sibling)
ROUTE_FRAC_FALLBACK = "route/frac_fallback"  # failed rollouts that take the GRPO loss (no teacher information)
# teacher and DW weights (SDPO-routed tokens)
TEACHER_ENTROPY_MEAN = "teacher/entropy_mean"  # mean teacher entropy H over SDPO-routed tokens (nats)
TEACHER_PROMPTS_TRUNCATED = "teacher/prompts_truncated"  # teacher prompts whose sibling solution was cut this step
# SDPO-routed rollouts of this step whose teacher-prompt template alone exceeded algo.teacher_max_tokens: no teacher
# information, re-routed by the method as rollouts without a correct sibling (run total: summary "teacher_over_budget")
TEACHER_PROMPTS_OVER_BUDGET = "teacher/prompts_over_budget"
DW_MIN = "dw/min"  # entropy weights exp(−βH) / mean over the SDPO tokens of the mini-batch (srpo)
DW_MEAN = "dw/mean"
DW_MAX = "dw/max"
# losses and RL health
LOSS = "loss/total"  # the objective (mean over the step's optimizer steps)
LOSS_GRPO = "loss/grpo"  # mean GRPO token loss over GRPO-routed tokens
LOSS_SDPO = "loss/sdpo"  # mean SDPO token loss over SDPO-routed tokens
SDPO_JSD = "sdpo/jsd"  # mean top-k JSD over SDPO-routed tokens
POLICY_ENTROPY = "policy/entropy"  # mean student entropy over response tokens (nats)
POLICY_LOGP_MAX = "policy/logp_max"  # largest sampled-token log-prob (≤ 0; a positive value is a bug)
GRPO_CLIP_FRAC = "grpo/clip_frac"  # share of GRPO tokens where the clipped surrogate is active
GRPO_DUAL_CLIP_FRAC = "grpo/dual_clip_frac"  # share of GRPO tokens where the dual clip −c·A is active
GRPO_APPROX_KL = "grpo/approx_kl"  # mean log π_old − log π_θ over GRPO tokens
GRPO_RATIO_MEAN = "grpo/ratio_mean"  # mean policy ratio π_θ / π_old over GRPO tokens
OPTIM_LR = "optim/lr"
OPTIM_GRAD_NORM = "optim/grad_norm"  # global gradient norm before clipping (mean over the step's optimizer steps)
# wall-clock
TIME_STEP_S = "time/step_s"  # wall-clock of the whole training step (rollout + teacher + update)
TIME_ROLLOUT_S = "time/rollout_s"
TIME_ROUTE_S = "time/reward_route_s"
TIME_TEACHER_S = "time/teacher_s"  # teacher prompts, and the π_old program on off-policy steps
TIME_UPDATE_S = "time/update_s"
TIME_REFIT_S = "time/refit_s"  # EMA teacher update and rollout-engine weight refit
TIME_TOKENS_PER_S = "time/tokens_per_s"  # response tokens per second of the whole step
TIME_WALL_S = "time/wall_s"  # the wall clock, evaluation included (`time_s` is the training clock: module docstring)

# summary.json keys
SUMMARY_INITIAL_ACCURACY = "initial_eval_accuracy"
SUMMARY_BEST_ACCURACY = "best_eval_accuracy"
SUMMARY_FINAL_ACCURACY = "final_eval_accuracy"
SUMMARY_TRAIN_TIME_S = "train_time_s"  # the training clock at the end (evaluation excluded)
SUMMARY_WALL_TIME_S = "wall_time_s"  # the wall clock at the end (everything)
SUMMARY_SKIPPED_DATA_ROWS = "skipped_data_rows"  # malformed data rows skipped under data.on_error=skip (both splits)
SUMMARY_DROPPED_PROMPTS = "dropped_long_prompts"  # rows dropped as longer than data.max_prompt_tokens (both splits)

PLOT_KEYS = (EVAL_ACCURACY, TRAIN_REWARD_MEAN, ROUTE_FRAC_GRPO, ROUTE_FRAC_SDPO, ROUTE_FRAC_FALLBACK,
             TEACHER_ENTROPY_MEAN, ROLLOUT_RESPONSE_LEN_MEAN, TIME_STEP_S)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TB_DIR = "tb"

_NONFINITE_TO_STR = {math.inf: "inf", -math.inf: "-inf"}
_STR_TO_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def to_json_value(v: Any) -> Any:
  """A metric value as JSON: numbers (numpy / jax scalars included) -> float or int, non-finite -> "nan"/"inf"."""
  if isinstance(v, (bool, np.bool_)):
    return bool(v)
  if isinstance(v, (str, type(None))):
    return v
  if isinstance(v, numbers.Integral):
    return int(v)
  if hasattr(v, "shape") and hasattr(v, "dtype"):  # jax / numpy 0-d arrays (a host sync for jax)
    v = np.asarray(v)
    if v.size != 1:
      raise ValueError(f"metric values must be scalars, got an array of shape {v.shape}")
    v = v.item()
    if isinstance(v, int) and not isinstance(v, bool):
      return v
  f = float(v)
  if math.isnan(f):
    return "nan"
  return _NONFINITE_TO_STR.get(f, f)


def from_json_value(v: Any) -> Any:
  return _STR_TO_NONFINITE.get(v, v) if isinstance(v, str) else v


def _json_clean(obj: Any) -> Any:
  """Recursively converts a summary-like object into JSON-safe values."""
  if isinstance(obj, Mapping):
    return {str(k): _json_clean(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_json_clean(v) for v in obj]
  return to_json_value(obj)


def _atomic_write_text(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
  """The records of run_dir/metrics.jsonl, non-finite strings back to floats; a torn last line is skipped."""
  path = os.path.join(run_dir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut short by a crash mid-write
      records.append({k: from_json_value(v) for k, v in rec.items()})
  return records


def truncate_metrics(run_dir: str, last_step: int) -> int:
  """Rewrites run_dir/metrics.jsonl keeping records with step <= last_step (a resumed run redoes the rest).

  Returns the number of records dropped. Atomic: the file is rewritten to a temporary name and renamed.
  """
  path = os.path.join(run_dir, METRICS_FILE)
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        dropped += bool(line.strip())
        continue
      if rec.get("step", 0) <= last_step:
        kept.append(json.dumps(rec))
      else:
        dropped += 1
  _atomic_write_text(path, "".join(k + "\n" for k in kept))
  return dropped


class MetricsWriter:
  """Appends one record per `write` to run_dir/metrics.jsonl (flushed each time) and to TensorBoard.

  Args:
    run_dir: the run directory (created if missing).
    resume_step: None for a new run (an existing metrics.jsonl is replaced); the resumed checkpoint's step
      otherwise: records after it are dropped and writing appends.
    time_offset_s: wall-clock already spent before this process (from the checkpoint's meta); `write` without an
      explicit time_s reports offset + time since construction.
    enabled: False on non-zero processes of a multi-host run (writes nothing); default: jax.process_index() == 0.
    tensorboard: also write TensorBoard events under run_dir/tb.
  """

  def __init__(self, run_dir: str, resume_step: Optional[int] = None, time_offset_s: float = 0.0,
               enabled: Optional[bool] = None, tensorboard: bool = True):
    if enabled is None:
      import jax  # Local: the rest of this module (plots, tables) needs no jax.
      enabled = jax.process_index() == 0
    self.run_dir = run_dir
    self.enabled = enabled
    self._t0 = time.monotonic()
    self._offset = float(time_offset_s)
    self._file: Optional[TextIO] = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, METRICS_FILE)
    if resume_step is None:
      self._file = open(path, "w")
    else:
      truncate_metrics(run_dir, resume_step)
      self._file = open(path, "a")
    if tensorboard:
      from tensorboardX import SummaryWriter
      # purge_step hides events after the resumed step that an interrupted process had already written.
      purge = None if resume_step is None else resume_step + 1
      self._tb = SummaryWriter(logdir=os.path.join(run_dir, TB_DIR), purge_step=purge)

  def elapsed_s(self) -> float:
    """Wall-clock of the run so far, including time before a resume."""
    return self._offset + time.monotonic() - self._t0

  def write(self, step: int, metrics: Mapping[str, Any], time_s: Optional[float] = None) -> dict[str, Any]:
    """Logs `metrics` (name -> scalar) at `step`; returns the JSON record written."""
    record: dict[str, Any] = {"step": int(step), "time_s": float(self.elapsed_s() if time_s is None else time_s)}
    for k, v in metrics.items():
      if k in ("step", "time_s"):
        raise ValueError(f"metric name {k!r} is reserved")
      record[k] = to_json_value(v)
    if not self.enabled:
      return record
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(from_json_value(v), (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, float(from_json_value(v)), global_step=int(step))
      self._tb.flush()
    return record

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def write_summary(run_dir: str, summary: Mapping[str, Any]) -> str:
  """Writes run_dir/summary.json atomically (non-finite floats as strings); returns its path."""
  os.makedirs(run_dir, exist_ok=True)
  path = os.path.join(run_dir, SUMMARY_FILE)
  _atomic_write_text(path, json.dumps(_json_clean(summary), indent=2, sort_keys=True) + "\n")
  return path


def read_summary(run_dir: str) -> dict[str, Any]:
  """run_dir/summary.json, or {} when there is none."""
  path = os.path.join(run_dir, SUMMARY_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return {k: from_json_value(v) for k, v in json.load(f).items()}


# The two clocks a time budget can be read on (module docstring): the record key each one is in.
CLOCKS = {"wall": TIME_WALL_S, "train": "time_s"}


def budget_key(hours: float, clock: str) -> str:
  """summary.json's key of the best eval accuracy within `hours` on `clock` ("wall" or "train"): best_at_1h_wall."""
  if clock not in CLOCKS:
    raise ValueError(f"budget_key: clock must be one of {sorted(CLOCKS)}, got {clock!r}")
  return f"best_at_{hours:g}h_{clock}"


def best_within_budgets(records: Iterable[Mapping[str, Any]], budgets_h: Sequence[float],
                        key: str = EVAL_ACCURACY) -> dict[str, Optional[float]]:
  """The paper's metric: per budget and clock, the best `key` among the records written within the budget.

  On the wall clock (`time/wall_s`: the paper reads its budgets so) a record counts at the time it was written,
  after the evaluation that produced it; on the training clock (`time_s`) evaluation time is not counted at all.
  Returns {budget_key(h, clock): value or None}, e.g. {"best_at_1h_wall": 0.62, "best_at_1h_train": 0.64, ...}.
  """
  records = [r for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
  out = {}
  for h in budgets_h:
    for clock, at in CLOCKS.items():
      inside = [r[key] for r in records if isinstance(r.get(at), (int, float)) and r[at] <= h * 3600.0]
      out[budget_key(h, clock)] = max(inside) if inside else None
  return out


# ---------------------------------------------------------------------------------------------------------------------
# Progress display
# ---------------------------------------------------------------------------------------------------------------------
class Progress:
  """Step progress: a tqdm bar on a terminal; otherwise one plain line every `log_every` steps (and the last).

  Shows the step, train reward, the latest eval accuracy, rollout tokens/s and s/step.
  """

  def __init__(self, total_steps: int, initial_step: int = 0, log_every: int = 1,
               stream: Optional[TextIO] = None, force_tty: Optional[bool] = None, enabled: bool = True):
    self.total = total_steps
    self.enabled = enabled  # False: shows nothing (the other processes of a multi-process run)
    self.log_every = max(1, log_every)
    self.stream = stream or sys.stderr
    tty = enabled and (self.stream.isatty() if force_tty is None else force_tty)
    self._last_acc: Optional[float] = None
    self._bar = None
    if tty:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=initial_step, file=self.stream, dynamic_ncols=True, unit="step")

  def _fields(self, metrics: Mapping[str, Any]) -> dict[str, str]:
    acc = metrics.get(EVAL_ACCURACY)
    if isinstance(acc, (int, float)):
      self._last_acc = float(acc)
    fields = {}
    for name, key, fmt in (("reward", TRAIN_REWARD_MEAN, "{:.3f}"), ("tok/s", ROLLOUT_TOKENS_PER_S, "{:.0f}"),
                           ("s/step", TIME_STEP_S, "{:.2f}")):
      v = metrics.get(key)
      if isinstance(v, (int, float)):
        fields[name] = fmt.format(v)
    if self._last_acc is not None:
      fields["acc"] = f"{self._last_acc:.3f}"
    return fields

  def update(self, step: int, metrics: Mapping[str, Any]) -> Optional[str]:
    """Reports training step `step` (1-based, done); returns the plain line when one was printed."""
    fields = self._fields({k: from_json_value(to_json_value(v)) for k, v in metrics.items()})
    if self._bar is not None:
      self._bar.set_postfix(fields, refresh=False)
      self._bar.update(step - self._bar.n)
      return None
    if not self.enabled or (step % self.log_every and step != self.total):
      return None
    line = f"step {step}/{self.total} | " + " | ".join(f"{k} {v}" for k, v in fields.items())
    print(line, file=self.stream, flush=True)
    return line

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


# ---------------------------------------------------------------------------------------------------------------------
# Text table of several runs' summaries
# ---------------------------------------------------------------------------------------------------------------------
def _fmt_cell(v: Any) -> str:
  if v is None:
    return "-"
  if isinstance(v, bool):
    return str(v)
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def summary_table(summary_dicts_by_run: Mapping[str, Mapping[str, Any]],
                  columns: Optional[Sequence[str]] = None) -> str:
  """A fixed-width text table: one row per run, one column per summary key (all keys, sorted, by default).

  Nested values are skipped unless named in `columns`; a run without a key shows "-".
  """
  if columns is None:
    keys = {k for s in summary_dicts_by_run.values() for k, v in s.items() if not isinstance(v, (Mapping, list))}
    columns = sorted(keys)
  header = ["run", *columns]
  rows = [[str(run), *(_fmt_cell(s.get(c)) for c in columns)] for run, s in summary_dicts_by_run.items()]
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

  def fmt(row):
    return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
  sep = "  ".join("-" * w for w in widths)
  return "\n".join([fmt(header), sep, *(fmt(r) for r in rows)])
