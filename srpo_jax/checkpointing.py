"""Training checkpoints with Orbax: one directory per step holding the state pytree and a JSON `meta` record.

Layout (orbax `CheckpointManager`): `<dir>/<step>/state/` (arrays: any pytree, optax states and `nnx.State`
included; the trainer saves params, optimizer state and the EMA teacher) and `<dir>/<step>/meta/` (JSON; the trainer
saves the step, the data position, counters, accuracies, the seed and wall time). No RNG state is saved: the trainer's
randomness is a function of (seed, step), so a resumed run redraws the same numbers. Saves are synchronous and atomic:
orbax writes into `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` only once everything is on disk, so a
crash mid-save leaves the previous step as the latest one; the unfinished temporary directory is ignored and removed
when the next `Checkpointer` opens the directory.

    ckpt = Checkpointer(cfg.checkpoint_dir, keep=cfg.checkpoint.keep)
    ckpt.save(step, {"params": p, "opt_state": opt_state, "teacher": t}, meta={"step": step, ...})
    state, meta = ckpt.restore(ckpt.latest_step(), abstract_state)   # abstract: arrays or jax.ShapeDtypeStruct
    ckpt.close()

Restore checks the stored tree against the target first (keys, shapes, dtypes) and names the step directory and the
dotted key of any mismatch; arrays come back bitwise equal, with the target's dtypes and shardings.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


class CheckpointError(ValueError):
  """A missing checkpoint, or one whose contents do not match the restore target."""


class Checkpointer:
  """Keeps the last `keep` step checkpoints under `directory`; save/restore a (state pytree, JSON meta) pair.

  Every process of a multi-host run must call save/restore (orbax coordinates the writes).
  """

  def __init__(self, directory: str | os.PathLike, keep: int = 3):
    if keep < 1:
      raise ValueError(f"Checkpointer: keep={keep} must be >= 1")
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=False,  # The trainer saves between steps; simple beats overlapped here.
        create=True,
        cleanup_tmp_directories=True,  # Remove the leftovers of a save that crashed before its final rename.
    )
    # Naming the item handlers lets a fresh manager (a resumed process) read item metadata before any restore.
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    self._mgr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def all_steps(self) -> list[int]:
    """Steps with a complete checkpoint, ascending (read when the manager opened, updated by its own saves)."""
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> Optional[int]:
    """The newest complete checkpoint's step, or None when there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state_pytree: PyTree, meta: Mapping[str, Any], force: bool = False) -> bool:
    """Writes `state_pytree` and `meta` as checkpoint `step`; drops the oldest beyond `keep`.

    Returns False (and writes nothing) when `step` is already saved — the trainer's final save can coincide with a
    periodic one; True otherwise. `force` saves even where orbax's save policy would skip the step.
    Raises TypeError naming the key if `meta` is not JSON-serialisable (checked before anything is written).
    """
    meta = dict(meta)
    _check_json(meta)
    if step in self.all_steps():
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state_pytree), meta=ocp.args.JsonSave(meta))
    saved = self._mgr.save(step, args=args, force=force)
    self._mgr.wait_until_finished()
    return bool(saved)

  def restore(self, step: int, abstract_state: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Loads checkpoint `step` into the structure, dtypes and shardings of `abstract_state`.

    Args:
      step: a step in `all_steps()`.
      abstract_state: the target pytree; leaves are arrays or `jax.ShapeDtypeStruct` (with `sharding` to place
        the restored arrays; without one they land on the default device). `jax.eval_shape` output works.
    Returns:
      (state, meta): the state pytree with the target's tree structure, and the JSON meta dict.
    Raises:
      CheckpointError naming the step directory and the dotted key of a missing/extra leaf or a shape/dtype
      mismatch, or listing the available steps when `step` does not exist.
    """
    steps = self.all_steps()
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} at {self.step_dir(step)!r}; available steps: {steps}")
    target = jax.tree.map(_abstract_leaf, abstract_state)
    stored = self._mgr.item_metadata(step)["state"]
    _check_against_metadata(self.step_dir(step), stored, target)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
    restored = self._mgr.restore(step, args=args)
    return restored.state, dict(restored.meta)

  def close(self) -> None:
    self._mgr.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _abstract_leaf(x: Any) -> Any:
  """Arrays -> ShapeDtypeStruct keeping the sharding; ShapeDtypeStructs and Python scalars pass through."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  if isinstance(x, np.ndarray):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return x


def _path_str(path: tuple) -> str:
  """('params', 'w') style key path -> "params.w" (dict keys, sequence indices and attribute names alike)."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return ".".join(parts)


def _stored_shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype] | None:
  """Shape and dtype as orbax stores a target leaf (typed PRNG keys are stored as their uint32 key data)."""
  if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
    return None
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    return tuple(data.shape), np.dtype(data.dtype)
  return tuple(leaf.shape), np.dtype(leaf.dtype)


def _check_against_metadata(step_dir: str, stored: PyTree, target: PyTree) -> None:
  """Same keys, shapes and dtypes in the checkpoint's metadata tree and the restore target, else CheckpointError."""
  have = {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
  want = {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(target)[0]}
  missing = sorted(set(want) - set(have))
  if missing:
    raise CheckpointError(f"checkpoint {step_dir!r} has no key {missing[0]!r} that the restore target expects "
                          f"({len(missing)} missing: {missing[:5]})")
  extra = sorted(set(have) - set(want))
  if extra:
    raise CheckpointError(f"checkpoint {step_dir!r} holds key {extra[0]!r} that the restore target lacks "
                          f"({len(extra)} extra: {extra[:5]}); tree structures differ")
  for key, leaf in want.items():
    expect = _stored_shape_dtype(leaf)
    meta = have[key]
    if expect is None or getattr(meta, "shape", None) is None:
      continue
    got = (tuple(meta.shape), np.dtype(meta.dtype))
    if got != expect:
      raise CheckpointError(f"checkpoint {step_dir!r}, key {key!r}: stored shape {got[0]} dtype {got[1]}, "
                            f"but the restore target has shape {expect[0]} dtype {expect[1]}")


def _check_json(meta: Mapping[str, Any], prefix: str = "meta") -> None:
  """Raises TypeError naming the first value JSON cannot hold (NaN/inf included: they are not JSON)."""
  for k, v in meta.items():
    path = f"{prefix}.{k}"
    if not isinstance(k, str):
      raise TypeError(f"{path}: JSON keys must be str, got {type(k).__name__}")
    if isinstance(v, Mapping):
      _check_json(v, path)
    elif isinstance(v, (list, tuple)):
      _check_json({str(i): x for i, x in enumerate(v)}, path)
    elif isinstance(v, float) and not math.isfinite(v):
      raise TypeError(f"{path}={v!r}: non-finite floats are not valid JSON")
    elif not (v is None or isinstance(v, (bool, int, float, str))):
      raise TypeError(f"{path}={v!r}: {type(v).__name__} is not JSON-serialisable; convert it first "
                      "(e.g. .item() / .tolist() for numpy values)")

