"""Kernels with pure-XLA implementations (Pallas variants may come later); import as `srpo_jax.kernels`.

Nothing is re-exported here, so `from srpo_jax.kernels import fused_head as fh` is the module and
`fh.fused_head(...)` the function.
"""
