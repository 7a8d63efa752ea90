"""The supervisor of a multi-process run's processes (srpo_jax/supervise.py), with small child scripts: statuses pass
through, signals are forwarded, the child dies with its supervisor, and an aborted child whose coordinator is gone
becomes PEER_LOST_EXIT with one line naming process 0."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from srpo_jax import supervise
from tests.e2e_utils import REPO, free_port


def child(code: str) -> list:
  return [sys.executable, "-c", code]


@pytest.mark.parametrize("code, want", [("import sys; sys.exit(3)", 3), ("pass", 0),
                                        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 128 + 9)])
def test_exit_status_passes_through(code, want):
  assert supervise.run_supervised(child(code), 2, 1, None) == want


def test_child_runs_supervised():
  code = f"import os, sys; sys.exit(0 if os.environ.get('{supervise.SUPERVISED_ENV}') == '1' else 9)"
  assert supervise.run_supervised(child(code), 2, 1, None) == 0


def test_aborted_child_with_the_coordinator_gone_is_a_lost_peer(capfd):
  abort = "import os; os.abort()"
  gone = f"127.0.0.1:{free_port()}"  # nothing listens there
  assert supervise.run_supervised(child(abort), 2, 1, gone, lambda: "The newest complete checkpoint is /x/3") \
      == supervise.PEER_LOST_EXIT
  err = capfd.readouterr().err.strip().splitlines()
  assert err[-1] == ("multi-process run: process 1 of 2 lost process 0 (the coordinator; it no longer answers); "
                     "stopping. The newest complete checkpoint is /x/3")
  with socket.socket() as live:  # the coordinator still answers: the abort is this process's own, passed through
    live.bind(("127.0.0.1", 0))
    live.listen()
    assert supervise.run_supervised(child(abort), 2, 1, "127.0.0.1:%d" % live.getsockname()[1]) == 128 + 6
  assert supervise.run_supervised(child(abort), 2, 0, gone) == 128 + 6  # process 0 hosts the coordinator itself


def _supervisor(code: str) -> subprocess.Popen:
  script = (f"import sys; from srpo_jax import supervise; "
            f"sys.exit(supervise.run_supervised([sys.executable, '-c', {code!r}], 2, 1, None))")
  return subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": REPO})


def test_sigterm_is_forwarded_to_the_child():
  proc = _supervisor("import os, signal, sys, time\n"
                     "signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))\n"
                     "print(os.getpid(), flush=True)\n"
                     "time.sleep(60)")
  proc.stdout.readline()  # the child is up, its handler installed
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=30) == 7


def test_child_dies_with_its_supervisor():
  proc = _supervisor("import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(60)")
  pid = int(proc.stdout.readline())
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  deadline = time.monotonic() + 10
  while time.monotonic() < deadline:
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return
    time.sleep(0.1)
  os.kill(pid, signal.SIGKILL)
  raise AssertionError(f"child {pid} outlived its supervisor")
