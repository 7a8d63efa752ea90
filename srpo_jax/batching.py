"""Host-side batch assembly: ragged rollouts → padded, bucketed arrays for the jitted train step.

The batch layout is defined here (`MicroBatch`, `route_groups`); `train_step` consumes it. Shapes are padded up to
powers of two so a run compiles a small, known set of programs. Every row is RIGHT-padded: its prompt, its response,
then padding up to S = P + T positions (P, T: the buckets of the longest prompt and response), so each row's valid
tokens are a prefix (what cuDNN flash attention needs: per-row lengths instead of a mask) and row b's response starts
at position `start[b]` = its prompt length. Micro-batches
are route-pure (`route_groups`): a teacher micro-batch holds only SDPO-routed rollouts, each beside its teacher
sequence; a plain one has no teacher sequences and its program runs no teacher forward, which is where SRPO saves
teacher compute over SDPO.

Letters (srpo_jax/models/qwen3.py): B rollouts, S = P + T sequence, T response positions, C teacher rows,
M micro-batches.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np


class MicroBatch(NamedTuple):
  """The update's input: one micro-batch (a leading [M] axis on every field when stacked for `prepare`'s callers).

  Route-pure: either a *teacher* micro-batch (every real row SDPO-routed; teacher row b re-reads rollout b after its
  teacher prompt, so the student's and the teacher's head run in one pass per row) or a *plain* one (no SDPO-routed
  row, no teacher fields, no teacher forward in the compiled program)."""
  ids: np.ndarray        # [B, S] int32: prompt, response, padding
  mask: np.ndarray       # [B, S] bool: a prefix of each row
  start: np.ndarray      # [B] int32: where the response starts (the prompt length)
  resp: np.ndarray       # [B, T] bool: valid response tokens
  roll_logp: np.ndarray  # [B, T] float32: π_roll (from the rollout engine)
  adv: np.ndarray        # [B] float32
  grpo: np.ndarray       # [B] bool: takes the GRPO loss
  sdpo: np.ndarray       # [B] bool: takes the SDPO loss
  old_logp: Optional[np.ndarray] = None  # [B, T] float32: π_old from `prepare`; None on-policy (π_old = π_θ, detached)
  t_ids: Optional[np.ndarray] = None    # [B, S_T] int32: each row re-read after its teacher prompt (teacher batches)
  t_mask: Optional[np.ndarray] = None   # [B, S_T] bool
  t_start: Optional[np.ndarray] = None  # [B] int32: where the response starts in the teacher row

  @property
  def has_teacher(self) -> bool:
    return self.t_ids is not None


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


def teacher_sequences(rows: Sequence[int], teacher_prompts: dict[int, Sequence[int]],
                      responses: Sequence[Sequence[int]], resp_len: int, pad: int, *, num_rows: int,
                      prompt_len: Optional[int] = None) -> Sequences:
  """Rollouts `rows` re-read after their teacher prompts (each row: teacher prompt, the same response, padding up to
  `prompt_len` + `resp_len`; `prompt_len` defaults to the bucket of the longest teacher prompt), padded with empty
  rows to `num_rows`."""
  rows = [int(r) for r in rows]
  p_len = prompt_len or pow2_bucket(max(len(teacher_prompts[r]) for r in rows), 16)
  empty = [[]] * (num_rows - len(rows))
  return sequences([teacher_prompts[r] for r in rows] + empty, [responses[r] for r in rows] + empty, p_len,
                   resp_len, pad)


class StepArrays(NamedTuple):
  """The step's padded per-rollout arrays that micro-batches are cut from (all indexed by rollout)."""
  ids: np.ndarray
  mask: np.ndarray
  start: np.ndarray
  resp: np.ndarray
  roll_logp: np.ndarray
  adv: np.ndarray
  grpo: np.ndarray
  sdpo: np.ndarray
  old_logp: Optional[np.ndarray] = None  # None: on-policy, π_old = π_θ inside the update


def micro_batch(rows: Sequence[int], a: StepArrays, teacher_prompts: dict[int, Sequence[int]],
                responses: Sequence[Sequence[int]], pad: int, *, num_rows: Optional[int] = None,
                seq_len: Optional[int] = None, resp_len: Optional[int] = None,
                teacher_prompt_len: Optional[int] = None, with_teacher: bool = True,
                row_multiple: int = 1) -> MicroBatch:
  """One route-pure micro-batch of the rollouts `rows`: padded to `num_rows` rows (empty rows carry no loss), the
  first `seq_len` positions and `resp_len` response positions (right padding makes the cut exact; defaults: the
  buckets of these rows), and, when its rows are SDPO-routed (and `with_teacher`), their teacher sequences.

  Rows must all be SDPO-routed or all not (`route_groups` cuts them so): a micro-batch of both kinds would need a
  teacher row map and a second head pass over the SDPO rows, and its DW numerator could not be deferred.
  """
  rows = [int(r) for r in rows]
  kinds = {bool(a.sdpo[r]) for r in rows}
  if with_teacher and len(kinds) > 1:
    raise ValueError(f"micro_batch: rows {rows} mix SDPO-routed and other rollouts; cut them with route_groups")
  b = num_rows or padded_rows(len(rows), row_multiple)
  lengths = [int(a.mask[r].sum()) for r in rows]
  s = seq_len or seq_bucket(max(lengths))
  t = resp_len or pow2_bucket(max(int(a.resp[r].sum()) for r in rows), 8)

  def take(x, cols=None, fill=0):
    out = x[rows] if cols is None else x[rows][:, :cols]
    extra = np.full((b - len(rows),) + out.shape[1:], fill, out.dtype)
    return np.concatenate([out, extra])

  mb = MicroBatch(ids=take(a.ids, s, pad), mask=take(a.mask, s), start=take(a.start), resp=take(a.resp, t),
                  roll_logp=take(a.roll_logp, t), adv=take(a.adv), grpo=take(a.grpo), sdpo=take(a.sdpo),
                  old_logp=None if a.old_logp is None else take(a.old_logp, t))
  if not (with_teacher and kinds == {True}):
    return mb
  tr = teacher_sequences(rows, teacher_prompts, responses, t, pad, num_rows=b, prompt_len=teacher_prompt_len)
  return mb._replace(t_ids=tr.ids, t_mask=tr.mask, t_start=tr.start)


def row_bucket(n: int, micro_size: int, row_multiple: int = 1) -> int:
  """Rows of a fixed-size micro-batch that holds n ≤ micro_size rollouts (the last one of a route): the next multiple
  of an eighth of micro_size (and of the mesh's row shards), so a route's remainder wastes at most an eighth of a
  micro-batch and a run compiles at most 8 row counts per route."""
  step = -(-max(micro_size // 8, 1) // row_multiple) * row_multiple
  full = -(-micro_size // row_multiple) * row_multiple
  return min(-(-max(n, 1) // step) * step, full)


def route_groups(rows: Sequence[int], sdpo: np.ndarray, lengths: Sequence[int], *, micro_size: Optional[int] = None,
                 budget: Optional[int] = None, teacher_lengths: Optional[dict[int, int]] = None,
                 row_multiple: int = 1) -> list[list[int]]:
  """The route-pure micro-batches of a mini-batch's `rows`: the SDPO-routed rollouts first, then the others.

  Fixed size (`micro_size`): consecutive chunks of each route. Token budget (`budget`): each route packed by
  `token_budget_groups`, an SDPO-routed rollout costing its own tokens plus its teacher sequence's
  (`teacher_lengths[row]`: teacher prompt + response), since the micro-batch runs both forwards.
  `lengths[i]` is the token count of `rows[i]`. SDPO micro-batches come first so that the trainer can scale their
  gradient by the DW normaliser before the plain ones are added (`train_step`: deferred DW).
  """
  rows = np.asarray(rows)
  lengths = np.asarray(lengths)
  on = np.asarray(sdpo)[rows].astype(bool)
  out = []
  for kind in (True, False):
    r, n = rows[on == kind], lengths[on == kind]
    if not len(r):
      continue
    if budget is None:
      out += [list(map(int, r[i:i + micro_size])) for i in range(0, len(r), micro_size)]
    else:
      cost = [int(x) + (teacher_lengths[int(row)] if kind and teacher_lengths else 0) for row, x in zip(r, n)]
      out += token_budget_groups(r, cost, budget, row_multiple)
  return out


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
