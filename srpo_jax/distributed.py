"""Multi-host start-up: one process per host, joined through `jax.distributed` before any device is touched.

On GPU/TPU hosts JAX uses NCCL / ICI for collectives; on CPU-only hosts (and in the tests) it needs gloo, set here.
"""
from __future__ import annotations

import os
from typing import Optional

import jax


def initialize(num_processes: int = 1, coordinator: Optional[str] = None, process_id: Optional[int] = None) -> None:
  """Joins a `num_processes`-process run; a no-op for 1. `process_id` None = from the cluster (SLURM, ...)."""
  if num_processes <= 1:
    return
  if coordinator is None and "SLURM_JOB_ID" not in os.environ:
    raise ValueError(f"mesh.num_processes={num_processes} needs mesh.coordinator (host:port of process 0) "
                     "outside a SLURM job")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
