"""Qwen3-8B, the paper's main setting (Table 3) on one 8-GPU node.

Usage: `python -m srpo_jax.main --config=configs/qwen3_8b.py:srpo,chemistry --config.model.path=/path/to/Qwen3-8B`.
The parameter is "ALGO[,TASK]"; lr / mini-batch / loss aggregation follow the method (srpo 5e-6, grpo 1e-6 with
mini-batch 8, sdpo 1e-5), see `srpo_jax.config.Config`.
"""
from srpo_jax import config


def get_config(param: str = ""):
  # 8B with fp32 master weights, AdamW moments and an fp32 EMA teacher is ~160 GB: shard it 8 ways (ZeRO-3 style).
  c = config.paper_config("Qwen3-8B", param, mesh={"data": 1, "fsdp": 8, "tensor": 1})
  # 16 rollouts per forward/backward: 2 per GPU, 20,480 tokens per device. `python -m srpo_jax.plan
  # --target=h100x8` compiles a teacher micro-batch's accumulate at 31.0 GiB per device of JAX's 43.5 (apply 26.7),
  # with remat (BUILD_NOTES.md, "Planner"). A multiple of the 8 row shards (mesh.data × mesh.fsdp) dividing every
  # method's mini-batch (grpo: 64 rollouts).
  c.optim.micro_batch_size = 16
  return c
