"""Each process of a multi-process run works in a child of a small supervisor (`run_supervised`), which outlives it.

Why: JAX's distributed runtime client aborts its process from a C++ thread (SIGABRT, a "Fatal Python error" dump
wherever the main thread was, e.g. inside a checkpoint save) the moment the coordination service reports a fatal
error, e.g. because process 0, which hosts the service, died. That usually happens before `distributed`'s own watch
thread notices, and the client's `missed_heartbeat_callback`, the hook that would replace the abort, cannot be called
from Python in jaxlib 0.10.2 (its status argument has no Python conversion: std::bad_cast). The supervisor imports
no JAX; when its child aborts and the coordinator no longer accepts connections, it says which process was lost in
the same one line as the watch does and exits `PEER_LOST_EXIT`, so a launcher sees the same status whichever
noticed first. Otherwise it passes the child's exit status through (a signal N as 128 + N, as a shell does).

The child dies with its supervisor (Linux PR_SET_PDEATHSIG), and SIGINT / SIGTERM / SIGHUP sent to the supervisor
are forwarded to it, so stopping a run or killing one of its processes works as before.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
from typing import Callable, Optional

SUPERVISED_ENV = "SRPO_JAX_SUPERVISED"  # set in the child: it does the work
PEER_LOST_EXIT = 5  # the exit status of a process that stopped because a peer process was lost (one home: here)
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


def supervised() -> bool:
  """Whether this process is a supervisor's child (or must not be supervised)."""
  return os.environ.get(SUPERVISED_ENV) == "1"


def lost_message(me: int, n: int, lost: Optional[list[int]], error: Optional[BaseException], kept: str) -> str:
  """The one line a process prints when it stops because peers were lost (None: process 0, the coordinator)."""
  who = "process 0 (the coordinator; it no longer answers)" if lost is None else (
      "process " + ", ".join(map(str, lost)) + " (it stopped answering)")
  first = "" if error is None else (str(error).strip().splitlines() or [""])[0][:300]
  return (f"multi-process run: process {me} of {n} lost {who}; stopping."
          + (f" Its error: {type(error).__name__}: {first}." if error is not None else "") + (f" {kept}" if kept else ""))


def _die_with_parent(parent: int) -> Callable[[], None]:
  def set_pdeathsig():
    with_errno = ctypes.CDLL(None, use_errno=True)
    with_errno.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the supervisor died before the call above
      os._exit(1)
  return set_pdeathsig


def accepts_connections(address: Optional[str], timeout_s: float = 2.0) -> bool:
  """Whether host:port accepts a TCP connection (the coordination service of a live process 0)."""
  if not address or ":" not in address:
    return True  # unknown: do not claim the coordinator was lost
  host, port = address.rsplit(":", 1)
  try:
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
      return True
  except (OSError, ValueError):
    return False


def run_supervised(argv: list[str], num_processes: int, process_id: Optional[int], coordinator: Optional[str],
                   what_is_kept: Callable[[], str] = lambda: "") -> int:
  """Runs `argv` (this entry point again) as a child with SUPERVISED_ENV set and returns the status to exit with."""
  if process_id is None:  # from the cluster, as jax.distributed.initialize finds it (SLURM)
    process_id = int(os.environ.get("SLURM_PROCID", "-1"))
  child = subprocess.Popen(argv, env={**os.environ, SUPERVISED_ENV: "1"}, preexec_fn=_die_with_parent(os.getpid()))
  previous = {s: signal.signal(s, lambda signum, _: child.send_signal(signum)) for s in _FORWARDED}
  try:
    rc = child.wait()
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  if rc == -signal.SIGABRT and process_id not in (None, 0) and not accepts_connections(coordinator):
    print(lost_message(process_id, num_processes, None, None, what_is_kept()), file=sys.stderr, flush=True)
    return PEER_LOST_EXIT
  return rc if rc >= 0 else 128 - rc
