"""The trainer against a rollout server that holds other weights, hangs, or is waited on when a signal arrives.

CONTRACT tests against tests/fake_sglang_server.py (SGLang's HTTP API subset; its tokens and logprobs are a function
of the prompt, the seed and a fingerprint of the loaded safetensors files, so the rollouts tell which weights served
them). Not SGLang.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from flax import nnx

from srpo_jax import metrics as M
from srpo_jax import trainer as trainer_lib
from srpo_jax.models import hf_io
from srpo_jax.rollout import sglang_engine as se
from srpo_jax.tokenizer import load_tokenizer
from tests.e2e_utils import REPO, coin_task, fast_config, fast_overrides, free_port
from tests.fake_server_utils import FAKE, pid_gone as _pid_gone, start_fake

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import fake_sglang_server as fake  # noqa: E402

VOCAB = 151936  # the tiny model's (Qwen3's) vocabulary
DETERMINISTIC = ("--enable-deterministic-inference",)  # the engine then sends per-sample seeds: reproducible rollouts


def _start_fake(*args: str) -> tuple[subprocess.Popen, str]:
  return start_fake(*args, vocab=VOCAB)


def _info(url: str) -> dict:
  with urllib.request.urlopen(url + "/get_model_info", timeout=5) as r:
    return json.load(r)


def _post(url: str, path: str, body: dict) -> dict:
  req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                               headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=10) as r:
    return json.load(r)


@pytest.fixture
def other_weights(tmp_path) -> pathlib.Path:
  """A model directory that is not the trainer's (some other safetensors bytes)."""
  d = tmp_path / "someone_elses_model"
  d.mkdir()
  (d / "model.safetensors").write_bytes(os.urandom(4096))
  return d


def _fingerprint_of(tr: trainer_lib.Trainer, out_dir: pathlib.Path) -> str:
  """The fake's fingerprint of the trainer's current weights, exported here independently of the engine."""
  hf_io.save_pretrained(nnx.merge(tr.graphdef, tr.params), str(out_dir), tokenizer=tr.tokenizer, dtype="bfloat16")
  return fake.weights_fingerprint(str(out_dir))


def _spy_rollouts(monkeypatch) -> list:
  """Records every `collect_rollouts` call of the trainer (its arguments and result); behaviour unchanged."""
  calls = []
  real = trainer_lib.collect_rollouts

  def spy(engine, prompt_ids, rows, tokenizer, sampling, n):
    ro = real(engine, prompt_ids, rows, tokenizer, sampling, n)
    calls.append((list(rows), sampling, ro))
    return ro
  monkeypatch.setattr(trainer_lib, "collect_rollouts", spy)
  return calls


def _expected_logp(tr, sampling, rows, weights: str) -> list[list[float]]:
  """What the fake answers for these prompts when it holds `weights` (sample j of prompt i gets its own seed)."""
  out = []
  for i, row in enumerate(rows):
    for j in range(tr.cfg.rollout.n):
      params = se.sglang_sampling_params(sampling, se.sample_seed(sampling.seed, i, j))
      g = fake.fake_generate(list(tr.task.train.ids[row]), params, VOCAB, salt=0, weights=weights)
      out.append(np.asarray(g["logprobs"], np.float32).tolist())
  return out


def _steps_on_disk(cfg) -> list[int]:
  return sorted(int(d) for d in os.listdir(cfg.checkpoint_dir) if d.isdigit())


def test_attached_server_session_weights_pushed_and_signals_honoured(tmp_path, other_weights, monkeypatch):
  """One adversarial session against an attached server that holds someone else's weights (one run's compile
  serves several checks; each phase is labelled):

  1. fresh run: before any rollout the server reports the trainer's version and export path and serves the trainer's
     bytes (fingerprint); the run's first rollouts' log-probs are those of the trainer's weights, not the other ones;
  2. step 1's /generate hangs (deadline 60 s): SIGTERM stops the run within seconds, checkpoint 1 (the last
     completed step) and its metrics record kept, no prompt of the abandoned step consumed;
  3. someone loads other weights into the server under the very tag the resumed run expects ("1");
  4. resume: the same checks as 1 against the restored weights (the log-probs of the resumed run's first rollouts);
  5. SIGINT while the resumed step's update compiles and runs (where KeyboardInterrupt used to crash XLA): the step
     finishes and is checkpointed (2), the run stops before the next step.
  """
  proc, url = _start_fake("--model-path", str(other_weights), "--weight-version", "0", "--fake-hang-after", "2",
                          "--fake-hang-count", "1")
  other = fake.weights_fingerprint(str(other_weights))
  run_dir = tmp_path / "run"
  tok = load_tokenizer()
  over = {"rollout.engine": "sglang", "rollout.sglang_url": url, "rollout.sglang_args": DETERMINISTIC,
          "rollout.request_deadline_s": 60.0, "train.steps": 3, "eval.at_start": False, "algo.name": "grpo"}
  try:
    # 1. Fresh: the server says version "0" (the trainer's tag too) but holds someone else's weights.
    before = {s: signal.getsignal(s) for s in trainer_lib.STOP_SIGNALS}
    cfg = fast_config(run_dir, **over)
    tr = trainer_lib.Trainer(cfg, tokenizer=tok, task=coin_task(cfg, tok))
    mine = _fingerprint_of(tr, tmp_path / "mine0")
    info = _info(url)
    assert info["weight_version"] == "0" and info["model_path"] == str(tr.engine.exports_dir / "v00000000")
    assert info["fake_weights_sha"] == mine != other

    # 2. Step 0 (/generate #1) completes; step 1's request (#2) hangs; SIGTERM.
    calls = _spy_rollouts(monkeypatch)
    sent: list[float] = []
    _send_when_requests(url, 2, signal.SIGTERM, sent)
    summary = tr.run()
    rows, sampling, ro = calls[0]  # the run's first rollouts (step 0), before its first update
    got = [lp.tolist() for lp in ro.rollout_logp]
    assert got == _expected_logp(tr, sampling, rows, mine) != _expected_logp(tr, sampling, rows, other)
    assert sent and time.monotonic() - sent[0] < 5.0, "the run did not stop promptly after SIGTERM"
    assert summary["steps"] == 1 and _steps_on_disk(cfg) == [1]
    assert tr.state.data_position == cfg.rollout.prompts_per_step  # step 1's prompts were not consumed
    assert [r["step"] for r in M.read_metrics(str(run_dir))] == [1]
    assert {s: signal.getsignal(s) for s in trainer_lib.STOP_SIGNALS} == before  # all handlers put back
    assert _info(url)["weight_version"] == "1"  # the refit after step 0

    # 3. Someone else's weights, under the tag the resumed run expects.
    assert _post(url, "/update_weights_from_disk", {"model_path": str(other_weights), "weight_version": "1"})["success"]

    # 4. Resume.
    cfg = fast_config(run_dir, **{**over, "resume": True})
    tr = trainer_lib.Trainer(cfg, tokenizer=tok, task=coin_task(cfg, tok))
    assert tr.step == 1
    mine = _fingerprint_of(tr, tmp_path / "mine1")
    info = _info(url)
    assert info["weight_version"] == "1" and info["model_path"] == str(tr.engine.exports_dir / "v00000001")
    assert info["fake_weights_sha"] == mine != other

    # 5. SIGINT just before the jitted update of step 1 is compiled and run.
    real = trainer_lib.run_updates

    def sigint_then_update(*args, **kwargs):
      os.kill(os.getpid(), signal.SIGINT)
      return real(*args, **kwargs)
    monkeypatch.setattr(trainer_lib, "run_updates", sigint_then_update)
    calls.clear()
    summary = tr.run()
    rows, sampling, ro = calls[0]  # the resumed run's first rollouts (step 1)
    got = [lp.tolist() for lp in ro.rollout_logp]
    assert got == _expected_logp(tr, sampling, rows, mine) != _expected_logp(tr, sampling, rows, other)
    assert summary["steps"] == 2 and _steps_on_disk(cfg) == [1, 2]
    assert [r["step"] for r in M.read_metrics(str(run_dir))] == [1, 2]
  finally:
    proc.kill()
    proc.wait()


def _send_when_requests(url: str, count: int, sig: int, sent: list) -> threading.Thread:
  """Sends `sig` to this process once the fake has received `count` /generate requests (the last one hangs)."""
  def go():
    deadline = time.monotonic() + 120
    while _info(url)["fake_generate_requests"] < count:
      if time.monotonic() > deadline:
        return
      time.sleep(0.05)
    time.sleep(0.3)  # well inside the hung request
    sent.append(time.monotonic())
    os.kill(os.getpid(), sig)
  t = threading.Thread(target=go, daemon=True)
  t.start()
  return t


def _owned_fake_engine(tmp_path, *fake_args) -> se.SGLangEngine:
  """A server the engine launches (the fake) with a marker exporter; the trainer must close it on a stop."""
  def export(params, out_dir):
    pathlib.Path(out_dir, "marker").write_text("weights")
  return se.SGLangEngine(str(tmp_path / "initial"), launch_cmd=[sys.executable, FAKE], export_fn=export,
                         server_args=["--fake-vocab", str(VOCAB), *fake_args], run_dir=tmp_path / "run",
                         request_deadline_s=60.0, health_timeout_s=20.0, vocab_size=VOCAB,
                         install_signal_handlers=False)


def test_sigint_during_the_first_hung_request_is_a_clean_stop(tmp_path):
  """Ctrl-C is SIGTERM's twin: no KeyboardInterrupt; the (initial) state is checkpointed, the server closed."""
  eng = _owned_fake_engine(tmp_path, "--fake-hang-after", "1")
  pid, url = eng.server_pid, eng.url
  cfg = fast_config(tmp_path / "run", **{"train.steps": 2, "eval.at_start": False, "algo.name": "grpo",
                                         "rollout.engine": "sglang"})
  tok = load_tokenizer()
  tr = trainer_lib.Trainer(cfg, tokenizer=tok, task=coin_task(cfg, tok), engine=eng)
  sent: list[float] = []
  _send_when_requests(url, 1, signal.SIGINT, sent)
  summary = tr.run()
  assert sent and time.monotonic() - sent[0] < 5.0
  assert summary["steps"] == 0 and tr.checkpointer.all_steps() == [0]
  assert tr.state.data_position == 0  # the abandoned step consumed no prompts
  assert _pid_gone(pid)


def test_trainer_stops_within_the_deadline_on_a_trickling_server(tmp_path):
  """Attached to a server that answers one byte a second: the run fails with the URL and the deadline named, after
  deadline × (retries + 1) plus backoff, not hours."""
  proc, url = _start_fake("--model-path", str(tmp_path / "m"), "--fake-trickle-after", "1")
  try:
    cfg = fast_config(tmp_path / "run", **{"rollout.engine": "sglang", "rollout.sglang_url": url,
                                           "rollout.request_deadline_s": 1.5, "rollout.request_retries": 1,
                                           "algo.name": "grpo"})
    tok = load_tokenizer()
    tr = trainer_lib.Trainer(cfg, tokenizer=tok, task=coin_task(cfg, tok))
    t0 = time.monotonic()
    with pytest.raises(se.SGLangError) as err:
      tr.run()
    elapsed = time.monotonic() - t0
    assert 3.0 <= elapsed < 3.0 + 1.0 + 3.0, elapsed  # 2 deadlines + 1 s backoff + margin
    assert f"{url}/generate" in str(err.value) and "request_deadline_s=1.5" in str(err.value)
  finally:
    proc.kill()
    proc.wait()


def test_main_exits_nonzero_naming_url_and_deadline_on_a_hung_server(tmp_path):
  """The command line: a hung attached server ends the process with exit code 4 and one line naming both."""
  proc, url = _start_fake("--model-path", str(tmp_path / "m"), "--fake-hang-after", "1")
  try:
    over = fast_overrides(tmp_path / "run", **{"rollout.engine": "sglang", "rollout.sglang_url": url,
                                               "rollout.request_deadline_s": 1.0, "rollout.request_retries": 1})
    args = [f"--config.{k}={','.join(v) if isinstance(v, tuple) else v}" for k, v in over.items()]
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-m", "srpo_jax.main", "--config=configs/tiny.py", *args], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 4, res.stderr[-3000:]
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("rollout server: ")]
    assert line and f"{url}/generate" in line[0] and "request_deadline_s=1 each" in line[0], res.stderr[-3000:]
    assert "overall deadline of 1 s" in line[0]
  finally:
    proc.kill()
    proc.wait()
