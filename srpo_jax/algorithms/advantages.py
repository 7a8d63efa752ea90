"""Group-relative advantages (GRPO, spec "GRPO branch").

`A_i = r_i - mean_{j in group(i)} r_j`, optionally divided by `std_{j in group(i)} r_j + eps`
(**option** `norm_adv_by_std`, default False as in the SDPO/SRPO runs).

Departures: the std is the unbiased (Bessel-corrected) one, as `torch.std` in verl's `compute_grpo_outcome_advantage`.
A group of one rollout gets advantage 0 (the spec's formula; verl instead returns the raw reward there).

Letters (the alphabet of `srpo_jax.models.qwen3`): B rollouts, G groups.
"""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("num_groups", "norm_adv_by_std", "eps"))
def group_advantages(rewards_B: jax.Array, group_ids_B: jax.Array, num_groups: int, *,
                     norm_adv_by_std: bool = False, eps: float = 1e-6) -> jax.Array:
  """Per-rollout advantage `[B]` (float32) from rewards `[B]` and group ids `[B]` in `[0, num_groups)`.

  Jittable (`num_groups` is static). Rollouts of a group need not be contiguous.
  """
  chex.assert_rank(rewards_B, 1)
  chex.assert_shape(group_ids_B, rewards_B.shape)
  # Rewards may arrive as Python floats / ints; the statistics are taken in float32.
  r_B = jnp.asarray(rewards_B, jnp.float32)
  gid_B = jnp.asarray(group_ids_B, jnp.int32)
  count_G = jax.ops.segment_sum(jnp.ones_like(r_B), gid_B, num_segments=num_groups)
  mean_G = jax.ops.segment_sum(r_B, gid_B, num_segments=num_groups) / jnp.maximum(count_G, 1.0)
  adv_B = r_B - mean_G[gid_B]
  if norm_adv_by_std:
    sq_G = jax.ops.segment_sum(adv_B ** 2, gid_B, num_segments=num_groups)
    # Unbiased variance; a group of one has no spread (its advantage is already 0).
    std_G = jnp.sqrt(sq_G / jnp.maximum(count_G - 1.0, 1.0))
    adv_B = adv_B / (std_G[gid_B] + eps)
  return adv_B
