"""Helpers for the tests that run `tests/fake_sglang_server.py`: start one as another process's server, build an
engine that launches it, and wait for a process to be gone."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time
import urllib.request

from srpo_jax.rollout import sglang_engine as se

FAKE = str(pathlib.Path(__file__).with_name("fake_sglang_server.py"))


def start_fake(*args: str, vocab: int, timeout_s: float = 30.0) -> tuple[subprocess.Popen, str]:
  """A standalone fake server (one that some other process owns) with `vocab` token ids, healthy when this returns."""
  port = se._free_port()
  proc = subprocess.Popen([sys.executable, FAKE, "--port", str(port), "--fake-vocab", str(vocab), *args],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}"
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with urllib.request.urlopen(url + "/health", timeout=1) as r:
        if r.status == 200:
          return proc, url
    except OSError:
      if time.monotonic() > deadline:
        proc.kill()
        raise
      time.sleep(0.05)


def fake_engine(tmp_path: pathlib.Path, *fake_args: str, vocab: int, **kw) -> se.SGLangEngine:
  """An SGLangEngine that launches the fake server (`fake_args` are its switches), with test-sized deadlines."""
  kw.setdefault("health_timeout_s", 20.0)
  kw.setdefault("request_deadline_s", 10.0)
  kw.setdefault("backoff_s", 0.05)
  kw.setdefault("install_signal_handlers", False)
  kw.setdefault("send_seeds", True)
  kw.setdefault("kill_grace_s", 3.0)
  kw.setdefault("launch_cmd", [sys.executable, FAKE])
  return se.SGLangEngine(kw.pop("model_path", str(tmp_path / "init_ckpt")), run_dir=tmp_path / "run",
                         server_args=["--fake-vocab", str(vocab), *fake_args], **kw)


def pid_gone(pid: int, wait_s: float = 5.0) -> bool:
  """True once `pid` no longer exists or is a zombie (an orphan whose reaper has not run yet)."""
  deadline = time.monotonic() + wait_s
  while True:
    try:
      os.kill(pid, 0)
      with open(f"/proc/{pid}/stat") as f:
        if f.read().rsplit(")", 1)[1].split()[0] == "Z":
          return True
    except (ProcessLookupError, FileNotFoundError):
      return True
    if time.monotonic() > deadline:
      return False
    time.sleep(0.05)
