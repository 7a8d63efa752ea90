"""Real multi-process JAX on CPU (gloo collectives): two processes, one mesh, a batch sharded across them."""
import os
import socket
import subprocess
import sys

from tests.e2e_utils import REPO


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_process_forward_matches_single_process():
  port = _free_port()
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(port), str(i)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  results = [line.split() for out, _ in outs for line in out.splitlines() if line.startswith("RESULT")]
  assert len(results) == 2
  for _, pid, total, ref in results:
    assert abs(float(total) - float(ref)) <= 1e-3 * max(1.0, abs(float(ref))), (pid, total, ref)
  assert results[0][2] == results[1][2]  # both processes see the same global value
