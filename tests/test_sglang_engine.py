"""Tests of `SGLangEngine` against `tests/fake_sglang_server.py`.

These are CONTRACT tests against a FAKE server, not against SGLang (SGLang needs CUDA and is not installed here): real
HTTP on 127.0.0.1 and real subprocesses / process groups, but the server side is our reading of SGLang's API. What
they show is that the engine speaks that API and survives crashes, stale weights and hung startups.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from srpo_jax.rollout import sglang_engine as se
from srpo_jax.rollout.engine import SamplingParams
from tests.fake_server_utils import FAKE, fake_engine, pid_gone as _pid_gone

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import fake_sglang_server as fake  # noqa: E402

VOCAB = 32
STOP = (5, 7)


def _engine(tmp_path: pathlib.Path, *fake_args: str, **kw) -> se.SGLangEngine:
  return fake_engine(tmp_path, *fake_args, vocab=VOCAB, **kw)


def _export_marker(params, out_dir: str) -> None:
  """Stands in for the HF safetensors exporter: writes the params' version into a marker file."""
  pathlib.Path(out_dir, "marker.json").write_text(json.dumps(params))


def _reference(prompt, sampling: SamplingParams, i: int, j: int):
  """What the fake must produce for sample j of prompt i when the engine sends per-sample seeds."""
  params = se.sglang_sampling_params(sampling, se.sample_seed(sampling.seed, i, j))
  return fake.fake_generate(prompt, params, VOCAB, salt=0)


def _check_completion(c, sampling: SamplingParams, version: int) -> None:
  assert c.token_ids.dtype == np.int32 and c.logprobs.dtype == np.float32
  assert c.token_ids.shape == c.logprobs.shape and 1 <= len(c.token_ids) <= sampling.max_new_tokens
  assert np.all(c.logprobs <= 0.0)
  assert c.weight_version == version
  stops = np.isin(c.token_ids, sampling.stop_token_ids)
  if c.finish_reason == "stop":  # Ends with its stop token, and has no earlier one.
    assert stops[-1] and not stops[:-1].any()
  else:
    assert c.finish_reason == "length" and len(c.token_ids) == sampling.max_new_tokens and not stops.any()


# ----- pure helpers ---------------------------------------------------------------------------------------------------


def test_sampling_params_translation():
  p = se.sglang_sampling_params(SamplingParams(max_new_tokens=9, temperature=0.6, top_p=0.95, top_k=0,
                                               stop_token_ids=(3, 4)), seed=11)
  assert p == {"max_new_tokens": 9, "temperature": 0.6, "top_p": 0.95, "top_k": -1, "n": 1, "no_stop_trim": True,
               "stop_token_ids": [3, 4], "sampling_seed": 11}
  p = se.sglang_sampling_params(SamplingParams(max_new_tokens=2, top_k=100))
  assert p["top_k"] == 100 and "sampling_seed" not in p and "stop_token_ids" not in p


def test_server_args_to_cli():
  assert se.server_args_to_cli({"mem_fraction_static": 0.8, "enable_deterministic_inference": True,
                                "disable_radix_cache": False, "tp_size": 2}) == [
                                    "--mem-fraction-static", "0.8", "--enable-deterministic-inference",
                                    "--tp-size", "2"]
  assert se.server_args_to_cli(["--tp", "2"]) == ["--tp", "2"]
  with pytest.raises(TypeError, match="server_args"):
    se.server_args_to_cli("--tp 2")


def test_sample_seeds_are_distinct_per_sample():
  seeds = {se.sample_seed(0, i, j) for i in range(64) for j in range(16)}
  assert len(seeds) == 64 * 16
  assert se.sample_seed(1, 0, 0) != se.sample_seed(0, 0, 0)


def test_parse_rejects_stale_abort_and_mismatched_ids():
  out = {"output_ids": [1, 2], "meta_info": {"finish_reason": {"type": "length", "length": 2}, "weight_version": "3",
                                             "output_token_logprobs": [[-0.1, 1, None], [-0.2, 2, None]]}}
  c = se.parse_generate_output(out, "3", 3, "t")
  assert c.token_ids.tolist() == [1, 2] and c.finish_reason == "length"
  with pytest.raises(se.StaleWeightsError, match="'2'"):
    se.parse_generate_output(out, "2", 2, "t")
  with pytest.raises(se._Retryable):
    se.parse_generate_output({**out, "meta_info": {**out["meta_info"], "finish_reason": {"type": "abort"}}}, "3", 3,
                             "t")
  with pytest.raises(se.SGLangError, match="disagree"):
    se.parse_generate_output({**out, "output_ids": [1, 9]}, "3", 3, "t")


# ----- against the fake server ----------------------------------------------------------------------------------------


def test_generate_matches_fake_contract(tmp_path):
  sampling = SamplingParams(max_new_tokens=6, stop_token_ids=STOP, seed=123)
  prompts = [[1, 2, 3], [4], [9, 9, 9, 9, 2]]
  # max_batch_size=5 splits the 12 sequences into 3 concurrent /generate requests.
  with _engine(tmp_path, max_batch_size=5) as eng:
    out = eng.generate(prompts, sampling, n=4)
    assert [len(g) for g in out] == [4, 4, 4]
    for i, group in enumerate(out):
      for j, c in enumerate(group):
        _check_completion(c, sampling, version=0)
        ref = _reference(prompts[i], sampling, i, j)  # Pins the prompt/sample order and the field conversion.
        assert c.token_ids.tolist() == ref["tokens"]
        np.testing.assert_array_equal(c.logprobs, np.asarray(ref["logprobs"], np.float32))
        assert c.finish_reason == ref["finish_reason"]["type"]
      assert len({tuple(c.token_ids) for c in group}) > 1  # The 4 samples of a prompt are not copies.
    reasons = {c.finish_reason for g in out for c in g}
    assert reasons == {"stop", "length"}  # Both branches exercised (a fixed property of these seeds).
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\]"):
      eng.generate([[1], []], sampling)
    with pytest.raises(ValueError, match="n must be"):
      eng.generate([[1]], sampling, n=0)


def test_update_weights_flows_version_and_keeps_two_exports(tmp_path):
  sampling = SamplingParams(max_new_tokens=3)
  with _engine(tmp_path, export_fn=_export_marker) as eng:
    inode = {}
    for v in (1, 2, 3):
      eng.update_weights({"version": v}, v)
      assert {c.weight_version for g in eng.generate([[1, 2]], sampling, n=2) for c in g} == {v}
      info = eng.get_model_info()
      assert info["weight_version"] == str(v)
      assert json.loads(pathlib.Path(info["model_path"], "marker.json").read_text()) == {"version": v}
      inode[v] = os.stat(info["model_path"]).st_ino
    exports = sorted(p.name for p in (tmp_path / "run" / "weights").iterdir())
    assert exports == ["v00000002", "v00000003"]
    assert inode[3] == inode[1] != inode[2]  # the oldest export was recycled (its files overwritten in place)


def test_update_weights_without_export_fn_is_an_error(tmp_path):
  with _engine(tmp_path) as eng:
    with pytest.raises(ValueError, match="export_fn"):
      eng.update_weights({}, 1)


def test_server_dies_mid_batch_is_restarted_on_latest_weights(tmp_path):
  sampling = SamplingParams(max_new_tokens=5, stop_token_ids=STOP, seed=7)
  prompts = [[1, 2], [3, 4], [5, 6]]
  marker = tmp_path / "died_once"
  with _engine(tmp_path, "--fake-die-after", "1", "--fake-die-once-marker", str(marker), export_fn=_export_marker,
               max_batch_size=2) as eng:
    eng.update_weights({"version": 4}, 4)
    first_pid = eng.server_pid
    out = eng.generate(prompts, sampling, n=2)  # 3 requests in flight; the first one kills the server.
    assert marker.exists() and eng.num_restarts == 1
    assert eng.server_pid != first_pid and _pid_gone(first_pid)
    for i, group in enumerate(out):
      assert len(group) == 2
      for j, c in enumerate(group):
        _check_completion(c, sampling, version=4)
        assert c.token_ids.tolist() == _reference(prompts[i], sampling, i, j)["tokens"]
    info = eng.get_model_info()  # The new server started from the latest export, tagged with its version.
    assert info["weight_version"] == "4" and info["model_path"].endswith("v00000004")


def test_stale_weight_version_raises(tmp_path):
  with _engine(tmp_path, "--fake-ignore-version-updates", export_fn=_export_marker) as eng:
    eng.update_weights({"version": 1}, 1)
    with pytest.raises(se.StaleWeightsError, match="expected '1'"):
      eng.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2), n=2)


def test_never_healthy_times_out_with_url_and_log(tmp_path):
  t0 = time.monotonic()
  with pytest.raises(se.ServerStartupError) as err:
    _engine(tmp_path, "--fake-never-healthy", health_timeout_s=1.0)
  msg = str(err.value)
  assert time.monotonic() - t0 < 10
  assert re.search(r"http://127\.0\.0\.1:\d+", msg) and "health_timeout_s=1s" in msg
  assert "never healthy" in msg  # The tail of the server log.
  pid = int(re.search(r"fake-sglang: pid (\d+)", msg).group(1))
  assert _pid_gone(pid)  # The engine did not leave the hung server behind.


def test_server_exiting_at_startup_reports_code_and_log(tmp_path):
  cmd = [sys.executable, "-c", "import sys; print('boom: no GPU', flush=True); sys.exit(3)"]
  with pytest.raises(se.ServerStartupError, match=r"(?s)exited with code 3.*boom: no GPU"):
    _engine(tmp_path, launch_cmd=cmd)


def test_attach_mode_uses_url_and_leaves_server_alive(tmp_path):
  port = se._free_port()
  proc = subprocess.Popen([sys.executable, FAKE, "--model-path", str(tmp_path), "--port", str(port),
                           "--fake-startup-delay", "0.5"], stderr=subprocess.DEVNULL, start_new_session=True)
  try:
    eng = se.SGLangEngine("unused", url=f"http://127.0.0.1:{port}/", run_dir=tmp_path / "run",
                          export_fn=_export_marker, health_timeout_s=20, install_signal_handlers=False)
    assert not eng.owns_server and eng.server_pid is None
    # The attached server reports "default": that is initial_version 0, not a stale answer.
    assert {c.weight_version for c in eng.generate([[1]], SamplingParams(max_new_tokens=2), n=2)[0]} == {0}
    eng.update_weights({"version": 1}, 1)
    assert eng.generate([[1]], SamplingParams(max_new_tokens=2))[0][0].weight_version == 1
    eng.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
      assert r.status == 200 and proc.poll() is None
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_close_kills_process_group_and_is_idempotent(tmp_path):
  eng = _engine(tmp_path, "--fake-spawn-child")
  info = eng.get_model_info()
  pid, child = info["fake_pid"], info["fake_child_pid"]
  assert pid == eng.server_pid and child and not _pid_gone(child, wait_s=0)
  eng.close()
  assert _pid_gone(pid) and _pid_gone(child)  # The child (SGLang's scheduler stand-in) too.
  eng.close()
  with pytest.raises(se.SGLangError, match="after close"):
    eng.generate([[1]], SamplingParams(max_new_tokens=1))


def test_timeouts_are_retried_then_reported(tmp_path):
  with _engine(tmp_path, "--fake-slow", "1.5", request_deadline_s=0.3, max_retries=1) as eng:
    with pytest.raises(se.SGLangError, match="after 2 attempts"):
      eng.generate([[1]], SamplingParams(max_new_tokens=1))
    assert eng.num_restarts == 0  # A slow but live server is not restarted.


def test_sigterm_closes_server_and_chains_previous_handler(tmp_path):
  seen = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
  try:
    eng = _engine(tmp_path, install_signal_handlers=True)
    pid = eng.server_pid
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)  # Python runs the handler in the main thread at the next bytecode.
    assert seen == [signal.SIGTERM] and _pid_gone(pid)
    assert signal.getsignal(signal.SIGTERM) is not eng._on_signal  # close() put the previous handler back.
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_sampling_keys_are_sglangs_and_a_misspelt_one_is_refused(tmp_path, monkeypatch):
  """Every key the client sends is a SamplingParams field of SGLang; the fake, like the real server, answers 400 to
  any other, so a misspelt key fails here rather than first on a GPU."""
  from tests.fake_sglang_server import SGLANG_SAMPLING_KEYS
  sent = se.sglang_sampling_params(SamplingParams(max_new_tokens=2, top_k=5, stop_token_ids=(3,)), seed=1)
  assert set(sent) <= SGLANG_SAMPLING_KEYS
  translate = se.sglang_sampling_params
  monkeypatch.setattr(se, "sglang_sampling_params", lambda *a, **k: {**translate(*a, **k), "top_kk": 5})
  with _engine(tmp_path) as eng:
    with pytest.raises(se.SGLangError, match=r"400.*unknown sampling_params keys \['top_kk'\]"):
      eng.generate([[1, 2]], SamplingParams(max_new_tokens=2))


def test_sleep_releases_everything_and_generate_wakes_weights_before_the_cache(tmp_path):
  """`sleep` releases the server's weights, KV cache and CUDA graphs; `generate` resumes the weights, reloads the
  current export into them (SGLang keeps no copy) and only then the cache; `update_weights` wakes only the weights,
  after its export. The fake refuses to generate or load while the memory is released, as SGLang would fail."""
  sampling = SamplingParams(max_new_tokens=4, seed=3)
  with _engine(tmp_path, export_fn=_export_marker) as eng:
    eng.update_weights({"version": 1}, 1)
    before = eng.generate([[1, 2, 3]], sampling, n=2)
    eng.sleep()
    eng.sleep()  # idempotent: nothing more to release
    info = eng.get_model_info()
    assert info["fake_released"] == ["cuda_graph", "kv_cache", "weights"]
    after = eng.generate([[1, 2, 3]], sampling, n=2)
    assert [c.token_ids.tolist() for c in after[0]] == [c.token_ids.tolist() for c in before[0]]
    info = eng.get_model_info()
    assert info["fake_released"] == [] and info["fake_weights_sha"] != "lost" and info["weight_version"] == "1"
    eng.sleep()
    eng.update_weights({"version": 2}, 2)
    info = eng.get_model_info()
    assert info["fake_released"] == ["cuda_graph", "kv_cache"] and info["weight_version"] == "2"
    assert json.loads(pathlib.Path(info["model_path"], "marker.json").read_text()) == {"version": 2}
    eng.sleep()  # only the weights are awake: only they are released
    assert {c.weight_version for c in eng.generate([[4]], sampling, n=2)[0]} == {2}
    assert eng.get_model_info()["fake_occupation_calls"] == [
        "release:cuda_graph,kv_cache,weights", "resume:weights", "resume:cuda_graph,kv_cache",
        "release:cuda_graph,kv_cache,weights", "resume:weights", "release:weights", "resume:weights",
        "resume:cuda_graph,kv_cache"]


def test_sleep_refuses_a_gpu_server_without_the_memory_saver(tmp_path):
  with _engine(tmp_path, "--device", "cuda") as eng:
    with pytest.raises(se.SGLangError, match="--enable-memory-saver"):
      eng.sleep()
    assert eng.get_model_info()["fake_released"] == []  # nothing was released
  with _engine(tmp_path, "--device", "cuda", "--enable-memory-saver") as eng:
    eng.sleep()
    assert eng.get_model_info()["fake_released"] == ["cuda_graph", "kv_cache", "weights"]


def test_an_attached_server_released_before_the_trainer_allocates(tmp_path):
  """rollout.sglang_sleep with sglang_url: the trainer puts the server to sleep first (`release_attached`), and the
  engine it then makes knows: the first refit wakes the weights alone."""
  with _engine(tmp_path, export_fn=_export_marker) as owner:
    se.release_attached(owner.url, deadline_s=10.0)
    assert owner.get_model_info()["fake_released"] == ["cuda_graph", "kv_cache", "weights"]
    att = se.SGLangEngine("unused", url=owner.url, run_dir=tmp_path / "att", export_fn=_export_marker, released=True,
                          health_timeout_s=10.0, request_deadline_s=10.0, install_signal_handlers=False)
    try:
      att.ensure_weights({"version": 1}, 1)
      assert owner.get_model_info()["fake_released"] == ["cuda_graph", "kv_cache"]
      assert {c.weight_version for c in att.generate([[1, 2]], SamplingParams(max_new_tokens=3), n=2)[0]} == {1}
    finally:
      att.close()
