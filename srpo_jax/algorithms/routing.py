"""SRPO sample routing (spec "SRPO: routing"; paper Tables 6 and 7).

Correctness `c_i = [r_i >= 0.5]`; teacher availability `m_i = [exists j != i in the group with c_j = 1]`. Which
rollouts then take the GRPO and the SDPO loss is the method's (`srpo_jax.methods`: `Method.route_masks`); for SRPO,
`z^SDPO = (1 - c_i) m_i` and GRPO takes the rest.

The sibling index is the teacher information's source: the first correct sibling `j != i` in group (batch) order,
or a uniformly random one (**option** `sibling_choice="random"`), -1 when there is none. A rollout is never its
own teacher. Everything here is pure `jnp`: it runs on host numpy arrays and inside `jit` alike (`method` static).

Letters (srpo_jax/models/qwen3.py): B rollouts.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from srpo_jax import methods

SIBLING_CHOICES = ("first", "random")
CORRECT_THRESHOLD = 0.5


class Route(NamedTuple):
  """Routing of one batch of rollouts; all `[B]`."""
  grpo_B: jax.Array      # bool: rollout takes the GRPO loss.
  sdpo_B: jax.Array      # bool: rollout takes the SDPO loss (needs a teacher forward).
  sibling_B: jax.Array   # int32: index of the sibling whose response is the teacher information, -1 if none.
  correct_B: jax.Array   # bool: c_i.
  has_teacher_B: jax.Array  # bool: m_i.


@functools.partial(jax.jit, static_argnames=("method", "sibling_choice"))
def route(rewards: jax.Array, group_ids: jax.Array, *, method: str | methods.Method = "srpo",
          sibling_choice: str = "first",
          rng: jax.Array | None = None, correct_threshold: float = CORRECT_THRESHOLD) -> Route:
  """Routes rollouts with rewards `[B]` and group ids `[B]` (any ints; equal id = same prompt).

  `rng` is required only for `sibling_choice="random"`.
  """
  method = methods.get(method)
  if sibling_choice not in SIBLING_CHOICES:
    raise ValueError(f"route: sibling_choice must be one of {SIBLING_CHOICES}, got {sibling_choice!r}")
  rewards_B = jnp.asarray(rewards, jnp.float32)
  gid_B = jnp.asarray(group_ids)
  chex.assert_rank(rewards_B, 1)
  chex.assert_shape(gid_B, rewards_B.shape)
  num = rewards_B.shape[0]
  correct_B = rewards_B >= correct_threshold
  # candidate_BB[i, j]: j is a correct sibling of i other than i itself. B is a few hundred, so B x B is cheap.
  same_BB = gid_B[:, None] == gid_B[None, :]
  candidate_BB = same_BB & ~jnp.eye(num, dtype=bool) & correct_B[None, :]
  has_teacher_B = candidate_BB.any(axis=1)
  if sibling_choice == "first":
    score_BB = candidate_BB.astype(jnp.float32)  # argmax returns the first maximum: the first correct sibling.
  else:
    if rng is None:
      raise ValueError("route: sibling_choice='random' needs rng")
    score_BB = jnp.where(candidate_BB, 1.0 + jax.random.uniform(rng, (num, num)), 0.0)
  sibling_B = jnp.where(has_teacher_B, jnp.argmax(score_BB, axis=1), -1).astype(jnp.int32)
  grpo_B, sdpo_B = method.route_masks(correct_B, has_teacher_B)
  return Route(grpo_B=grpo_B, sdpo_B=sdpo_B, sibling_B=sibling_B, correct_B=correct_B,
               has_teacher_B=has_teacher_B)
