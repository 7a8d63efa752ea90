"""A rollout engine across the processes of a multi-process run: each process samples its share, all get the whole.

`ProcessShardedEngine(inner)` wraps the engine of one process (a JaxEngine on the process's own devices, or the
client of the SGLang server of its node). `generate(prompts, sampling, n)` takes the whole list of prompts (the same
on every process), samples this process's contiguous share with `inner` — `SamplingParams.first_prompt` set to the
share's offset, so every prompt keeps the random stream it has in a single call — and returns every process's
completions, exchanged with one all-gather of token ids and log-probs padded to `max_new_tokens`. Every process
thus holds the same step, and the deterministic host code that follows (rewards, routing, teacher prompts) agrees
everywhere without another message.

Weights: `update_weights(params)` gets the trainer's global parameters and hands `inner` a process-local copy
(`to_local`, e.g. `distributed.local_replica`). Stops: `interrupt()` does not reach `inner`: a process that
abandoned its rollouts would leave the others waiting in the all-gather; the trainer stops multi-process runs at
step boundaries, where the processes agree (`distributed.any_process`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from srpo_jax import distributed
from srpo_jax.rollout.engine import Completion, RolloutEngine, SamplingParams

_FINISH = ("length", "stop")  # finish reason <-> its code in the exchange


class ProcessShardedEngine(RolloutEngine):

  def __init__(self, inner: RolloutEngine, to_local: Callable[[Any], Any] = lambda params: params):
    self.inner, self._to_local = inner, to_local

  def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams,
               n: int = 1) -> list[list[Completion]]:
    num = len(prompt_token_ids)
    lo, hi, size = distributed.share(num)
    mine = list(prompt_token_ids[lo:hi])
    # Short or empty shares still send `size` prompts (all-gather needs one shape): copies of a real one, dropped.
    filler = prompt_token_ids[lo] if mine else prompt_token_ids[0]
    padded = mine + [filler] * (size - len(mine))
    groups = self.inner.generate(padded, dataclasses.replace(sampling, first_prompt=sampling.first_prompt + lo), n=n)
    t = sampling.max_new_tokens
    tokens = np.zeros((size, n, t), np.int32)
    logprobs = np.zeros((size, n, t), np.float32)
    meta = np.zeros((size, n, 3), np.int64)  # length, finish code, weight version
    for i, group in enumerate(groups):
      for j, c in enumerate(group):
        k = len(c.token_ids)
        if k > t or len(c.logprobs) != k:
          raise ValueError(f"rollout engine returned {k} tokens and {len(c.logprobs)} log-probs for prompt "
                           f"{lo + i} sample {j}; expected equal counts <= max_new_tokens={t}")
        tokens[i, j, :k], logprobs[i, j, :k] = c.token_ids, c.logprobs
        meta[i, j] = (k, _FINISH.index(c.finish_reason), c.weight_version)
    tokens, logprobs, meta = distributed.allgather((tokens, logprobs, meta))  # [processes, size, n, ...]
    flat = lambda x: x.reshape(-1, *x.shape[2:])[:num]  # process-major = prompt order; fillers dropped
    tokens, logprobs, meta = flat(tokens), flat(logprobs), flat(meta)
    return [[Completion(token_ids=tokens[i, j, :meta[i, j, 0]].copy(), logprobs=logprobs[i, j, :meta[i, j, 0]].copy(),
                        finish_reason=_FINISH[meta[i, j, 1]], weight_version=int(meta[i, j, 2]))
             for j in range(n)] for i in range(num)]

  def update_weights(self, params: Any, version: int) -> None:
    self.inner.update_weights(self._to_local(params), version)

  def ensure_weights(self, params: Any, version: int) -> None:
    self.inner.ensure_weights(self._to_local(params), version)

  def sleep(self) -> None:
    self.inner.sleep()

  def interrupt(self) -> None:
    """Nothing to do: the trainer stops a multi-process run at a step boundary (see the module docstring)."""

  def close(self) -> None:
    self.inner.close()
