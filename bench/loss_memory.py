"""Fused vocab-tiled head vs naive full-logits head: peak memory and time of forward + backward (jit, CPU).

Both compute, per token, the sampled-token log-prob, the student entropy, the student top-k log-probs with tail, the
teacher log-probs there with tail and the teacher entropy, then the same scalar loss (a GRPO-like term linear in the
log-prob, the top-k JSD, an entropy term, the teacher entropy as a stop-gradient DW input), and its gradient with
respect to the student hidden states and the head weight. Time is the median of a few runs after a warm-up.

Memory is read from the compiled program (`memory_analysis()`), in three parts: arguments (the two float32 `[D, V]`
head weights, the hidden states, ids, advantages), outputs (the loss, the `[X, D]` hidden-state gradient and the
float32 `[D, V]` weight gradient) and temporaries. "peak" is temporaries + outputs: the memory the computation needs
beyond its inputs. The arguments are excluded from it because both heads receive the very same arrays, which the
model holds anyway (the weights) or has produced before the head runs (the hidden states); they are printed in their
own column, and the all-inclusive ratio (arguments + outputs + temporaries) is printed too. The outputs are counted:
the `[D, V]` weight gradient is memory the backward creates.

Letters (the alphabet of `srpo_jax.models.qwen3`): X flattened tokens, D model width, V vocabulary.

Run: `.venv/bin/python bench/loss_memory.py [--tokens 4096 --vocab 151936 --hidden 1024 --tile 256]`.
The last two lines are `peak memory ratio fused/naive: <x>` and `time ratio fused/naive: <x>`.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from srpo_jax.algorithms import losses
from srpo_jax.kernels import fused_head as fh

TOP_K = 100


def naive_loss(h_XD, w_DV, ht_XD, wt_DV, ids_X, adv_X):
  """Full `[X, V]` logits for student and teacher."""
  z_XV = jnp.dot(h_XD, w_DV, preferred_element_type=jnp.float32)
  zt_XV = jax.lax.stop_gradient(jnp.dot(ht_XD, wt_DV, preferred_element_type=jnp.float32))
  logp_XV = jax.nn.log_softmax(z_XV)
  logp_X = jnp.take_along_axis(logp_XV, ids_X[:, None], axis=-1)[:, 0]
  entropy_X = -jnp.sum(jnp.exp(logp_XV) * logp_XV, axis=-1)
  tlogp_XV = jax.nn.log_softmax(zt_XV)
  t_entropy_X = -jnp.sum(jnp.exp(tlogp_XV) * tlogp_XV, axis=-1)
  jsd_X = losses.topk_jsd(z_XV, zt_XV, k=TOP_K)
  return _combine(logp_X, entropy_X, jsd_X, t_entropy_X, adv_X)


def fused_loss(h_XD, w_DV, ht_XD, wt_DV, ids_X, adv_X, tile):
  out = fh.fused_head(h_XD, w_DV, ids_X, ht_XD, teacher_head_weight_DV=wt_DV, k=TOP_K, tile_size=tile)
  return _combine(out.logp_X, out.entropy_X, losses.head_divergence(out), out.teacher_entropy_X, adv_X)


def _combine(logp_X, entropy_X, jsd_X, t_entropy_X, adv_X):
  dw_X = jax.lax.stop_gradient(jnp.exp(-t_entropy_X))
  return jnp.mean(-adv_X * logp_X) + jnp.mean(dw_X * jsd_X) + 1e-3 * jnp.mean(entropy_X)


def measure(fn, args, runs):
  """({args, outputs, temp, peak = temp + outputs, all = args + peak} bytes of the compiled program, median seconds
  or nan, last result)."""
  compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
  mem = compiled.memory_analysis()
  sizes = {"args": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes, "temp": mem.temp_size_in_bytes}
  sizes["peak"] = sizes["temp"] + sizes["outputs"]
  sizes["all"] = sizes["peak"] + sizes["args"]
  if runs == 0:
    return sizes, float("nan"), None
  result = jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    result = jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return sizes, statistics.median(times), result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--vocab", type=int, default=151936)
  parser.add_argument("--hidden", type=int, default=1024)
  parser.add_argument("--tile", type=int, default=None, help="token tile (default: the library default)")
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--memory_only", action="store_true", help="compile and report memory, do not run")
  args = parser.parse_args()
  tile = args.tile or fh.DEFAULT_TILE_SIZE
  keys = jax.random.split(jax.random.key(0), 6)
  n, d, v = args.tokens, args.hidden, args.vocab
  inputs = (jax.random.normal(keys[0], (n, d)), jax.random.normal(keys[1], (d, v)) * d ** -0.5,
            jax.random.normal(keys[2], (n, d)), jax.random.normal(keys[3], (d, v)) * d ** -0.5,
            jax.random.randint(keys[4], (n,), 0, v), jax.random.normal(keys[5], (n,)))
  fused = lambda *a: fused_loss(*a, tile)
  results = {name: measure(fn, inputs, 0 if args.memory_only else args.runs)
             for name, fn in (("naive", naive_loss), ("fused", fused))}
  mib = lambda x: f"{x / 2**20:10.1f}"
  print(f"tokens={n} vocab={v} hidden={d} k={TOP_K} tile={tile} backend={jax.default_backend()} "
        f"devices={jax.device_count()} (forward + backward w.r.t. hidden and head weight, float32)")
  print("| head  | args MiB   | outputs MiB | temp MiB   | peak MiB (temp + outputs) | all MiB (+ args) | median s |")
  print("|-------|------------|-------------|------------|---------------------------|------------------|----------|")
  for name, (sizes, secs, _) in results.items():
    print(f"| {name} | {mib(sizes['args'])} | {mib(sizes['outputs'])}  | {mib(sizes['temp'])} | "
          f"{mib(sizes['peak'])}                | {mib(sizes['all'])}       | {secs:8.3f} |")
  if not args.memory_only:
    (lv_n, (gh_n, gw_n)), (lv_f, (gh_f, gw_f)) = results["naive"][2], results["fused"][2]
    rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))
    print(f"loss naive {float(lv_n):.6f} fused {float(lv_f):.6f}; max rel grad diff hidden {rel(gh_f, gh_n):.2e} "
          f"weight {rel(gw_f, gw_n):.2e}")
  naive, fused_sizes = results["naive"][0], results["fused"][0]
  # Arguments (two [D, V] head weights) and outputs (the [D, V] weight gradient) are the same for both heads and
  # bound the all-inclusive ratio from below; the temp ratio is the working memory the fusion removes.
  print(f"all-inclusive memory ratio fused/naive (args + outputs + temp): {fused_sizes['all'] / naive['all']:.4f} "
        f"(floor with zero temp: {(fused_sizes['args'] + fused_sizes['outputs']) / naive['all']:.4f})")
  print(f"temp memory ratio fused/naive: {fused_sizes['temp'] / naive['temp']:.4f}")
  print("peak = temp + outputs (memory beyond the identical inputs; args excluded, see the module docstring)")
  print(f"peak memory ratio fused/naive: {fused_sizes['peak'] / naive['peak']:.4f}")
  print(f"time ratio fused/naive: {results['fused'][1] / results['naive'][1]:.4f}")


if __name__ == "__main__":
  main()
