"""Mesh layout: four GPUs of one node. `--mesh=configs/mesh/4gpu.py`.

FSDP over all four (the state per GPU is a quarter of 20 B per parameter; NVLink carries FSDP's per-layer weight
all-gathers and gradient reduce-scatters), every micro-batch's rows split four ways (a multiple of 4 rollouts).
On H100s (JAX's 43.5 GiB each): Qwen3-4B (18.7 GiB of state per GPU) fits with --config.optim.micro_batch_size=16,
4 rollouts per GPU (about 37 GiB, analytic estimate). Qwen3-8B's state is 38.1 GiB per GPU, and the optimizer step
alone then needs 53.4 GiB (compiled: AdamW's new parameters and moments, 15.3 GiB of temporaries, before the finite
check picks them), over at any micro-batch size: use 8 GPUs.
"""
import ml_collections


def get_config(param: str = ""):
  del param
  return ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=1, num_processes=1))
