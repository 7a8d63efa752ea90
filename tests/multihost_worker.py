"""One process of the 2-process test: joins via srpo_jax.distributed, shards a batch across processes over the
mesh's data axis, runs the Qwen3 forward, and prints the global logit sum next to a single-process reference."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from srpo_jax import distributed, sharding
from srpo_jax.models.qwen3 import Qwen3Config, init_model


def main():
  port, pid = sys.argv[1], int(sys.argv[2])
  distributed.initialize(num_processes=2, coordinator=f"127.0.0.1:{port}", process_id=pid)
  assert jax.process_count() == 2 and len(jax.devices()) == 2, (jax.process_count(), jax.devices())
  mesh = sharding.make_mesh(data=-1)
  model = init_model(Qwen3Config.preset("tiny", vocab_size=512), seed=0)
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, sharding.state_shardings(state, mesh))  # replicated: no fsdp/tensor axes
  ids = (np.arange(2 * 8).reshape(2, 8) * 31) % 512
  local = ids[pid:pid + 1]  # each process holds one row of the global batch
  batch = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data", None)), local, (2, 8))
  total = jax.jit(lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x)),
                  out_shardings=NamedSharding(mesh, P()))(state, batch)
  ref = float(jnp.sum(model(jnp.asarray(ids))))  # the whole batch on this process alone
  print(f"RESULT {pid} {float(total):.6f} {ref:.6f}", flush=True)


if __name__ == "__main__":
  main()
