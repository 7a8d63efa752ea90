"""JAX and the rollout server time-share each GPU (`rollout.sglang_sleep`).

While the server generates, JAX keeps only its parameters on the GPU: the optimizer state and the EMA teacher wait in
pinned host memory (`to_memory`), and the server's KV cache takes their place. While JAX trains, the server sleeps
(`RolloutEngine.sleep`: its weights, KV cache and CUDA graphs released) and JAX's update takes theirs. Moving the
8B state costs ~12 GB each way per GPU per step over PCIe (~0.5 s at 25 GB/s), against a step of ~100 s.

JAX must give freed memory back to the GPU for this (XLA_PYTHON_CLIENT_ALLOCATOR=platform, no preallocation:
`plan.jax_gpu_env`); the server must unmap what it releases (SGLang's --enable-memory-saver).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import jax

from srpo_jax.rollout.engine import Completion, RolloutEngine, SamplingParams

log = logging.getLogger(__name__)

HOST, DEVICE = "pinned_host", "device"  # JAX memory kinds


def to_memory(tree: Any, kind: str) -> Any:
  """`tree` with every array copied to memory `kind` of its own devices (same sharding otherwise), the copies done.
  The originals' memory is freed once the caller drops them."""
  moved = jax.tree.map(lambda x: jax.device_put(x, x.sharding.with_memory_kind(kind)), tree)
  return jax.block_until_ready(moved)


class TimeSharedEngine(RolloutEngine):
  """`inner` with the trainer's state out of the way while it generates, and asleep afterwards.

  offload / restore: move the trainer's optimizer state and teacher to host memory and back (`Trainer`)."""

  def __init__(self, inner: RolloutEngine, offload: Callable[[], None], restore: Callable[[], None]):
    self.inner, self._offload, self._restore = inner, offload, restore

  def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams,
               n: int = 1) -> list[list[Completion]]:
    self._offload()
    try:
      out = self.inner.generate(prompt_token_ids, sampling, n=n)
    except BaseException:
      try:  # the trainer's state comes back below: make room if the server still answers (a stop kills it anyway)
        self.inner.sleep()
      except Exception as e:  # noqa: BLE001 - the generate error is the one to report
        log.warning("rollout engine: could not release its memory after a failed generate: %s", e)
      self._restore()
      raise
    self.inner.sleep()
    self._restore()
    return out

  def update_weights(self, params: Any, version: int) -> None:
    self.inner.update_weights(params, version)

  def ensure_weights(self, params: Any, version: int) -> None:
    self.inner.ensure_weights(params, version)

  def sleep(self) -> None:
    self.inner.sleep()

  def interrupt(self) -> None:
    self.inner.interrupt()

  def close(self) -> None:
    self.inner.close()
