"""Mesh layout: one GPU. `--mesh=configs/mesh/1gpu.py` (after `--config=...`; `--mesh.fsdp=...` overrides a value).

Nothing to shard: every byte of the state sits on the one device. The trainer keeps fp32 parameters (4 B per
parameter), AdamW's two fp32 moments (8 B), an fp32 EMA teacher (4 B) and, from a mini-batch's first micro-batch to
its optimizer step, fp32 gradients (4 B): 20 B per parameter before any activation. With SGLang on the same GPU JAX
gets 55% of it (43.5 GiB of an 80 GB H100, 77.5 of an H200). `python -m srpo_jax.plan --mesh=configs/mesh/1gpu.py
--target=h100x1` (--analytic estimates): Qwen3-0.6B fits (34.5 GiB at configs/qwen3_0_6b.py's 16 rollouts per
micro-batch); Qwen3-1.7B (25.6 GiB of state) fits with --config.optim.micro_batch_size=2 (about 39 GiB); Qwen3-8B
needs 152.6 GiB of state alone (exact; the planner names the optimizer state).
"""
import ml_collections


def get_config(param: str = ""):
  del param
  return ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, num_processes=1))
