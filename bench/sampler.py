"""JAX sampler (`JaxEngine`) vs transformers' `generate` (PyTorch, CPU): new tokens per second on the same weights.

The default setting is the embedded demo's: a d=64, 2-layer Qwen3 with the real 151,936-token vocabulary (the LM
head dominates), batch 64, prompt 32, 32 new tokens, sampling at temperature 1 with no filters (the RL rollout
setting); `--validation` adds the validation setting (temperature 0.6, top-p 0.95). Both sides draw exactly
`--new` tokens per row (transformers: min_new_tokens; JAX: no stop ids). Times are medians of `--runs` calls after a
warm-up; the JAX compile time (first call minus a steady call) is reported separately.

Run: `.venv/bin/python bench/sampler.py [--batch 64 --prompt 32 --new 32 --vocab 151936 --runs 2 --validation]`.
The last line is `speedup vs transformers generate: <x>` (RL setting, temperature 1).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

# `python bench/sampler.py` puts bench/ first on sys.path; the editable install then resolves `srpo_jax` as a bare
# namespace package. Put the repository root first so the real package is imported.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import srpo_jax  # noqa: E402
from srpo_jax.rollout.engine import SamplingParams  # noqa: E402
from srpo_jax.rollout.jax_engine import JaxEngine  # noqa: E402


def hf_model(vocab: int, hidden: int, layers: int) -> transformers.Qwen3ForCausalLM:
  torch.manual_seed(0)
  cfg = transformers.Qwen3Config(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
      tie_word_embeddings=True, dtype="float32")
  return transformers.Qwen3ForCausalLM(cfg).eval()


def time_calls(fn, runs: int, warmup=None) -> tuple[float, float]:
  """(seconds of the first call — `warmup` if given, else `fn` itself —, median of `runs` calls of `fn`)."""
  start = time.perf_counter()
  (warmup or fn)()
  first = time.perf_counter() - start
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def hf_generate(model, ids: torch.Tensor, new: int, temperature: float, top_p: float):
  def fn():
    with torch.no_grad():
      out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                           top_p=top_p, top_k=0, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                           eos_token_id=None)
    assert out.shape[1] == ids.shape[1] + new, out.shape
  return fn


def jax_generate(engine: JaxEngine, prompts: list[list[int]], new: int, temperature: float, top_p: float):
  sampling = SamplingParams(max_new_tokens=new, temperature=temperature, top_p=top_p)
  def fn():
    out = engine.generate(prompts, sampling)
    assert all(len(c[0].token_ids) == new for c in out)
  return fn


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--prompt", type=int, default=32)
  ap.add_argument("--new", type=int, default=32)
  ap.add_argument("--vocab", type=int, default=151936)
  ap.add_argument("--hidden", type=int, default=64)
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--runs", type=int, default=2)
  ap.add_argument("--validation", action="store_true",
                  help="also time the validation setting (temperature 0.6, top-p 0.95)")
  args = ap.parse_args()

  hf = hf_model(args.vocab, args.hidden, args.layers)
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    ours = srpo_jax.load_pretrained(d)
  # No stop ids: every row draws exactly `new` tokens, as min_new_tokens forces on the transformers side.
  engine = JaxEngine(ours, eos_token_ids=(), pad_token_id=0, prompt_buckets=(args.prompt,),
                     batch_buckets=(args.batch,))
  ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.prompt))
  n_tokens = args.batch * args.new

  rows = []
  settings = [("T=1 (RL rollout)", 1.0, 1.0)] + ([("T=0.6 top-p 0.95 (validation)", 0.6, 0.95)] if args.validation
                                                else [])
  for label, temperature, top_p in settings:
    # transformers has nothing to compile: a 2-token call warms it up.
    _, hf_t = time_calls(hf_generate(hf, torch.tensor(ids), args.new, temperature, top_p), args.runs,
                         warmup=hf_generate(hf, torch.tensor(ids), 2, temperature, top_p))
    jx_first, jx_t = time_calls(jax_generate(engine, ids.tolist(), args.new, temperature, top_p), args.runs)
    rows.append((f"transformers generate, {label}", hf_t, n_tokens / hf_t, float("nan")))
    rows.append((f"JaxEngine, {label}", jx_t, n_tokens / jx_t, jx_first - jx_t))

  print(f"CPU, torch threads {torch.get_num_threads()}; d={args.hidden} layers={args.layers} V={args.vocab} "
        f"batch={args.batch} prompt={args.prompt} new={args.new}; median of {args.runs} after warm-up")
  print(f"{'sampler':<56} {'s/call':>8} {'new tok/s':>10} {'compile s':>10}")
  for name, t, tps, comp in rows:
    print(f"{name:<56} {t:8.3f} {tps:10.0f} {comp:10.2f}")
  for i in range(0, len(rows), 2):
    print(f"speedup ({rows[i + 1][0].split(', ', 1)[1]}): {rows[i][1] / rows[i + 1][1]:.2f}x")
  print(f"speedup vs transformers generate: {rows[0][1] / rows[1][1]:.2f}")


if __name__ == "__main__":
  main()
