"""Multi-process runs: start-up, and the few host-level exchanges the trainer needs between processes.

One process per host, joined through `jax.distributed` before any device is touched. On GPU/TPU hosts JAX uses
NCCL / ICI for collectives; on CPU-only hosts (and in the tests) it needs gloo, set here.

How a step is split (BUILD_NOTES.md, "Multi-process runs"): each process samples the rollouts of its share of the
step's prompts on its own devices (`rollout/sharded.py`), the shares are exchanged (`allgather`: a few MB of token
ids per step, not weights), and every process then runs the same deterministic host code (rewards, routing,
advantages, micro-batch plan) on the whole step, so all agree without further messages. The device programs take
global arrays of which each process supplies only its own devices' shards. Files are written by process 0 only
(`is_main`), checkpoints by all (orbax coordinates them).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np

from srpo_jax.supervise import PEER_LOST_EXIT, lost_message

# How long the coordination service waits for a silent process before declaring it dead and stopping the others
# (JAX's default is 100 s): a killed peer then ends the run within this bound instead of a hang in a collective.
HEARTBEAT_TIMEOUT_S = 20
# Each process stamps a counter into the coordination service's key-value store this often, and watches the others'
# (a daemon thread, `_watch_peers`): a peer whose stamp has not changed for PEER_TIMEOUT_S is lost, and this process
# stops naming it, wherever its main thread waits (a collective that never returns included). The stamps run while
# the main thread computes or compiles: XLA releases the GIL.
STAMP_PERIOD_S = 0.5
PEER_TIMEOUT_S = 10.0
_STAMPS = "srpo_jax/alive/"


def initialize(num_processes: int = 1, coordinator: Optional[str] = None, process_id: Optional[int] = None,
               heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> None:
  """Joins a `num_processes`-process run; a no-op for 1. `process_id` None = from the cluster (SLURM, ...)."""
  if num_processes <= 1:
    return
  if coordinator is None and "SLURM_JOB_ID" not in os.environ:
    raise ValueError(f"mesh.num_processes={num_processes} needs mesh.coordinator (host:port of process 0) "
                     "outside a SLURM job")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_s)
  threading.Thread(target=_watch_peers, name="srpo_jax-peers", daemon=True).start()
  atexit.register(_leave)  # runs before jax.distributed's own shutdown (atexit is last-in, first-out)


def _client():
  from jax._src import distributed as jax_distributed
  return jax_distributed.global_state.client


_watching = threading.Event()  # set while the watch may stop the process (cleared at exit: peers leave then)
_what_is_kept: list[Callable[[], str]] = [lambda: ""]  # set by exit_on_failure: what survives (the checkpoint)


_DONE = "done"  # the last stamp of a process that is exiting normally: its silence is not a loss


def _leave() -> None:
  _watching.clear()
  with contextlib.suppress(Exception):
    _client().key_value_set(f"{_STAMPS}{jax.process_index()}", _DONE, allow_overwrite=True)


def _stamps(client) -> dict[int, str]:
  return {int(k.rsplit("/", 1)[-1]): v for k, v in client.key_value_dir_get(_STAMPS)}


def _watch_peers() -> None:
  """Stamps this process's counter and stops the process (`_stop_for_lost_peers`) once a peer's stamp has stood
  still for PEER_TIMEOUT_S or the coordination service stopped answering."""
  client, me, count = _client(), jax.process_index(), 0
  _watching.set()
  seen: dict[int, tuple[str, float]] = {}
  while _watching.is_set():
    now = time.monotonic()
    try:
      client.key_value_set(f"{_STAMPS}{me}", str(count), allow_overwrite=True)
      stamps = _stamps(client)
    except Exception as e:  # noqa: BLE001 - the service (process 0) is gone
      if _watching.is_set():
        _stop_for_lost_peers(None, e)
      return
    count += 1
    for i in range(jax.process_count()):
      if i != me and (i not in seen or seen[i][0] != stamps.get(i)):
        seen[i] = (stamps.get(i), now)
    lost = [i for i, (stamp, since) in sorted(seen.items()) if stamp != _DONE and now - since > PEER_TIMEOUT_S]
    if lost and _watching.is_set():
      _stop_for_lost_peers(lost, None)
    time.sleep(STAMP_PERIOD_S)


def _stop_for_lost_peers(lost: Optional[list[int]], error: Optional[BaseException]) -> None:
  """One line naming the lost peers (None: process 0, the coordinator), then exit PEER_LOST_EXIT at once."""
  msg = lost_message(jax.process_index(), jax.process_count(), lost, error, _what_is_kept[0]())
  print(msg, file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(PEER_LOST_EXIT)  # skips the shutdown barrier a lost peer would never reach (exit_on_failure)


def lost_peers(wait_s: float = 4 * STAMP_PERIOD_S) -> Optional[list[int]]:
  """The other processes whose stamp did not change within `wait_s` (lost: killed, crashed, or hung outside Python's
  reach), or None when the coordination service itself no longer answers (process 0, which hosts it, is lost)."""
  client = _client()
  try:
    before = _stamps(client)
    time.sleep(wait_s)
    after = _stamps(client)
  except Exception:  # noqa: BLE001 - the service is unreachable
    return None
  me = jax.process_index()
  return [i for i in range(jax.process_count())
          if i != me and after.get(i) != _DONE and (i not in after or before.get(i) == after[i])]


@contextlib.contextmanager
def exit_on_failure(what_is_kept: Callable[[], str] = lambda: "",
                    statuses: Optional[dict[type, int]] = None) -> Iterator[None]:
  """In a multi-process run, an error in this process ends it at once, with one line naming the lost peer when a
  peer's loss caused it (exit status PEER_LOST_EXIT), else the error (the status `statuses` gives its type, else 1).

  Why not just raise: the processes wait on each other in collectives, and at exit in jax.distributed's shutdown
  barrier, which a lost peer never reaches: a failed process would wait there for the heartbeat timeout, and its
  live peers in their next collective for as long. Exiting at once closes this process's connections, so each peer's
  next collective fails at once and the peer ends here too. `what_is_kept()` says what survives (the checkpoint).
  """
  _what_is_kept[0] = what_is_kept
  try:
    yield
  except (Exception, KeyboardInterrupt) as e:
    if not multi_process():
      raise
    lost = lost_peers()
    if lost is None or lost:
      _stop_for_lost_peers(lost, e)
    me, n = jax.process_index(), jax.process_count()
    first = (str(e).strip().splitlines() or [""])[0][:300]
    kept = what_is_kept()
    traceback.print_exc()
    print(f"multi-process run: process {me} of {n} failed ({type(e).__name__}: {first}); stopping, the other "
          "processes stop when their next collective fails or their watch notices" + (f". {kept}" if kept else ""),
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(next((v for t, v in (statuses or {}).items() if isinstance(e, t)), 1))  # no shutdown barrier: above


def is_main() -> bool:
  """Whether this process writes the run's files (metrics, summary, plots, HF exports): process 0."""
  return jax.process_index() == 0


def multi_process() -> bool:
  return jax.process_count() > 1


def share(num: int) -> tuple[int, int, int]:
  """This process's contiguous share [lo, hi) of `num` items, and the common share size ceil(num / processes)
  (the last shares may be short, or empty: `allgather` pads them)."""
  size = -(-num // jax.process_count())
  lo = min(jax.process_index() * size, num)
  return lo, min(lo + size, num), size


def allgather(tree: Any) -> Any:
  """Every process's host arrays of `tree` (same shapes everywhere), stacked on a new leading process axis."""
  from jax.experimental import multihost_utils
  if not multi_process():
    return jax.tree.map(lambda x: np.asarray(x)[None], tree)
  return multihost_utils.process_allgather(tree, tiled=False)


def to_host(tree: Any) -> Any:
  """`jax.device_get` that also fetches arrays split across processes (gathered: a collective where any is)."""
  from jax.experimental import multihost_utils
  spans = lambda x: isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated
  if any(spans(x) for x in jax.tree.leaves(tree)):
    return jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True) if spans(x) else jax.device_get(x),
                        tree)
  return jax.device_get(tree)


def any_process(*flags: bool) -> tuple[bool, ...]:
  """Per flag, whether it holds on any process (a collective: every process must call it at the same point)."""
  gathered = allgather(np.asarray(flags, bool))  # [processes, flags]
  return tuple(bool(x) for x in np.any(gathered, axis=0))


# ---------------------------------------------------------------------------------------------------------------------
# A process-local view of the global mesh (for the process-local rollout engine)
# ---------------------------------------------------------------------------------------------------------------------
def local_mesh(mesh):
  """The mesh of this process's own devices with the global mesh's fsdp × tensor layout: the data slices of `mesh`
  held wholly by this process (the nodes layouts: a node's fsdp group), else all local devices as one fsdp group."""
  from jax.sharding import Mesh
  from srpo_jax.sharding import MESH_AXES
  pid = jax.process_index()
  devices = mesh.devices
  mine = [i for i in range(devices.shape[0]) if all(d.process_index == pid for d in devices[i].flat)]
  if mine and len(mine) * devices[0].size == jax.local_device_count():
    return Mesh(devices[mine], MESH_AXES)
  return Mesh(np.asarray(jax.local_devices()).reshape(1, -1, 1), MESH_AXES)


def local_replica(state: Any, mesh):
  """A copy of the global arrays of `state` on the devices of `mesh` (a `local_mesh`), sharded by the same
  logical-axis rules. Where this process's own shards of a leaf already form it (the leaf is not split across
  processes), they are reused as they are (no copy, no communication); otherwise the leaf is gathered from its
  processes first (a collective: every process must call this at the same point)."""
  from jax.sharding import NamedSharding
  from srpo_jax import sharding as sharding_lib
  if not multi_process():
    return state
  targets = sharding_lib.state_shardings(state, mesh)

  def one(x, target: NamedSharding):
    by_device = {s.device: s.data for s in x.addressable_shards}
    want = target.addressable_devices_indices_map(x.shape)
    have = {s.device: s.index for s in x.addressable_shards}
    if all(d in have and _same_index(have[d], idx, x.shape) for d, idx in want.items()):
      return jax.make_array_from_single_device_arrays(x.shape, target, [by_device[d] for d in want])
    from jax.experimental import multihost_utils
    return jax.device_put(np.asarray(multihost_utils.process_allgather(x, tiled=True)), target)

  # `targets` holds a NamedSharding where `state` holds a Variable (or an array): map over what is under each.
  return jax.tree.map(lambda target, sub: jax.tree.map(lambda x: one(x, target), sub), targets, state)


def _same_index(a: tuple, b: tuple, shape: tuple) -> bool:
  return all(x.indices(n) == y.indices(n) for x, y, n in zip(a, b, shape))
