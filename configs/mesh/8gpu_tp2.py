"""Mesh layout: one node of eight GPUs, FSDP 4 × tensor parallelism 2. `--mesh=configs/mesh/8gpu_tp2.py`.

When tensor parallelism pays: TP splits each layer's heads, MLP width and the vocabulary over `tensor` GPUs
(`srpo_jax.sharding.RULES`): the attention and MLP intermediates of ONE sequence, which FSDP cannot split (FSDP splits
rows: at one rollout per GPU it has nothing left to split). It does not split the residual stream that remat keeps
per layer, it costs two all-reduces of a [tokens, D] activation per layer in the forward and again in the backward
(traffic that grows with the tokens: NVLink only, inside a node), and it halves the row shards (data × fsdp = 4), so
at the same micro_batch_size each GPU holds twice the rollouts. Compiled for Qwen3-8B at configs/qwen3_8b.py's 16
rollouts per micro-batch: accumulate_t 54.3 GiB of temporaries, 73.4 GiB in all, 264 all-reduces (8gpu.py: 11.9,
31.0 and 4) -- does not fit; at 4 rollouts (one per row shard) the planner estimates 36.4 GiB. So for Qwen3-8B at
10k tokens 8gpu.py is the better layout; start from this file only when one rollout per GPU no longer fits under
FSDP (longer responses, a larger model), with --config.optim.micro_batch_size a multiple of 4.
"""
import ml_collections


def get_config(param: str = ""):
  del param
  return ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=2, num_processes=1))
