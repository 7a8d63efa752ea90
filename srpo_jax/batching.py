"""Host-side batch assembly: ragged rollouts → padded, bucketed arrays for the jitted train step.

Shapes are padded up to buckets (powers of two) so a run compiles a small, known set of programs. The teacher
sequences of a micro-batch hold only its SDPO-routed rollouts (c rows, bucketed; none at all when no rollout of the
mini-batch is SDPO-routed), which is where SRPO saves teacher compute over SDPO.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from srpo_jax.train_step import MicroBatch


def bucket(n: int, minimum: int = 8) -> int:
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
  """Prompt left-padded to `prompt_len`, response right-padded to `resp_len`: ids/mask [B, P+R], resp mask [B, R]."""
  p_ids, p_mask = pad_left(prompts, prompt_len, pad)
  r_ids, r_mask = pad_right(responses, resp_len, pad, np.int32)
  return np.concatenate([p_ids, r_ids], 1), np.concatenate([p_mask, r_mask], 1), r_mask


def micro_batches(rows: np.ndarray, micro_size: int, *, ids, mask, resp, old_logp, roll_logp, adv, grpo, sdpo, dw,
                  teacher_prompts: dict[int, Sequence[int]], responses: Sequence[Sequence[int]], pad: int
                  ) -> MicroBatch:
  """Stacks the mini-batch `rows` (indices into the step's arrays) into [M, micro_size, ...] micro-batches.

  Teacher sequences: for each micro-batch, the rows with `sdpo` set, re-read after `teacher_prompts[row]`.
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
  c = bucket(c_max, minimum=1)
  t_prompt_len = teacher_prompt_len(teacher_prompts, [g[j] for g, js in zip(groups, per_mb) for j in js])
  t_ids, t_mask = zip(*(teacher_sequences([g[j] for j in js], teacher_prompts, responses, c, t_prompt_len,
                                          resp.shape[1], pad) for g, js in zip(groups, per_mb)))
  t_row = [np.asarray(list(js) + [0] * (c - len(js)), np.int32) for js in per_mb]
  t_valid = [np.arange(c) < len(js) for js in per_mb]
  return mb._replace(t_ids=np.stack(t_ids), t_mask=np.stack(t_mask), t_row=np.stack(t_row),
                     t_valid=np.stack(t_valid))


def teacher_prompt_len(teacher_prompts: dict[int, Sequence[int]], rows: Sequence[int]) -> int:
  """The bucketed teacher-prompt length P_T for these rollouts."""
  return bucket(max(len(teacher_prompts[int(r)]) for r in rows), 16)


def teacher_sequences(rows: Sequence[int], teacher_prompts: dict[int, Sequence[int]],
                      responses: Sequence[Sequence[int]], num_rows: int, prompt_len: int, resp_len: int,
                      pad: int) -> tuple[np.ndarray, np.ndarray]:
  """Rollouts `rows` re-read after their teacher prompts, padded with empty rows to `num_rows`: ids, mask
  [num_rows, P_T + R] (teacher prompt left-padded to `prompt_len`, the same response right-padded to `resp_len`)."""
  empty = [[]] * (num_rows - len(rows))
  ids, mask, _ = sequences([teacher_prompts[int(r)] for r in rows] + empty,
                           [responses[int(r)] for r in rows] + empty, prompt_len, resp_len, pad)
  return ids, mask
