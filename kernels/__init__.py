"""Kernels with pure-XLA implementations (Pallas variants may come later); import as `srpo_jax.kernels`."""
from srpo_jax.kernels.fused_head import DEFAULT_TILE_SIZE, HeadOutputs, fused_head, fused_topk_jsd, head_divergence

__all__ = ["DEFAULT_TILE_SIZE", "HeadOutputs", "fused_head", "fused_topk_jsd", "head_divergence"]
