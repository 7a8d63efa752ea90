"""SGLang's share of each GPU beside the JAX trainer, and the refit's cost: pure arithmetic, no GPU needed.

SGLang 0.5.23 sizes its KV pool from the memory FREE when it starts (`distributed/bootstrap.py`
`measure_pre_model_load_memory`, `mem_cache/kv_cache_configurator.py` `_profile_available_bytes`,
`model_executor/pool_configurator.py` `DefaultPoolConfigurator`):

  pre    = torch.cuda.mem_get_info() free bytes after SGLang's CUDA context and process group, before its weights
           (the minimum over the GPUs of a tensor-parallel group)
  KV     = (free after loading the weights) - pre × (1 - mem_fraction_static)  =  pre × mem_fraction_static - weights
  tokens = KV // cell,  cell = kv_heads / tp × (head_dim + v_head_dim) × layers × dtype bytes  (= 2·L·K·H·2 in bf16)

and leaves the slack pre × (1 - mem_fraction_static) to activations, CUDA graphs and workspaces. JAX preallocates its
share first (`XLA_PYTHON_CLIENT_MEM_FRACTION` × total memory: `plan.jax_memory_fraction`), so

  pre = total × (1 - JAX's share) - JAX's memory outside its pool (CUDA context, NCCL buffers) - SGLang's context.

The trainer therefore sets mem_fraction_static = 1 - headroom / pre: the slack is SGLang's own activation and graph
reserve (`headroom_bytes`, SGLang's formula for the chunked-prefill size we pass) and every other byte JAX leaves
goes to the KV pool. An error in the estimate of pre lands in the KV pool, not in the headroom. The planner checks
that the pool holds the step's rollouts: prompts_per_step × n × (max prompt + max new tokens), spread over the
data-parallel servers (`--dp-size` = the node's GPUs / tp), with no credit for prefix sharing (a round-robin
data-parallel router sends a prompt's n copies to different GPUs).

Time-shared (`rollout.sglang_sleep`, the paper configs): the server releases its weights, KV cache and CUDA graphs
(`/release_memory_occupation`; torch_memory_saver unmaps their physical memory) while JAX trains, and JAX, on the
platform allocator (no pool), keeps only its parameters on the GPU while the server generates (the optimizer state and
the EMA teacher wait in pinned host memory: `srpo_jax.rollout.time_share`). Then

  pre = total - JAX's parameters - JAX's memory outside its arrays - SGLang's context      (SGLang's start, awake)
  JAX's budget = total - JAX's memory outside its arrays - what a sleeping server keeps   (`sleep_reserve_bytes`)

and the refit (JAX's state minus its gradients, plus a bf16 copy of its shard, beside the server's reloaded weights)
must fit too (`refit_bytes`).

Not measured on a GPU here: `JAX_OUTSIDE_POOL_BYTES` and the headroom are estimates (BUILD_NOTES.md, "SGLang memory").
"""
from __future__ import annotations

import dataclasses
import math
import subprocess
from typing import Optional, Sequence

GiB = float(2**30)
MiB = 2**20
# Passed to the server (--chunked-prefill-size): prefill chunks of this many tokens. SGLang picks 8192 or more from the
# GPU's TOTAL memory, not knowing that JAX holds half of it; its activation reserve grows 1.5 MiB per chunk token.
CHUNKED_PREFILL_TOKENS = 2048
# SGLang's reserve for decode CUDA graphs is 2 MiB per captured batch size up to max_bs (its default for an 80-141 GB
# GPU at tp 1 is 256 or 512: the larger is taken), plus 8 MiB per prefill graph batch size (32 at most).
_GRAPH_RESERVE_MIB = 2 * 512 + 8 * 32
# JAX's device memory outside its preallocated pool: the CUDA context (~0.5 GiB on Hopper) and NCCL's buffers.
JAX_OUTSIDE_POOL_BYTES = 1 * 2**30
# SGLang's own CUDA context and process group, taken before it measures `pre`.
SGLANG_CONTEXT_BYTES = 3 * 2**28
KV_DTYPE_BYTES = 2  # bf16 KV cache (SGLang's default: the model's dtype; the trainer exports bf16)
WEIGHT_DTYPE_BYTES = 2  # bf16 weights (trainer.build_engine's export)


def headroom_bytes(tp: int = 1, pp: int = 1, chunked_prefill: int = CHUNKED_PREFILL_TOKENS) -> int:
  """SGLang's runtime reserve (its `_handle_gpu_memory_settings`: 512 MiB + 1.5 MiB per chunked-prefill token +
  tp·pp/8 GiB + the CUDA graph reserve), without the 10 GiB floor it applies to a whole GPU of over 60 GB."""
  return int((512 + 1.5 * max(chunked_prefill, 2048) + tp * pp / 8 * 1024 + _GRAPH_RESERVE_MIB) * MiB)


def sleep_reserve_bytes(tp: int = 1) -> int:
  """What a sleeping server keeps on each GPU while JAX trains: its CUDA context and its runtime reserve (torch's cached
  activation blocks); its weights, KV cache and CUDA graphs are released."""
  return SGLANG_CONTEXT_BYTES + headroom_bytes(tp)


def kv_bytes_per_token(q, tp: int = 1) -> int:
  """KV cache bytes one token takes on one GPU: 2 (K and V) × layers × kv_heads / tp × head_dim × dtype bytes."""
  return 2 * q.num_hidden_layers * max(q.num_key_value_heads // tp, 1) * q.head_dim * KV_DTYPE_BYTES


def param_count(q) -> int:
  """Parameters of a Qwen3 (`hf_io.param_table`'s tensors): embedding, layers, final norm, untied LM head."""
  d, f, n, k, h = q.hidden_size, q.intermediate_size, q.num_attention_heads, q.num_key_value_heads, q.head_dim
  attn = d * (n + 2 * k) * h + n * h * d + 2 * h + ((n + 2 * k) * h if q.attention_bias else 0)
  layer = attn + 3 * d * f + 2 * d
  return q.vocab_size * d * (1 if q.tie_word_embeddings else 2) + q.num_hidden_layers * layer + d


def weight_bytes(q) -> int:
  """Bytes of the exported bf16 checkpoint (what each SGLang server loads at tp 1, and what a refit writes)."""
  return param_count(q) * WEIGHT_DTYPE_BYTES


def rollout_tokens(prompts_per_step: int, n: int, max_prompt: int, max_new: int, servers: int) -> int:
  """KV tokens one server needs to hold its share of the step's rollouts at once, every one at full length."""
  return math.ceil(prompts_per_step * n / max(servers, 1)) * (max_prompt + max_new)


@dataclasses.dataclass(frozen=True)
class SGLangMemory:
  """SGLang's side of each GPU (bytes per GPU), for one node of `gpus` GPUs shared with JAX."""
  device_memory: int
  jax_fraction: float
  gpus: int
  tp: int
  dp: int
  weights: int                 # per GPU (/ tp)
  kv_per_token: int            # per GPU (/ tp)
  free_at_start: int           # pre: what SGLang measures before loading its weights
  headroom: int
  mem_fraction_static: float
  kv_bytes: int
  kv_tokens: int
  need_tokens: int             # the step's rollouts on one data-parallel server
  # Time-shared (rollout.sglang_sleep): JAX's bytes on each GPU while the server generates (its parameters), and the
  # refit's peak (JAX's state, a bf16 copy of its shard, the server's reloaded weights); None: JAX's preallocated share.
  jax_rollout_bytes: Optional[int] = None
  refit_bytes: Optional[int] = None

  @property
  def sleep(self) -> bool:
    return self.jax_rollout_bytes is not None

  @property
  def starts(self) -> bool:
    """SGLang refuses to start ("Loaded weights leave no GPU memory for the KV cache") without a positive pool."""
    return self.kv_tokens > 0

  @property
  def refit_fits(self) -> bool:
    return self.refit_bytes is None or self.refit_bytes <= self.device_memory

  @property
  def fits(self) -> bool:
    return self.kv_tokens >= self.need_tokens and self.refit_fits

  @property
  def share(self) -> float:
    """SGLang's share of the GPU: everything JAX's pool and its outside memory leave."""
    return self.free_at_start / self.device_memory

  def cli(self) -> list[str]:
    """The `sglang.launch_server` flags of this sizing."""
    return ["--dp-size", str(self.dp), "--tp-size", str(self.tp), "--mem-fraction-static",
            f"{self.mem_fraction_static:.3f}", "--chunked-prefill-size", str(CHUNKED_PREFILL_TOKENS)] + (
                ["--enable-memory-saver"] if self.sleep else [])

  def mem_fraction_static_first(self) -> float:
    """--mem-fraction-static for a server started BEFORE the trainer on the same GPUs (launch/sglang_server.sh under
    launch/slurm.sbatch): SGLang then measures the whole GPU as free, and must leave JAX its share, so its weights
    and KV pool are the same bytes as an owned server's."""
    whole = self.device_memory - SGLANG_CONTEXT_BYTES
    return math.floor((self.weights + max(self.kv_bytes, 0)) / whole * 1000) / 1000

  def jax_fraction_to_fit(self) -> float:
    """The largest JAX share (XLA_PYTHON_CLIENT_MEM_FRACTION) with which the KV pool holds the step's rollouts."""
    sglang = (self.weights + self.need_tokens * self.kv_per_token + self.headroom + JAX_OUTSIDE_POOL_BYTES
              + SGLANG_CONTEXT_BYTES)
    return math.floor((1 - sglang / self.device_memory) * 1000) / 1000

  def summary(self) -> str:
    jax = (f"JAX's parameters {self.jax_rollout_bytes / GiB:.1f} GiB (time-shared: its optimizer state and teacher "
           f"in host memory)" if self.sleep else f"JAX {self.jax_fraction:.2f} × {self.device_memory / GiB:.1f} GiB")
    refit = (f"; refit peak {self.refit_bytes / GiB:.1f} GiB of {self.device_memory / GiB:.1f}"
             if self.refit_bytes is not None else "")
    return (f"SGLang per GPU (owned, {' '.join(self.cli())}): share {self.share:.2f} = "
            f"{self.free_at_start / GiB:.1f} GiB free at its start ({jax} + "
            f"{JAX_OUTSIDE_POOL_BYTES / GiB:.1f} GiB outside JAX's arrays, "
            f"{SGLANG_CONTEXT_BYTES / GiB:.2f} GiB SGLang's context); weights "
            f"{self.weights / GiB:.2f} GiB, headroom {self.headroom / GiB:.2f} GiB, KV "
            f"{max(self.kv_bytes, 0) / GiB:.2f} GiB = {max(self.kv_tokens, 0):,} tokens of {self.kv_per_token:,} B; the step's rollouts need "
            f"{self.need_tokens:,} tokens per server ({self.need_tokens * self.kv_per_token / GiB:.1f} GiB); a server started "
            f"before the trainer: --mem-fraction-static {self.mem_fraction_static_first():.3f}{refit}")


def plan(q, *, device_memory: int, jax_fraction: float, gpus: int, prompts_per_step: int, n: int, max_prompt: int,
         max_new: int, nodes: int = 1, tp: int = 1, jax_state: Optional[dict[str, int]] = None) -> SGLangMemory:
  """SGLang's memory on each of a node's `gpus` GPUs beside JAX's share; `nodes` servers split the step's prompts
  (one per node, as `ProcessShardedEngine`); tp GPUs per data-parallel rank.

  jax_state: time-shared (rollout.sglang_sleep): JAX's resident bytes per GPU by kind (`plan.Model.state_bytes`);
  `jax_fraction` is then JAX's budget while the server sleeps (`sleep_jax_fraction`)."""
  if tp < 1 or gpus % tp:
    raise ValueError(f"SGLang --tp-size {tp} must divide the node's {gpus} GPUs")
  dp = gpus // tp
  weights = weight_bytes(q) // tp
  cell = kv_bytes_per_token(q, tp)
  if jax_state is None:
    jax_awake, refit = int(device_memory * jax_fraction), None
  else:
    jax_awake = jax_state["parameters"]
    refit = (jax_state["parameters"] + jax_state["optimizer state"] + jax_state["teacher"]
             + weight_bytes(q) // (gpus * max(nodes, 1)) + JAX_OUTSIDE_POOL_BYTES + SGLANG_CONTEXT_BYTES + weights
             + headroom_bytes(tp))
  pre = device_memory - jax_awake - JAX_OUTSIDE_POOL_BYTES - SGLANG_CONTEXT_BYTES
  headroom = headroom_bytes(tp)
  # Rounded down: the slack pre × (1 - f) is at least the headroom.
  fraction = math.floor((1 - headroom / pre) * 1000) / 1000 if pre > headroom else 0.0
  kv = int(pre * fraction) - weights
  per_node = math.ceil(prompts_per_step / max(nodes, 1))
  return SGLangMemory(device_memory=device_memory, jax_fraction=jax_fraction, gpus=gpus, tp=tp, dp=dp,
                      weights=weights, kv_per_token=cell, free_at_start=pre, headroom=headroom,
                      mem_fraction_static=fraction, kv_bytes=kv, kv_tokens=kv // cell if kv > 0 else 0,
                      need_tokens=rollout_tokens(per_node, n, max_prompt, max_new, dp),
                      jax_rollout_bytes=None if jax_state is None else jax_awake, refit_bytes=refit)


def sleep_jax_fraction(device_memory: int, tp: int = 1) -> float:
  """JAX's share of a GPU it time-shares with a sleeping server: all but its own outside memory and the server's
  `sleep_reserve_bytes`."""
  return 1 - (JAX_OUTSIDE_POOL_BYTES + sleep_reserve_bytes(tp)) / device_memory


def gpu_memory_bytes(timeout_s: float = 10.0) -> Optional[int]:
  """The smallest total memory of this node's GPUs (`nvidia-smi`, within `timeout_s`); None when it cannot tell."""
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=timeout_s, check=True).stdout
    return min(int(float(line)) for line in out.split()) * MiB
  except (OSError, subprocess.SubprocessError, ValueError):
    return None


def config_tp(cfg) -> int:
  """The server's --tp-size (or --tp) in rollout.sglang_args; 1 when unset."""
  return int(flag_value(cfg.rollout.sglang_args, "--tp-size", "--tp") or 1)


def for_config(cfg, q, *, device_memory: int, jax_fraction: float, gpus: int, nodes: int = 1,
               jax_state: Optional[dict[str, int]] = None) -> SGLangMemory:
  """`plan` for a validated Config (its rollouts, prompt cap and any --tp-size / --tp in rollout.sglang_args);
  `jax_state` is used when the config time-shares (rollout.sglang_sleep)."""
  r = cfg.rollout
  return plan(q, device_memory=device_memory, jax_fraction=jax_fraction, gpus=gpus, nodes=nodes,
              prompts_per_step=r.prompts_per_step, n=r.n, max_prompt=cfg.data.max_prompt_tokens,
              max_new=r.max_new_tokens, tp=config_tp(cfg), jax_state=jax_state if r.sglang_sleep else None)


def flag_value(args: Sequence[str], *names: str) -> Optional[str]:
  """The value of the first of `names` in a launch_server argument list (`--flag value` or `--flag=value`)."""
  for i, a in enumerate(args):
    for name in names:
      if a == name and i + 1 < len(args):
        return args[i + 1]
      if a.startswith(name + "="):
        return a.split("=", 1)[1]
  return None


def owned_server_args(user_args: Sequence[str], memory: SGLangMemory) -> list[str]:
  """The user's launch_server arguments plus this sizing's flags for what they leave unset (the user's win)."""
  out = list(user_args)
  ours = memory.cli()
  i = 0
  while i < len(ours):
    width = 2 if i + 1 < len(ours) and not ours[i + 1].startswith("--") else 1  # `--flag value` or a switch
    names = (ours[i], "--tp") if ours[i] == "--tp-size" else (ours[i],)
    if flag_value(user_args, *names) is None and ours[i] not in user_args:
      out += ours[i:i + width]
    i += width
  return out


# ---------------------------------------------------------------------------------------------------------------------
# Refit: export + SGLang's reload
# ---------------------------------------------------------------------------------------------------------------------
# bf16 bytes per second of the host's part of `hf_io.save_pretrained` (laid-out arrays to the host, shards written in
# parallel into /dev/shm, in place over the engine's recycled oldest export, as every refit from the third on) for
# Qwen3-8B's shapes, measured by bench/refit.py on this project's 2-core CPU machine (BUILD_NOTES.md, "Refit export"):
# a floor for a node's host; its GPUs cast and transpose at HBM speed.
MEASURED_EXPORT_BYTES_PER_S = 8.7e9
# SGLang reloads the export from /dev/shm on every data-parallel rank at once: a host-to-device copy per GPU, PCIe
# Gen4 x16 at ~25 GB/s (an assumption: not measured here).
LOAD_BYTES_PER_S = 25e9
REFIT_NOTE = (f"the export's host part at bench/refit.py's {MEASURED_EXPORT_BYTES_PER_S / 1e9:.2f} GB/s on a 2-core "
              f"CPU machine, SGLang's reload from /dev/shm at an assumed {LOAD_BYTES_PER_S / 1e9:.0f} GB/s per GPU")


def projected_refit_s(weights: int, export_bytes_per_s: float = MEASURED_EXPORT_BYTES_PER_S,
                      load_bytes_per_s: float = LOAD_BYTES_PER_S) -> float:
  """Seconds of one refit: the bf16 export, then SGLang's `/update_weights_from_disk` load."""
  return weights / export_bytes_per_s + weights / load_bytes_per_s
