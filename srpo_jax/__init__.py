"""srpo_jax: SRPO / GRPO / SDPO post-training of Qwen3 in JAX + Flax NNX."""

__version__ = "0.1.0"


def load_pretrained(path, dtype=None, mesh=None, **config_overrides):
  """Loads an HF Qwen3 checkpoint directory into a Flax NNX `Qwen3` (see `srpo_jax.models.hf_io`).

  `config_overrides` replace `Qwen3Config` fields (e.g. `remat=True`).
  """
  from srpo_jax.models import hf_io
  return hf_io.load_pretrained(path, dtype=dtype, mesh=mesh, **config_overrides)


def save_pretrained(model, path, tokenizer=None):
  """Writes `model` as an HF directory (config.json + sharded safetensors + index [+ tokenizer])."""
  from srpo_jax.models import hf_io
  return hf_io.save_pretrained(model, path, tokenizer=tokenizer)
