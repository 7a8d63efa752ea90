"""Qwen3-4B, the paper's smaller setting (Table 3) on one 8-GPU node.

Usage: `python -m srpo_jax.main --config=configs/qwen3_4b.py:srpo,chemistry --config.model.path=/path/to/Qwen3-4B`.
The parameter is "ALGO[,TASK]"; per-method lr / mini-batch / aggregation follow algo.name.
"""
from srpo_jax import config


def get_config(param: str = ""):
  # ~80 GB of fp32 weights + AdamW moments + EMA teacher: fsdp over the 8 GPUs leaves room for the SGLang engine.
  return config.paper_config("Qwen3-4B", param, mesh={"data": 1, "fsdp": 8, "tensor": 1})
