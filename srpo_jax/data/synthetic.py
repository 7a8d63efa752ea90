"""A procedurally generated four-option task that a tiny random Qwen3 can learn with RL on a CPU in minutes.

Why this shape (a prototype found that shuffled options did not learn): every family keeps its four options in a FIXED
order, the answer is a simple function of one or two numbers in the question, and the prompt is short (about 40-45
tokens after the chat template, system message included). Rows are `benchmarks.Row`s of kind "mcq", so they are
rendered by `build_messages` and scored by `mcq_reward` exactly like the science benchmarks. Families, easiest first;
`difficulty` = how many are used (1..4):

  1. water:   "Water at -57°C: A) solid B) liquid C) gas D) plasma"      (sign and digit count decide)
  2. digits:  "Digits in 4821? A) one B) two C) three D) four"           (token count decides)
  3. compare: "Compare 37 to 50. A) less B) equal C) greater D) unknown" (D is never right, like a distractor)
  4. largest: "Which is largest? A) 3 B) 8 C) 1 D) 5"                    (option text varies; letters do not move)

Held-out split: each question's text is hashed (SHA-1) and 1 in 5 questions belong to "test", the rest to "train",
for every seed; so the splits are disjoint by construction and the test set is a fixed part of the question space.
Within a split, a seed draws the questions i.i.d. (family, then answer class, then values: balanced letters).

`warmstart_examples` builds a short supervised warm-start for the answer FORMAT that does not teach the task. It takes
the SDPO teacher-prompt builder as an argument (`teacher_messages` of algorithms/teacher.py): the data package imports
nothing from the algorithms package.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Literal

import numpy as np

from srpo_jax.data.benchmarks import Row
from srpo_jax.data.prompts import Messages, build_messages

SYSTEM_PROMPT = "Reply <answer>X</answer>."
LETTERS = ("A", "B", "C", "D")
MAX_DIFFICULTY = 4
TEST_FRACTION_DENOM = 5  # 1 in 5 questions is held out.
_SPLIT_OFFSET = {"train": 0, "test": 10_000_000}  # Row.idx ranges, so train and test ids never collide.

Question = tuple[str, str]  # (prompt text, answer letter)


def _water(rng: np.random.Generator) -> Question:
  letter = LETTERS[int(rng.integers(4))]
  low, high = {"A": (-99, -1), "B": (1, 99), "C": (101, 999), "D": (5000, 9999)}[letter]
  t = int(rng.integers(low, high + 1))
  return f"Water at {t}°C: A) solid B) liquid C) gas D) plasma", letter


def _digits(rng: np.random.Generator) -> Question:
  k = int(rng.integers(4))
  n = int(rng.integers(10**k if k else 0, 10**(k + 1)))
  return f"Digits in {n}? A) one B) two C) three D) four", LETTERS[k]


def _compare(rng: np.random.Generator) -> Question:
  k = int(rng.integers(3))  # less / equal / greater, equally often
  a = int(rng.integers(100))
  if k == 1:
    b = a
  else:
    b = int(rng.integers(100))
    while b == a:
      b = int(rng.integers(100))
    if (a < b) != (k == 0):
      a, b = b, a
  return f"Compare {a} to {b}. A) less B) equal C) greater D) unknown", LETTERS[k]


def _largest(rng: np.random.Generator) -> Question:
  values = [int(v) for v in rng.choice(10, size=4, replace=False)]
  options = " ".join(f"{letter}) {v}" for letter, v in zip(LETTERS, values))
  return f"Which is largest? {options}", LETTERS[int(np.argmax(values))]


FAMILIES: tuple[tuple[str, Callable[[np.random.Generator], Question]], ...] = (
    ("water", _water), ("digits", _digits), ("compare", _compare), ("largest", _largest))


def split_of(prompt: str) -> str:
  """"test" for a fixed 1/5 of all question texts (by SHA-1), "train" for the rest; independent of any seed."""
  h = int.from_bytes(hashlib.sha1(prompt.encode("utf-8")).digest()[:8], "big")
  return "test" if h % TEST_FRACTION_DENOM == 0 else "train"


def _check_difficulty(difficulty: int) -> None:
  if not 1 <= difficulty <= MAX_DIFFICULTY:
    raise ValueError(f"difficulty must be in 1..{MAX_DIFFICULTY} (number of question families), got {difficulty}")


def make_split(n: int, seed: int = 0, difficulty: int = 2,
               split: Literal["train", "test"] = "train") -> list[Row]:
  """`n` questions of `split`, deterministic in (n, seed, difficulty, split).

  Each row draws its family, then its answer class, then its values, i.i.d. (repeats allowed: some classes have
  only ~10-100 questions, and insisting on distinct questions would skew the letters). Rows carry `task="synthetic"`,
  `dataset="synthetic/<family>"`, the short system prompt, and idx values unique within and across splits.
  """
  _check_difficulty(difficulty)
  if split not in _SPLIT_OFFSET:
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  rng = np.random.default_rng([seed, difficulty, 0 if split == "train" else 1])
  rows: list[Row] = []
  while len(rows) < n:
    name, family = FAMILIES[int(rng.integers(difficulty))]
    prompt, letter = family(rng)
    if split_of(prompt) != split:
      continue
    rows.append(Row(idx=_SPLIT_OFFSET[split] + len(rows), kind="mcq", answer=letter, prompt=prompt,
                    system=SYSTEM_PROMPT, task="synthetic", split=split, dataset=f"synthetic/{name}"))
  return rows


def make_train_test(n_train: int, n_test: int, seed: int = 0, difficulty: int = 2) -> tuple[list[Row], list[Row]]:
  """Both splits at once (disjoint by construction, see `split_of`)."""
  return (make_split(n_train, seed, difficulty, "train"), make_split(n_test, seed, difficulty, "test"))


@dataclasses.dataclass(frozen=True)
class WarmstartExample:
  """A supervised format example: chat `messages` (generation prompt to be added) and the `target` response text
  (no end-of-turn token: the trainer appends `<|im_end|>`). kind: "format" or "teacher"."""
  messages: Messages
  target: str
  kind: str


def warmstart_examples(n: int, seed: int = 0, difficulty: int = 2, *,
                       teacher_messages: Callable[[Messages, str], Messages]) -> list[WarmstartExample]:
  """`n` examples for a supervised format warm-start that does NOT teach the answers.

  teacher_messages: (student messages, sibling response) -> the SDPO teacher prompt's messages
  (`teacher_messages` of algorithms/teacher.py).

  Alternating, starting with (a):
    (a) "format": a train question with a uniformly random letter X as target `<answer>X</answer>`: teaches the
        format only (the target is independent of the question);
    (b) "teacher": the SDPO teacher prompt (`teacher_messages`) of a train question whose "Correct solution" is
        `<answer>Y</answer>` for a uniformly random Y, with target `<answer>Y</answer>`: teaches copying the answer
        from the context, so that SDPO's self-teacher carries information, without teaching the task.
  """
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  questions = make_split(n, seed=seed + 1_000_003, difficulty=difficulty, split="train")
  rng = np.random.default_rng([seed, 7])
  examples = []
  for k, row in enumerate(questions):
    letter = LETTERS[int(rng.integers(4))]
    target = f"<answer>{letter}</answer>"
    if k % 2 == 0:
      examples.append(WarmstartExample(messages=build_messages(row), target=target, kind="format"))
    else:
      examples.append(WarmstartExample(messages=teacher_messages(build_messages(row), target), target=target,
                                       kind="teacher"))
  return examples
