"""Qwen3-4B, the paper's smaller setting (Table 3) on one 8-GPU node.

Usage: `python -m srpo_jax.main --config=configs/qwen3_4b.py:srpo,chemistry --config.model.path=/path/to/Qwen3-4B`.
The parameter is "ALGO[,TASK]"; per-method lr / mini-batch / aggregation follow algo.name.
"""
from srpo_jax import config


def get_config(param: str = ""):
  # ~80 GB of fp32 weights + AdamW moments + EMA teacher: fsdp over the 8 GPUs leaves room for the SGLang engine.
  c = config.paper_config("Qwen3-4B", param, mesh={"data": 1, "fsdp": 8, "tensor": 1})
  # 32 rollouts per forward/backward: 4 per GPU, 40,960 tokens per device. `python -m srpo_jax.plan
  # --target=h100x8` compiles the update at 26.0 GiB per device of JAX's 43.5 (55% of an 80 GB H100), with
  # remat (BUILD_NOTES.md, "Planner"). A multiple of the 8 row shards (mesh.data × mesh.fsdp) dividing every
  # method's mini-batch (grpo: 64 rollouts).
  c.optim.micro_batch_size = 32
  return c
