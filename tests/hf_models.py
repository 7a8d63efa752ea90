"""Tiny random transformers Qwen3 models for parity tests (built locally, nothing downloaded)."""
import torch
import transformers


def tiny_hf_qwen3(*, tied: bool, num_heads: int = 4, num_kv_heads: int = 2, vocab: int = 512, seed: int = 0,
                  layers: int = 2, hidden: int = 64, head_dim: int = 16, rope_theta: float = 1e6):
  torch.manual_seed(seed)
  cfg = transformers.Qwen3Config(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
      num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
      max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
      tie_word_embeddings=tied, attn_implementation="eager", dtype="float32")
  model = transformers.Qwen3ForCausalLM(cfg).eval()
  with torch.no_grad():  # move every norm weight away from 1 so a missing/misplaced norm shows up
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.5 * torch.randn_like(p))
  return model
