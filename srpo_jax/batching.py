"""Host-side batch assembly: ragged rollouts → padded, bucketed arrays for the jitted train step.

The batch layout is defined here (`MicroBatch`, `TeacherRows`); `train_step` consumes it. Shapes are padded up to
powers of two so a run compiles a small, known set of programs. Every row is RIGHT-padded: its prompt, its response,
then padding up to S = P + T positions (P, T: the buckets of the longest prompt and response), so each row's valid
tokens are a prefix (what cuDNN flash attention needs: per-row lengths instead of a mask) and row b's response starts
at position `start[b]` = its prompt length. The
teacher sequences of a micro-batch hold only its SDPO-routed rollouts (C rows, bucketed; none at all when no rollout
of the mini-batch is SDPO-routed), which is where SRPO saves teacher compute over SDPO.

Letters (srpo_jax/models/qwen3.py): B rollouts, S = P + T sequence, T response positions, C teacher rows,
M micro-batches.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np


class MicroBatch(NamedTuple):
  """The update's input: M stacked micro-batches (a leading [M] axis on every field) or one micro-batch."""
  ids: np.ndarray        # [B, S] int32: prompt, response, padding
  mask: np.ndarray       # [B, S] bool: a prefix of each row
  start: np.ndarray      # [B] int32: where the response starts (the prompt length)
  resp: np.ndarray       # [B, T] bool: valid response tokens
  old_logp: np.ndarray   # [B, T] float32: π_old (from `prepare`)
  roll_logp: np.ndarray  # [B, T] float32: π_roll (from the rollout engine)
  adv: np.ndarray        # [B] float32
  grpo: np.ndarray       # [B] bool: takes the GRPO loss
  sdpo: np.ndarray       # [B] bool: takes the SDPO loss
  dw: np.ndarray         # [B, T] float32: DW weights (ones unless the method uses them)
  t_ids: Optional[np.ndarray] = None    # [C, S_T] int32: the SDPO rows re-read after their teacher prompts
  t_mask: Optional[np.ndarray] = None   # [C, S_T] bool
  t_start: Optional[np.ndarray] = None  # [C] int32: where the response starts in the teacher row
  t_row: Optional[np.ndarray] = None    # [C] int32: which of the B rows each teacher row belongs to
  t_valid: Optional[np.ndarray] = None  # [C] bool: False for padding rows


class TeacherRows(NamedTuple):
  """Teacher sequences for some rows of a batch, padded to a bucket of C rows."""
  ids: np.ndarray    # [C, S_T] int32
  mask: np.ndarray   # [C, S_T] bool
  start: np.ndarray  # [C] int32: where the response starts (the teacher prompt length)
  row: np.ndarray    # [C] int32: index into the batch; padding rows point at 0
  valid: np.ndarray  # [C] bool


def pow2_bucket(n: int, minimum: int = 8, multiple_of: int = 1) -> int:
  """Smallest power of two ≥ max(n, minimum), rounded up to a multiple of `multiple_of` (the row shards of a mesh:
  a batch split over ("data", "fsdp") needs its rows divisible by their product)."""
  n = max(int(n), minimum, 1)
  return -(-(1 << (n - 1).bit_length()) // multiple_of) * multiple_of


def pad_right(seqs: Sequence[Sequence[float]], length: int, pad, dtype) -> tuple[np.ndarray, np.ndarray]:
  out = np.full((len(seqs), length), pad, dtype)
  mask = np.zeros((len(seqs), length), bool)
  for i, s in enumerate(seqs):
    s = np.asarray(s)[:length]
    out[i, :len(s)] = s
    mask[i, :len(s)] = True
  return out, mask


def seq_bucket(n: int) -> int:
  """Length bucket of a micro-batch under a token budget: powers of two up to 1,024, then multiples of 1,024 (a
  10,240-token row pads to 10,240, not 16,384; at most 10 programs up to 10k tokens)."""
  return pow2_bucket(n, 16) if n <= 1024 else -(-int(n) // 1024) * 1024


def padded_rows(n: int, row_multiple: int = 1) -> int:
  """Rows of a micro-batch of n rollouts: the power-of-two bucket, a multiple of the mesh's row shards."""
  return pow2_bucket(n, 1, row_multiple)


class Sequences(NamedTuple):
  ids: np.ndarray    # [B, S] int32
  mask: np.ndarray   # [B, S] bool
  resp: np.ndarray   # [B, T] bool
  start: np.ndarray  # [B] int32


def sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], prompt_len: int, resp_len: int,
              pad: int) -> Sequences:
  """Right-padded rows `prompt + response + padding` of S = prompt_len + resp_len positions.

  Worked example (prompt_len 3, resp_len 2, pad 0): prompt [7, 8], response [9] -> ids [7, 8, 9, 0, 0],
  mask [1, 1, 1, 0, 0], resp [1, 0], start 2.
  """
  b, s = len(prompts), prompt_len + resp_len
  ids = np.full((b, s), pad, np.int32)
  mask = np.zeros((b, s), bool)
  start = np.zeros(b, np.int32)
  for i, (p, r) in enumerate(zip(prompts, responses)):
    if len(p) > prompt_len or len(r) > resp_len:
      raise ValueError(f"sequence {i}: prompt of {len(p)} / response of {len(r)} tokens exceed the buckets "
                       f"{prompt_len} / {resp_len}")
    row = list(p) + list(r)
    ids[i, :len(row)] = row
    mask[i, :len(row)] = True
    start[i] = len(p)
  resp = np.arange(resp_len)[None, :] < np.array([len(r) for r in responses], int).reshape(b, 1)
  return Sequences(ids=ids, mask=mask, resp=resp, start=start)


def teacher_rows(rows: Sequence[int], teacher_prompts: dict[int, Sequence[int]], responses: Sequence[Sequence[int]],
                 resp_len: int, pad: int, *, num_rows: Optional[int] = None, prompt_len: Optional[int] = None,
                 row_multiple: int = 1) -> TeacherRows:
  """Rollouts `rows` re-read after their teacher prompts (each row: teacher prompt, the same response, padding up to
  `prompt_len` + `resp_len`; `prompt_len` defaults to the bucket of the longest teacher prompt), padded with empty
  rows to `num_rows` (default: the power-of-two bucket of len(rows), a multiple of `row_multiple`)."""
  rows = [int(r) for r in rows]
  c = num_rows or pow2_bucket(len(rows), 1, row_multiple)
  p_len = prompt_len or pow2_bucket(max(len(teacher_prompts[r]) for r in rows), 16)
  empty = [[]] * (c - len(rows))
  seq = sequences([teacher_prompts[r] for r in rows] + empty, [responses[r] for r in rows] + empty, p_len,
                  resp_len, pad)
  row = np.asarray(rows + [0] * (c - len(rows)), np.int32)
  return TeacherRows(ids=seq.ids, mask=seq.mask, start=seq.start, row=row, valid=np.arange(c) < len(rows))


class StepArrays(NamedTuple):
  """The step's padded per-rollout arrays that micro-batches are cut from (all indexed by rollout)."""
  ids: np.ndarray
  mask: np.ndarray
  start: np.ndarray
  resp: np.ndarray
  old_logp: np.ndarray
  roll_logp: np.ndarray
  adv: np.ndarray
  grpo: np.ndarray
  sdpo: np.ndarray
  dw: np.ndarray


def micro_batch(rows: Sequence[int], a: StepArrays, teacher_prompts: dict[int, Sequence[int]],
                responses: Sequence[Sequence[int]], pad: int, *, num_rows: Optional[int] = None,
                seq_len: Optional[int] = None, resp_len: Optional[int] = None, num_teacher_rows: Optional[int] = None,
                teacher_prompt_len: Optional[int] = None, row_multiple: int = 1) -> MicroBatch:
  """One micro-batch of the rollouts `rows`: padded to `num_rows` rows (empty rows carry no loss), the first
  `seq_len` positions and `resp_len` response positions (right padding makes the cut exact: defaults, the buckets
  of these rows), and teacher rows for its SDPO-routed rollouts (none when it has none and `num_teacher_rows` is
  not given)."""
  rows = [int(r) for r in rows]
  b = num_rows or padded_rows(len(rows), row_multiple)
  lengths = [int(a.mask[r].sum()) for r in rows]
  s = seq_len or seq_bucket(max(lengths))
  t = resp_len or pow2_bucket(max(int(a.resp[r].sum()) for r in rows), 8)

  def take(x, cols=None, fill=0):
    out = x[rows] if cols is None else x[rows][:, :cols]
    extra = np.full((b - len(rows),) + out.shape[1:], fill, out.dtype)
    return np.concatenate([out, extra])

  mb = MicroBatch(ids=take(a.ids, s, pad), mask=take(a.mask, s), start=take(a.start), resp=take(a.resp, t),
                  old_logp=take(a.old_logp, t), roll_logp=take(a.roll_logp, t), adv=take(a.adv), grpo=take(a.grpo),
                  sdpo=take(a.sdpo), dw=take(a.dw, t, 1.0))
  local = [j for j, r in enumerate(rows) if a.sdpo[r]]
  if not local and num_teacher_rows is None:
    return mb
  c = num_teacher_rows or pow2_bucket(len(local), 1, row_multiple)
  p_len = teacher_prompt_len or pow2_bucket(max(len(teacher_prompts[rows[j]]) for j in local), 16)
  tr = (teacher_rows([rows[j] for j in local], teacher_prompts, responses, t, pad, num_rows=c, prompt_len=p_len)
        if local else _empty_teacher_rows(c, p_len + t, pad))
  return mb._replace(t_ids=tr.ids, t_mask=tr.mask, t_start=tr.start,
                     t_row=np.asarray(local + [0] * (c - len(local)), np.int32), t_valid=tr.valid)


def micro_batches(rows: np.ndarray, micro_size: int, *, ids, mask, start, resp, old_logp, roll_logp, adv, grpo, sdpo,
                  dw, teacher_prompts: dict[int, Sequence[int]], responses: Sequence[Sequence[int]], pad: int,
                  row_multiple: int = 1) -> MicroBatch:
  """Stacks the mini-batch `rows` (indices into the step's arrays) into [M, micro_size, ...] micro-batches of the
  step's full shape (one program for all of them: `train_step.update`'s scan).

  Teacher sequences: for each micro-batch, the rows with `sdpo` set, re-read after `teacher_prompts[row]`; every
  micro-batch gets the same C (bucket of the largest count) and the same teacher prompt length.
  """
  if len(rows) % micro_size:
    raise ValueError(f"mini-batch of {len(rows)} rollouts is not divisible by micro_batch_size={micro_size}")
  if micro_size % row_multiple:
    raise ValueError(f"micro_batch_size={micro_size} is not divisible by the mesh's {row_multiple} row shards "
                     "(mesh.data × mesh.fsdp): set optim.micro_batch_size to a multiple of it")
  a = StepArrays(ids=ids, mask=mask, start=start, resp=resp, old_logp=old_logp, roll_logp=roll_logp, adv=adv,
                 grpo=grpo, sdpo=sdpo, dw=dw)
  groups = rows.reshape(-1, micro_size)
  per_mb = [[int(r) for r in g if sdpo[r]] for g in groups]
  teacher = {}
  if any(per_mb):
    teacher = dict(num_teacher_rows=pow2_bucket(max(map(len, per_mb)), 1, row_multiple),
                   teacher_prompt_len=pow2_bucket(max(len(teacher_prompts[r]) for js in per_mb for r in js), 16))
  parts = [micro_batch(g, a, teacher_prompts, responses, pad, num_rows=micro_size, seq_len=ids.shape[1],
                       resp_len=resp.shape[1], **teacher) for g in groups]
  return MicroBatch(*(None if f[0] is None else np.stack(f) for f in zip(*parts)))


def token_budget_groups(rows: Sequence[int], lengths: Sequence[int], budget: int, row_multiple: int = 1
                        ) -> list[list[int]]:
  """`rows` grouped into micro-batches whose padded size per device fits `budget` tokens (verl's dynamic batch
  size, `ppo_max_token_len_per_gpu`): rows sorted by length (longest first) so a micro-batch holds rollouts of
  similar length and padding stays small; a micro-batch of n rows and longest row L costs
  padded_rows(n) / row_multiple × seq_bucket(L) tokens on each of the `row_multiple` devices that share it.

  A row longer than the budget gets a micro-batch of its own (the config check keeps that from happening).
  """
  order = sorted(range(len(rows)), key=lambda i: -lengths[i])
  groups: list[list[int]] = []
  for i in order:
    if groups:
      g = groups[-1]
      cost = padded_rows(len(g) + 1, row_multiple) // row_multiple * seq_bucket(lengths[g[0]])
      if cost <= budget:
        g.append(i)
        continue
    groups.append([i])
  return [[int(rows[i]) for i in g] for g in groups]


def padding_fraction(micro_batches: Sequence[MicroBatch]) -> float:
  """Share of the positions fed to the model that are padding (1 − valid tokens / all positions)."""
  total = sum(mb.mask.size for mb in micro_batches)
  return 1.0 - sum(int(mb.mask.sum()) for mb in micro_batches) / max(total, 1)


def _empty_teacher_rows(num_rows: int, length: int, pad: int) -> TeacherRows:
  return TeacherRows(ids=np.full((num_rows, length), pad, np.int32), mask=np.zeros((num_rows, length), bool),
                     start=np.zeros(num_rows, np.int32), row=np.zeros(num_rows, np.int32),
                     valid=np.zeros(num_rows, bool))
