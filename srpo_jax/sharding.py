"""Device mesh and the one table that maps parameters' logical axes to mesh axes.

Mesh axes are ("data", "fsdp", "tensor"). Parameters carry `logical_axes` metadata (see models/qwen3.py); `RULES`
turns each logical name into a mesh axis (or None = replicated). An explicit mesh is always passed: nothing here
installs a global mesh that would silently do nothing on CPU.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis. FSDP shards the model width; tensor parallelism shards heads, MLP width and vocab.
RULES: dict[str, str | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over `devices` (default: all). One size may be -1 (= the rest)."""
  from srpo_jax.config import resolve_axis_sizes  # the one "-1 = the rest" rule; raises ConfigError (a ValueError)
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_axis_sizes({"data": data, "fsdp": fsdp, "tensor": tensor}, len(devices))
  return Mesh(np.asarray(devices).reshape([sizes[a] for a in MESH_AXES]), MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh) -> P:
  """PartitionSpec for one array; an axis whose size the mesh axis does not divide stays replicated."""
  if not logical_axes:
    return P()
  spec = []
  for name, dim in zip(logical_axes, shape):
    axis = RULES.get(name) if name else None
    axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    spec.append(None if not axes or size == 1 or dim % size else (axes[0] if len(axes) == 1 else axes))
  return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh):
  """NamedSharding per leaf of an nnx.State (abstract or concrete), from each Variable's `logical_axes`."""
  def one(v):
    axes = v.get_metadata().get("logical_axes") if isinstance(v, nnx.Variable) else None
    value = v.get_value() if isinstance(v, nnx.Variable) else v
    return NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Batch-major arrays: the leading axis split over data × fsdp, the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


ROW_AXES = ("data", "fsdp")


def constrain_rows(x: jax.Array) -> jax.Array:
  """`x` (batch-major: rows on axis 0) split over ("data", "fsdp") on its rows, when traced under a mesh context
  (`jax.set_mesh(mesh)`, which the train step's programs enter) whose row axes divide them; unchanged otherwise.

  The model calls it on the residual stream of every layer. Without it XLA's sharding propagation may keep the
  weights' FSDP split on the model width and gather the (small) batch instead: every device then runs the whole
  batch (found in the deviceless H100 compile: ids all-gathered, 8x the per-device work, no reduce-scatter).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(ROW_AXES) <= set(mesh.axis_names):
    return x
  shards = int(np.prod([mesh.shape[a] for a in ROW_AXES]))
  if shards == 1 or x.shape[0] % shards:
    return x
  return jax.lax.with_sharding_constraint(x, P(ROW_AXES))
