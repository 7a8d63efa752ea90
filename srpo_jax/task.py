"""The training task: rendered train/test prompts and the reward that scores a response (from `data.*`, `rewards`)."""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

from srpo_jax.data import benchmarks, prompts as prompt_lib, synthetic
from srpo_jax.rewards import mcq_reward, tooluse_reward

log = logging.getLogger("srpo_jax")

Reward = Callable[[str, str], float]  # (response text, row.answer) -> reward in [0, 1]


@dataclasses.dataclass
class Task:
  train: prompt_lib.RenderedPrompts
  test: prompt_lib.RenderedPrompts
  reward: Reward
  skipped_rows: int = 0  # malformed data rows skipped under data.on_error="skip" (summary SUMMARY_SKIPPED_DATA_ROWS)
  dropped_prompts: int = 0  # rows dropped as longer than data.max_prompt_tokens (summary SUMMARY_DROPPED_PROMPTS)
  tooluse_system_prompt: bool = False  # how `messages` builds a row's chat (the teacher prompt starts from it)

  def messages(self, train_index: int) -> prompt_lib.Messages:
    """The chat messages of training prompt `train_index` (what the teacher prompt is built from)."""
    return prompt_lib.build_messages(self.train.rows[train_index], self.tooluse_system_prompt)


def reward_for(task: str, tooluse_strict_reward: bool = False) -> Reward:
  if task == "tooluse":
    return lambda text, answer: tooluse_reward(text, answer, strict=tooluse_strict_reward)
  return mcq_reward


def load_task(cfg, tokenizer) -> Task:
  """The configured task's splits, rendered with the chat template; over-long prompts dropped and logged."""
  d = cfg.data
  skipped = 0
  if d.task == "synthetic":
    train_rows, test_rows = synthetic.make_train_test(d.synthetic_train_size, d.synthetic_test_size, seed=cfg.seed,
                                                      difficulty=d.synthetic_difficulty)
  else:
    splits = [benchmarks.load_split(d.task, s, d.data_dir, on_error=d.on_error) for s in ("train", "test")]
    for sp in splits:
      if sp.skipped:
        log.warning("data.on_error=skip: skipped %d malformed rows of %s (first: %s)", len(sp.skipped), sp.path,
                    sp.skipped[0])
    skipped = sum(len(sp.skipped) for sp in splits)
    train_rows, test_rows = (list(sp.rows) for sp in splits)
  if cfg.eval.max_questions:
    test_rows = test_rows[:cfg.eval.max_questions]
  render = lambda rows: prompt_lib.render_prompts(rows, tokenizer, d.max_prompt_tokens, d.tooluse_system_prompt)
  train, test = render(train_rows), render(test_rows)
  if train.dropped or test.dropped:
    log.warning("dropped prompts longer than %d tokens: train %d, test %d", d.max_prompt_tokens, train.dropped,
                test.dropped)
  # An empty split is a DataError at load time (benchmarks.load_split); here every row was there but too long.
  for name, rendered in (("training", train), ("test", test)):
    if not rendered.ids:
      raise ValueError(f"data.task={d.task!r}: no {name} prompt fits data.max_prompt_tokens={d.max_prompt_tokens} "
                       f"({rendered.dropped} dropped as longer)")
  # Here, where the usable training set's size is first known (after skips and drops). Not an error: the step reads
  # on through the next epochs (trainer.prompt_rows), so it holds some prompts more than once.
  if cfg.rollout.prompts_per_step > len(train.ids):
    log.warning("rollout.prompts_per_step=%d is larger than the training set of data.task=%r (%d prompts): each step "
                "holds some prompts more than once", cfg.rollout.prompts_per_step, d.task, len(train.ids))
  return Task(train=train, test=test, reward=reward_for(d.task, d.tooluse_strict_reward), skipped_rows=skipped,
              dropped_prompts=train.dropped + test.dropped, tooluse_system_prompt=d.tooluse_system_prompt)
