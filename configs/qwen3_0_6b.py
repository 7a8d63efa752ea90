"""Qwen3-0.6B with the paper's hyperparameters (Table 3): a cheap end-to-end check of the GPU path.

Usage: `python -m srpo_jax.main --config=configs/qwen3_0_6b.py:srpo,chemistry --config.model.path=/path/to/Qwen3-0.6B`.
The parameter is "ALGO[,TASK]"; per-method lr / mini-batch / aggregation follow algo.name.
"""
from srpo_jax import config


def get_config(param: str = ""):
  # ~13 GB of fp32 weights + AdamW moments + EMA teacher fits one GPU: pure data parallelism over all devices.
  c = config.paper_config("Qwen3-0.6B", param, mesh={"data": -1, "fsdp": 1, "tensor": 1})
  # 16 rollouts per forward/backward: 2 per GPU on 8 GPUs. `python -m srpo_jax.plan --target=h100x8` compiles the
  # update at 32.8 GiB per device of JAX's 43.5 (64 rollouts would need 61 GiB; BUILD_NOTES.md, "Planner").
  c.optim.micro_batch_size = 16
  return c
