"""Host-side batch assembly: ragged rollouts → padded, bucketed arrays for the jitted train step.

The batch layout is defined here (`MicroBatch`, `TeacherRows`); `train_step` consumes it. Shapes are padded up to
powers of two so a run compiles a small, known set of programs. Every sequence is the prompt left-padded to P
positions followed by the response right-padded to T positions, so the response always starts at column P. The
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
  ids: np.ndarray        # [B, S] int32
  mask: np.ndarray       # [B, S] bool
  resp: np.ndarray       # [B, T] bool: valid response tokens
  old_logp: np.ndarray   # [B, T] float32: π_old (from `prepare`)
  roll_logp: np.ndarray  # [B, T] float32: π_roll (from the rollout engine)
  adv: np.ndarray        # [B] float32
  grpo: np.ndarray       # [B] bool: takes the GRPO loss
  sdpo: np.ndarray       # [B] bool: takes the SDPO loss
  dw: np.ndarray         # [B, T] float32: DW weights (ones unless the method uses them)
  t_ids: Optional[np.ndarray] = None    # [C, S_T] int32: the SDPO rows re-read after their teacher prompts
  t_mask: Optional[np.ndarray] = None   # [C, S_T] bool
  t_row: Optional[np.ndarray] = None    # [C] int32: which of the B rows each teacher row belongs to
  t_valid: Optional[np.ndarray] = None  # [C] bool: False for padding rows


class TeacherRows(NamedTuple):
  """Teacher sequences for some rows of a batch, padded to a bucket of C rows."""
  ids: np.ndarray    # [C, S_T] int32
  mask: np.ndarray   # [C, S_T] bool
  row: np.ndarray    # [C] int32: index into the batch; padding rows point at 0
  valid: np.ndarray  # [C] bool


def pow2_bucket(n: int, minimum: int = 8) -> int:
  """Smallest power of two ≥ max(n, minimum)."""
  n = max(int(n), minimum, 1)
  return 1 << (n - 1).bit_length()


def pad_left(seqs: Sequence[Sequence[int]], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
  """[B, length] ids (each sequence right-aligned) and its validity mask."""
  ids = np.full((len(seqs), length), pad, np.int32)
  mask = np.zeros((len(seqs), length), bool)
  for i, s in enumerate(seqs):
    if len(s) > length:
      raise ValueError(f"sequence {i} has {len(s)} tokens, more than the bucket length {length}")
    if len(s):
      ids[i, length - len(s):] = s
      mask[i, length - len(s):] = True
  return ids, mask


def pad_right(seqs: Sequence[Sequence[float]], length: int, pad, dtype) -> tuple[np.ndarray, np.ndarray]:
  out = np.full((len(seqs), length), pad, dtype)
  mask = np.zeros((len(seqs), length), bool)
  for i, s in enumerate(seqs):
    s = np.asarray(s)[:length]
    out[i, :len(s)] = s
    mask[i, :len(s)] = True
  return out, mask


def sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], prompt_len: int, resp_len: int,
              pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Prompt left-padded to `prompt_len`, response right-padded to `resp_len`: ids/mask [B, P+T], resp mask [B, T]."""
  p_ids, p_mask = pad_left(prompts, prompt_len, pad)
  r_ids, r_mask = pad_right(responses, resp_len, pad, np.int32)
  return np.concatenate([p_ids, r_ids], 1), np.concatenate([p_mask, r_mask], 1), r_mask


def teacher_rows(rows: Sequence[int], teacher_prompts: dict[int, Sequence[int]], responses: Sequence[Sequence[int]],
                 resp_len: int, pad: int, *, num_rows: Optional[int] = None,
                 prompt_len: Optional[int] = None) -> TeacherRows:
  """Rollouts `rows` re-read after their teacher prompts: the teacher prompt left-padded to `prompt_len` (default:
  the bucket of the longest), then the same response right-padded to `resp_len`; padded with empty rows to
  `num_rows` (default: the power-of-two bucket of len(rows))."""
  rows = [int(r) for r in rows]
  c = num_rows or pow2_bucket(len(rows), 1)
  p_len = prompt_len or pow2_bucket(max(len(teacher_prompts[r]) for r in rows), 16)
  empty = [[]] * (c - len(rows))
  ids, mask, _ = sequences([teacher_prompts[r] for r in rows] + empty, [responses[r] for r in rows] + empty, p_len,
                           resp_len, pad)
  row = np.asarray(rows + [0] * (c - len(rows)), np.int32)
  return TeacherRows(ids=ids, mask=mask, row=row, valid=np.arange(c) < len(rows))


def micro_batches(rows: np.ndarray, micro_size: int, *, ids, mask, resp, old_logp, roll_logp, adv, grpo, sdpo, dw,
                  teacher_prompts: dict[int, Sequence[int]], responses: Sequence[Sequence[int]], pad: int
                  ) -> MicroBatch:
  """Stacks the mini-batch `rows` (indices into the step's arrays) into [M, micro_size, ...] micro-batches.

  Teacher sequences: for each micro-batch, the rows with `sdpo` set, re-read after `teacher_prompts[row]`; every
  micro-batch gets the same C (bucket of the largest count) and the same teacher prompt length.
  """
  if len(rows) % micro_size:
    raise ValueError(f"mini-batch of {len(rows)} rollouts is not divisible by micro_batch_size={micro_size}")
  groups = rows.reshape(-1, micro_size)
  take = lambda x: np.stack([x[g] for g in groups])
  mb = MicroBatch(ids=take(ids), mask=take(mask), resp=take(resp), old_logp=take(old_logp),
                  roll_logp=take(roll_logp), adv=take(adv), grpo=take(grpo), sdpo=take(sdpo), dw=take(dw))
  per_mb = [[j for j, r in enumerate(g) if sdpo[r]] for g in groups]
  c_max = max(len(x) for x in per_mb)
  if c_max == 0:
    return mb
  c = pow2_bucket(c_max, minimum=1)
  p_len = pow2_bucket(max(len(teacher_prompts[int(g[j])]) for g, js in zip(groups, per_mb) for j in js), 16)
  parts = []
  for g, js in zip(groups, per_mb):
    # Local row indices within the micro-batch: build with the step-level rows, then renumber.
    t = teacher_rows([g[j] for j in js], teacher_prompts, responses, resp.shape[1], pad, num_rows=c,
                     prompt_len=p_len) if js else _empty_teacher_rows(c, p_len + resp.shape[1], pad)
    parts.append(t._replace(row=np.asarray(list(js) + [0] * (c - len(js)), np.int32)))
  return mb._replace(t_ids=np.stack([t.ids for t in parts]), t_mask=np.stack([t.mask for t in parts]),
                     t_row=np.stack([t.row for t in parts]), t_valid=np.stack([t.valid for t in parts]))


def _empty_teacher_rows(num_rows: int, length: int, pad: int) -> TeacherRows:
  return TeacherRows(ids=np.full((num_rows, length), pad, np.int32), mask=np.zeros((num_rows, length), bool),
                     row=np.zeros(num_rows, np.int32), valid=np.zeros(num_rows, bool))
