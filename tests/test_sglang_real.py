"""The SGLang client and the trainer against a REAL SGLang 0.5.23 server, on the CPU.

Not the fake of test_sglang_engine.py: SGLang's own HTTP server, tokenizer manager, scheduler, weight loader and
Qwen3 model, run by `.venv-sglang` (make sglang-env; pinned in tests/sglang_cpu/requirements.txt) through
tests/sglang_cpu/serve.py, which stubs SGLang's CUDA-only imports (each stub raises if called). Flags:
`--device cpu --dtype float32 --attention-backend torch_native` (no CUDA graphs). The model is the tiny random Qwen3
of configs/tiny.py with the real vocabulary.

One server, launched by an owning `SGLangEngine` (the module fixture), serves every test; the trainer runs attach to
it by URL. Only the kill test starts a second one (the engine's restart). A server start costs 25-40 s of this
machine's 2 cores (SGLang's and torch's imports in three processes), so nothing else launches one.

Skipped when .venv-sglang is missing, except under CI=true, where that is a failure (make test builds it).
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from srpo_jax import metrics as M
from srpo_jax import trainer as trainer_lib
from srpo_jax.models import hf_io, qwen3
from srpo_jax.rollout import sglang_engine as se
from srpo_jax.rollout.engine import SamplingParams
from srpo_jax.tokenizer import load_tokenizer
from tests.e2e_utils import REPO, coin_task, fast_config
from tests.fake_server_utils import pid_gone

SGL_PYTHON = os.path.join(REPO, ".venv-sglang", "bin", "python")
SERVE = os.path.join(REPO, "tests", "sglang_cpu", "serve.py")
IN_CI = os.environ.get("CI") == "true"
if not os.path.exists(SGL_PYTHON) and not IN_CI:
  pytest.skip(f"{SGL_PYTHON} is missing (make sglang-env builds it)", allow_module_level=True)

# SGLang's CPU engine, fp32 like the JAX reference. --max-total-tokens bounds the KV cache (by default SGLang takes
# 72% of the free host memory: 13 GB); 32k tokens hold the largest test batch (16 x 1,600) with room.
SERVER_ARGS = ["--device", "cpu", "--dtype", "float32", "--attention-backend", "torch_native",
               "--max-total-tokens", "32768", "--random-seed", "0", "--skip-server-warmup"]
TOL = 1e-4  # server log-probs vs the JAX model on the same weights (measured: ~1e-6)
TINY = qwen3.Qwen3Config.preset("tiny", dtype="float32", param_dtype="float32")
V0 = 100  # the shared engine's versions start here, apart from the trainer runs' 0, 1, 2, ...
START_TIMEOUT_S = 300.0  # a server start takes ~40 s here; the suite's other worker shares the 2 cores

TIMINGS: dict[str, float] = {}  # printed at the end of the module (pytest -s), quoted in BUILD_NOTES


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer()


@pytest.fixture(scope="module")
def models():
  """Two different random tiny models (seeds 0 and 1): weights A and B."""
  return qwen3.init_model(TINY, seed=0), qwen3.init_model(TINY, seed=1)


def _export_fn(tok):
  def export(model, out_dir):  # fp32, as the JAX reference computes
    hf_io.save_pretrained(model, out_dir, tokenizer=tok, dtype="float32")
  return export


@pytest.fixture(scope="module")
def server(tmp_path_factory, tok, models):
  """The shared server: launched (owned mode) from an export of model A, tagged V0."""
  if not os.path.exists(SGL_PYTHON):
    pytest.fail(f"CI=true but {SGL_PYTHON} is missing: make test builds it (make sglang-env); the real-server "
                "tests must run in CI")
  root = tmp_path_factory.mktemp("sglang_real")
  export = _export_fn(tok)
  export(models[0], str(root / "initial"))
  t0 = time.monotonic()
  # kill_grace_s: SGLang's own SIGTERM shutdown sleeps 5 s ("crash diagnostics"); SIGKILL of the group after 2 s.
  eng = se.SGLangEngine(root / "initial", server_args=SERVER_ARGS, export_fn=export, run_dir=root / "run",
                        launch_cmd=[SGL_PYTHON, SERVE], initial_version=V0, vocab_size=TINY.vocab_size,
                        health_timeout_s=START_TIMEOUT_S, request_deadline_s=120.0, install_signal_handlers=False,
                        kill_grace_s=2.0)
  TIMINGS["server start (launch to /health_generate 200), s"] = time.monotonic() - t0
  yield eng
  pgid = eng.server_pid  # the group of the server now running (the kill test restarts it)
  eng.close()
  # SGLang's scheduler and detokenizer are children in the launched group: close() must leave none of them.
  assert pgid is not None and _group_pids(pgid) == []
  print("\nreal SGLang timings: " + json.dumps({k: round(v, 6) for k, v in TIMINGS.items()}, indent=1))


def _group_pids(pgid: int) -> list[int]:
  """Live (not zombie) processes of process group `pgid`."""
  out = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[2]) == pgid and fields[0] != "Z":
      out.append(int(pid))
  return out


def _prompts(tok) -> list[list[int]]:
  texts = ["What state is water in at 150 degrees Celsius?", "Ice melts at", "Hi"]
  return [tok.encode(t) for t in texts]


SCORE_LEN, SCORE_T = 32, 8  # padded prompt + response length and response length: one compiled scorer per model


@functools.partial(jax.jit, static_argnums=0)
def _score(graphdef, state, ids, mask, pos, tokens, inv_temperature):
  """log_softmax(logits / T)[token] at positions `pos` of right-padded rows `ids` (teacher forcing, fp32)."""
  model = nnx.merge(graphdef, state)
  h = jnp.take_along_axis(model.hidden_states(ids, mask, right_padded=True), pos[..., None], axis=1)
  lp = jax.nn.log_softmax(model.logits(h) * inv_temperature, axis=-1)
  return jnp.take_along_axis(lp, tokens[..., None], axis=-1)[..., 0]


def _max_logprob_diff(model, prompts, completions, temperature: float) -> float:
  """max |JAX log-prob - server log-prob| over every sampled token of `completions` (result[i][j]: prompt i)."""
  rows = [(p, c) for p, group in zip(prompts, completions) for c in group]
  ids = np.zeros((len(rows), SCORE_LEN), np.int32)
  mask = np.zeros_like(ids, dtype=bool)
  pos = np.zeros((len(rows), SCORE_T), np.int32)
  tokens = np.zeros_like(pos)
  for r, (p, c) in enumerate(rows):
    seq = list(p) + c.token_ids.tolist()
    assert len(seq) <= SCORE_LEN and len(c.token_ids) <= SCORE_T
    ids[r, :len(seq)], mask[r, :len(seq)] = seq, True
    pos[r, :len(c.token_ids)] = np.arange(len(p) - 1, len(seq) - 1)  # the positions that predict the tokens
    tokens[r, :len(c.token_ids)] = c.token_ids
  graphdef, state = nnx.split(model)
  lp = np.asarray(_score(graphdef, state, ids, mask, pos, tokens, 1.0 / temperature))
  return float(max(np.max(np.abs(lp[r, :len(c.token_ids)] - c.logprobs)) for r, (_, c) in enumerate(rows)))


def _push(eng, model, version: int) -> float:
  """Refit the shared engine (export + /update_weights_from_disk); returns the seconds it took."""
  t0 = time.monotonic()
  eng.update_weights(model, version)
  return time.monotonic() - t0


def _log_text(eng, start: int = 0) -> str:
  with open(eng.log_path, "rb") as f:
    f.seek(start)
    return f.read().decode("utf-8", "replace")


def _wait_for(pred, timeout_s: float, what: str, poll_s: float = 0.2):
  deadline = time.monotonic() + timeout_s
  while not pred():
    if time.monotonic() > deadline:
      raise AssertionError(f"not within {timeout_s:g} s: {what}")
    time.sleep(poll_s)


# ---------------------------------------------------------------------------------------------------------------------


def test_owned_launch_serves_the_jax_models_logprobs(server, tok, models):
  eng = server
  assert eng.owns_server and not pid_gone(eng.server_pid, wait_s=0)
  info = eng.get_model_info()
  assert (info["model_path"], info["weight_version"]) == (eng.model_path, str(V0))
  prompts = _prompts(tok)
  worst = {}
  for temperature in (1.0, 0.6):  # SGLang's log-probs are of the TEMPERED distribution (sglang_engine docstring)
    out = eng.generate(prompts, SamplingParams(max_new_tokens=8, temperature=temperature, seed=1), n=2)
    assert [len(g) for g in out] == [2, 2, 2]
    assert {c.weight_version for g in out for c in g} == {V0}
    assert all(1 <= len(c.token_ids) <= 8 for g in out for c in g)
    worst[temperature] = _max_logprob_diff(models[0], prompts, out, temperature)
    assert worst[temperature] <= TOL, worst
    # The other model's log-probs are far off: the comparison can tell the weights apart.
    assert _max_logprob_diff(models[1], prompts, out, temperature) > 100 * TOL
  TIMINGS["logprob max |diff| at start (T=1)"] = worst[1.0]
  TIMINGS["logprob max |diff| at start (T=0.6)"] = worst[0.6]


def test_refit_serves_the_new_weights_under_the_new_version(server, tok, models):
  eng = server
  prompts = _prompts(tok)
  TIMINGS["refit (fp32 export + /update_weights_from_disk), s"] = _push(eng, models[1], V0 + 1)
  info = eng.get_model_info()
  assert info["weight_version"] == str(V0 + 1) and info["model_path"].endswith(f"v{V0 + 1:08d}")
  eng.verify_weights(V0 + 1)
  with pytest.raises(se.StaleWeightsError, match=f"weight_version='{V0 + 1}'"):
    eng.verify_weights(V0)
  out = eng.generate(prompts, SamplingParams(max_new_tokens=8, seed=2), n=2)
  assert {c.weight_version for g in out for c in g} == {V0 + 1}
  assert _max_logprob_diff(models[1], prompts, out, 1.0) <= TOL
  assert _max_logprob_diff(models[0], prompts, out, 1.0) > 100 * TOL  # stale weights would fail the line above
  # Time-shared (rollout.sglang_sleep): the server releases its memory, the refit wakes its weights alone (back to A
  # for the tests that follow); after another release a generate wakes the weights, reloads them, then the KV cache.
  # (On the CPU SGLang has no memory saver, so nothing is unmapped: what runs here is the API and its order.)
  eng.sleep()
  _push(eng, models[0], V0 + 2)
  eng.sleep()
  out = eng.generate(prompts[:1], SamplingParams(max_new_tokens=4, seed=3))
  assert {c.weight_version for g in out for c in g} == {V0 + 2}
  assert _max_logprob_diff(models[0], prompts[:1], out, 1.0) <= TOL


def test_attach_pushes_weights_and_the_owner_sees_them_as_stale(server, tok, models, tmp_path):
  eng = server
  att = se.SGLangEngine("unused", url=eng.url + "/", export_fn=_export_fn(tok), run_dir=tmp_path / "att",
                        vocab_size=TINY.vocab_size, health_timeout_s=60, request_deadline_s=60,
                        install_signal_handlers=False)
  try:
    assert not att.owns_server and att.server_pid is None
    prompts = _prompts(tok)
    # Attached, it takes the server's current tag as its own (A, pushed by the owner as V0 + 2).
    assert {c.weight_version for c in att.generate(prompts[:1], SamplingParams(max_new_tokens=3), n=2)[0]} == {0}
    att.update_weights(models[1], V0 + 3)
    out = att.generate(prompts, SamplingParams(max_new_tokens=6, seed=4))
    assert {g[0].weight_version for g in out} == {V0 + 3}
    assert _max_logprob_diff(models[1], prompts, out, 1.0) <= TOL
    # The owner last pushed V0 + 2: the server's answers now carry V0 + 3, which it must refuse.
    with pytest.raises(se.StaleWeightsError, match=f"sampled with weight_version '{V0 + 3}', expected '{V0 + 2}'"):
      eng.generate(prompts[:1], SamplingParams(max_new_tokens=2))
  finally:
    att.close()
  assert not pid_gone(eng.server_pid, wait_s=0)  # closing an attached engine leaves the server alone
  eng.update_weights(models[0], V0 + 4)
  assert eng.generate(prompts[:1], SamplingParams(max_new_tokens=2))[0][0].weight_version == V0 + 4


def test_request_deadline_and_a_refit_while_the_abandoned_request_runs(server, tok, models, tmp_path):
  """A request past its deadline fails in time and SGLang aborts it. A refit sent right after it waits (SGLang's
  model-update lock) until SGLang's tokenizer side aborts the abandoned request, then loads the weights while the
  scheduler still holds the aborted rows: SGLang answers HTTP 400 "cache was not flushed". The client then waits for
  the server to be idle and flushes the prefix cache (what a trainer resumed at once against its server meets)."""
  eng = server
  start = os.path.getsize(eng.log_path)
  att = se.SGLangEngine("unused", url=eng.url, run_dir=tmp_path / "att", vocab_size=TINY.vocab_size,
                        health_timeout_s=60, request_deadline_s=1.0, max_retries=0, install_signal_handlers=False)
  try:
    t0 = time.monotonic()
    # 16 x 1,500 tokens: tens of seconds of decoding here, far past the 1 s deadline.
    with pytest.raises(se.SGLangError, match=r"failed after 1 attempts \(request_deadline_s=1 each\)"):
      att.generate(_prompts(tok)[:1], SamplingParams(max_new_tokens=1500, seed=5), n=16)
    waited = time.monotonic() - t0
  finally:
    att.close()
  assert waited < 5.0, waited
  TIMINGS["deadline 1 s: generate raised after, s"] = waited
  TIMINGS["refit right after the abandoned request (waits for its abort), s"] = _push(eng, models[1], V0 + 5)
  log_text = _log_text(eng, start)
  # SGLang polls for a gone client every 4 s (SGLANG_REQUEST_STATE_WAIT_TIMEOUT) and aborts its request.
  assert "disconnected from the client side" in log_text
  assert "cache was not flushed because requests are still running" in log_text  # the path under test was taken
  out = eng.generate(_prompts(tok), SamplingParams(max_new_tokens=4, seed=8))
  assert {g[0].weight_version for g in out} == {V0 + 5}
  assert _max_logprob_diff(models[1], _prompts(tok), out, 1.0) <= TOL


def _metric_keys(run_dir) -> dict[int, set[str]]:
  return {r["step"]: set(r) for r in M.read_metrics(str(run_dir))}


def _as_exported(graphdef, params):
  """The model as the trainer's refit exports it (bf16 weights; every parameter is floating), computed in fp32."""
  return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), params))


def test_trainer_on_sglang_matches_the_jax_engine_metrics_and_refits(server, tok, tmp_path):
  """3 training steps with rollout.engine=sglang on the tiny config (attached to the shared server) record the same
  metrics as with the JAX engine; after the run the server holds the trained weights (the trainer's bf16 export)."""
  # GRPO, fast_config: the programs of test_trainer.py's grpo run and test_trainer_sglang.py, so make test's shared XLA
  # cache compiles them once for the three files.
  overrides = {"algo.name": "grpo", "train.steps": 3, "eval.at_start": False}
  runs = {}
  for engine in ("sglang", "jax"):
    extra = {"rollout.engine": engine, **({"rollout.sglang_url": server.url} if engine == "sglang" else {})}
    cfg = fast_config(tmp_path / engine, **overrides, **extra)
    tr = trainer_lib.Trainer(cfg, tokenizer=tok, task=coin_task(cfg, tok))
    initial = jax.tree.map(np.array, tr.state.params)  # copies: the train step donates the params
    t0 = time.monotonic()
    summary = tr.run()
    TIMINGS[f"trainer 3 steps, {engine} engine, s"] = time.monotonic() - t0
    runs[engine] = (tr, summary, initial)
  keys = {e: _metric_keys(tmp_path / e) for e in runs}
  assert sorted(keys["sglang"]) == sorted(keys["jax"]) == [1, 2, 3]
  assert keys["sglang"] == keys["jax"]
  assert set(runs["sglang"][1]) == set(runs["jax"][1]) and runs["sglang"][1]["steps"] == 3
  recs = M.read_metrics(str(tmp_path / "sglang"))
  assert all(r["time/refit_s"] > 0 for r in recs)
  TIMINGS["trainer refit (bf16 export + load), mean s"] = float(np.mean([r["time/refit_s"] for r in recs]))

  tr, _, initial = runs["sglang"]
  info = server.get_model_info()
  assert info["weight_version"] == "3" and info["model_path"].endswith("v00000003")
  # Sample from the server as it is now (tag "3"), and score against the trainer's final weights.
  att = se.SGLangEngine("unused", url=server.url, run_dir=tmp_path / "att", vocab_size=TINY.vocab_size,
                        initial_version=3, health_timeout_s=60, request_deadline_s=60, install_signal_handlers=False)
  try:
    prompts = _prompts(tok)
    out = att.generate(prompts, SamplingParams(max_new_tokens=8, seed=6), n=2)
  finally:
    att.close()
  assert {c.weight_version for g in out for c in g} == {3}
  trained = _as_exported(tr.graphdef, tr.state.params)
  before = _as_exported(tr.graphdef, initial)
  after_diff = _max_logprob_diff(trained, prompts, out, 1.0)
  stale_diff = _max_logprob_diff(before, prompts, out, 1.0)
  TIMINGS["logprob max |diff| after 3 trainer steps + refit"] = after_diff
  TIMINGS["same tokens scored with the step-0 (stale) weights"] = stale_diff
  assert after_diff <= TOL
  assert stale_diff > 10 * TOL  # had the refit not happened, the comparison above would fail


def test_sigterm_stops_the_trainer_while_the_server_generates(server, tok, tmp_path, models):
  """A real SIGTERM to the trainer (this process) while its /generate runs on the server: the trainer stops within
  seconds, checkpoints step 0, and the server aborts the abandoned request and keeps serving."""
  cfg = fast_config(tmp_path / "run", **{"train.steps": 3, "eval.at_start": False, "rollout.engine": "sglang",
                                         "rollout.sglang_url": server.url, "rollout.max_new_tokens": 1500})
  previous = signal.getsignal(signal.SIGTERM)  # before the trainer's engine installs its own
  tr = trainer_lib.Trainer(cfg, tokenizer=tok, task=coin_task(cfg, tok))
  start = os.path.getsize(server.log_path)
  sent = {}

  def kill_when_generating():
    # The rollout's prefill in the server log: the trainer is inside its /generate, its handler installed.
    try:
      _wait_for(lambda: "Prefill batch" in _log_text(server, start), 120.0, "the trainer's rollout reached the server")
    except AssertionError:
      return
    time.sleep(1.0)  # well into decoding
    sent["t"] = time.monotonic()
    os.kill(os.getpid(), signal.SIGTERM)

  killer = threading.Thread(target=kill_when_generating, daemon=True)
  killer.start()
  try:
    summary = tr.run()
  finally:
    killer.join(timeout=5)
    assert signal.getsignal(signal.SIGTERM) == previous  # the trainer put the previous handler back
  assert "t" in sent, "SIGTERM was never sent"
  stopped_s = time.monotonic() - sent["t"]
  TIMINGS["SIGTERM during generation: trainer returned after, s"] = stopped_s
  assert stopped_s < 30.0  # the checkpoint save included; the rollout alone would take minutes
  assert summary["steps"] == 0 and [r for r in M.read_metrics(str(tmp_path / "run")) if r["step"] > 0] == []
  assert tr.checkpointer.all_steps() == [0]  # the last completed step
  # The trainer pushed its own weights; the shared engine takes over again (as a resumed run would, at once: the
  # refit waits for SGLang to abort the abandoned rollout).
  server.update_weights(models[0], V0 + 6)
  _wait_for(lambda: "disconnected from the client side" in _log_text(server, start), 30.0,
            "the server log reports the abandoned request aborted")
  assert server.generate(_prompts(tok)[:1], SamplingParams(max_new_tokens=2))[0][0].weight_version == V0 + 6


def test_killed_server_is_restarted_on_the_latest_weights(server, tok, models):
  """Last in the module: SIGKILL of the whole server (process group); the next request restarts it."""
  eng = server
  _push(eng, models[1], V0 + 7)
  old_pid = eng.server_pid
  os.killpg(old_pid, signal.SIGKILL)
  assert pid_gone(old_pid)
  prompts = _prompts(tok)
  t0 = time.monotonic()
  out = eng.generate(prompts, SamplingParams(max_new_tokens=6, seed=7))
  TIMINGS["restart after SIGKILL + generate, s"] = time.monotonic() - t0
  assert eng.num_restarts == 1 and eng.server_pid != old_pid
  assert _group_pids(old_pid) == []
  info = eng.get_model_info()
  assert info["weight_version"] == str(V0 + 7) and info["model_path"].endswith(f"v{V0 + 7:08d}")
  assert {g[0].weight_version for g in out} == {V0 + 7}
  assert _max_logprob_diff(models[1], prompts, out, 1.0) <= TOL
