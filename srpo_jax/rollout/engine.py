"""The rollout-engine interface shared by the in-process JAX sampler and the SGLang client.

An engine turns prompts (token ids) into sampled responses with the sampler's own per-token log-probs, which the
trainer needs for the truncated rollout importance weights (spec: `w_roll = min(exp(logp_old - logp_roll), 2)`).

Letters (the alphabet of `srpo_jax.models.qwen3`): T response positions (one completion's tokens).
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Literal, Sequence

import numpy as np

FinishReason = Literal["stop", "length"]


class RolloutInterrupted(RuntimeError):
  """A stop was requested (`RolloutEngine.interrupt`, e.g. on SIGTERM / SIGINT) while the engine was waiting: the
  rollouts in flight are abandoned and nothing they produced is returned."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to sample. `top_k <= 0` and `top_p >= 1` switch those filters off; `temperature == 0` is greedy."""
  max_new_tokens: int
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  stop_token_ids: tuple[int, ...] = ()
  seed: int = 0
  # The index of the call's first prompt in the whole batch it belongs to: sample j of prompt i draws from the
  # random stream of prompt first_prompt + i, so a process's share of a step (rollout/sharded.py) samples what the
  # same prompts would get in one call over the whole batch.
  first_prompt: int = 0

  def __post_init__(self):
    if self.max_new_tokens <= 0:
      raise ValueError(f"SamplingParams.max_new_tokens must be > 0, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
    if self.first_prompt < 0:
      raise ValueError(f"SamplingParams.first_prompt must be >= 0, got {self.first_prompt}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


@dataclasses.dataclass
class Completion:
  """One sampled response.

  token_ids: [T] response tokens, including the stop token when finish_reason == "stop".
  logprobs:  [T] float32 log-prob of each sampled token under the distribution it was drawn from
             (temperature / top-k / top-p applied; at temperature 1 with no filters, the model's own).
  """
  token_ids: np.ndarray
  logprobs: np.ndarray
  finish_reason: FinishReason
  weight_version: int = 0


class RolloutEngine(abc.ABC):
  """generate() -> per prompt, `n` Completions; update_weights() after every training step; close().

  `ensure_weights()` before the first rollout of a run; `interrupt()` from a signal handler.
  """

  @abc.abstractmethod
  def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams,
               n: int = 1) -> list[list[Completion]]:
    """Returns `len(prompt_token_ids)` lists of `n` completions each, in prompt order."""

  @abc.abstractmethod
  def update_weights(self, params: Any, version: int) -> None:
    """Makes the engine sample from `params` (the trainer's current weights), tagged `version`."""

  def ensure_weights(self, params: Any, version: int) -> None:
    """Before the first rollout of a run: makes the engine hold exactly `params` as `version`, and checks it.

    An engine whose weights may differ from the trainer's (a server someone else loaded, a resumed run) must not
    serve a single rollout before this; the default pushes `params` (`update_weights`).
    """
    self.update_weights(params, version)

  def sleep(self) -> None:
    """Frees the device memory the engine shares with the trainer until its next `generate` / `update_weights`
    (`rollout.sglang_sleep`: a server releases its weights and KV cache). Default: nothing to free."""

  def interrupt(self) -> None:
    """Asks every wait of the engine to end soon with `RolloutInterrupted`. Safe in a signal handler (it only sets a
    flag); later calls raise at once. An in-process engine computing on the host has nothing to interrupt."""

  def close(self) -> None:
    """Releases processes / devices. Idempotent."""

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
