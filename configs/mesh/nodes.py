"""Mesh layout: N nodes of eight GPUs, one process per node. `--mesh=configs/mesh/nodes.py:N` (default N = 2).

FSDP inside each node, data parallelism across nodes (hybrid sharding): mesh data = N, fsdp = 8. The state per GPU is
the 8-GPU node's (an eighth of 20 B per parameter): it does not shrink with more nodes, the batch work does. Why not
FSDP over all 8·N GPUs: FSDP moves every layer's weights for each forward, remat forward and backward of every
micro-batch (Qwen3-8B: 16 GB of weights in bf16, gathered three times per micro-batch), which NVLink carries (about
900 GB/s per GPU) and the inter-node network (typically 400 Gb/s = 50 GB/s per GPU) does not. Across nodes only the
gradients travel: one all-reduce over `data` of each GPU's 1/8 gradient shard per micro-batch (Qwen3-8B: 3.8 GiB in
fp32; 78 all-reduces in the compiled 2-node accumulate against 4 on one node), small next to the micro-batch's
compute (Qwen3-8B on 2 nodes, one rollout per GPU: 1.24 PFLOP per GPU, half the 8-GPU node's 2.48). `jax.devices()`
lists each process's devices together, so every fsdp group of the mesh is one node (checked by launch/check_mesh.py).

Rows go over data × fsdp = 8·N shards: keep `optim.micro_batch_size` a multiple of 8·N (Qwen3-8B: 16 on 2 nodes
is one rollout per GPU; 32 on 4 nodes); a smaller one is padded up to 8·N rows (correct, but wasted work).
Launch with launch/slurm.sbatch (one process per node, the coordinator from SLURM's environment), which also sets
mesh.coordinator and mesh.process_id; `python -m srpo_jax.plan --mesh=configs/mesh/nodes.py:N --target=h100x8`
plans N × 8 H100s.
"""
import ml_collections


def get_config(param: str = ""):
  try:
    nodes = int(param) if param else 2
  except ValueError:
    nodes = 0
  if nodes < 1:
    raise ValueError(f"configs/mesh/nodes.py:{param}: the parameter is the number of nodes, a positive integer")
  return ml_collections.ConfigDict(dict(data=nodes, fsdp=8, tensor=1, num_processes=nodes))
