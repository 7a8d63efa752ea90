"""verl's balance_batch (srpo_jax/balance.py) against a second implementation written here from verl's source
(ray_trainer `_balance_batch`, utils/seqlen_balancing.py `karmarkar_karp` / `get_seqlen_balanced_partitions`, and
the dispatch of the reordered batch to the workers, each cutting its share into mini-batches), on fixed lengths;
and the trainer's mini-batches of a step with and without optim.balance_batch."""
import heapq

import numpy as np
import pytest

from srpo_jax import balance
from srpo_jax import trainer as T
from srpo_jax.config import CheckpointConfig, Config, OptimConfig, RolloutConfig, TrainConfig, AlgoConfig


# ---------------------------------------------------------------------------------------------------------------------
# The reference: verl's structure (a heap of partial solutions, each a list of bins that compare by sum, size, items)
# ---------------------------------------------------------------------------------------------------------------------
class _Bin:
  def __init__(self):
    self.total, self.members = 0, []

  def put(self, index, value):
    self.members.append((index, value))
    self.total += value

  def absorb(self, other):
    for index, value in other.members:
      self.put(index, value)

  def __lt__(self, other):
    if self.total != other.total:
      return self.total < other.total
    if len(self.members) != len(other.members):
      return len(self.members) < len(other.members)
    return self.members < other.members


class _Partial:
  def __init__(self, members, k):
    self.k, self.bins = k, [_Bin() for _ in range(k)]
    for b, (index, value) in zip(self.bins, members):
      b.put(index, value)
    self.bins.sort(reverse=True)

  @property
  def spread(self):
    return self.bins[0].total - self.bins[-1].total

  def combine(self, other):
    for i in range(self.k):
      self.bins[i].absorb(other.bins[self.k - 1 - i])
    self.bins.sort(reverse=True)

  def __lt__(self, other):  # a min-heap that yields the largest spread first, then the largest top bin
    if self.spread != other.spread:
      return self.spread > other.spread
    return self.bins[0] > other.bins[0]


def verl_partitions(values, k):
  ascending = sorted((v, i) for i, v in enumerate(values))
  heap = []
  for start in range(0, len(ascending), k):
    heapq.heappush(heap, _Partial([(i, v) for v, i in ascending[start:start + k]], k))
  while len(heap) > 1:
    first, second = heapq.heappop(heap), heapq.heappop(heap)
    first.combine(second)
    heapq.heappush(heap, first)
  return [sorted(i for i, _ in b.members) for b in heap[0].bins]


def verl_reorder(lengths, k):
  """`_balance_batch`: workloads, equal-size partitions, each short-long-short, concatenated."""
  work = [24576 * n + n * n for n in lengths]
  out = []
  for part in verl_partitions(work, k):
    part = sorted(part, key=lambda x: (work[x], x))
    out.extend(part[::2] + part[1::2][::-1])
  return out


def verl_mini_batches(reordered, k, mini_batch):
  """The dispatch: worker r gets the r-th contiguous chunk and splits it into mini-batch / k rollouts each."""
  chunk = len(reordered) // k
  workers = [reordered[r * chunk:(r + 1) * chunk] for r in range(k)]
  per = mini_batch // k
  return [sorted(x for w in workers for x in w[m * per:(m + 1) * per]) for m in range(chunk // per)]


# Fixed lengths: a GRPO paper step (32 prompts × 8 rollouts, 8 workers, mini-batches of 8 prompts) with long-tailed
# lengths and ties (equal lengths exercise every tie-break), and small odd cases.
_RNG = np.random.default_rng(23)
PAPER_STEP = [int(x) for x in np.minimum(_RNG.lognormal(7.0, 0.8, 256), 10240).astype(int) + 300]
PAPER_STEP[10:20] = [1000] * 10
CASES = [(PAPER_STEP, 8, 64), ([5, 1, 4, 1, 5, 9, 2, 6], 2, 4), ([7] * 12, 3, 6), (list(range(40, 0, -1)), 4, 40),
         ([3, 3, 1, 1, 2, 2, 8, 8], 1, 4)]


@pytest.mark.parametrize("lengths,k,mini_batch", CASES)
def test_order_and_mini_batches_equal_verl(lengths, k, mini_batch):
  want = verl_reorder(lengths, k)
  assert balance.order(lengths, k) == want
  assert sorted(want) == list(range(len(lengths)))
  got = balance.mini_batches(lengths, k, mini_batch)
  assert [sorted(m.tolist()) for m in got] == verl_mini_batches(want, k, mini_batch)


def test_paper_grpo_mini_batches_mix_prompts_and_skew_lengths():
  """What the issue measured: each official mini-batch of a GRPO paper step mixes most of the 32 prompts, and the
  first and last hold short rollouts, the middle two long ones (a partition is short-long-short)."""
  groups = np.repeat(np.arange(32), 8)
  lengths = np.asarray(PAPER_STEP)
  mbs = balance.mini_batches(PAPER_STEP, 8, 64)
  prompts = [len(set(groups[m])) for m in mbs]
  means = [lengths[m].mean() / lengths.mean() for m in mbs]
  assert min(prompts) > 16, prompts  # sampling order: 8 whole prompts each
  assert means[0] < 1 and means[3] < 1 and means[1] > 1 and means[2] > 1, means
  # Every worker's share of a mini-batch is balanced with the others' (what balance_batch is for).
  per_worker = [lengths[m].reshape(8, 8).sum(axis=1) for m in mbs]
  assert all(w.max() / w.min() < 1.5 for w in per_worker)


def _cfg(**optim):
  return Config(run_dir="unused", train=TrainConfig(steps=1), checkpoint=CheckpointConfig(every_steps=1),
                algo=AlgoConfig(name="grpo"), rollout=RolloutConfig(prompts_per_step=4, n=4),
                optim=OptimConfig(mini_batch_prompts=1, **optim))


def test_trainer_mini_batches_follow_the_option():
  lengths = np.array([9, 3, 12, 5, 7, 7, 1, 30, 2, 8, 6, 4, 11, 10, 13, 5])
  batch = T.StepBatch(ids=None, mask=np.arange(32)[None, :] < lengths[:, None], start=None, resp=None,
                      roll_logp=None)
  plain = T.mini_batch_rows(batch, _cfg())
  assert [m.tolist() for m in plain] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]  # groups
  balanced = T.mini_batch_rows(batch, _cfg(balance_batch=True, balance_batch_ranks=2))
  assert [m.tolist() for m in balanced] == [m.tolist() for m in balance.mini_batches(lengths, 2, 4)]
  assert sorted(np.concatenate(balanced).tolist()) == list(range(16))
  assert any(len(set(m // 4)) > 1 for m in balanced)  # whole groups no longer
