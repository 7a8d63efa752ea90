"""verl's `balance_batch` (`trainer.balance_batch`, on in the official configs): how a step's rollouts are ordered
before verl cuts them into mini-batches, and so which rollouts each of its mini-batches holds.

What verl does (ray_trainer `_balance_batch`, utils/seqlen_balancing.py), for `ranks` data-parallel workers:
1. each rollout's workload is `24576·L + L²`, L its sequence length (prompt + response tokens, the attention mask's
   sum): an attention-FLOP estimate;
2. the rollouts are split into `ranks` partitions of equal size and balanced total workload by the Karmarkar–Karp
   largest differencing method (`partitions`); each partition's indices sorted;
3. each partition is reordered short-long-short (sorted by workload, the even places rising then the odd places
   falling), and the partitions are concatenated: that is the new order (`order`);
4. verl hands partition r to worker r, and each worker cuts its share into consecutive mini-batches of
   `mini-batch rollouts / ranks`: mini-batch m is the m-th slice of every partition (`mini_batches`).

So with several mini-batches per step (GRPO's 4) an official mini-batch mixes most of the step's prompts and its
lengths are skewed: the slices at both ends of each partition hold its shortest rollouts, the middle ones its
longest. Routing and advantages are computed before, on whole prompt groups; only the mini-batch membership follows.
"""
from __future__ import annotations

import dataclasses
import functools
import heapq
from typing import Sequence

import numpy as np


def workload(lengths: Sequence[int]) -> list[int]:
  """verl's `calculate_workload`: 24576·L + L² per sequence of L tokens (a 7B model's dense + attention FLOPs)."""
  return [24576 * int(n) + int(n) ** 2 for n in lengths]


@dataclasses.dataclass
class _Part:
  """One partition under construction: (index, value) items and their total."""
  items: list[tuple[int, int]]
  total: int

  def key(self):  # verl's order of partitions: total, then item count, then the items themselves
    return self.total, len(self.items), self.items


def _sorted_parts(parts: list[_Part]) -> list[_Part]:
  return sorted(parts, key=_Part.key, reverse=True)


def _spread(parts: list[_Part]) -> int:
  return parts[0].total - parts[-1].total


def _pops_first(a: list[_Part], b: list[_Part]) -> int:
  """The differencing order: the partial solution with the larger spread first, then the one whose largest
  partition is larger (a strict order: partitions of different solutions never hold the same items)."""
  if _spread(a) != _spread(b):
    return -1 if _spread(a) > _spread(b) else 1
  return -1 if a[0].key() > b[0].key() else 1


def partitions(values: Sequence[int], ranks: int) -> list[list[int]]:
  """Indices of `values` in `ranks` equal-size partitions of balanced sums (Karmarkar–Karp, as verl's
  `get_seqlen_balanced_partitions(..., equal_size=True)`), each partition's indices ascending."""
  if ranks < 1 or len(values) % ranks:
    raise ValueError(f"balance: {len(values)} rollouts do not split into {ranks} equal partitions")
  ranked = sorted((int(v), i) for i, v in enumerate(values))
  key = functools.cmp_to_key(_pops_first)
  # Each run of `ranks` consecutive values (ascending) starts as one partial solution, one value per partition.
  heap = [(key(s), s) for s in (_sorted_parts([_Part([(i, v)], v) for v, i in ranked[j:j + ranks]])
                                for j in range(0, len(ranked), ranks))]
  heapq.heapify(heap)
  while len(heap) > 1:
    a, b = heapq.heappop(heap)[1], heapq.heappop(heap)[1]
    # The largest partition of one takes the smallest of the other, and so on.
    merged = _sorted_parts([_Part(p.items + q.items, p.total + q.total) for p, q in zip(a, reversed(b))])
    heapq.heappush(heap, (key(merged), merged))
  return [sorted(i for i, _ in p.items) for p in heap[0][1]]


def order(lengths: Sequence[int], ranks: int) -> list[int]:
  """The rollouts in verl's balanced order: the partitions one after the other, each short-long-short."""
  work = workload(lengths)
  out = []
  for part in partitions(work, ranks):
    by_work = sorted(part, key=lambda i: (work[i], i))
    out += by_work[::2] + by_work[1::2][::-1]
  return out


def mini_batches(lengths: Sequence[int], ranks: int, rollouts_per_mini_batch: int) -> list[np.ndarray]:
  """The rollouts of each official mini-batch (step 4 of the module docstring), worker by worker."""
  if rollouts_per_mini_batch % ranks or len(lengths) % rollouts_per_mini_batch:
    raise ValueError(f"balance: mini-batches of {rollouts_per_mini_batch} rollouts do not split over {ranks} workers "
                     f"and {len(lengths)} rollouts")
  per_rank, share = len(lengths) // ranks, rollouts_per_mini_batch // ranks
  workers = np.asarray(order(lengths, ranks)).reshape(ranks, per_rank)
  return [workers[:, m * share:(m + 1) * share].reshape(-1) for m in range(per_rank // share)]
