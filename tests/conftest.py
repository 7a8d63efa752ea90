"""Shared test setup: offline HF hub, CPU JAX, float32 matmuls at full precision, and the data-dir fixture."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One persistent XLA compilation cache per test session, inherited by the training subprocesses the end-to-end tests
# start: the tiny config's programs compile once for the session, not once per process (most of those tests' time).
# Fresh per session (a CI run starts cold, so its duration is honest) and removed at exit, unless the caller gives
# one: `make test` shares one between its xdist pass and its solo pass (Makefile), and removes it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="srpo-jax-test-xla-cache-")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

# Parity tests compare against PyTorch fp32; make XLA's fp32 dots exact rather than TF32/bf16-pass on accelerators.
jax.config.update("jax_default_matmul_precision", "highest")
