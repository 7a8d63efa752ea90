"""The trainer driving the SGLang engine over real HTTP: rollouts, per-step HF export + refit with weight versions.

CONTRACT test: the server is tests/fake_sglang_server.py (SGLang's HTTP API subset, fake tokens), not SGLang.
"""
import json
import os
import subprocess
import sys
import time
import urllib.request

import jax.numpy as jnp
import numpy as np
import pytest

import srpo_jax
from srpo_jax import metrics as M
from srpo_jax import trainer as trainer_lib
from srpo_jax.tokenizer import load_tokenizer
from tests.e2e_utils import REPO, coin_task, fast_config, free_port


@pytest.fixture
def fake_server(tmp_path):
  port = free_port()
  proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "fake_sglang_server.py"), "--model-path",
                           str(tmp_path / "none"), "--port", str(port), "--fake-vocab", "151936"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + 30
  while time.time() < deadline:
    try:
      if urllib.request.urlopen(url + "/health", timeout=1).status == 200:
        break
    except OSError:
      time.sleep(0.1)
  yield url
  proc.kill()
  proc.wait()


def test_trainer_refits_sglang_every_step(tmp_path, fake_server, monkeypatch):
  # Exports on disk under run_dir, to be read after the run (in /dev/shm they are removed when the engine closes).
  from srpo_jax.rollout import sglang_engine
  monkeypatch.setattr(sglang_engine, "ram_exports_dir", lambda *a, **k: None)
  run_dir = tmp_path / "run"
  cfg = fast_config(run_dir, **{"algo.name": "grpo", "rollout.engine": "sglang", "rollout.sglang_url": fake_server})
  tok = load_tokenizer()
  tr = trainer_lib.Trainer(cfg, tokenizer=tok, task=coin_task(cfg, tok))
  summary = tr.run()
  assert summary["steps"] == 2
  info = json.load(urllib.request.urlopen(fake_server + "/get_model_info", timeout=5))
  assert str(info["weight_version"]) == "2"  # refit after each of the 2 steps, versions flowing through
  exports = sorted(os.listdir(run_dir / "weights"))
  assert exports[-1].endswith("2") and len(exports) <= 2
  # The exported directory is a bf16 HF checkpoint of the trained weights.
  model = srpo_jax.load_pretrained(run_dir / "weights" / exports[-1])
  assert model.embed[...].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(model.embed[...], np.float32),
                             np.asarray(tr.params["embed"].get_value(), np.float32), rtol=1e-2, atol=1e-3)
  recs = [r for r in M.read_metrics(str(run_dir)) if r["step"] > 0]
  assert [r["step"] for r in recs] == [1, 2] and all(r["time/refit_s"] > 0 for r in recs)
