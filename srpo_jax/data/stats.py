"""Rows per split and prompt lengths in tokens (chat template applied, thinking off) for each benchmark.

    python -m srpo_jax.data.stats [--data-dir D] [--tasks ...] [--tooluse-system-prompt] [--tokenizer PATH]

Lengths use the bundled Qwen3 tokenizer (`srpo_jax.tokenizer.load_tokenizer`); prompts over 2048 tokens would be
dropped by the trainer, and the count is printed.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import numpy as np

from srpo_jax.data.benchmarks import SPLITS, TASKS, DataError, DataFileMissing, load_split, resolve_data_dir
from srpo_jax.data.prompts import build_messages, encode_text, render_messages

PERCENTILES = (50, 90, 99)


def prompt_lengths(rows, tokenizer: Any, tooluse_system_prompt: bool = False) -> np.ndarray:
  """[N] token counts of the rendered prompts."""
  return np.array([len(encode_text(tokenizer, render_messages(tokenizer, build_messages(r, tooluse_system_prompt))))
                   for r in rows], dtype=np.int64)


def summarize(lengths: np.ndarray, max_prompt_tokens: int = 2048) -> dict[str, float]:
  """p50/p90/p99/max of `lengths` and how many exceed `max_prompt_tokens`."""
  if lengths.size == 0:
    return {"rows": 0}
  out = {f"p{p}": float(np.percentile(lengths, p)) for p in PERCENTILES}
  out.update(rows=int(lengths.size), max=int(lengths.max()), over=int((lengths > max_prompt_tokens).sum()))
  return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m srpo_jax.data.stats", description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
  parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the bundled Qwen3 tokenizer)")
  parser.add_argument("--tooluse-system-prompt", action="store_true")
  parser.add_argument("--max-prompt-tokens", type=int, default=2048)
  args = parser.parse_args(argv)
  from srpo_jax.tokenizer import load_tokenizer  # Late: only the CLI needs it.
  tokenizer = load_tokenizer(args.tokenizer)
  print(f"data dir: {resolve_data_dir(args.data_dir)}")
  print(f"{'task/split':18s} {'rows':>6s} {'p50':>7s} {'p90':>7s} {'p99':>7s} {'max':>6s} {'>max':>5s}")
  for task in args.tasks:
    for split in SPLITS:
      try:
        rows = load_split(task, split, args.data_dir).rows
      except DataFileMissing:
        print(f"{task + '/' + split:18s} missing (python -m srpo_jax.data.download)")
        continue
      except DataError as err:  # a malformed row or an empty split: say which, then the other splits
        print(f"{task + '/' + split:18s} error: {err}")
        continue
      s = summarize(prompt_lengths(rows, tokenizer, args.tooluse_system_prompt), args.max_prompt_tokens)
      print(f"{task + '/' + split:18s} {s['rows']:6d} {s['p50']:7.0f} {s['p90']:7.0f} {s['p99']:7.0f} "
            f"{s['max']:6d} {s['over']:5d}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
