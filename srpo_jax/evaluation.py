"""Held-out evaluation: avg@n (the paper's avg@16), the mean reward over n samples per test question."""
from __future__ import annotations

import time

import numpy as np

from srpo_jax import metrics as M
from srpo_jax.rewards.mcq import extract_answer
from srpo_jax.rollout.engine import RolloutEngine, SamplingParams


def evaluate(engine: RolloutEngine, task, tokenizer, eval_cfg, max_new_tokens: int, seed: int) -> dict[str, float]:
  """avg@n on `task.test` (temperature 0.6, top-p 0.95 by default) and the favourite answer's share (chance level)."""
  if not task.test.ids:  # an average over no question would be reported as accuracy 0.0
    raise ValueError("evaluate: the test split has no prompts (nothing to evaluate)")
  t0 = time.perf_counter()
  sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=eval_cfg.temperature, top_p=eval_cfg.top_p,
                            top_k=eval_cfg.top_k, seed=seed)
  out = engine.generate(task.test.ids, sampling, n=eval_cfg.n_samples)
  scores, answers = [], []
  for row, group in zip(task.test.rows, out):
    for c in group:
      text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
      scores.append(task.reward(text, row.answer))
      answers.append(extract_answer(text)[:8] or None)
  letters = [a for a in answers if a]
  favourite = max((letters.count(x) for x in set(letters)), default=0) / max(len(answers), 1)
  acc = float(np.mean(scores)) if scores else 0.0
  return {M.EVAL_ACCURACY: acc, M.EVAL_FAVOURITE_SHARE: favourite, M.EVAL_TIME_S: time.perf_counter() - t0}
