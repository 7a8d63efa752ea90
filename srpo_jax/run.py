"""Shared by the entry points (main, compare): the device mesh, then one training run with its table and plot."""
from __future__ import annotations

import os

from srpo_jax import config as config_lib


def build_mesh(cfg: config_lib.Config):
  """Joins a multi-host run when configured; a ("data", "fsdp", "tensor") mesh when there is more than one device."""
  from srpo_jax import plan
  # Before JAX touches a GPU: room for the SGLang server on the same devices (JAX preallocates 75% otherwise).
  for key, value in plan.jax_gpu_env(cfg).items():
    os.environ.setdefault(key, value)
  import jax
  from srpo_jax import distributed, sharding
  distributed.initialize(cfg.mesh.num_processes, cfg.mesh.coordinator, cfg.mesh.process_id)
  if jax.device_count() == 1:
    return None
  return sharding.make_mesh(**cfg.mesh.axis_sizes(jax.device_count()))


def run(cfg: config_lib.Config, mesh=None) -> dict:
  """Trains one run; returns its summary (also run_dir/summary.json) and writes run_dir/curves.png.

  On GPUs it first checks the analytic memory plan (`srpo_jax.plan.check_fits_analytic`: parameters, optimizer
  state, teacher and the programs' activations against JAX's memory) and raises `plan.DoesNotFit` before anything
  is allocated or compiled.
  """
  from srpo_jax import distributed, metrics, plan, plot, trainer
  plan.check_fits_analytic(cfg, mesh)
  summary = trainer.Trainer(cfg, mesh=mesh).run()
  if not distributed.is_main():  # process 0 reports and plots
    return summary
  print(metrics.summary_table({cfg.run_dir: summary}))
  out = os.path.join(cfg.run_dir, "curves.png")
  plot.plot_runs([cfg.run_dir], out)
  print(f"plot: {out}")
  return summary
