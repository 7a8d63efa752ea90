"""In-process JAX sampler: batched left-padded prefill, then a jitted `lax.while_loop` of pure decode steps.

Letters (the alphabet of `srpo_jax.models.qwen3`): B batch rows (prompts × n samples, padded to a batch bucket), P
padded prompt length (a prompt bucket), T max new tokens, S = P + T cache slots, D model width, V vocabulary; Q the
positions one model call computes (P at prefill, 1 per decode step).

One generate() call:
  1. rows = every prompt repeated n times; split into chunks of at most `max_batch` rows;
  2. per chunk, LEFT-pad the prompts to P = the smallest prompt bucket that fits and the rows to the smallest batch
     bucket (padding rows start finished), so a run compiles one program per (B, P, T, strategy) and no more;
  3. the compiled program prefills the static KV cache of S = P + T slots, then loops `decode_step` until every row
     has stopped or T tokens were drawn (`SamplerState` is the loop carry);
  4. per row, the tokens up to and including the stop token (and their log-probs) become a Completion.

Randomness: row r = (sampling.first_prompt + prompt_index) * n + sample_index draws its step-t uniform from
fold_in(fold_in(key(seed), r), t). Same seed → same outputs whatever the chunking or padding; every prompt and every
sample has its own stream. See `sampling.py` for the strategies and the log-prob each returns.

Weights: the engine holds (graphdef, nnx.State); `update_weights` swaps the trainer's State in by reference (no copy,
no export) after checking structure, shapes and dtypes. Under a mesh, rows are sharded over ("data", "fsdp") and the
parameters stay where the trainer placed them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from srpo_jax.models.qwen3 import KVCache, Qwen3, positions_from_mask
from srpo_jax.rollout import sampling as sampling_lib
from srpo_jax.rollout.engine import Completion, RolloutEngine, SamplingParams
from srpo_jax.sharding import batch_sharding

DEFAULT_PROMPT_BUCKETS = (64, 128, 256, 512, 1024, 2048)
DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


# ---------------------------------------------------------------------------------------------------------------------
# Loop state and the pure step
# ---------------------------------------------------------------------------------------------------------------------
@flax.struct.dataclass
class SamplerState:
  """The carry of the decode loop.

  step:        [] int32, tokens drawn so far (all rows advance together; finished rows idle).
  hidden_BD:   final hidden state of the last token fed; the next token's logits come from it.
  cache:       KVCache with S = P + T slots: the prompt at [0, P), the token drawn at step t at slot P + t.
  next_pos_B:  RoPE position of the next token fed (= prompt length + step; padding does not count).
  tokens_BT:   drawn tokens; the pad id after a row stops.
  logprobs_BT: their log-probs (see sampling.py); 0 after a row stops.
  done_B:      the row has stopped (drew a stop token) or is a batch-padding row.
  length_B:    tokens kept per row (the stop token included).
  key_B:       per-row PRNG key (typed key array).
  """
  step: jax.Array
  hidden_BD: jax.Array
  cache: KVCache
  next_pos_B: jax.Array
  tokens_BT: jax.Array
  logprobs_BT: jax.Array
  done_B: jax.Array
  length_B: jax.Array
  key_B: jax.Array


@flax.struct.dataclass
class StepInputs:
  """Traced per-call values that do not change the program: temperature, top_p, stop-token table [V] bool."""
  temperature: jax.Array
  top_p: jax.Array
  is_stop_V: jax.Array
  pad_id: jax.Array


def _uniforms(key_B: jax.Array, step: jax.Array) -> jax.Array:
  """One U[0, 1) per row for this step, from the row's own stream."""
  return jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step), (), jnp.float32))(key_B)


def decode_step(model: Qwen3, strategy: sampling_lib.Strategy, inputs: StepInputs, prompt_len: int,
                s: SamplerState) -> SamplerState:
  """Draws one token per row from `s.hidden_BD`, records it, and feeds it through the model (one cache slot)."""
  logits_BV = model.logits(s.hidden_BD[:, None])[:, 0]
  tok_B, logp_B = sampling_lib.sample(strategy, logits_BV, _uniforms(s.key_B, s.step), inputs.temperature,
                                      inputs.top_p)
  # Rows that stopped earlier (or are batch padding) record padding: pad id, log-prob 0, length unchanged.
  tokens_BT = s.tokens_BT.at[:, s.step].set(jnp.where(s.done_B, inputs.pad_id, tok_B))
  logprobs_BT = s.logprobs_BT.at[:, s.step].set(jnp.where(s.done_B, 0.0, logp_B))
  length_B = s.length_B + (~s.done_B).astype(jnp.int32)
  # Stopping condition 1 (per row): the token just drawn is an EOS id or one of sampling.stop_token_ids.
  done_B = s.done_B | inputs.is_stop_V[tok_B]
  # Feed the drawn token (finished rows feed token 0, a valid embedding row; nothing reads their output).
  feed_B = jnp.where(s.done_B, 0, tok_B)
  h_BQD, cache = model.forward_with_cache(feed_B[:, None], s.next_pos_B[:, None], ~s.done_B[:, None], s.cache,
                                          prompt_len + s.step)
  return SamplerState(step=s.step + 1, hidden_BD=h_BQD[:, 0], cache=cache, next_pos_B=s.next_pos_B + 1,
                      tokens_BT=tokens_BT, logprobs_BT=logprobs_BT, done_B=done_B, length_B=length_B, key_B=s.key_B)


def prefill(model: Qwen3, ids_BP: jax.Array, mask_BP: jax.Array, row_ids_B: jax.Array, live_B: jax.Array,
            seed: jax.Array, inputs: StepInputs, max_new_tokens: int, cache_sharding=None) -> SamplerState:
  """Runs the left-padded prompts [B, P] through the model at cache slots [0, P); returns the initial state."""
  b, p = ids_BP.shape
  cache = model.init_cache(b, p + max_new_tokens)
  if cache_sharding is not None:
    cache = jax.lax.with_sharding_constraint(cache, cache_sharding)
  h_BPD, cache = model.forward_with_cache(ids_BP, positions_from_mask(mask_BP), mask_BP, cache, 0)
  key_B = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(seed), r))(row_ids_B)
  return SamplerState(
      step=jnp.zeros((), jnp.int32), hidden_BD=h_BPD[:, -1], cache=cache,
      next_pos_B=jnp.sum(mask_BP, axis=-1, dtype=jnp.int32),
      tokens_BT=jnp.full((b, max_new_tokens), inputs.pad_id, jnp.int32),
      logprobs_BT=jnp.zeros((b, max_new_tokens), jnp.float32),
      done_B=~live_B, length_B=jnp.zeros((b,), jnp.int32), key_B=key_B)


def run_sampler(graphdef, state, ids_BP, mask_BP, row_ids_B, live_B, seed, inputs: StepInputs, *,
                strategy: sampling_lib.Strategy, max_new_tokens: int, cache_sharding=None):
  """The compiled program: prefill, then decode until done. Returns (tokens [B, T], log-probs [B, T], lengths [B])."""
  model = nnx.merge(graphdef, state)
  prompt_len = ids_BP.shape[1]
  s = prefill(model, ids_BP, mask_BP, row_ids_B, live_B, seed, inputs, max_new_tokens, cache_sharding)

  def cond(s: SamplerState):
    # Stopping condition 2: T = max_new_tokens drawn (rows still running finish with "length").
    # Stopping condition 3: every row has stopped: exit early instead of decoding padding.
    return (s.step < max_new_tokens) & ~jnp.all(s.done_B)

  s = jax.lax.while_loop(cond, functools.partial(decode_step, model, strategy, inputs, prompt_len), s)
  return s.tokens_BT, s.logprobs_BT, s.length_B


# ---------------------------------------------------------------------------------------------------------------------
# Weight checks
# ---------------------------------------------------------------------------------------------------------------------
def _flat(state) -> dict[str, Any]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(state)
  return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def check_same_layout(current, new) -> None:
  """Raises ValueError naming the first path whose presence, shape or dtype differs between two param trees."""
  cur, nxt = _flat(current), _flat(new)
  missing, extra = sorted(set(cur) - set(nxt)), sorted(set(nxt) - set(cur))
  if missing or extra:
    raise ValueError(f"update_weights: parameter tree differs: missing {missing[:5]}, unexpected {extra[:5]}")
  for path, a in cur.items():
    b = nxt[path]
    if tuple(np.shape(a)) != tuple(np.shape(b)):
      raise ValueError(f"update_weights: parameter {path} has shape {tuple(np.shape(b))}, "
                       f"expected {tuple(np.shape(a))}")
    if jnp.result_type(a) != jnp.result_type(b):
      raise ValueError(f"update_weights: parameter {path} has dtype {jnp.result_type(b)}, "
                       f"expected {jnp.result_type(a)}")
  if jax.tree.structure(current) != jax.tree.structure(new):
    raise ValueError("update_weights: parameter tree structure differs (same paths, different node types): "
                     f"{jax.tree.structure(new)} vs {jax.tree.structure(current)}")


def _as_state(params) -> tuple[Any, nnx.State]:
  """(graphdef or None, state) from a Qwen3, a (graphdef, state) pair, or an nnx.State."""
  if isinstance(params, nnx.Module):
    return nnx.split(params)
  if isinstance(params, tuple) and len(params) == 2:
    return params
  if isinstance(params, nnx.State):
    return None, params
  raise TypeError(f"params must be a Qwen3, a (graphdef, nnx.State) pair or an nnx.State, got {type(params).__name__}")


def smallest_bucket(n: int, buckets: Sequence[int], multiple_of: int = 1) -> int:
  """The smallest bucket >= n (rounded up to a multiple of `multiple_of`); past the largest, a multiple of it."""
  fits = [b for b in buckets if b >= n]
  b = fits[0] if fits else -(-n // buckets[-1]) * buckets[-1]
  return -(-b // multiple_of) * multiple_of


# ---------------------------------------------------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _ProgramKey:
  batch: int
  prompt_len: int
  max_new_tokens: int
  strategy: sampling_lib.Strategy


class JaxEngine(RolloutEngine):
  """Samples from a Flax NNX Qwen3 in this process (see the module docstring).

  `num_compiled_programs` counts the distinct programs built so far (one per batch bucket × prompt bucket ×
  max_new_tokens × strategy); two calls whose prompt lengths fall in one bucket reuse one program.
  """

  def __init__(self, model: Qwen3 | tuple[Any, nnx.State], *, eos_token_ids: Sequence[int] = (151645, 151643),
               pad_token_id: int = 151643, mesh: Mesh | None = None,
               prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
               batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS, max_batch: int | None = None):
    graphdef, state = _as_state(model)
    if graphdef is None:
      raise TypeError("JaxEngine needs the model structure: pass a Qwen3 or a (graphdef, nnx.State) pair")
    self._graphdef, self._state = graphdef, state
    self.config = nnx.merge(graphdef, state).config
    self.vocab_size = self.config.vocab_size
    self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
    self.pad_token_id = int(pad_token_id)
    self.mesh = mesh
    if not prompt_buckets or sorted(prompt_buckets) != list(prompt_buckets) or min(prompt_buckets) <= 0:
      raise ValueError(f"prompt_buckets must be positive and increasing, got {prompt_buckets}")
    if not batch_buckets or sorted(batch_buckets) != list(batch_buckets) or min(batch_buckets) <= 0:
      raise ValueError(f"batch_buckets must be positive and increasing, got {batch_buckets}")
    self.prompt_buckets = tuple(prompt_buckets)
    self.batch_buckets = tuple(batch_buckets)
    self.max_batch = int(max_batch or self.batch_buckets[-1])
    if self.max_batch <= 0:
      raise ValueError(f"max_batch must be > 0, got {max_batch}")
    # Rows are split over ("data", "fsdp"): every batch bucket is rounded up to a multiple of that size.
    self._row_shards = 1 if mesh is None else int(mesh.shape["data"] * mesh.shape["fsdp"])
    self.version = 0
    self._programs: dict[_ProgramKey, Any] = {}
    self._closed = False

  # -- RolloutEngine ------------------------------------------------------------------------------------------------
  @property
  def num_compiled_programs(self) -> int:
    return len(self._programs)

  @property
  def params(self) -> nnx.State:
    return self._state

  def update_weights(self, params: Any, version: int) -> None:
    """Samples from `params` (a Qwen3, (graphdef, State) or State) from now on; no copy. Checks layout first."""
    _, state = _as_state(params)
    check_same_layout(self._state, state)
    self._state, self.version = state, int(version)

  def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams,
               n: int = 1) -> list[list[Completion]]:
    if self._closed:
      raise RuntimeError("JaxEngine.generate called after close()")
    if n < 1:
      raise ValueError(f"n must be >= 1, got {n}")
    prompts = [self._check_prompt(i, p) for i, p in enumerate(prompt_token_ids)]
    rows = [i for i in range(len(prompts)) for _ in range(n)]  # row r = i * n + j holds prompt i
    flat: list[Completion] = []  # in row order
    version = self.version
    for start in range(0, len(rows), self.max_batch):
      chunk = rows[start:start + self.max_batch]
      first = sampling.first_prompt * n + start  # the global row id of the chunk's first row (its random stream)
      tokens, logprobs, lengths = self._run_chunk([prompts[i] for i in chunk], list(range(first, first + len(chunk))),
                                                  sampling)
      flat.extend(self._completion(tokens[r], logprobs[r], int(lengths[r]), sampling, version)
                  for r in range(len(chunk)))
    return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]

  def close(self) -> None:
    self._programs.clear()
    self._closed = True

  # -- internals ----------------------------------------------------------------------------------------------------
  def _check_prompt(self, i: int, prompt: Sequence[int]) -> np.ndarray:
    ids = np.asarray(prompt, dtype=np.int64).reshape(-1)
    if ids.size == 0:
      raise ValueError(f"prompt_token_ids[{i}] is empty; the sampler needs at least one prompt token")
    bad = (ids < 0) | (ids >= self.vocab_size)
    if bad.any():
      raise ValueError(f"prompt_token_ids[{i}] has token id {int(ids[bad][0])} outside [0, {self.vocab_size})")
    return ids.astype(np.int32)

  def _stop_table(self, sampling: SamplingParams) -> np.ndarray:
    """[V] bool: EOS ids and sampling.stop_token_ids; ids outside the vocabulary can never be drawn and are skipped."""
    table = np.zeros(self.vocab_size, bool)
    for t in self.eos_token_ids + tuple(sampling.stop_token_ids):
      if t < 0:
        raise ValueError(f"stop token id {t} is negative")
      if t < self.vocab_size:
        table[t] = True
    return table

  def _program(self, key: _ProgramKey):
    if key not in self._programs:
      cache_sharding = None
      if self.mesh is not None:
        rows = ("data", "fsdp")
        cache_sharding = KVCache(k=NamedSharding(self.mesh, P(None, rows)), v=NamedSharding(self.mesh, P(None, rows)),
                                 valid=NamedSharding(self.mesh, P(rows)))
      self._programs[key] = jax.jit(functools.partial(
          run_sampler, self._graphdef, strategy=key.strategy, max_new_tokens=key.max_new_tokens,
          cache_sharding=cache_sharding))
    return self._programs[key]

  def _run_chunk(self, prompts: list[np.ndarray], row_ids: list[int], sampling: SamplingParams):
    """Pads one chunk to its buckets, runs the program, returns host arrays for the real rows."""
    b_real = len(prompts)
    b = smallest_bucket(b_real, self.batch_buckets, self._row_shards)
    p = smallest_bucket(max(len(x) for x in prompts), self.prompt_buckets)
    ids = np.zeros((b, p), np.int32)  # token 0 under the padding: a valid embedding row, masked out everywhere
    mask = np.zeros((b, p), bool)
    for r, x in enumerate(prompts):
      ids[r, p - len(x):], mask[r, p - len(x):] = x, True
    mask[b_real:, -1] = True  # padding rows: one dummy token so no attention row is empty; they start finished
    live = np.arange(b) < b_real
    rows = np.asarray(row_ids + [0] * (b - b_real), np.int32)
    strategy = sampling_lib.Strategy.from_params(sampling.temperature, sampling.top_k, sampling.top_p,
                                                 self.vocab_size)
    inputs = StepInputs(temperature=jnp.float32(sampling.temperature or 1.0), top_p=jnp.float32(sampling.top_p),
                        is_stop_V=jnp.asarray(self._stop_table(sampling)), pad_id=jnp.int32(self.pad_token_id))
    batch_args = [ids, mask, rows, live]
    if self.mesh is not None:
      batch_args = [jax.device_put(a, batch_sharding(self.mesh, a.ndim)) for a in batch_args]
    program = self._program(_ProgramKey(b, p, sampling.max_new_tokens, strategy))
    seed = jnp.uint32(sampling.seed % 2**32)
    with contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh):  # traced as the train step is
      tokens, logprobs, lengths = jax.device_get(program(self._state, *batch_args, seed, inputs))
    return tokens[:b_real], logprobs[:b_real], lengths[:b_real]

  def _completion(self, tokens_T, logprobs_T, length: int, sampling: SamplingParams, version: int) -> Completion:
    stops = set(self.eos_token_ids) | set(sampling.stop_token_ids)
    stopped = length > 0 and int(tokens_T[length - 1]) in stops
    return Completion(token_ids=np.asarray(tokens_T[:length], np.int32),
                      logprobs=np.asarray(logprobs_T[:length], np.float32),
                      finish_reason="stop" if stopped else "length", weight_version=version)
