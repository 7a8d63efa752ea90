"""Shared test setup: offline HF hub, CPU JAX, float32 matmuls at full precision, and the data-dir fixture."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

# Parity tests compare against PyTorch fp32; make XLA's fp32 dots exact rather than TF32/bf16-pass on accelerators.
jax.config.update("jax_default_matmul_precision", "highest")
