"""A FAKE SGLang server for CONTRACT tests of `srpo_jax.rollout.sglang_engine`. It is not SGLang.

It speaks the subset of SGLang's native HTTP API that `SGLangEngine` uses, with the request / response shapes of
SGLang's `http_server.py` / `io_struct.py` (as read from the SGLang sources; see the engine's module docstring):
  GET  /health, /health_generate      200 when "loaded", 503 before
  POST /generate                      batched `input_ids`, per-item `sampling_params`, `return_logprob`
  POST /update_weights_from_disk      {"model_path", "weight_version"} -> {"success", "message", ...}
  GET  /get_model_info                {"model_path", "weight_version", ...} plus fake_* debugging fields
  GET|POST /flush_cache
  GET  /get_server_info               {"device", "enable_memory_saver", "dp_size"}
  POST /release_memory_occupation     {"tags": null | [...]}: as SGLang's, released regions must be resumed before use:
  POST /resume_memory_occupation      /generate answers 500 while the weights or the KV cache are released, and
                                      /update_weights_from_disk 400 while the weights are; resumed weights hold no
                                      values (fingerprint "lost") until weights are loaded again
Tokens are fake and deterministic given (prompt, sampling_seed): see `fake_generate`. Passing these tests shows the
engine honours this contract; it does not show that real SGLang answers the same way.

Launched like `sglang.launch_server` (`--model-path --host --port --weight-version`, unknown flags ignored), plus
failure switches:
  --fake-die-after N          os._exit(1) on receiving the N-th /generate request (a crash mid-batch)
  --fake-die-once-marker F    ...only if file F does not exist yet (it is created before dying), so a restart lives
  --fake-never-healthy        health endpoints always answer 503
  --fake-startup-delay S      health answers 503 for the first S seconds (a model that loads)
  --fake-slow S               every /generate sleeps S seconds before answering
  --fake-ignore-version-updates  /update_weights_from_disk succeeds but keeps the old weight_version (stale weights)
  --fake-spawn-child          starts a sleeping child process (like SGLang's scheduler) in the server's group
  --fake-vocab V              fake vocabulary size (default 32)
  --fake-hang-after N         the N-th and later /generate requests never answer (a hung scheduler)
  --fake-hang-count C         ...only C of them (0 = all)
  --fake-trickle-after N      ...answer one byte a second (headers, then the body: a stalled network / proxy)
  --fake-bind-delay S         sleep S seconds before binding the port (SGLang binds only after loading the model), so
                              a port already taken fails late, with EADDRINUSE, as SGLang does
  --device D, --enable-memory-saver   reported by /get_server_info (the engine refuses to sleep a GPU server without
                              the memory saver)
  --dp-size N                 N data-parallel ranks: the sequences of a batch go to ranks in turn (round robin, as
                              SGLang's DataParallelController); /get_model_info's fake_dp_sequences counts them
  --fake-corrupt KIND         every /generate output is broken: nan_logprob | pos_logprob | bad_entry | oob_token |
                              neg_token | empty | too_long
Weights: tokens and logprobs also depend on a fingerprint of the *.safetensors files under the loaded model_path
(`weights_fingerprint`, "" when there are none), reported as `fake_weights_sha` by /get_model_info, so a test can
tell from the rollouts alone which weights served them.
"""
from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
from typing import Any

# The API fields of SGLang's `SamplingParams` (python/sglang/srt/sampling/sampling_params.py, 0.5.x): the real server
# builds it from each request's `sampling_params` and answers 400 for any other key; so does this fake.
SGLANG_SAMPLING_KEYS = frozenset({
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema", "regex",
    "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
    "custom_params", "stream_interval", "logit_bias", "sampling_seed"})


MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")  # SGLang's GPU_MEMORY_ALL_TYPES


def weights_fingerprint(model_path: str) -> str:
  """sha256 of the *.safetensors files (names and bytes) directly under `model_path`; "" when there are none."""
  if not os.path.isdir(model_path):
    return ""
  names = sorted(n for n in os.listdir(model_path) if n.endswith(".safetensors"))
  if not names:
    return ""
  h = hashlib.sha256()
  for name in names:
    h.update(name.encode())
    with open(os.path.join(model_path, name), "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  return h.hexdigest()


def fake_generate(prompt: list[int], params: dict[str, Any], vocab: int, salt: int,
                  weights: str = "") -> dict[str, Any]:
  """SGLang-shaped output for one prompt: tokens drawn from a RNG seeded by (prompt, sampling_seed or salt, weights).

  Stops at the first token in `stop_token_ids` (finish_reason {"type": "stop", "matched": id}) or after
  `max_new_tokens` tokens ({"type": "length", "length": n}). Logprobs are log of a fake probability, so <= 0.
  Unless `no_stop_trim`, the matched stop token is trimmed from `output_ids` (not from the logprobs), as SGLang's
  detokenizer does for text.
  """
  seed = params.get("sampling_seed")
  rng = random.Random(f"{prompt}|{seed if seed is not None else f'salt{salt}'}" + (f"|{weights}" if weights else ""))
  stop_ids = set(params.get("stop_token_ids") or ())
  max_new = int(params.get("max_new_tokens", 128))
  tokens, logprobs, reason = [], [], {"type": "length", "length": max_new}
  for _ in range(max_new):
    tok = rng.randrange(vocab)
    tokens.append(tok)
    logprobs.append(math.log(rng.uniform(0.01, 1.0)))
    if tok in stop_ids:
      reason = {"type": "stop", "matched": tok}
      break
  output_ids = list(tokens)
  if reason["type"] == "stop" and not params.get("no_stop_trim", False):
    output_ids = output_ids[:-1]
  return {"output_ids": output_ids, "logprobs": logprobs, "tokens": tokens, "finish_reason": reason}


class FakeState:
  def __init__(self, args: argparse.Namespace):
    self.args = args
    self.model_path = args.model_path
    self.weights = weights_fingerprint(args.model_path)
    self.weight_version = args.weight_version
    self.started = time.monotonic()
    self.lock = threading.Lock()
    self.generate_requests = 0
    self.dp_sequences = [0] * max(args.dp_size, 1)  # sequences each data-parallel rank generated
    self.next_rank = 0
    self.salt = 0
    self.child: subprocess.Popen | None = None
    self.released: set[str] = set()  # memory regions released and not resumed
    self.occupation_calls: list[str] = []  # "release:tags" / "resume:tags", in order

  def healthy(self) -> bool:
    return not self.args.fake_never_healthy and time.monotonic() - self.started >= self.args.fake_startup_delay


class Handler(http.server.BaseHTTPRequestHandler):
  state: FakeState  # Set on the class by main().
  protocol_version = "HTTP/1.1"

  def log_message(self, fmt, *args):  # Into the server log (stderr), like SGLang's access log.
    sys.stderr.write("fake-sglang: " + (fmt % args) + "\n")

  def _send(self, status: int, payload: Any) -> None:
    raw = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(raw)))
    self.end_headers()
    self.wfile.write(raw)

  def _body(self) -> Any:
    n = int(self.headers.get("Content-Length") or 0)
    return json.loads(self.rfile.read(n)) if n else None

  def do_GET(self):
    st = self.state
    if self.path in ("/health", "/health_generate"):
      self._send(200 if st.healthy() else 503, b"")
    elif self.path == "/get_model_info":
      self._send(200, {"model_path": st.model_path, "tokenizer_path": st.model_path, "is_generation": True,
                       "weight_version": st.weight_version, "fake_pid": os.getpid(),
                       "fake_child_pid": st.child.pid if st.child else None, "fake_weights_sha": st.weights,
                       "fake_generate_requests": st.generate_requests, "fake_dp_sequences": st.dp_sequences,
                       "fake_released": sorted(st.released), "fake_occupation_calls": st.occupation_calls})
    elif self.path == "/get_server_info":
      self._send(200, {"device": st.args.device, "enable_memory_saver": st.args.enable_memory_saver,
                       "dp_size": st.args.dp_size, "weight_version": st.weight_version})
    elif self.path.split("?")[0] == "/flush_cache":
      self._send(200, b"Cache flushed.\n")
    else:
      self._send(404, {"detail": "Not Found"})

  def do_POST(self):
    st = self.state
    body = self._body()
    if self.path == "/generate":
      self._generate(body)
    elif self.path in ("/release_memory_occupation", "/resume_memory_occupation"):
      tags = (body or {}).get("tags") or list(MEMORY_TAGS)
      release = self.path.startswith("/release")
      if not release and not set(tags) <= st.released:  # SGLang: offload_tags.remove(tag) of a tag never released
        self._send(400, {"error": {"message": f"resume of {sorted(set(tags) - st.released)}: not released"}})
        return
      st.released = st.released | set(tags) if release else st.released - set(tags)
      if not release and "weights" in tags:
        st.weights = "lost"  # no CPU backup: the woken weights hold garbage until a load
      st.occupation_calls.append(f"{'release' if release else 'resume'}:{','.join(sorted(tags))}")
      self._send(200, None)
    elif self.path == "/update_weights_from_disk":
      if "weights" in st.released:
        self._send(400, {"success": False, "message": "weights are released (resume_memory_occupation first)",
                         "num_paused_requests": 0})
        return
      path = body.get("model_path", "")
      if not os.path.isdir(path):
        self._send(400, {"success": False, "message": f"model_path {path!r} is not a directory",
                         "num_paused_requests": 0})
        return
      st.model_path = path
      st.weights = weights_fingerprint(path)
      if body.get("weight_version") is not None and not st.args.fake_ignore_version_updates:
        st.weight_version = str(body["weight_version"])
      self._send(200, {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0})
    elif self.path.split("?")[0] == "/flush_cache":
      self._send(200, b"Cache flushed.\n")
    else:
      self._send(404, {"detail": "Not Found"})

  def _generate(self, body: dict[str, Any]) -> None:
    st = self.state
    if st.released & {"weights", "kv_cache"}:
      self._send(500, {"error": {"message": f"generate while {sorted(st.released)} are released"}})
      return
    with st.lock:
      st.generate_requests += 1
      count = st.generate_requests
    if st.args.fake_die_after and count >= st.args.fake_die_after:
      marker = st.args.fake_die_once_marker
      if not marker or not os.path.exists(marker):
        if marker:
          open(marker, "w").close()
        sys.stderr.write(f"fake-sglang: dying on /generate request #{count}\n")
        sys.stderr.flush()
        os._exit(1)
    hang_count = st.args.fake_hang_count
    if st.args.fake_hang_after and st.args.fake_hang_after <= count < st.args.fake_hang_after + (hang_count or 1e18):
      sys.stderr.write(f"fake-sglang: hanging on /generate request #{count}\n")
      sys.stderr.flush()
      while True:
        time.sleep(3600)
    if st.args.fake_slow:
      time.sleep(st.args.fake_slow)
    input_ids = body["input_ids"]
    single = bool(input_ids) and isinstance(input_ids[0], int)
    batch = [input_ids] if single else input_ids
    params = body.get("sampling_params") or {}
    params = [params] * len(batch) if isinstance(params, dict) else params
    if len(params) != len(batch):
      self._send(400, {"error": {"message": "sampling_params length must equal the batch size"}})
      return
    unknown = sorted({k for p in params for k in p} - SGLANG_SAMPLING_KEYS)
    if unknown:  # as the real server: SamplingParams(**sampling_params) refuses a key it does not define
      self._send(400, {"error": {"message": f"unknown sampling_params keys {unknown}"}})
      return
    if any(int(p.get("n", 1)) != 1 for p in params):
      self._send(400, {"error": {"message": "this fake serves n == 1 only (one prompt copy per sample)"}})
      return
    outs = []
    for prompt, p in zip(batch, params):
      with st.lock:
        st.salt += 1
        salt = st.salt
        st.dp_sequences[st.next_rank] += 1
        st.next_rank = (st.next_rank + 1) % len(st.dp_sequences)
      g = fake_generate(prompt, p, st.args.fake_vocab, salt, st.weights)
      meta = {"id": f"fake-{salt}", "finish_reason": g["finish_reason"], "prompt_tokens": len(prompt),
              "weight_version": st.weight_version, "completion_tokens": len(g["tokens"]), "cached_tokens": 0}
      if body.get("return_logprob"):
        meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(g["logprobs"], g["tokens"])]
      out = {"text": "", "output_ids": g["output_ids"], "meta_info": meta}
      if st.args.fake_corrupt:
        corrupt(out, st.args.fake_corrupt, st.args.fake_vocab, int(p.get("max_new_tokens", 128)))
      outs.append(out)
    if st.args.fake_trickle_after and count >= st.args.fake_trickle_after:
      self._trickle(outs[0] if single else outs)
      return
    self._send(200, outs[0] if single else outs)

  def _trickle(self, payload: Any) -> None:
    """A well-formed answer sent one byte a second, headers included (until the client hangs up)."""
    raw = json.dumps(payload).encode()
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n").encode()
    try:
      for i in range(len(head) + len(raw)):
        self.wfile.write((head + raw)[i:i + 1])
        self.wfile.flush()
        time.sleep(1.0)
    except OSError:
      pass
    self.close_connection = True


def corrupt(out: dict[str, Any], kind: str, vocab: int, max_new: int) -> None:
  """Breaks one output in place the way `--fake-corrupt KIND` says (each a case the client must reject)."""
  entries = out["meta_info"]["output_token_logprobs"]
  if kind == "nan_logprob":
    entries[0][0] = float("nan")  # json.dumps writes NaN, as a Python server would
  elif kind == "pos_logprob":
    entries[0][0] = 0.5
  elif kind == "bad_entry":
    entries[0] = ["x", "y"]
  elif kind == "oob_token":
    entries[0][1] = vocab
  elif kind == "neg_token":
    entries[0][1] = -1
  elif kind == "empty":
    out["meta_info"]["output_token_logprobs"], out["output_ids"] = [], []
  elif kind == "too_long":
    entries.extend([[-0.5, 1, None]] * (max_new + 1 - len(entries)))
    out["output_ids"] = [e[1] for e in entries]
  else:
    raise ValueError(f"--fake-corrupt: unknown kind {kind!r}")
  if kind in ("oob_token", "neg_token", "bad_entry"):
    out["output_ids"] = None  # Let the per-entry check speak, not the output_ids cross-check.


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model-path", required=True)
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, default=30000)
  parser.add_argument("--weight-version", default="default")
  parser.add_argument("--fake-die-after", type=int, default=0)
  parser.add_argument("--fake-die-once-marker", default="")
  parser.add_argument("--fake-never-healthy", action="store_true")
  parser.add_argument("--fake-startup-delay", type=float, default=0.0)
  parser.add_argument("--fake-slow", type=float, default=0.0)
  parser.add_argument("--fake-ignore-version-updates", action="store_true")
  parser.add_argument("--fake-spawn-child", action="store_true")
  parser.add_argument("--fake-vocab", type=int, default=32)
  parser.add_argument("--fake-hang-after", type=int, default=0)
  parser.add_argument("--fake-hang-count", type=int, default=0)
  parser.add_argument("--fake-trickle-after", type=int, default=0)
  parser.add_argument("--fake-bind-delay", type=float, default=0.0)
  parser.add_argument("--fake-corrupt", default="")
  # SGLang's data parallelism: one scheduler per rank, each request of a batch sent to the next rank in turn (its
  # DataParallelController's round_robin); the fake counts the sequences each rank got (/get_model_info).
  parser.add_argument("--dp-size", type=int, default=1)
  parser.add_argument("--device", default="cpu")
  parser.add_argument("--enable-memory-saver", action="store_true")
  args, unknown = parser.parse_known_args(argv)
  state = FakeState(args)
  if args.fake_spawn_child:
    state.child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
  Handler.state = state
  if args.fake_bind_delay:
    time.sleep(args.fake_bind_delay)
  server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
  server.daemon_threads = True
  sys.stderr.write(f"fake-sglang: pid {os.getpid()} serving {args.model_path} "
                   f"(weight_version={args.weight_version}) on {args.host}:{args.port}; ignored args {unknown}"
                   f"{'; never healthy' if args.fake_never_healthy else ''}\n")
  sys.stderr.flush()
  server.serve_forever()


if __name__ == "__main__":
  main()
