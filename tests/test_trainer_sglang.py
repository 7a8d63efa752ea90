"""The trainer driving the SGLang engine over real HTTP: rollouts, per-step HF export + refit with weight versions.

CONTRACT test: the server is tests/fake_sglang_server.py (SGLang's HTTP API subset, fake tokens), not SGLang.
"""
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request

import jax.numpy as jnp
import numpy as np

import srpo_jax
from srpo_jax import metrics as M
from srpo_jax import trainer as trainer_lib
from srpo_jax.tokenizer import load_tokenizer
from tests.e2e_utils import REPO, coin_task, fast_config, free_port


@contextlib.contextmanager
def launched_fake(model_path):
  """A fake server of the real vocabulary on a free port; yields its URL."""
  port = free_port()
  proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "fake_sglang_server.py"), "--model-path",
                           str(model_path), "--port", str(port), "--fake-vocab", "151936"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + 30
  while time.time() < deadline:
    try:
      if urllib.request.urlopen(url + "/health", timeout=1).status == 200:
        break
    except OSError:
      time.sleep(0.1)
  try:
    yield url
  finally:
    proc.kill()
    proc.wait()


def test_trainer_refits_sglang_every_step_and_time_shares_it_exactly(tmp_path, monkeypatch):
  """Every step ends with a bf16 HF export of the trained weights loaded by the server under the step's version.
  rollout.sglang_sleep: while the server generates, the optimizer state and the teacher are in pinned host memory
  (and back on the device for the update); after each rollout the server is asleep. The trained state is bitwise
  the same as without time-sharing."""
  # Exports on disk under run_dir, to be read after the run (in /dev/shm they are removed when the engine closes).
  import jax
  from srpo_jax.rollout import sglang_engine
  monkeypatch.setattr(sglang_engine, "ram_exports_dir", lambda *a, **k: None)
  seen, holder = [], {}
  generate = sglang_engine.SGLangEngine.generate

  def spy(self, *a, **k):
    if "tr" in holder:
      st = holder["tr"].state
      seen.append({x.sharding.memory_kind for x in jax.tree.leaves((st.opt_state, st.teacher))})
    return generate(self, *a, **k)

  monkeypatch.setattr(sglang_engine.SGLangEngine, "generate", spy)
  tok = load_tokenizer()
  states = {}
  for sleep in (False, True):  # each run on a fresh server: the fake's unseeded samples depend on its history
    with launched_fake(tmp_path / "none") as url:
      cfg = fast_config(tmp_path / f"run_{sleep}", **{"algo.name": "srpo", "rollout.engine": "sglang",
                                                     "rollout.sglang_url": url, "rollout.sglang_sleep": sleep})
      tr = trainer_lib.Trainer(cfg, tokenizer=tok, task=coin_task(cfg, tok))
      holder["tr"] = tr
      seen.clear()
      assert tr.run()["steps"] == 2
      info = json.load(urllib.request.urlopen(url + "/get_model_info", timeout=5))
    assert str(info["weight_version"]) == "2"  # refit after each of the 2 steps, versions flowing through
    run_dir = cfg.run_dir
    exports = sorted(os.listdir(os.path.join(run_dir, "weights")))
    assert exports[-1].endswith("2") and len(exports) <= 2
    # The exported directory is a bf16 HF checkpoint of the trained weights.
    model = srpo_jax.load_pretrained(os.path.join(run_dir, "weights", exports[-1]))
    assert model.embed[...].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(model.embed[...], np.float32),
                               np.asarray(tr.params["embed"].get_value(), np.float32), rtol=1e-2, atol=1e-3)
    recs = [r for r in M.read_metrics(str(run_dir)) if r["step"] > 0]
    assert [r["step"] for r in recs] == [1, 2] and all(r["time/refit_s"] > 0 for r in recs)
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves((tr.state.opt_state, tr.state.teacher))}
    assert kinds == {"device"}  # back for the update and the checkpoint
    assert seen and all(s == ({"pinned_host"} if sleep else {"device"}) for s in seen), seen
    states[sleep] = jax.tree.map(np.asarray, tr.state.arrays())
    assert info["fake_released"] == (["cuda_graph", "kv_cache", "weights"] if sleep else [])
  jax.tree.map(np.testing.assert_array_equal, states[False], states[True])
