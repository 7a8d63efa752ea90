"""Mesh layout: two GPUs of one node. `--mesh=configs/mesh/2gpu.py`.

FSDP over both (ZeRO-3: parameters, AdamW moments, teacher and gradients split in two), not data parallelism: inside
a node NVLink makes FSDP's per-layer all-gathers and gradient reduce-scatters cheap, and the state per GPU halves
(20 B per parameter / 2), while data parallelism would keep a whole copy on each GPU and only split the batch. Both
GPUs still split every micro-batch's rows (rows go over data × fsdp), so a micro-batch needs a multiple of 2
rollouts. On H100s with SGLang sharing the GPUs (JAX's 43.5 GiB each): Qwen3-1.7B fits at 16 rollouts per
micro-batch (38.8 GiB, analytic estimate); Qwen3-4B's state is 37.5 GiB per GPU, too little room left; Qwen3-8B's
is 76.3 GiB (exact), over before any activation.
"""
import ml_collections


def get_config(param: str = ""):
  del param
  return ml_collections.ConfigDict(dict(data=1, fsdp=2, tensor=1, num_processes=1))
