"""Rollout engine backed by an SGLang server, spoken to over SGLang's native HTTP API.

The trainer keeps its weights in JAX; SGLang samples. After every optimizer step the trainer exports its weights as a
Hugging Face safetensors directory and the server reloads them in place (`/update_weights_from_disk`), tagged with the
step number as `weight_version`. SGLang stamps every `/generate` answer with the `weight_version` it had when the answer
was built, so the engine can refuse rollouts from old weights (`StaleWeightsError`): we never train on stale samples.

HTTP API used (SGLang `python/sglang/srt/entrypoints/http_server.py`, `managers/io_struct.py`):
  GET  /health_generate           200 once the server can generate one token (503 while it starts).
  POST /generate                  {"input_ids": [[...], ...], "sampling_params": [{...}, ...], "return_logprob": true}
                                  -> a list, one dict per input: {"output_ids": [...], "meta_info": {
                                     "output_token_logprobs": [[logprob, token_id, text|null], ...],
                                     "finish_reason": {"type": "stop", "matched": id} | {"type": "length", ...}
                                                      | {"type": "abort", ...},
                                     "weight_version": "<str>", ...}}
  POST /update_weights_from_disk  {"model_path": dir, "weight_version": "<str>"}
                                  -> {"success": bool, "message": str, "num_paused_requests": int} (200 / 400)
  GET  /get_model_info            {"model_path", "weight_version", ...}

Choices and where they depart from the `RolloutEngine` contract:
- n samples per prompt are sent as n copies of the prompt (each with `n = 1`), not with SGLang's `n` parameter: the
  order of the answers to an `n > 1` batch is an implementation detail of SGLang's tokenizer manager, while a flat batch
  answers in input order. The radix cache still shares the prompt prefix between the copies.
- Logprobs: SGLang returns `log_softmax(logits / temperature)` of each sampled token, taken BEFORE top-k / top-p
  filtering (unless the server runs with `SGLANG_RETURN_ORIGINAL_LOGPROB`, which drops the temperature: leave it unset).
  With top-k off and top-p = 1 (the spec's training rollouts) that is exactly the sampling distribution. With filters
  on (validation at top-p 0.95) the logprobs are those of the unfiltered tempered distribution; a warning says so.
- Seeds: SGLang honours the per-request `sampling_seed` only with `--enable-deterministic-inference`. Then the n copies
  of a prompt must get DIFFERENT seeds or they would be n identical samples, so every sample gets its own seed
  `sample_seed(sampling.seed, i, j)`. Seeds are sent only when `send_seeds` (default: when that flag is in
  `server_args`); the trainer should vary `SamplingParams.seed` per step.
- `output_token_logprobs` is the source of the token ids (it has one entry per sampled token, the stop token
  included); `no_stop_trim` is sent so `output_ids` keeps the stop token too, and the two are cross-checked.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import hashlib
import http.client
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from srpo_jax.rollout.engine import Completion, RolloutEngine, SamplingParams

log = logging.getLogger(__name__)

ExportFn = Callable[[Any, str], None]  # export_fn(params, out_dir) writes an HF safetensors checkpoint into out_dir.


class SGLangError(RuntimeError):
  """The SGLang server failed a request (after retries) or answered something malformed."""


class StaleWeightsError(SGLangError):
  """A response was produced by weights other than the ones the trainer last pushed."""


class ServerStartupError(SGLangError):
  """The server process exited or did not become healthy in time."""


class _Retryable(Exception):
  """A failure worth retrying (connection lost, timeout, 5xx, aborted request)."""

  def __init__(self, msg: str, *, server_gone: bool = False):
    super().__init__(msg)
    self.server_gone = server_gone  # True when the listener is gone: an owned server should be restarted.


# ---------------------------------------------------------------------------------------------------------------------
# Pure helpers: request building and response parsing.
# ---------------------------------------------------------------------------------------------------------------------


def sample_seed(base_seed: int, prompt_index: int, sample_index: int) -> int:
  """Seed of sample j of prompt i: a hash of (base_seed, i, j), in [0, 2**31). Distinct samples get distinct seeds."""
  digest = hashlib.blake2b(f"{base_seed}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") % (2**31)


def sglang_sampling_params(sampling: SamplingParams, seed: int | None = None) -> dict[str, Any]:
  """Translates our `SamplingParams` into one SGLang `sampling_params` dict.

  SGLang spells "top-k off" as -1 (ours: 0) and maps temperature 0 to greedy itself.
  """
  params: dict[str, Any] = {
      "max_new_tokens": int(sampling.max_new_tokens),
      "temperature": float(sampling.temperature),
      "top_p": float(sampling.top_p),
      "top_k": int(sampling.top_k) if sampling.top_k > 0 else -1,
      "n": 1,
      # Keep the matched stop token in `output_ids`; the trainer scores it like any other response token.
      "no_stop_trim": True,
  }
  if sampling.stop_token_ids:
    params["stop_token_ids"] = [int(t) for t in sampling.stop_token_ids]
  if seed is not None:
    params["sampling_seed"] = int(seed)
  return params


def server_args_to_cli(server_args: Mapping[str, Any] | Sequence[str]) -> list[str]:
  """{"mem_fraction_static": 0.8, "enable_deterministic_inference": True} -> ["--mem-fraction-static", "0.8", ...].

  A list is passed through unchanged. In a dict, True adds a bare flag and False / None drop it.
  """
  if isinstance(server_args, Mapping):
    cli: list[str] = []
    for key, value in server_args.items():
      flag = "--" + str(key).lstrip("-").replace("_", "-")
      if value is True:
        cli.append(flag)
      elif value is not None and value is not False:
        cli += [flag, str(value)]
    return cli
  if isinstance(server_args, str):
    raise TypeError(f"server_args must be a dict or a list of strings, got the string {server_args!r}")
  return [str(a) for a in server_args]


def parse_generate_output(out: Mapping[str, Any], expected_version: str, version: int, where: str) -> Completion:
  """One `/generate` answer -> `Completion`. Raises `StaleWeightsError`, `_Retryable` (aborted) or `SGLangError`."""
  meta = out.get("meta_info")
  if not isinstance(meta, Mapping):
    raise SGLangError(f"{where}: response has no meta_info: {str(out)[:300]}")
  reason = meta.get("finish_reason")
  kind = reason.get("type") if isinstance(reason, Mapping) else reason
  if kind == "abort":
    raise _Retryable(f"{where}: request aborted by the server: {reason}")
  if kind not in ("stop", "length"):
    raise SGLangError(f"{where}: unexpected meta_info.finish_reason {reason!r}")
  got_version = meta.get("weight_version")
  if got_version is None:
    raise SGLangError(f"{where}: response has no meta_info.weight_version (SGLang too old?); cannot rule out stale "
                      "weights")
  if str(got_version) != expected_version:
    raise StaleWeightsError(f"{where}: sampled with weight_version {got_version!r}, expected {expected_version!r}")
  entries = meta.get("output_token_logprobs")
  if entries is None:
    raise SGLangError(f"{where}: response has no meta_info.output_token_logprobs (was return_logprob sent?)")
  token_ids = np.asarray([int(e[1]) for e in entries], dtype=np.int32)
  logprobs = np.asarray([float(e[0]) for e in entries], dtype=np.float32)
  output_ids = out.get("output_ids")
  if output_ids is not None:
    # output_ids may lack the final stop token if the server trimmed it; otherwise it must equal the logprob ids.
    n_ids = len(output_ids)
    if list(output_ids) != token_ids[:n_ids].tolist() or n_ids not in (len(token_ids), len(token_ids) - 1):
      raise SGLangError(f"{where}: output_ids {list(output_ids)[:16]}... disagree with the token ids of "
                        f"output_token_logprobs {token_ids[:16].tolist()}...")
  return Completion(token_ids=token_ids, logprobs=logprobs, finish_reason=kind, weight_version=version)


def _free_port(host: str = "127.0.0.1") -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def _tail(path: pathlib.Path | None, n_lines: int = 40) -> str:
  if path is None or not path.exists():
    return "<no server log>"
  with open(path, "rb") as f:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 16384))
    lines = f.read().decode("utf-8", "replace").splitlines()
  return "\n".join(lines[-n_lines:])


def _kill_group(proc: subprocess.Popen, grace_s: float) -> None:
  """SIGTERM the process group of `proc` (its own session), SIGKILL it after `grace_s`, reap `proc`."""
  pgid = proc.pid  # start_new_session=True makes the child a group leader: pgid == pid.
  for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
    try:
      os.killpg(pgid, sig)
    except ProcessLookupError:
      break
    try:
      proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
      continue
    # The leader is gone; grandchildren (SGLang's scheduler / detokenizer) may still hold the group.
    try:
      os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    break
  try:
    proc.wait(timeout=5.0)
  except subprocess.TimeoutExpired:
    log.error("process %d survived SIGKILL of its group", proc.pid)


# ---------------------------------------------------------------------------------------------------------------------
# The engine.
# ---------------------------------------------------------------------------------------------------------------------


class SGLangEngine(RolloutEngine):
  """`RolloutEngine` over an SGLang server it launches (and restarts), or one it attaches to with `url=`.

  Args:
    model_path: HF checkpoint directory the server starts from (the trainer's initial exported weights).
    url: attach to this running server instead of launching one (it is then never restarted nor killed).
    server_args: extra `sglang.launch_server` flags, as a dict (see `server_args_to_cli`) or a list of strings.
    export_fn: `export_fn(params, out_dir)` writes an HF safetensors checkpoint; needed by `update_weights`.
    run_dir: holds the server log and the exported weights (default: a fresh temporary directory).
    port: port of the launched server (default: a free one, re-picked on restart).
    health_timeout_s: how long a launched server may take to answer `/health_generate` with 200.
    request_timeout_s: socket timeout of one `/generate` request (a batch chunk).
    max_retries: retries per request after the first attempt; the wait before retry k is `backoff_s * 2**k`.
    python, launch_cmd: the server command is `launch_cmd + [--model-path, ..., --host, --port, --weight-version]
      + server_args`, `launch_cmd` defaulting to `[python, -m, sglang.launch_server]` (tests put a fake server here).
    initial_version: the integer version of `model_path`'s weights.
    max_batch_size: sequences per `/generate` request; max_concurrency: requests in flight at once.
    send_seeds: send per-sample `sampling_seed`s (default: iff `--enable-deterministic-inference` is in server_args).
    keep_exports: exported weight directories kept on disk (the newest ones).
    install_signal_handlers: on SIGTERM / SIGINT, kill the server, then run the previous handler.
  """

  def __init__(self, model_path: str | os.PathLike, *, url: str | None = None,
               server_args: Mapping[str, Any] | Sequence[str] = (), export_fn: ExportFn | None = None,
               run_dir: str | os.PathLike | None = None, port: int | None = None, health_timeout_s: float = 600.0,
               request_timeout_s: float = 1800.0, max_retries: int = 3, backoff_s: float = 1.0,
               python: str = sys.executable, launch_cmd: Sequence[str] | None = None, initial_version: int = 0,
               max_batch_size: int = 256, max_concurrency: int = 8, send_seeds: bool | None = None,
               keep_exports: int = 2, install_signal_handlers: bool = True, kill_grace_s: float = 10.0):
    if max_retries < 0 or max_batch_size < 1 or max_concurrency < 1 or keep_exports < 1:
      raise ValueError(f"SGLangEngine: need max_retries >= 0, max_batch_size >= 1, max_concurrency >= 1, "
                       f"keep_exports >= 1; got {max_retries}, {max_batch_size}, {max_concurrency}, {keep_exports}")
    self._server_cli = server_args_to_cli(server_args)
    self.model_path = str(model_path)
    self.export_fn = export_fn
    self.run_dir = pathlib.Path(run_dir) if run_dir is not None else pathlib.Path(tempfile.mkdtemp(prefix="sglang_"))
    self.run_dir.mkdir(parents=True, exist_ok=True)
    self.health_timeout_s = float(health_timeout_s)
    self.request_timeout_s = float(request_timeout_s)
    self.max_retries = int(max_retries)
    self.backoff_s = float(backoff_s)
    self.max_batch_size = int(max_batch_size)
    self.max_concurrency = int(max_concurrency)
    self.keep_exports = int(keep_exports)
    self.kill_grace_s = float(kill_grace_s)
    self.send_seeds = ("--enable-deterministic-inference" in self._server_cli) if send_seeds is None else send_seeds
    self.launch_cmd = list(launch_cmd) if launch_cmd is not None else [python, "-m", "sglang.launch_server"]
    self.log_path: pathlib.Path | None = None
    self.num_restarts = 0
    self.version = int(initial_version)
    self._version_tag = str(self.version)  # What the server must report in meta_info.weight_version.
    self._fixed_port = port
    self._proc: subprocess.Popen | None = None
    self._server_gen = 0  # Bumped at every (re)start, so concurrent failures restart the server only once.
    self._lock = threading.RLock()
    self._exports: list[pathlib.Path] = []
    self._closed = False
    self._warned_filters = False
    self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # Never proxy 127.0.0.1.
    self._prev_handlers: dict[int, Any] = {}

    atexit.register(self.close)
    if install_signal_handlers:
      self._install_signal_handlers()
    self.owns_server = url is None
    self.url = url.rstrip("/") if url is not None else ""
    try:
      if self.owns_server:
        self._start_server()
      else:
        self._wait_healthy()
        # An attached server's weights are whatever it reports now (e.g. "default"): that tag is `initial_version`.
        self._version_tag = str(self.get_model_info().get("weight_version", self._version_tag))
    except BaseException:
      self.close()
      raise

  # ----- public API ---------------------------------------------------------------------------------------------------

  @property
  def server_pid(self) -> int | None:
    return self._proc.pid if self._proc is not None else None

  def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams,
               n: int = 1) -> list[list[Completion]]:
    """Samples `n` completions per prompt; result[i][j] is sample j of prompt i. Raises `StaleWeightsError`."""
    if self._closed:
      raise SGLangError("SGLangEngine.generate called after close()")
    if n < 1:
      raise ValueError(f"generate: n must be >= 1, got {n}")
    prompts = [[int(t) for t in p] for p in prompt_token_ids]
    for i, p in enumerate(prompts):
      if not p:
        raise ValueError(f"generate: prompt_token_ids[{i}] is empty")
    self._maybe_warn_filters(sampling)
    items = [(i, j) for i in range(len(prompts)) for j in range(n)]  # Prompt-major: result order == item order.
    chunks = [items[k:k + self.max_batch_size] for k in range(0, len(items), self.max_batch_size)]
    if not chunks:
      return []
    flat: list[Completion] = []  # in item order: chunks are consecutive runs of `items`
    with concurrent.futures.ThreadPoolExecutor(min(self.max_concurrency, len(chunks))) as pool:
      futures = [pool.submit(self._generate_chunk, prompts, chunk, sampling) for chunk in chunks]
      for fut in futures:
        flat.extend(fut.result())
    return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]

  def update_weights(self, params: Any, version: int) -> None:
    """Exports `params` to `run_dir/weights/v{version}` and makes the server load them, tagged `version`."""
    if self._closed:
      raise SGLangError("SGLangEngine.update_weights called after close()")
    if self.export_fn is None:
      raise ValueError("SGLangEngine.update_weights needs export_fn(params, out_dir) (none was given)")
    version = int(version)
    out_dir = self._export(params, version)
    body = {"model_path": str(out_dir), "weight_version": str(version)}
    for attempt in range(self.max_retries + 1):
      gen, url = self._snapshot()
      try:
        status, reply = self._request("POST", "/update_weights_from_disk", body, self.request_timeout_s, url)
      except _Retryable as e:
        if self.owns_server and self._restart_if_dead(gen, e.server_gone, model_path=out_dir, version=version):
          break  # The fresh server loaded `out_dir` at start, tagged `version`: nothing left to do.
        if attempt == self.max_retries:
          raise SGLangError(f"update_weights(version={version}) at {self.url} failed after {attempt + 1} attempts: "
                            f"{e}") from e
        time.sleep(self.backoff_s * 2**attempt)
        continue
      if status != 200 or not (isinstance(reply, Mapping) and reply.get("success")):
        raise SGLangError(f"update_weights(version={version}): {self.url}/update_weights_from_disk answered "
                          f"HTTP {status}: {str(reply)[:500]}")
      break
    with self._lock:
      self.model_path, self.version, self._version_tag = str(out_dir), version, str(version)
    self._prune_exports()

  def get_model_info(self) -> dict[str, Any]:
    status, reply = self._request("GET", "/get_model_info", None, 30.0)
    if status != 200 or not isinstance(reply, Mapping):
      raise SGLangError(f"{self.url}/get_model_info answered HTTP {status}: {str(reply)[:300]}")
    return dict(reply)

  def flush_cache(self) -> None:
    """Drops the radix (prefix) cache. `update_weights_from_disk` already flushes it by default."""
    status, reply = self._request("POST", "/flush_cache", None, 60.0)
    if status != 200:
      raise SGLangError(f"{self.url}/flush_cache answered HTTP {status}: {str(reply)[:300]}")

  def close(self) -> None:
    """Kills the launched server's process group (SIGTERM, then SIGKILL). Idempotent; attached servers live on."""
    # A signal handler may land here while another thread holds the lock for a restart (up to health_timeout_s):
    # do not wait that long; `_start_server` re-checks `_closed` after spawning.
    locked = self._lock.acquire(timeout=5.0)
    try:
      if self._closed:
        return
      self._closed = True
      proc, self._proc = self._proc, None
    finally:
      if locked:
        self._lock.release()
    if proc is not None:
      _kill_group(proc, self.kill_grace_s)
    self._restore_signal_handlers()
    atexit.unregister(self.close)

  # ----- server process -----------------------------------------------------------------------------------------------

  def _start_server(self) -> None:
    """Launches the server in its own process group and waits for health. Caller holds the lock (or is __init__)."""
    port = self._fixed_port if self._fixed_port is not None else _free_port()
    self.url = f"http://127.0.0.1:{port}"
    cmd = self.launch_cmd + ["--model-path", self.model_path, "--host", "127.0.0.1", "--port", str(port),
                             "--weight-version", self._version_tag] + self._server_cli
    self.log_path = self.run_dir / "sglang_server.log"
    with open(self.log_path, "ab") as logf:
      logf.write(f"\n==== {time.strftime('%H:%M:%S')} launching (restart #{self.num_restarts}): "
                 f"{' '.join(cmd)}\n".encode())
      logf.flush()
      # Own session => own process group, so close() can kill SGLang's scheduler/detokenizer children too.
      self._proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
    self._server_gen += 1
    try:
      if self._closed:
        raise SGLangError("SGLangEngine closed while the server was (re)starting")
      self._wait_healthy()
    except BaseException:
      proc, self._proc = self._proc, None
      _kill_group(proc, grace_s=2.0)
      raise

  def _wait_healthy(self) -> None:
    deadline = time.monotonic() + self.health_timeout_s
    while True:
      code = self._proc.poll() if self._proc is not None else None
      if code is not None:
        raise ServerStartupError(f"SGLang server for {self.url} exited with code {code} before becoming healthy. "
                                 f"Log {self.log_path}, last lines:\n{_tail(self.log_path)}")
      try:
        status, _ = self._request("GET", "/health_generate", None, min(10.0, self.health_timeout_s))
        if status == 200:
          return
      except _Retryable:
        pass  # Not listening yet.
      if time.monotonic() > deadline:
        raise ServerStartupError(f"SGLang server at {self.url} was not healthy (GET /health_generate -> 200) within "
                                 f"health_timeout_s={self.health_timeout_s:g}s. Log {self.log_path}, last lines:\n"
                                 f"{_tail(self.log_path)}")
      time.sleep(0.2)

  def _restart_if_dead(self, gen: int, server_gone: bool, *, model_path: pathlib.Path | None = None,
                       version: int | None = None) -> bool:
    """Restarts an owned server whose process exited (or whose listener is gone). True iff it (re)started one.

    `gen` is the server generation the failed request talked to: if another thread restarted it meanwhile, the
    request is simply retried. The restarted server loads `model_path` (default: the latest weights) tagged `version`.
    """
    with self._lock:
      if self._closed:
        raise SGLangError("SGLangEngine closed while a request was failing")
      if self._server_gen != gen:
        return False
      proc = self._proc
      dead = proc is None or proc.poll() is not None
      if not dead and not server_gone:
        return False
      code = proc.poll() if proc is not None else None
      log.warning("SGLang server at %s is gone (exit code %s); restarting it from %s", self.url, code,
                  model_path or self.model_path)
      if proc is not None:
        _kill_group(proc, grace_s=2.0)  # Reap it and any orphaned children before starting afresh.
        self._proc = None
      if model_path is not None:
        self.model_path, self.version, self._version_tag = str(model_path), int(version), str(version)
      self.num_restarts += 1
      self._start_server()
      return True

  def _snapshot(self) -> tuple[int, str]:
    """(server generation, url) of the current server; blocks while another thread restarts it."""
    with self._lock:
      return self._server_gen, self.url

  # ----- requests -----------------------------------------------------------------------------------------------------

  def _request(self, method: str, path: str, body: Any, timeout: float, url: str | None = None) -> tuple[int, Any]:
    """One HTTP call. Returns (status, parsed JSON or text) for any HTTP answer; raises `_Retryable` otherwise."""
    url = url or self.url
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
      with self._opener.open(req, timeout=timeout) as resp:
        status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
      status, raw = e.code, e.read()
    except urllib.error.URLError as e:
      gone = isinstance(e.reason, (ConnectionRefusedError, ConnectionResetError))
      raise _Retryable(f"{method} {url}{path}: {e.reason!r}", server_gone=gone) from e
    except (ConnectionError, http.client.HTTPException, socket.timeout, TimeoutError, OSError) as e:
      gone = isinstance(e, (ConnectionRefusedError, ConnectionResetError, http.client.RemoteDisconnected))
      raise _Retryable(f"{method} {url}{path}: {e!r}", server_gone=gone) from e
    if status >= 500:
      raise _Retryable(f"{method} {url}{path}: HTTP {status}: {raw[:300]!r}")
    try:
      return status, json.loads(raw) if raw else None
    except json.JSONDecodeError:
      return status, raw.decode("utf-8", "replace")

  def _generate_chunk(self, prompts: list[list[int]], chunk: list[tuple[int, int]],
                      sampling: SamplingParams) -> list[Completion]:
    """Sends one batch of (prompt i, sample j) items, retrying (and restarting a dead owned server) on failure."""
    body = {
        "input_ids": [prompts[i] for i, _ in chunk],
        "sampling_params": [sglang_sampling_params(sampling, sample_seed(sampling.seed, i, j) if self.send_seeds
                                                   else None) for i, j in chunk],
        "return_logprob": True,
        "stream": False,
    }
    def where() -> str:
      return f"POST {self.url}/generate (items {chunk[0]}..{chunk[-1]} as (prompt, sample))"

    last: Exception | None = None
    for attempt in range(self.max_retries + 1):
      gen, url = self._snapshot()
      try:
        status, reply = self._request("POST", "/generate", body, self.request_timeout_s, url)
        if status != 200:
          raise SGLangError(f"{where()} answered HTTP {status}: {str(reply)[:500]}")
        if not isinstance(reply, list) or len(reply) != len(chunk):
          raise SGLangError(f"{where()}: expected a list of {len(chunk)} outputs, got {str(reply)[:300]}")
        with self._lock:
          tag, version = self._version_tag, self.version
        return [parse_generate_output(out, tag, version, where()) for out in reply]
      except _Retryable as e:
        last = e
        if attempt == self.max_retries:
          break
        log.warning("%s failed (attempt %d/%d): %s", where(), attempt + 1, self.max_retries + 1, e)
        if self.owns_server and self._restart_if_dead(gen, e.server_gone):
          continue  # Fresh server: retry at once.
        time.sleep(self.backoff_s * 2**attempt)
    raise SGLangError(f"{where()} failed after {self.max_retries + 1} attempts "
                      f"(request_timeout_s={self.request_timeout_s:g}): {last}") from last

  def _maybe_warn_filters(self, sampling: SamplingParams) -> None:
    if (sampling.top_k > 0 or sampling.top_p < 1.0) and not self._warned_filters:
      self._warned_filters = True
      warnings.warn("SGLangEngine: with top_k/top_p filters on, SGLang's logprobs are log_softmax(logits / T) of the "
                    "UNFILTERED distribution, not of the filtered one the tokens were drawn from", stacklevel=3)

  # ----- exported weights ---------------------------------------------------------------------------------------------

  def _export(self, params: Any, version: int) -> pathlib.Path:
    """Writes the checkpoint into a temporary dir, then renames it, so the server never reads a half-written one."""
    out_dir = self.run_dir / "weights" / f"v{version:08d}"
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    for d in (tmp_dir, out_dir):
      if d.exists():
        shutil.rmtree(d)
    tmp_dir.mkdir(parents=True)
    self.export_fn(params, str(tmp_dir))
    os.replace(tmp_dir, out_dir)
    if out_dir in self._exports:
      self._exports.remove(out_dir)
    self._exports.append(out_dir)
    return out_dir

  def _prune_exports(self) -> None:
    """Keeps the newest `keep_exports` export dirs; never deletes the one the server currently serves."""
    while len(self._exports) > self.keep_exports:
      old = self._exports.pop(0)
      if str(old) != self.model_path:
        shutil.rmtree(old, ignore_errors=True)

  # ----- signals ------------------------------------------------------------------------------------------------------

  def _install_signal_handlers(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return  # signal.signal only works in the main thread; atexit still covers normal exits.
    for signum in (signal.SIGTERM, signal.SIGINT):
      self._prev_handlers[signum] = signal.getsignal(signum)
      signal.signal(signum, self._on_signal)

  def _restore_signal_handlers(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return
    for signum, prev in self._prev_handlers.items():
      if signal.getsignal(signum) == self._on_signal:  # Only undo our own handler, not one installed after it.
        signal.signal(signum, prev if prev is not None else signal.SIG_DFL)
    self._prev_handlers = {}

  def _on_signal(self, signum: int, frame: Any) -> None:
    """Kills the server, then behaves as the handler that was installed before ours."""
    prev = self._prev_handlers.get(signum, signal.SIG_DFL)
    self.close()
    if callable(prev):
      prev(signum, frame)
    elif prev == signal.SIG_DFL or prev is None:
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
