"""Checkpoints on a real, small file system (a private tmpfs: `unshare -rm` + `mount -t tmpfs`, nothing outside
the test's own mount namespace is touched): the free-space pre-check admits a save that fits once compressed, and a
disk filled by someone else during a save ends `python -m srpo_jax.main` with one line and exit status 6."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.e2e_utils import FAST, REPO


def _can_mount() -> bool:
  if not shutil.which("unshare"):
    return False
  return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                        capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not _can_mount(), reason="needs unshare -rm and tmpfs mounts (user namespaces)")


def on_tmpfs(size: str, *cmd: str, timeout: int = 600) -> subprocess.CompletedProcess:
  """`cmd` in a private mount namespace with a fresh tmpfs of `size` at /mnt."""
  env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}
  script = f"mount -t tmpfs -o size={size} tmpfs /mnt && exec \"$@\""
  return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *cmd], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


SAVE_TWO = """
import json, os, shutil, sys
import jax.numpy as jnp, numpy as np
from srpo_jax.checkpointing import Checkpointer
state = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((1024, 1024), np.float32)),
         "z": jnp.zeros((1024, 1024))}  # 8.4 MB of arrays; zeros compress: about 4 MB on disk
size = lambda p: sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(p) for n in ns)
ck = Checkpointer("/mnt/ck", keep=1)
ck.save(1, state, {"step": 1})
before, size_1 = shutil.disk_usage("/mnt").free, size(ck.step_dir(1))
ck.save(2, state, {"step": 2})
print(json.dumps({"arrays": 2 * 4 * 1024 * 1024, "free_before_2": before, "on_disk_1": size_1,
                  "on_disk_2": size(ck.step_dir(2)), "steps": ck.all_steps()}))
"""


def test_free_space_check_admits_a_save_that_fits_compressed():
  """11 MB: checkpoint 1 takes ~4 MB, leaving less than the arrays' 8.4 MB but more than checkpoint 2 needs."""
  proc = on_tmpfs("11m", sys.executable, "-c", SAVE_TWO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["on_disk_2"] < out["free_before_2"] < out["arrays"], out  # the old estimate would have refused
  assert abs(out["on_disk_2"] - out["on_disk_1"]) < 0.01 * out["on_disk_1"]  # the estimate: the last one's size
  assert out["steps"] == [2]


def test_disk_filled_during_a_save_is_one_line(tmp_path):
  flags = [f"--config.{k}={v}" for k, v in {**FAST, "train.steps": 3, "run_dir": "/mnt/run"}.items()]
  proc = on_tmpfs("400m", sys.executable, "-m", "tests.disk_full_driver", "2", "/mnt/filler",
                  "--config=configs/tiny.py", *flags)
  err = proc.stderr
  assert proc.returncode == 6, err[-3000:]
  assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
  lines = [line for line in err.splitlines() if "No space left on device" in line]
  assert lines == [lines[-1]] and lines[-1].startswith(
      "checkpoint: /mnt/run/checkpoints/2: No space left on device while saving checkpoint 2 ("), err[-3000:]
  assert lines[-1].endswith("the previous checkpoints are kept (newest: 1)")
  assert err.strip().splitlines()[-1] == lines[-1]
