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
  GET  /get_server_info           the server's arguments ("enable_memory_saver", "device", ...)
  POST /release_memory_occupation {"tags": null | [...]}: frees weights / KV cache / CUDA graphs (`sleep`; 200, null)
  POST /resume_memory_occupation  {"tags": [...]}: maps them again (the weights without values: reloaded after)

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
  included); `no_stop_trim` is sent so `output_ids` keeps the stop token too, and the two are cross-checked. Every
  entry is checked (a [logprob, token_id, ...] list, a finite logprob <= 0, an id in [0, vocab_size), at least one and
  at most max_new_tokens of them): a bad one is an `SGLangError` naming the URL, the field and the value.
- Deadlines: every HTTP call has an OVERALL deadline (`deadline_http`: connect to last byte, not per read), and every
  wait polls a stop flag (`interrupt()`, which the trainer's SIGTERM / SIGINT handler calls), so neither a hung nor a
  trickling server nor a pending signal can hold the trainer longer than the deadline (times the attempts).
- Identity: a server this engine launched must be its own process reporting its own model path and weight version
  (a port taken by another healthy server answers health checks too); `ensure_weights` pushes the trainer's weights
  before a run's first rollout and checks what `/get_model_info` reports.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import hashlib
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
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from srpo_jax.rollout import deadline_http
from srpo_jax.rollout.engine import Completion, RolloutEngine, RolloutInterrupted, SamplingParams

log = logging.getLogger(__name__)

ExportFn = Callable[[Any, str], None]  # export_fn(params, out_dir) writes an HF safetensors checkpoint into out_dir.
# A sampled token's log-prob is <= 0; fp32 log_softmax gives exactly that, this tolerance only absorbs a server that
# rounds differently. Anything above it is not a log-probability.
MAX_LOGPROB = 1e-5


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


# SGLang's memory regions (`sglang.srt.constants.GPU_MEMORY_ALL_TYPES`), in the order they are resumed: the weights are
# reloaded before the KV cache comes back (the refit then needs no room for the cache).
GPU_MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")


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


def parse_token_logprobs(entries: Any, where: str, vocab_size: int | None = None,
                         max_new_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """`meta_info.output_token_logprobs` -> (token_ids [T] int32, logprobs [T] float32), every entry checked.

  Each entry is [logprob, token_id, text|null]: the logprob a finite number <= 0 (`MAX_LOGPROB`), the id an int in
  [0, vocab_size); 1 <= T <= max_new_tokens. Anything else is an `SGLangError` naming `where`, the entry and value.
  """
  field = "meta_info.output_token_logprobs"
  if not isinstance(entries, list):
    raise SGLangError(f"{where}: {field} is not a list: {str(entries)[:200]}")
  if not entries:
    raise SGLangError(f"{where}: {field} is empty: an empty completion (at least one token is always sampled)")
  if max_new_tokens is not None and len(entries) > max_new_tokens:
    raise SGLangError(f"{where}: {field} has {len(entries)} tokens, more than max_new_tokens={max_new_tokens}")
  try:
    lps, ids = [e[0] for e in entries], [e[1] for e in entries]
  except (TypeError, IndexError, KeyError):
    k = next(k for k, e in enumerate(entries) if not (isinstance(e, (list, tuple)) and len(e) >= 2))
    raise SGLangError(f"{where}: {field}[{k}] = {str(entries[k])[:100]}: expected [logprob, token_id, text]") from None
  # Type sets, not per-entry isinstance: 2M entries a step. bool is not an int here (JSON true is not a token id).
  if {type(v) for v in lps} - {float, int}:
    k = next(k for k, v in enumerate(lps) if type(v) not in (float, int))
    raise SGLangError(f"{where}: {field}[{k}][0] (logprob) = {lps[k]!r:.100} is not a number")
  if {type(v) for v in ids} - {int}:
    k = next(k for k, v in enumerate(ids) if type(v) is not int)
    raise SGLangError(f"{where}: {field}[{k}][1] (token id) = {ids[k]!r:.100} is not an integer")
  logprobs = np.asarray(lps, dtype=np.float64)
  bad = np.flatnonzero(~np.isfinite(logprobs) | (logprobs > MAX_LOGPROB))
  if bad.size:
    k = int(bad[0])
    raise SGLangError(f"{where}: {field}[{k}][0] (logprob) = {lps[k]!r} is not a log-probability (finite, <= 0)")
  limit = vocab_size if vocab_size is not None else 2**31  # int32 ids without a known vocabulary
  if min(ids) < 0 or max(ids) >= limit:
    k = next(k for k, v in enumerate(ids) if not 0 <= v < limit)
    vocab = f"[0, {vocab_size})" if vocab_size is not None else "of int32 ids"
    raise SGLangError(f"{where}: {field}[{k}][1] (token id) = {ids[k]} is outside the vocabulary {vocab}")
  return np.asarray(ids, dtype=np.int32), logprobs.astype(np.float32)


def parse_generate_output(out: Any, expected_version: str, version: int, where: str, vocab_size: int | None = None,
                          max_new_tokens: int | None = None) -> Completion:
  """One `/generate` answer -> `Completion`. Raises `StaleWeightsError`, `_Retryable` (aborted) or `SGLangError`."""
  if not isinstance(out, Mapping):
    raise SGLangError(f"{where}: an output is not a JSON object: {str(out)[:300]}")
  meta = out.get("meta_info")
  if not isinstance(meta, Mapping):
    raise SGLangError(f"{where}: response has no meta_info: {str(out)[:300]}")
  reason = meta.get("finish_reason")
  kind = reason.get("type") if isinstance(reason, Mapping) else reason
  if kind == "abort":
    raise _Retryable(f"{where}: request aborted by the server: {reason}")
  if kind not in ("stop", "length"):
    raise SGLangError(f"{where}: unexpected meta_info.finish_reason {str(reason)[:200]}")
  got_version = meta.get("weight_version")
  if got_version is None:
    raise SGLangError(f"{where}: response has no meta_info.weight_version (SGLang too old?); cannot rule out stale "
                      "weights")
  if str(got_version) != expected_version:
    raise StaleWeightsError(f"{where}: sampled with weight_version {got_version!r}, expected {expected_version!r}")
  entries = meta.get("output_token_logprobs")
  if entries is None:
    raise SGLangError(f"{where}: response has no meta_info.output_token_logprobs (was return_logprob sent?)")
  token_ids, logprobs = parse_token_logprobs(entries, where, vocab_size, max_new_tokens)
  output_ids = out.get("output_ids")
  if output_ids is not None:
    # output_ids may lack the final stop token if the server trimmed it; otherwise it must equal the logprob ids.
    n_ids = len(output_ids) if isinstance(output_ids, list) else -1
    if n_ids not in (len(token_ids), len(token_ids) - 1) or list(output_ids) != token_ids[:n_ids].tolist():
      raise SGLangError(f"{where}: output_ids {str(output_ids)[:100]}... disagree with the token ids of "
                        f"output_token_logprobs {token_ids[:16].tolist()}...")
  return Completion(token_ids=token_ids, logprobs=logprobs, finish_reason=kind, weight_version=version)


def _free_port(host: str = "127.0.0.1") -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def listener_held_by_group(port: int, pgid: int) -> bool | None:
  """Whether a process of group `pgid` holds the socket listening on TCP `port` (Linux /proc); None: cannot tell.

  Two servers can report the same model path and weight version (a leaked server of the same run on a fixed port):
  only the socket's owner says which process answers.
  """
  inodes = set()
  for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
      with open(table) as f:
        rows = f.read().splitlines()[1:]
    except OSError:
      continue
    for row in rows:
      col = row.split()  # sl, local_address (hex ip:port), rem_address, st (0A = LISTEN), ..., inode (10th)
      if len(col) > 9 and col[3] == "0A" and int(col[1].rsplit(":", 1)[1], 16) == port:
        inodes.add(f"socket:[{col[9]}]")
  if not inodes:
    return None
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/stat") as f:
        if int(f.read().rsplit(")", 1)[1].split()[2]) != pgid:  # fields after the name: state, ppid, pgrp
          continue
      for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
          return True
    except OSError:  # gone meanwhile, or not ours to read
      continue
  return False


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


def release_attached(url: str, deadline_s: float) -> None:
  """`sleep` of a running server before the trainer allocates its state beside it (rollout.sglang_sleep with
  rollout.sglang_url): its engine is then made with `released=True`."""
  eng = SGLangEngine("unused", url=url, health_timeout_s=deadline_s, request_deadline_s=deadline_s,
                     install_signal_handlers=False)
  try:
    eng.sleep()
  finally:
    eng.close()


def ram_exports_dir(run_dir: str | os.PathLike, needed_bytes: int, root: str = "/dev/shm") -> pathlib.Path | None:
  """A directory for a run's weight exports in RAM (`root`, a tmpfs: the server reloads from memory, and writing
  there skips the disk), named after the run directory; None when `root` is missing or has not `needed_bytes` free."""
  try:
    st = os.statvfs(root)
  except OSError:
    return None
  if st.f_bavail * st.f_frsize < needed_bytes:
    return None
  tag = hashlib.blake2b(str(pathlib.Path(run_dir).resolve()).encode(), digest_size=6).hexdigest()
  return pathlib.Path(root) / f"srpo_jax-exports-{os.getuid()}-{tag}"


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
    health_timeout_s: how long a server may take to answer `/health_generate` with 200 (a launched one: to load
      and start), and to load weights (`/update_weights_from_disk`).
    request_deadline_s: overall deadline of one `/generate` request (a batch chunk of up to `max_batch_size`
      sequences), from connect to the answer's last byte; its clock starts when it is sent, and up to
      `max_concurrency` requests share the server at once.
    max_retries: retries per request after the first attempt; the wait before retry k is `backoff_s * 2**k`. A
      request fails for good after `(max_retries + 1) × deadline` plus the backoffs.
    python, launch_cmd: the server command is `launch_cmd + [--model-path, ..., --host, --port, --weight-version]
      + server_args`, `launch_cmd` defaulting to `[python, -m, sglang.launch_server]` (tests put a fake server here).
    initial_version: the integer version of `model_path`'s weights (a launched server is tagged with it).
    vocab_size: the model's vocabulary: a sampled id outside [0, vocab_size) is an error (None: ids >= 0 only).
    max_batch_size: sequences per `/generate` request; max_concurrency: requests in flight at once (2: one 256-row
      request fills SGLang's running batch, a second one keeps it full while the first one's longest rows finish).
    send_seeds: send per-sample `sampling_seed`s (default: iff `--enable-deterministic-inference` is in server_args).
    keep_exports: exported weight directories kept on disk (the newest ones).
    exports_dir: where the exports go (default `run_dir/weights`), e.g. a RAM-backed directory (`ram_exports_dir`);
      with `remove_exports_dir`, the engine empties it first and removes it on `close()`.
    install_signal_handlers: on SIGTERM / SIGINT, kill the server, then run the previous handler.
    released: an attached server's memory is released already (`release_attached`): the first use wakes it.
  """

  def __init__(self, model_path: str | os.PathLike, *, url: str | None = None,
               server_args: Mapping[str, Any] | Sequence[str] = (), export_fn: ExportFn | None = None,
               run_dir: str | os.PathLike | None = None, port: int | None = None, health_timeout_s: float = 900.0,
               request_deadline_s: float = 3600.0, max_retries: int = 1, backoff_s: float = 1.0,
               python: str = sys.executable, launch_cmd: Sequence[str] | None = None, initial_version: int = 0,
               vocab_size: int | None = None, max_batch_size: int = 256, max_concurrency: int = 2,
               send_seeds: bool | None = None, keep_exports: int = 2, install_signal_handlers: bool = True,
               exports_dir: str | os.PathLike | None = None, remove_exports_dir: bool = False,
               kill_grace_s: float = 10.0, released: bool = False):
    if max_retries < 0 or max_batch_size < 1 or max_concurrency < 1 or keep_exports < 1:
      raise ValueError(f"SGLangEngine: need max_retries >= 0, max_batch_size >= 1, max_concurrency >= 1, "
                       f"keep_exports >= 1; got {max_retries}, {max_batch_size}, {max_concurrency}, {keep_exports}")
    if not (health_timeout_s > 0 and request_deadline_s > 0):
      raise ValueError(f"SGLangEngine: need health_timeout_s > 0 and request_deadline_s > 0; got {health_timeout_s}, "
                       f"{request_deadline_s}")
    if url is not None:
      deadline_http.check_url(url.rstrip("/"))
    self._server_cli = server_args_to_cli(server_args)
    self.model_path = str(model_path)
    self.export_fn = export_fn
    self.run_dir = pathlib.Path(run_dir) if run_dir is not None else pathlib.Path(tempfile.mkdtemp(prefix="sglang_"))
    self.run_dir.mkdir(parents=True, exist_ok=True)
    self.health_timeout_s = float(health_timeout_s)
    self.request_deadline_s = float(request_deadline_s)
    self.vocab_size = int(vocab_size) if vocab_size is not None else None
    self.max_retries = int(max_retries)
    self.backoff_s = float(backoff_s)
    self.max_batch_size = int(max_batch_size)
    self.max_concurrency = int(max_concurrency)
    self.keep_exports = int(keep_exports)
    self.exports_dir = pathlib.Path(exports_dir) if exports_dir is not None else self.run_dir / "weights"
    self._remove_exports_dir = bool(remove_exports_dir and exports_dir is not None)
    if self._remove_exports_dir:
      shutil.rmtree(self.exports_dir, ignore_errors=True)  # a crashed run's leftovers (RAM, in /dev/shm)
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
    self._stop = threading.Event()  # interrupt() / close(): every wait ends with RolloutInterrupted.
    self._prev_handlers: dict[int, Any] = {}
    self._released: set[str] = set(GPU_MEMORY_TAGS) if released else set()  # released (`sleep`), not resumed
    self._saver_checked = released

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
    if self._stop.is_set():
      raise RolloutInterrupted(f"SGLangEngine at {self.url}: interrupted (stop requested)")
    if n < 1:
      raise ValueError(f"generate: n must be >= 1, got {n}")
    prompts = [[int(t) for t in p] for p in prompt_token_ids]
    for i, p in enumerate(prompts):
      if not p:
        raise ValueError(f"generate: prompt_token_ids[{i}] is empty")
    self._maybe_warn_filters(sampling)
    self._wake(GPU_MEMORY_TAGS)  # after `sleep`: the weights (reloaded) first, then the KV cache and CUDA graphs
    items = [(i, j) for i in range(len(prompts)) for j in range(n)]  # Prompt-major: result order == item order.
    chunks = [items[k:k + self.max_batch_size] for k in range(0, len(items), self.max_batch_size)]
    if not chunks:
      return []
    flat: list[Completion] = []  # in item order: chunks are consecutive runs of `items`
    cancel = threading.Event()  # The first failure ends the other requests at once (they poll it).
    with concurrent.futures.ThreadPoolExecutor(min(self.max_concurrency, len(chunks))) as pool:
      futures = [pool.submit(self._generate_chunk, prompts, chunk, sampling, cancel) for chunk in chunks]
      concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
      failed = [f for f in futures if f.done() and f.exception() is not None]
      if failed:
        cancel.set()
        # The cause, not a sibling's "cancelled" (RolloutInterrupted) when a real error is among the failures.
        real = [f for f in failed if not isinstance(f.exception(), RolloutInterrupted)]
        raise (real or failed)[0].exception()
      for fut in futures:
        flat.extend(fut.result())
    return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]

  def update_weights(self, params: Any, version: int) -> None:
    """Exports `params` to `exports_dir/v{version}` and makes the server load them, tagged `version`."""
    if self._closed:
      raise SGLangError("SGLangEngine.update_weights called after close()")
    if self.export_fn is None:
      raise ValueError("SGLangEngine.update_weights needs export_fn(params, out_dir) (none was given)")
    version = int(version)
    out_dir = self._export(params, version)
    self._wake(("weights",), reload=False)  # the export first: JAX's cast and layout run while the server sleeps
    self._load(out_dir, version)

  def _load(self, out_dir: pathlib.Path, version: int) -> None:
    """`/update_weights_from_disk` of `out_dir`, tagged `version` (a dead owned server restarts from it)."""
    body = {"model_path": str(out_dir), "weight_version": str(version)}
    for attempt in range(self.max_retries + 1):
      gen, url = self._snapshot()
      try:  # Loading weights is bounded like loading them at start-up.
        status, reply = self._request("POST", "/update_weights_from_disk", body, self.health_timeout_s, url)
      except _Retryable as e:
        if self.owns_server and self._restart_if_dead(gen, e.server_gone, model_path=out_dir, version=version):
          break  # The fresh server loaded `out_dir` at start, tagged `version`: nothing left to do.
        if attempt == self.max_retries:
          raise SGLangError(f"update_weights(version={version}) at {self.url} failed after {attempt + 1} attempts "
                            f"(health_timeout_s={self.health_timeout_s:g}): {e}") from e
        self._sleep(self.backoff_s * 2**attempt)
        continue
      if status == 400 and isinstance(reply, Mapping) and "cache was not flushed" in str(reply.get("message")):
        # SGLang 0.5.23 loaded the weights and took the version, but requests were still running (an abandoned
        # client's, which it aborts within seconds): its prefix cache still holds old-weight KV. Flush once idle.
        self._flush_when_idle(url, f"update_weights(version={version}): {url} loaded the weights but")
      elif status != 200 or not (isinstance(reply, Mapping) and reply.get("success")):
        raise SGLangError(f"update_weights(version={version}): {self.url}/update_weights_from_disk answered "
                          f"HTTP {status}: {str(reply)[:500]}")
      break
    with self._lock:
      self.model_path, self.version, self._version_tag = str(out_dir), version, str(version)
    self._prune_exports()

  def sleep(self) -> None:
    """`/release_memory_occupation` of everything (weights, KV cache, CUDA graphs) until the next `generate` or
    `update_weights` wakes what it needs: with `--enable-memory-saver` (torch_memory_saver) SGLang unmaps their GPU
    memory for the trainer. Only between requests (SGLang asserts it is idle). Raises `SGLangError` for a GPU server
    without the memory saver (it would keep every byte while the trainer counts on them)."""
    if self._closed:
      raise SGLangError("SGLangEngine.sleep called after close()")
    awake = [t for t in GPU_MEMORY_TAGS if t not in self._released]
    if not awake:
      return
    if not self._saver_checked:
      info = self._get_info("/get_server_info")
      if not info.get("enable_memory_saver") and str(info.get("device", "cuda")) != "cpu":
        raise SGLangError(f"rollout.sglang_sleep: the server at {self.url} runs on {info.get('device', 'cuda')!r} "
                          f"without --enable-memory-saver, so releasing its memory frees nothing; launch it with "
                          f"--enable-memory-saver (launch/sglang_server.sh SLEEP=1) or set rollout.sglang_sleep=false")
      self._saver_checked = True
    # SGLang releases only an idle server (an abandoned request of a retried deadline may still run): wait for it.
    self._flush_when_idle(self.url, f"sleep: {self.url}")
    self._occupation("/release_memory_occupation", None if len(awake) == len(GPU_MEMORY_TAGS) else awake)
    self._released = set(GPU_MEMORY_TAGS)

  def _wake(self, tags: Sequence[str], *, reload: bool = True) -> None:
    """`/resume_memory_occupation` of the released `tags` among `tags`. Woken weights hold no values (SGLang keeps no
    CPU copy): with `reload`, the current export is loaded into them again."""
    tags = [t for t in GPU_MEMORY_TAGS if t in tags and t in self._released]
    if "weights" in tags:  # alone and first: the reload then has the room the KV cache will take
      self._occupation("/resume_memory_occupation", ["weights"])
      self._released.discard("weights")
      if reload:
        self._load(pathlib.Path(self.model_path), self.version)
      tags.remove("weights")
    if tags:
      self._occupation("/resume_memory_occupation", tags)
      self._released -= set(tags)

  def _occupation(self, path: str, tags: Sequence[str] | None) -> None:
    status, reply = self._request("POST", path, {"tags": list(tags) if tags is not None else None},
                                  self.health_timeout_s)
    if status != 200:
      raise SGLangError(f"{self.url}{path} (tags {tags or 'all'}) answered HTTP {status}: {str(reply)[:300]}")

  def _flush_when_idle(self, url: str, what: str) -> None:
    """`/flush_cache?timeout=` waits (up to health_timeout_s) for the running requests to end, then flushes."""
    wait_s = self.health_timeout_s
    try:
      status, reply = self._request("POST", f"/flush_cache?timeout={wait_s:g}", None, wait_s + 30.0, url)
    except _Retryable as e:
      status, reply = None, e
    if status != 200:
      raise SGLangError(f"{what} could not flush its prefix cache (requests still running after "
                        f"health_timeout_s={wait_s:g}): {str(reply)[:300]}")

  def ensure_weights(self, params: Any, version: int) -> None:
    """Before a run's first rollout: the server holds exactly `params` as `version`, as `/get_model_info` confirms.

    A server this engine launched from `model_path` tagged `version` already does (the caller exported `params`
    there); any other (an attached server holds whatever someone loaded, maybe under the same tag) gets them pushed.
    """
    version = int(version)
    if not (self.owns_server and self.version == version):
      self.update_weights(params, version)
    self.verify_weights(version)

  def verify_weights(self, version: int) -> None:
    """`StaleWeightsError` unless the server reports our model path and weight version `version`."""
    info = self.get_model_info()
    got = (str(info.get("model_path")), str(info.get("weight_version")))
    want = (self.model_path, str(int(version)))
    if got != want:
      raise StaleWeightsError(f"{self.url}/get_model_info reports model_path={got[0]!r}, weight_version={got[1]!r}; "
                              f"expected model_path={want[0]!r}, weight_version={want[1]!r} (the trainer's weights)")

  def interrupt(self) -> None:
    """Every wait (request, health poll, backoff) ends within `deadline_http.POLL_S` with `RolloutInterrupted`."""
    self._stop.set()

  def get_model_info(self) -> dict[str, Any]:
    return self._get_info("/get_model_info")

  def _get_info(self, path: str) -> dict[str, Any]:
    """A JSON object the server describes itself with (`/get_model_info`, `/get_server_info`)."""
    status, reply = self._request("GET", path, None, min(30.0, self.health_timeout_s))
    if status != 200 or not isinstance(reply, Mapping):
      raise SGLangError(f"{self.url}{path} answered HTTP {status}: {str(reply)[:300]}")
    return dict(reply)

  def flush_cache(self) -> None:
    """Drops the radix (prefix) cache. `update_weights_from_disk` already flushes it by default."""
    status, reply = self._request("POST", "/flush_cache", None, min(60.0, self.health_timeout_s))
    if status != 200:
      raise SGLangError(f"{self.url}/flush_cache answered HTTP {status}: {str(reply)[:300]}")

  def close(self) -> None:
    """Kills the launched server's process group (SIGTERM, then SIGKILL). Idempotent; attached servers live on."""
    # A signal handler may land here while another thread holds the lock for a restart (up to health_timeout_s):
    # do not wait that long; `_start_server` re-checks `_closed` after spawning.
    self._stop.set()  # Requests in other threads end at once instead of waiting out their deadline.
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
    if self._remove_exports_dir:
      shutil.rmtree(self.exports_dir, ignore_errors=True)
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
    self._released = set()  # a fresh server holds all of its memory
    try:
      if self._closed:
        raise SGLangError("SGLangEngine closed while the server was (re)starting")
      self._wait_healthy()
      self._check_identity()
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
      left = deadline - time.monotonic()
      try:
        if left > 0:
          status, _ = self._request("GET", "/health_generate", None, min(10.0, left))
          if status == 200:
            return
      except _Retryable:
        pass  # Not listening yet.
      if time.monotonic() > deadline:
        raise ServerStartupError(f"SGLang server at {self.url} was not healthy (GET /health_generate -> 200) within "
                                 f"health_timeout_s={self.health_timeout_s:g}s. Log {self.log_path}, last lines:\n"
                                 f"{_tail(self.log_path)}")
      self._sleep(0.2)

  def _check_identity(self) -> None:
    """A launched server that answers health checks must be ours: our process alive, our model path and version.

    SGLang binds its port only after loading the model, so while ours loads (or after it died of EADDRINUSE)
    another server on that port answers `/health_generate` with 200; its rollouts would come from its weights.
    """
    info = self.get_model_info()
    code = self._proc.poll()
    got = (str(info.get("model_path")), str(info.get("weight_version")))
    want = (self.model_path, self._version_tag)
    port = int(self.url.rsplit(":", 1)[1])
    if code is not None or got != want or listener_held_by_group(port, self._proc.pid) is False:
      ours = f"exited with code {code}" if code is not None else (
          f"(pid {self._proc.pid}) does not hold the listening socket" if got == want else
          f"(pid {self._proc.pid}) is alive but not answering")
      raise ServerStartupError(
          f"{self.url} answers as another server: it reports model_path={got[0]!r}, weight_version={got[1]!r}, but "
          f"the server this engine launched there (model_path={want[0]!r}, weight_version={want[1]!r}) {ours}. The "
          f"port is taken by another server: stop it or let the engine pick a free port. Log {self.log_path}, last "
          f"lines:\n{_tail(self.log_path)}")

  def _sleep(self, seconds: float) -> None:
    if self._stop.wait(seconds):
      raise RolloutInterrupted(f"SGLangEngine at {self.url}: interrupted (stop requested)")

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

  def _request(self, method: str, path: str, body: Any, deadline_s: float, url: str | None = None,
               cancel: threading.Event | None = None) -> tuple[int, Any]:
    """One HTTP call with an overall deadline. Returns (status, parsed JSON or text) for any HTTP answer below 500;
    raises `_Retryable` (no complete answer in time, connection lost, 5xx), `RolloutInterrupted` or `SGLangError`."""
    url = url or self.url
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    stop = (lambda: self._stop.is_set() or cancel.is_set()) if cancel is not None else self._stop.is_set
    try:
      status, raw = deadline_http.request(url, method, path, data, deadline_s, stop=stop)
    except deadline_http.Stopped as e:
      raise RolloutInterrupted(str(e)) from None
    except deadline_http.HTTPFailure as e:
      raise _Retryable(str(e), server_gone=e.server_gone) from e
    except deadline_http.BadResponse as e:
      raise SGLangError(str(e)) from e
    if status >= 500:
      raise _Retryable(f"{method} {url}{path}: HTTP {status}: {raw[:300]!r}")
    try:
      return status, json.loads(raw) if raw else None
    except ValueError:  # Not JSON (or not UTF-8): the caller reports the text.
      return status, raw.decode("utf-8", "replace")
    except RecursionError:
      raise SGLangError(f"{method} {url}{path}: answer nested too deeply to be JSON from SGLang") from None

  def _generate_chunk(self, prompts: list[list[int]], chunk: list[tuple[int, int]], sampling: SamplingParams,
                      cancel: threading.Event | None = None) -> list[Completion]:
    """Sends one batch of (prompt i, sample j) items, retrying (and restarting a dead owned server) on failure."""
    body = {
        "input_ids": [prompts[i] for i, _ in chunk],
        "sampling_params": [sglang_sampling_params(
            sampling, sample_seed(sampling.seed, sampling.first_prompt + i, j) if self.send_seeds else None)
            for i, j in chunk],
        "return_logprob": True,
        "stream": False,
    }
    def where() -> str:
      return f"POST {self.url}/generate (items {chunk[0]}..{chunk[-1]} as (prompt, sample))"

    last: Exception | None = None
    for attempt in range(self.max_retries + 1):
      gen, url = self._snapshot()
      try:
        status, reply = self._request("POST", "/generate", body, self.request_deadline_s, url, cancel)
        if status != 200:
          raise SGLangError(f"{where()} answered HTTP {status}: {str(reply)[:500]}")
        if not isinstance(reply, list) or len(reply) != len(chunk):
          raise SGLangError(f"{where()}: expected a list of {len(chunk)} outputs, got {str(reply)[:300]}")
        with self._lock:
          tag, version = self._version_tag, self.version
        return [parse_generate_output(out, tag, version, where(), self.vocab_size, sampling.max_new_tokens)
                for out in reply]
      except _Retryable as e:
        last = e
        if attempt == self.max_retries:
          break
        log.warning("%s failed (attempt %d/%d): %s", where(), attempt + 1, self.max_retries + 1, e)
        if self.owns_server and self._restart_if_dead(gen, e.server_gone):
          continue  # Fresh server: retry at once.
        self._sleep(self.backoff_s * 2**attempt)
    raise SGLangError(f"{where()} failed after {self.max_retries + 1} attempts "
                      f"(request_deadline_s={self.request_deadline_s:g} each): {last}") from last

  def _maybe_warn_filters(self, sampling: SamplingParams) -> None:
    if (sampling.top_k > 0 or sampling.top_p < 1.0) and not self._warned_filters:
      self._warned_filters = True
      warnings.warn("SGLangEngine: with top_k/top_p filters on, SGLang's logprobs are log_softmax(logits / T) of the "
                    "UNFILTERED distribution, not of the filtered one the tokens were drawn from", stacklevel=3)

  # ----- exported weights ---------------------------------------------------------------------------------------------

  def _export(self, params: Any, version: int) -> pathlib.Path:
    """Writes the checkpoint into a temporary dir, then renames it, so the server never reads a half-written one.

    Once `keep_exports` exports exist, the oldest one (not the served one) becomes that temporary dir: `export_fn`
    finds the previous files there and may overwrite them in place (`hf_io.save_pretrained(in_place=True)`)."""
    out_dir = self.exports_dir / f"v{version:08d}"
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    for d in (tmp_dir, out_dir):
      if d.exists():
        shutil.rmtree(d)
    oldest = self._exports[0] if len(self._exports) >= self.keep_exports else None
    if oldest is not None and str(oldest) != self.model_path and oldest.is_dir():
      os.replace(oldest, tmp_dir)  # the server loaded a newer export since: nobody reads this one
      self._exports.pop(0)
    else:
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
