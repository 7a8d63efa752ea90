"""Verifiable rewards (spec "Rewards"): pure functions of (response text, gold answer) -> 0.0 or 1.0."""
from srpo_jax.rewards.mcq import mcq_reward
from srpo_jax.rewards.tooluse import tooluse_reward

__all__ = ["mcq_reward", "tooluse_reward", "reward_for_kind"]


def reward_for_kind(kind: str, response: str, answer: str, strict_tooluse: bool = False) -> float:
  """Dispatches on a row's `kind` ("mcq" or "tooluse"); raises ValueError naming an unknown kind."""
  if kind == "mcq":
    return mcq_reward(response, answer)
  if kind == "tooluse":
    return tooluse_reward(response, answer, strict=strict_tooluse)
  raise ValueError(f"unknown row kind {kind!r}; expected 'mcq' or 'tooluse'")
