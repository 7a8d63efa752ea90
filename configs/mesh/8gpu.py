"""Mesh layout: one node of eight GPUs, the paper's setting. `--mesh=configs/mesh/8gpu.py`.

FSDP over the whole node: NVLink (about 900 GB/s per GPU on H100/H200) carries FSDP's traffic -- each layer's weights
all-gathered for the forward, the remat forward and the backward of every micro-batch, and the gradients
reduce-scattered -- and the state per GPU is an eighth of 20 B per parameter (Qwen3-8B: 19.1 GiB). Every
micro-batch's rows split eight ways (`optim.micro_batch_size` a multiple of 8). This is what configs/qwen3_8b.py
already sets; the file exists so that a run can swap layouts with one flag.

Tensor parallelism (configs/mesh/8gpu_tp2.py) does not pay here for Qwen3-8B at 10k tokens: two rollouts per GPU fit
under FSDP alone (planned: 30.98 GiB of JAX's 43.5 per H100), and TP adds two activation all-reduces per layer and
halves the row shards (that file has the compiled comparison).
"""
import ml_collections


def get_config(param: str = ""):
  del param
  return ml_collections.ConfigDict(dict(data=1, fsdp=8, tensor=1, num_processes=1))
