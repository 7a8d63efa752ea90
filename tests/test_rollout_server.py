"""A misbehaving rollout server against `SGLangEngine`: hung / trickling answers, malformed outputs, a port taken by
another server, an attached server holding other weights, a stop request while waiting.

CONTRACT tests against tests/fake_sglang_server.py (not SGLang): real HTTP on 127.0.0.1 and real processes.
"""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from srpo_jax import config as config_lib
from srpo_jax.rollout import deadline_http
from srpo_jax.rollout import sglang_engine as se
from srpo_jax.rollout.engine import RolloutInterrupted, SamplingParams
from tests.e2e_utils import tiny_config_dict
from tests.fake_server_utils import FAKE, fake_engine, start_fake

VOCAB = 32
URL_RE = r"http://127\.0\.0\.1:\d+"


def _engine(tmp_path, *fake_args, **kw) -> se.SGLangEngine:
  kw.setdefault("vocab_size", VOCAB)
  return fake_engine(tmp_path, *fake_args, vocab=VOCAB, **kw)


def _start_fake(*args: str) -> tuple[subprocess.Popen, str]:
  return start_fake(*args, vocab=VOCAB, timeout_s=20.0)



@pytest.fixture
def other_server(tmp_path):
  """A healthy server someone else launched, holding other weights under version "7"."""
  proc, url = _start_fake("--model-path", str(tmp_path / "someone_elses_model"), "--weight-version", "7")
  yield url
  proc.kill()
  proc.wait()


def _export_marker(params, out_dir: str) -> None:
  pathlib.Path(out_dir, "marker.json").write_text(str(params))


# ----- malformed outputs: each a clear SGLangError naming the URL, the field and the value ----------------------------

GOOD = {"output_ids": [1, 2], "meta_info": {"finish_reason": {"type": "length", "length": 2}, "weight_version": "3",
                                            "output_token_logprobs": [[-0.1, 1, None], [-0.2, 2, None]]}}


def _with_entries(entries, output_ids=None):
  return {"output_ids": output_ids, "meta_info": {**GOOD["meta_info"], "output_token_logprobs": entries}}


@pytest.mark.parametrize("entries, match", [
    ([["x", "y"]], r"output_token_logprobs\[0\]\[0\] \(logprob\) = 'x' is not a number"),
    ([[-0.1, 1], [-0.1, "7"]], r"output_token_logprobs\[1\]\[1\] \(token id\) = '7' is not an integer"),
    ([[-0.1, 1.5]], r"\[0\]\[1\] \(token id\) = 1.5 is not an integer"),
    ([[-0.1, True]], r"\[0\]\[1\] \(token id\) = True is not an integer"),
    ([[-0.1]], r"output_token_logprobs\[0\] = \[-0.1\]: expected \[logprob, token_id, text\]"),
    ([7], r"output_token_logprobs\[0\] = 7: expected"),
    ([[-0.1, 1], [float("nan"), 2]], r"\[1\]\[0\] \(logprob\) = nan is not a log-probability"),
    ([[float("-inf"), 2]], r"\[0\]\[0\] \(logprob\) = -inf is not a log-probability"),
    ([[0.5, 2]], r"\[0\]\[0\] \(logprob\) = 0.5 is not a log-probability \(finite, <= 0\)"),
    ([[-0.1, 1], [-0.1, VOCAB]], rf"\[1\]\[1\] \(token id\) = {VOCAB} is outside the vocabulary \[0, {VOCAB}\)"),
    ([[-0.1, -1]], r"\[0\]\[1\] \(token id\) = -1 is outside the vocabulary"),
    ([], r"output_token_logprobs is empty: an empty completion"),
    ("not a list", r"output_token_logprobs is not a list"),
    ([[-0.1, 1]] * 5, r"has 5 tokens, more than max_new_tokens=4"),
])
def test_malformed_logprob_entries_are_named(entries, match):
  with pytest.raises(se.SGLangError, match=match) as err:
    se.parse_generate_output(_with_entries(entries), "3", 3, "POST http://h:1/generate", vocab_size=VOCAB,
                             max_new_tokens=4)
  assert str(err.value).startswith("POST http://h:1/generate: ")


def test_logprob_tolerance_and_good_entries_pass():
  c = se.parse_generate_output(_with_entries([[0.0, 0, None], [se.MAX_LOGPROB, VOCAB - 1, "t"]], [0, VOCAB - 1]),
                               "3", 3, "w", vocab_size=VOCAB, max_new_tokens=2)
  assert c.token_ids.tolist() == [0, VOCAB - 1]
  with pytest.raises(se.SGLangError, match="not a JSON object"):
    se.parse_generate_output(["a list"], "3", 3, "w")


@pytest.mark.parametrize("kind, match", [
    ("nan_logprob", r"\(logprob\) = nan is not a log-probability"),
    ("pos_logprob", r"\(logprob\) = 0.5 is not a log-probability"),
    ("bad_entry", r"\(logprob\) = 'x' is not a number"),
    ("oob_token", rf"\(token id\) = {VOCAB} is outside the vocabulary \[0, {VOCAB}\)"),
    ("neg_token", r"\(token id\) = -1 is outside the vocabulary"),
    ("empty", r"is empty: an empty completion"),
    ("too_long", r"more than max_new_tokens=3"),
])
def test_server_sending_malformed_outputs_is_reported_with_url(tmp_path, kind, match):
  with _engine(tmp_path, "--fake-corrupt", kind) as eng:
    with pytest.raises(se.SGLangError, match=match) as err:
      eng.generate([[1, 2]], SamplingParams(max_new_tokens=3), n=2)
    assert re.search(URL_RE + "/generate", str(err.value))
    assert not isinstance(err.value, se.StaleWeightsError)


# ----- deadlines: a hung or trickling server ends within deadline × attempts ------------------------------------------


@pytest.mark.parametrize("mode", ["--fake-hang-after", "--fake-trickle-after"])
def test_hung_or_trickling_server_misses_the_overall_deadline(tmp_path, mode):
  deadline, retries = 1.0, 1
  with _engine(tmp_path, mode, "1", request_deadline_s=deadline, max_retries=retries) as eng:
    t0 = time.monotonic()
    with pytest.raises(se.SGLangError) as err:
      eng.generate([[1, 2]], SamplingParams(max_new_tokens=3))
    elapsed = time.monotonic() - t0
    msg = str(err.value)
    # (retries + 1) deadlines, one 0.05 s backoff, a poll interval per attempt; a trickle would never end otherwise.
    assert deadline * (retries + 1) <= elapsed < deadline * (retries + 1) + 2.0, elapsed
    assert re.search(URL_RE + "/generate", msg) and "failed after 2 attempts" in msg
    assert "request_deadline_s=1 each" in msg and "overall deadline of 1 s" in msg
    assert eng.num_restarts == 0  # a live (if useless) server is not restarted


def test_interrupt_ends_a_hung_request_at_once(tmp_path):
  with _engine(tmp_path, "--fake-hang-after", "1", request_deadline_s=60.0) as eng:
    threading.Timer(0.5, eng.interrupt).start()
    t0 = time.monotonic()
    with pytest.raises(RolloutInterrupted, match="stop requested"):
      eng.generate([[1, 2], [3, 4]], SamplingParams(max_new_tokens=3), n=2)
    assert time.monotonic() - t0 < 0.5 + 2 * deadline_http.POLL_S + 0.5
    with pytest.raises(RolloutInterrupted):  # later calls do not start new waits
      eng.generate([[1]], SamplingParams(max_new_tokens=1))


def test_one_failing_request_cancels_its_siblings(tmp_path):
  """Two requests in flight: the first to arrive hangs, the other is malformed. The malformed one is reported at
  once, not after the hung one's 30 s deadline."""
  with _engine(tmp_path, "--fake-hang-after", "1", "--fake-hang-count", "1", "--fake-corrupt", "nan_logprob",
               request_deadline_s=30.0, max_batch_size=1) as eng:
    t0 = time.monotonic()
    with pytest.raises(se.SGLangError, match="nan is not a log-probability"):
      eng.generate([[1], [2]], SamplingParams(max_new_tokens=2))
    assert time.monotonic() - t0 < 5.0


# ----- identity: an owned server's port taken by another healthy server ----------------------------------------------


@pytest.mark.parametrize("bind_delay", ["0", "2"])
def test_port_taken_by_another_server_is_refused(tmp_path, other_server, bind_delay):
  """Ours dies of EADDRINUSE at bind time (at once, or after "loading the model" for 2 s as SGLang does) while the
  other server answers health checks: the engine must not take it for ours."""
  port = int(other_server.rsplit(":", 1)[1])
  t0 = time.monotonic()
  with pytest.raises(se.ServerStartupError) as err:
    _engine(tmp_path, "--fake-bind-delay", bind_delay, port=port)
  msg = str(err.value)
  assert f"http://127.0.0.1:{port} answers as another server" in msg
  assert "someone_elses_model" in msg and "weight_version='7'" in msg and "port is taken" in msg
  assert time.monotonic() - t0 < 10
  with urllib.request.urlopen(other_server + "/health", timeout=5) as r:  # the other server is left alone
    assert r.status == 200


def test_port_taken_by_a_server_with_our_identity_is_refused(tmp_path):
  """A leaked server of the same run (same model path, same version "0") on our fixed port reports exactly what ours
  would: only the listening socket's owner (Linux /proc) tells them apart."""
  proc, url = _start_fake("--model-path", str(tmp_path / "init_ckpt"), "--weight-version", "0")
  try:
    port = int(url.rsplit(":", 1)[1])
    assert se.listener_held_by_group(port, os.getpgid(proc.pid)) is True  # the check itself, on a known owner
    assert se.listener_held_by_group(port, 2**30) is False  # a group that holds nothing
    assert se.listener_held_by_group(se._free_port(), os.getpgid(proc.pid)) is None  # nothing listens there
    with pytest.raises(se.ServerStartupError, match=r"answers as another server: .*does not hold the listening"):
      _engine(tmp_path, "--fake-bind-delay", "2", port=port)
  finally:
    proc.kill()
    proc.wait()


def test_owned_server_identity_check_passes_for_our_server(tmp_path):
  with _engine(tmp_path, initial_version=4) as eng:
    info = eng.get_model_info()
    assert info["weight_version"] == "4" and info["model_path"] == str(tmp_path / "init_ckpt")
    eng.ensure_weights({"v": 4}, 4)  # launched from these weights: verified, not re-exported
    assert not (tmp_path / "run" / "weights").exists()


# ----- attach mode: the server's weights are whatever someone loaded ---------------------------------------------------


def test_ensure_weights_pushes_to_an_attached_server_holding_other_weights(tmp_path, other_server):
  eng = se.SGLangEngine("unused", url=other_server, run_dir=tmp_path / "run", export_fn=_export_marker,
                        health_timeout_s=10, install_signal_handlers=False)
  try:
    assert eng.get_model_info()["weight_version"] == "7"
    eng.ensure_weights({"v": 7}, 7)  # same tag as the foreign weights: pushed anyway
    info = eng.get_model_info()
    assert info["weight_version"] == "7" and info["model_path"] == str(tmp_path / "run" / "weights" / "v00000007")
    assert pathlib.Path(info["model_path"], "marker.json").read_text() == "{'v': 7}"
  finally:
    eng.close()


def test_ensure_weights_refuses_a_server_that_does_not_load_them(tmp_path):
  proc, url = _start_fake("--model-path", str(tmp_path / "other"), "--fake-ignore-version-updates")
  try:
    eng = se.SGLangEngine("unused", url=url, run_dir=tmp_path / "run", export_fn=_export_marker, health_timeout_s=10,
                          install_signal_handlers=False)
    with pytest.raises(se.StaleWeightsError, match=rf"{url}/get_model_info reports .*weight_version='default'; "
                       r"expected .*weight_version='2'"):
      eng.ensure_weights({"v": 2}, 2)
    eng.close()
  finally:
    proc.kill()
    proc.wait()


# ----- URLs and config -------------------------------------------------------------------------------------------------


def test_bad_urls_and_deadlines_are_refused():
  with pytest.raises(ValueError, match="'https://h:1': expected an http://host:port URL"):
    se.SGLangEngine("m", url="https://h:1", install_signal_handlers=False)
  with pytest.raises(ValueError, match="request_deadline_s > 0"):
    se.SGLangEngine("m", url="http://h:1", request_deadline_s=0, install_signal_handlers=False)
  base = tiny_config_dict()
  for key, value, why in [("rollout.sglang_url", "localhost:30000", "http://host:port"),
                          ("rollout.request_deadline_s", float("inf"), "must be a finite number"),
                          ("rollout.health_timeout_s", 0.0, "finite number of seconds"),
                          ("rollout.request_retries", -1, ">= 0")]:
    with pytest.raises(config_lib.ConfigError, match=re.escape(key) + ".*" + re.escape(why)):
      config_lib.validate(config_lib.apply_overrides(base, {key: value}))


def test_response_framing():
  r = deadline_http._ResponseReader("w", 1 << 20)
  assert r.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n") is None
  assert r.feed(b"2;x=1\r\nef\r\n0\r\n\r\n") == (200, b"abcdef")
  r = deadline_http._ResponseReader("w", 1 << 20)
  assert r.feed(b"HTTP/1.0 503 X\r\nContent-Length: 3\r\n\r\nab") is None and r.feed(b"cdef") == (503, b"abc")
  r = deadline_http._ResponseReader("w", 1 << 20)
  assert r.feed(b"HTTP/1.1 200 OK\r\n\r\nall") is None and r.feed(b"") == (200, b"all")
  with pytest.raises(deadline_http.BadResponse, match="not an HTTP answer"):
    deadline_http._ResponseReader("w", 1 << 20).feed(b"SSH-2.0-OpenSSH\r\n\r\n")
  with pytest.raises(deadline_http.BadResponse, match="larger than 8 bytes"):
    deadline_http._ResponseReader("w", 8).feed(b"HTTP/1.1 200 OK\r\n")
  with pytest.raises(deadline_http.HTTPFailure, match="closed after 2 of 5") as err:
    r = deadline_http._ResponseReader("w", 1 << 20)
    r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    r.feed(b"")
  assert not err.value.server_gone
  with pytest.raises(deadline_http.HTTPFailure) as err:
    deadline_http._ResponseReader("w", 1 << 20).feed(b"")
  assert err.value.server_gone  # closed without a byte: nothing is serving there


def test_connection_refused_is_server_gone():
  port = se._free_port()
  with pytest.raises(deadline_http.HTTPFailure) as err:
    deadline_http.request(f"http://127.0.0.1:{port}", "GET", "/health", None, 2.0)
  assert err.value.server_gone and f"127.0.0.1:{port}/health" in str(err.value)
