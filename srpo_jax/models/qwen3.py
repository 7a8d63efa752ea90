"""Qwen3 (dense) in Flax NNX.

Dimension letters: the one alphabet of srpo_jax, for einsums, shape suffixes (`x_BSD`) and shapes in docstrings in
every module (each module's "Letters:" line points here and names the letters it uses).
  B   batch: rollouts (the sampler's rows)
  S   sequence positions: prompt + response (S = P + T); the sampler's KV cache has S = P + T slots
  P   prompt positions
  T   response positions (in the sampler: max new tokens)
  D   model width
  F   MLP width
  L   layers
  N   query heads
  K   key/value heads
  H   head dim
  V   vocabulary
  G   groups (prompts: the rollouts of one prompt form a group)
  C   teacher rows (the SDPO-routed rollouts of a micro-batch)
  M   micro-batches
  X   flattened tokens (B·T)
  E   top-k entries (E1 = E + 1 with the tail bucket)
Local letters, used only where their module says so:
  Q   query positions inside the decoder (the positions a forward computes: S without a cache, P at prefill, 1 per
      decode step); attention keys are the S positions (or cache slots)
  R   query heads per key/value head (N = K·R)
  U   vocabulary blocks of W tokens in the sampler (V = U·W, padded when W does not divide V)
  W   tokens per vocabulary block (sampler)
  A   any last axis of a generic sampler helper (E, U or W)
  t   (lowercase) the rows of one token tile in the fused head (a tile of X)

Architecture (matches transformers' `Qwen3ForCausalLM`): token embedding; per layer RMSNorm → GQA attention with
per-head RMSNorm on q and k *before* rotate-half RoPE → residual → RMSNorm → SwiGLU MLP → residual; final RMSNorm;
tied or untied LM head. Parameters carry `logical_axes` metadata that `srpo_jax.sharding` maps to mesh axes.

Positions are explicit: left padding works because each token's position is its index among the valid tokens of its
row (`positions_from_mask`). The KV cache is static-size: prefill writes the prompt at slots [0, P), each decode step
writes one slot, and attention only reads valid slots at or before the query's slot.

Letters (see the alphabet above): B, S, P, T, D, F, L, N, K, H, V; locally Q query positions, R query heads per
key/value head.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from srpo_jax import sharding
from srpo_jax.models import attention as attention_lib

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(name_or_dtype) -> jnp.dtype:
  if isinstance(name_or_dtype, str):
    if name_or_dtype not in _DTYPES:
      raise ValueError(f"unsupported dtype {name_or_dtype!r}; expected one of {sorted(_DTYPES)}")
    return jnp.dtype(_DTYPES[name_or_dtype])
  return jnp.dtype(name_or_dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Qwen3Config:
  """Architecture + numerics. Field names follow HF's config.json where one exists."""
  vocab_size: int = 151936
  hidden_size: int = 1024
  intermediate_size: int = 3072
  num_hidden_layers: int = 28
  num_attention_heads: int = 16
  num_key_value_heads: int = 8
  head_dim: int = 128
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  tie_word_embeddings: bool = True
  attention_bias: bool = False
  max_position_embeddings: int = 40960
  bos_token_id: int = 151643
  eos_token_id: int = 151645
  # Numerics (not HF fields): parameter storage dtype, and the dtype activations/matmuls run in.
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: bool = False
  # Attention implementation (srpo_jax.models.attention): auto | naive | blockwise | cudnn | splash, and blockwise's
  # key block and query chunk.
  attention: str = "auto"
  attention_block: int = attention_lib.DEFAULT_BLOCK
  attention_query_block: int = attention_lib.DEFAULT_QUERY_BLOCK
  # The platform the programs are compiled for ("cpu" | "gpu" | "tpu"; None = jax.default_backend() when traced): it
  # picks "auto" attention's kernel. The trainer sets it from the mesh's devices and the planner from its target, so a
  # deviceless compile for a GPU or TPU target takes that target's kernel.
  platform: Optional[str] = None

  def __post_init__(self):
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"Qwen3Config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads={self.num_key_value_heads}")
    if self.head_dim % 2:
      raise ValueError(f"Qwen3Config: head_dim={self.head_dim} must be even for rotate-half RoPE")
    as_dtype(self.param_dtype), as_dtype(self.dtype)
    if self.attention not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(f"Qwen3Config: attention={self.attention!r}; expected one of {attention_lib.IMPLEMENTATIONS}")
    if self.platform is not None and self.platform not in attention_lib.PLATFORMS:
      raise ValueError(f"Qwen3Config: platform={self.platform!r}; expected None or one of {attention_lib.PLATFORMS}")
    for name in ("attention_block", "attention_query_block"):
      if getattr(self, name) <= 0:
        raise ValueError(f"Qwen3Config: {name}={getattr(self, name)} must be > 0")

  # -- HF config.json ------------------------------------------------------------------------------------------------
  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides) -> "Qwen3Config":
    """Reads an HF Qwen3 config dict; rejects what this implementation does not compute (MoE, sliding window)."""
    arch = d.get("architectures") or []
    model_type = d.get("model_type")
    if model_type != "qwen3" and "Qwen3ForCausalLM" not in arch:
      raise ValueError(f"{source}: unsupported architecture model_type={model_type!r} architectures={arch!r}; "
                       "srpo_jax implements dense Qwen3 (model_type 'qwen3', Qwen3ForCausalLM)")
    for moe_key in ("num_experts", "num_local_experts", "moe_intermediate_size"):
      if d.get(moe_key):
        raise ValueError(f"{source}: field {moe_key}={d[moe_key]!r} means a mixture-of-experts model; "
                         "only dense Qwen3 is supported")
    if d.get("use_sliding_window"):
      raise ValueError(f"{source}: field use_sliding_window=true is not supported (Qwen3 dense uses full attention)")
    if d.get("hidden_act", "silu") != "silu":  # the MLP computes SwiGLU; another activation would be silently wrong
      raise ValueError(f"{source}: field hidden_act={d['hidden_act']!r} is not supported (Qwen3's MLP is 'silu')")
    size = lambda key, default=None: _positive_int_field(d, key, source, default)
    num_heads, hidden = size("num_attention_heads"), size("hidden_size")
    kw = dict(
        vocab_size=size("vocab_size"), hidden_size=hidden, intermediate_size=size("intermediate_size"),
        num_hidden_layers=size("num_hidden_layers"), num_attention_heads=num_heads,
        num_key_value_heads=size("num_key_value_heads", num_heads),
        head_dim=size("head_dim", hidden // num_heads),
        rms_norm_eps=_positive_float_field(d, "rms_norm_eps", source, 1e-6),
        rope_theta=_rope_theta(d, source), tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", False)),
        max_position_embeddings=d.get("max_position_embeddings", 40960),
        bos_token_id=d.get("bos_token_id", 151643) or 151643, eos_token_id=_first(d.get("eos_token_id", 151645)),
        param_dtype=_hf_dtype_name(d.get("dtype", d.get("torch_dtype", "float32"))),
    )
    kw["dtype"] = kw["param_dtype"]
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def from_dir(cls, path: str | os.PathLike, **overrides) -> "Qwen3Config":
    cfg_path = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(cfg_path):
      raise FileNotFoundError(f"no config.json in checkpoint directory {os.fspath(path)!r}")
    try:
      with open(cfg_path, encoding="utf-8") as f:
        d = json.load(f)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
      raise ValueError(f"{cfg_path}: not a valid JSON file ({err})") from None
    if not isinstance(d, dict):
      raise ValueError(f"{cfg_path}: expected a JSON object, got {type(d).__name__}")
    return cls.from_hf_dict(d, source=cfg_path, **overrides)

  def to_hf_dict(self) -> dict[str, Any]:
    """An HF config.json that transformers 5 and SGLang load as Qwen3ForCausalLM."""
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
        "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
        "attention_dropout": 0.0, "max_position_embeddings": self.max_position_embeddings,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": self.num_hidden_layers,
        "initializer_range": 0.02, "use_cache": True, "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id, "dtype": self.param_dtype, "torch_dtype": self.param_dtype,
    }

  @classmethod
  def preset(cls, name: str, **overrides) -> "Qwen3Config":
    """Published Qwen3 dense shapes (HF config.json of Qwen/Qwen3-*), plus `tiny` for CPU tests and the demo."""
    if name not in PRESETS:
      raise ValueError(f"unknown Qwen3 preset {name!r}; expected one of {sorted(PRESETS)}")
    return dataclasses.replace(cls(), **{**PRESETS[name], **overrides})

  @property
  def q_heads_per_kv_head(self) -> int:
    """R: query heads sharing one key/value head (N = K·R)."""
    return self.num_attention_heads // self.num_key_value_heads


def _positive_int_field(d: dict[str, Any], key: str, source: str, default: int | None = None) -> int:
  """config.json's `key` as a positive int (`default` when absent; required when the default is None)."""
  if key not in d or d[key] is None:
    if default is None:
      raise ValueError(f"{source}: missing required field {key!r}")
    return default
  value = d[key]
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{source}: field {key}={value!r} must be a positive integer")
  return value


def _positive_float_field(d: dict[str, Any], key: str, source: str, default: float) -> float:
  """config.json's `key` as a finite number > 0 (`default` when absent or null). Python's json reads the NaN and
  Infinity literals, and a NaN eps or RoPE base would only show up as NaN logits."""
  if key not in d or d[key] is None:
    return default
  value = d[key]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
    raise ValueError(f"{source}: field {key}={value!r} must be a finite number > 0")
  return float(value)


# transformers 5 may nest rope_parameters by layer type ({"full_attention": {...}, ...}).
_ROPE_LAYER_TYPES = ("full_attention", "sliding_attention")


def _rope_theta(d: dict[str, Any], source: str) -> float:
  """The RoPE base of an HF config, refusing every RoPE variant but the plain one (`rope()` computes only that).

  Where transformers (5.x) reads it: `rope_scaling` (the older name, which takes precedence) or `rope_parameters`,
  each null, a dict with `rope_type` (or the legacy `type`), or a dict of such dicts per layer type; `rope_theta` in
  those dicts or at the top level. Any type but "default" (yarn, linear, dynamic, llama3, longrope, ...) and a
  partial_rotary_factor other than 1 are refused, in whichever of these places they sit, so that none is ignored; the
  values of rope_theta given must agree. None given: 1e6, Qwen3's.
  """
  found = {"rope_theta": d.get("rope_theta")}
  ropes = {}
  for key in ("rope_scaling", "rope_parameters"):
    value = d.get(key)
    if isinstance(value, dict) and any(t in value for t in _ROPE_LAYER_TYPES):
      ropes.update({f"{key}.{t}": value[t] for t in value})
    else:
      ropes[key] = value
  for name, rope in ropes.items():
    if rope is None:
      continue
    if not isinstance(rope, dict):
      raise ValueError(f"{source}: field {name}={rope!r:.80} must be an object or null")
    for type_key in ("rope_type", "type"):
      if rope.get(type_key) not in (None, "default"):
        raise ValueError(f"{source}: field {name}.{type_key}={rope[type_key]!r} is not supported (only the default "
                         "RoPE is implemented: null, absent or 'default')")
    found[f"{name}.rope_theta"] = rope.get("rope_theta")
    found[f"{name}.partial_rotary_factor"] = rope.get("partial_rotary_factor")
  found["partial_rotary_factor"] = d.get("partial_rotary_factor")
  thetas = {}
  for name, value in found.items():
    if value is None:
      continue
    if name.endswith("partial_rotary_factor"):
      if value != 1:
        raise ValueError(f"{source}: field {name}={value!r} is not supported (RoPE on the whole head only: 1)")
    else:
      thetas[name] = _positive_float_field(found, name, source, 0.0)
  if len(set(thetas.values())) > 1:
    raise ValueError(f"{source}: the RoPE base is given more than once, with different values: "
                     + ", ".join(f"{k}={v!r}" for k, v in thetas.items()))
  return next(iter(thetas.values()), 1_000_000.0)


def _first(x):
  return x[0] if isinstance(x, (list, tuple)) else x


def _hf_dtype_name(x) -> str:
  x = str(x).replace("torch.", "")
  return {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}.get(x, "float32")


# vocab_size 151936 for all; tie_word_embeddings true for 0.6B/1.7B/4B (HF config.json of each model).
PRESETS: dict[str, dict[str, Any]] = {
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, tie_word_embeddings=True),
    "1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, tie_word_embeddings=True),
    "4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
    "14b": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=8, tie_word_embeddings=False),
    "32b": dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                num_key_value_heads=8, tie_word_embeddings=False),
    # The embedded CPU default: real vocabulary, everything else tiny.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=4096),
}


# ---------------------------------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------------------------------
@flax.struct.dataclass
class KVCache:
  """Static-size cache. k, v: [L, B, S, K, H]; valid: [B, S] (slot holds a real, non-padding token)."""
  k: jax.Array
  v: jax.Array
  valid: jax.Array

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


def positions_from_mask(attention_mask_BS: jax.Array) -> jax.Array:
  """Position of each token among the valid tokens of its row; padding gets 0.

  Left padding [0 0 1 1 1] → [0 0 0 1 2]; right padding [1 1 1 0 0] → [0 1 2 0 0] (padding rows carry no loss).
  """
  m = attention_mask_BS.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0) * m


# ---------------------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------------------
def _param(rngs: nnx.Rngs, shape, axes, dtype, std: float | None) -> nnx.Param:
  value = jnp.ones(shape, dtype) if std is None else (std * jax.random.normal(rngs.params(), shape)).astype(dtype)
  return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, *, param_dtype, axis: str, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = _param(rngs, (dim,), (axis,), param_dtype, None)

  def __call__(self, x):
    # Normalise in float32 whatever the compute dtype (as HF does), then scale in the input dtype.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


def rope(x_BQNH: jax.Array, positions_BQ: jax.Array, theta: float) -> jax.Array:
  """Rotate-half rotary embedding (HF `apply_rotary_pos_emb`); angles computed in float32. The head axis may be N
  (queries) or K (keys)."""
  h = x_BQNH.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  angles = positions_BQ.astype(jnp.float32)[..., None] * inv_freq  # [B, Q, H/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, Q, 1, H]
  cos, sin = jnp.cos(angles).astype(x_BQNH.dtype), jnp.sin(angles).astype(x_BQNH.dtype)
  x1, x2 = jnp.split(x_BQNH, 2, axis=-1)
  return x_BQNH * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Attention(nnx.Module):
  def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
    d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    pd, std = as_dtype(cfg.param_dtype), 0.02
    self.head_dim, self.rope_theta = h, cfg.rope_theta
    self.attention, self.attention_block, self.attention_query_block = (cfg.attention, cfg.attention_block,
                                                                        cfg.attention_query_block)
    self.platform = cfg.platform
    self.dtype = as_dtype(cfg.dtype)
    self.q = _param(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), pd, std)
    self.k = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd, std)
    self.v = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd, std)
    self.o = _param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), pd, std)
    if cfg.attention_bias:
      self.q_bias = nnx.Param(jnp.zeros((n, h), pd), logical_axes=("q_heads", "head_dim"))
      self.k_bias = nnx.Param(jnp.zeros((k, h), pd), logical_axes=("kv_heads", "head_dim"))
      self.v_bias = nnx.Param(jnp.zeros((k, h), pd), logical_axes=("kv_heads", "head_dim"))
    else:
      self.q_bias = self.k_bias = self.v_bias = None
    self.q_norm = RMSNorm(h, cfg.rms_norm_eps, param_dtype=pd, axis="head_dim", rngs=rngs)
    self.k_norm = RMSNorm(h, cfg.rms_norm_eps, param_dtype=pd, axis="head_dim", rngs=rngs)

  def _proj(self, x_BQD, w, b):
    """[B, Q, D] @ [D, heads, H] -> [B, Q, heads, H] (heads: N for q, K for k and v)."""
    y = jnp.einsum("BQD,D...->BQ...", x_BQD, w[...].astype(self.dtype))
    return y if b is None else y + b[...].astype(self.dtype)

  def __call__(self, x_BQD, positions_BQ, q_slots_BQ, kv_valid_BS, kv_cache=None, right_padded=False):
    """Query q (at slot q_slots_BQ[b, q]) attends to slots s <= its own with kv_valid_BS[b, s].

    kv_cache: None (keys are the Q positions themselves), or (k_BSKH, v_BSKH, write_index): the new k/v are written
    at slots write_index + [0, Q) and the keys are the cache's S slots.
    """
    q = rope(self.q_norm(self._proj(x_BQD, self.q, self.q_bias)), positions_BQ, self.rope_theta)
    k = rope(self.k_norm(self._proj(x_BQD, self.k, self.k_bias)), positions_BQ, self.rope_theta)
    v = self._proj(x_BQD, self.v, self.v_bias)
    if kv_cache is not None:
      k_cache, v_cache, index = kv_cache
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
    out = attention_lib.attention(q, k.astype(q.dtype), v.astype(self.dtype), q_slots_BQ, kv_valid_BS,
                                  impl=self.attention, right_padded=right_padded and kv_cache is None,
                                  block=self.attention_block, query_block=self.attention_query_block,
                                  platform=self.platform, self_attention=kv_cache is None)
    y = jnp.einsum("BQNH,NHD->BQD", out.astype(self.dtype), self.o[...].astype(self.dtype))
    return y, (k, v)


class MLP(nnx.Module):
  def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
    d, f, pd = cfg.hidden_size, cfg.intermediate_size, as_dtype(cfg.param_dtype)
    self.dtype = as_dtype(cfg.dtype)
    self.gate = _param(rngs, (d, f), ("embed", "mlp"), pd, 0.02)
    self.up = _param(rngs, (d, f), ("embed", "mlp"), pd, 0.02)
    self.down = _param(rngs, (f, d), ("mlp", "embed"), pd, 0.02)

  def __call__(self, x_BQD):
    dt = self.dtype
    g = jnp.einsum("BQD,DF->BQF", x_BQD, self.gate[...].astype(dt))
    u = jnp.einsum("BQD,DF->BQF", x_BQD, self.up[...].astype(dt))
    return jnp.einsum("BQF,FD->BQD", jax.nn.silu(g) * u, self.down[...].astype(dt))


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
    pd = as_dtype(cfg.param_dtype)
    self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, axis="norm", rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, axis="norm", rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_BQD, positions_BQ, q_slots_BQ, kv_valid_BS, kv_cache=None, right_padded=False):
    a, new_kv = self.attn(self.input_norm(x_BQD), positions_BQ, q_slots_BQ, kv_valid_BS, kv_cache, right_padded)
    x_BQD = x_BQD + a
    return x_BQD + self.mlp(self.post_attn_norm(x_BQD)), new_kv


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------
class Qwen3(nnx.Module):
  """Qwen3ForCausalLM. `model(input_ids, attention_mask=None, positions=None)` → float32 logits [B, S, V]."""

  def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
    self.config = cfg
    pd = as_dtype(cfg.param_dtype)
    self.dtype = as_dtype(cfg.dtype)
    self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd, 0.02)
    self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
    self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd, axis="norm", rngs=rngs)
    self.lm_head = None if cfg.tie_word_embeddings else _param(
        rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd, 0.02)

  # -- pieces the trainer uses directly (the fused head needs hidden states and the head weight) ----------------------
  def head_weight(self) -> jax.Array:
    """The LM-head matrix as [D, V] (the transposed embedding when tied)."""
    return self.embed[...].T if self.lm_head is None else self.lm_head[...]

  def logits(self, hidden_BSD: jax.Array) -> jax.Array:
    """Float32 logits [B, S, V] from final hidden states [B, S, D] (any run of positions; matmul in the compute
    dtype, accumulated in float32)."""
    return jnp.einsum("BSD,DV->BSV", hidden_BSD, self.head_weight().astype(hidden_BSD.dtype),
                      preferred_element_type=jnp.float32)

  def hidden_states(self, input_ids_BS, attention_mask_BS=None, positions_BS=None, *, right_padded: bool = False):
    """Final-normed hidden states [B, S, D] in the compute dtype (full causal + padding mask, no cache).

    right_padded=True promises that each row's valid tokens are a prefix (prompt, response, then padding): it lets
    "auto" attention use cuDNN flash attention on GPUs, which takes per-row lengths instead of a mask.
    """
    b, s = input_ids_BS.shape
    if attention_mask_BS is None:
      attention_mask_BS = jnp.ones((b, s), jnp.bool_)
    attention_mask_BS = attention_mask_BS.astype(jnp.bool_)
    if positions_BS is None:
      positions_BS = positions_from_mask(attention_mask_BS)
    q_slots_BQ = jnp.broadcast_to(jnp.arange(s), (b, s))  # every position is a query here: Q = S
    h, _ = self._run_layers(input_ids_BS, positions_BS, q_slots_BQ, attention_mask_BS, None, 0, right_padded)
    return h

  def __call__(self, input_ids, attention_mask=None, positions=None):
    return self.logits(self.hidden_states(input_ids, attention_mask, positions))

  # -- KV-cache path (sampler) ----------------------------------------------------------------------------------------
  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    c = self.config
    shape = (c.num_hidden_layers, batch, max_len, c.num_key_value_heads, c.head_dim)
    dt = self.dtype if dtype is None else as_dtype(dtype)
    return KVCache(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt), valid=jnp.zeros((batch, max_len), jnp.bool_))

  def forward_with_cache(self, input_ids_BQ, positions_BQ, attention_mask_BQ, cache: KVCache, index):
    """Runs Q new tokens written at cache slots [index, index + Q); returns (hidden [B, Q, D], updated cache).

    Prefill: index 0, the left-padded prompt (Q = P). Decode: Q = 1 at index = P + steps so far. Query q sits at
    slot index + q and attends to valid slots s <= index + q.
    """
    b, num_q = input_ids_BQ.shape
    valid_BS = jax.lax.dynamic_update_slice(cache.valid, attention_mask_BQ.astype(jnp.bool_), (0, index))
    q_slots_BQ = jnp.broadcast_to(index + jnp.arange(num_q), (b, num_q))
    h, (ks, vs) = self._run_layers(input_ids_BQ, positions_BQ, q_slots_BQ, valid_BS, cache, index)
    return h, KVCache(k=ks, v=vs, valid=valid_BS)

  def _run_layers(self, input_ids_BQ, positions_BQ, q_slots_BQ, kv_valid_BS, cache, index, right_padded=False):
    # Rows split over the mesh's ("data", "fsdp") axes under a mesh context (sharding.constrain_rows): FSDP, not a
    # gathered batch.
    x = sharding.constrain_rows(jnp.take(self.embed[...], input_ids_BQ, axis=0).astype(self.dtype))
    ks, vs = [], []
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (cache.k[i], cache.v[i], index)
      if self.config.remat and cache is None:
        # Rematerialise each layer in the backward pass: activations of one layer at a time (training path only).
        x, new_kv = nnx.remat(lambda lyr, *a: lyr(*a, None, right_padded))(layer, x, positions_BQ, q_slots_BQ,
                                                                             kv_valid_BS)
      else:
        x, new_kv = layer(x, positions_BQ, q_slots_BQ, kv_valid_BS, kv, right_padded)
      x = sharding.constrain_rows(x)
      ks.append(new_kv[0])
      vs.append(new_kv[1])
    h = self.final_norm(x)
    if cache is None:
      return h, (None, None)
    return h, (jnp.stack(ks), jnp.stack(vs))


def init_model(cfg: Qwen3Config, seed: int = 0) -> Qwen3:
  """A randomly initialised model (normal(0, 0.02) weights, unit norms), as HF's `_init_weights` does."""
  return Qwen3(cfg, rngs=nnx.Rngs(params=seed))
