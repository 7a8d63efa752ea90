"""The synthetic four-option task for the CPU default run, and its format warm-start."""
from __future__ import annotations

import collections
import re

import pytest

from srpo_jax.algorithms.teacher import teacher_messages
from srpo_jax.data import synthetic
from srpo_jax.data.prompts import build_messages, render_prompts
from srpo_jax.rewards import mcq_reward

ROWS_PER_CHECK = 2000


def oracle_response(row) -> str:
  """The response that scores 1 under `mcq_reward`."""
  return f"<answer>{row.answer}</answer>"


def warmstart_examples(n, seed=0, difficulty=2):
  return synthetic.warmstart_examples(n, seed=seed, difficulty=difficulty, teacher_messages=teacher_messages)


@pytest.fixture(scope="module")
def tokenizer():
  tokenizer_module = pytest.importorskip("srpo_jax.tokenizer", reason="srpo_jax.tokenizer not available")
  return tokenizer_module.load_tokenizer()


def _solve(prompt: str) -> str:
  """An independent solver that reads only the question text (checks that the answer is a function of it)."""
  if m := re.fullmatch(r"Water at (-?\d+)°C: A\) solid B\) liquid C\) gas D\) plasma", prompt):
    t = int(m[1])
    return "A" if t < 0 else "B" if t < 100 else "C" if t < 1000 else "D"
  if m := re.fullmatch(r"Digits in (\d+)\? A\) one B\) two C\) three D\) four", prompt):
    return "ABCD"[len(m[1]) - 1]
  if m := re.fullmatch(r"Compare (\d+) to (\d+)\. A\) less B\) equal C\) greater D\) unknown", prompt):
    a, b = int(m[1]), int(m[2])
    return "A" if a < b else "B" if a == b else "C"
  if m := re.fullmatch(r"Which is largest\? A\) (\d) B\) (\d) C\) (\d) D\) (\d)", prompt):
    values = [int(v) for v in m.groups()]
    assert len(set(values)) == 4
    return "ABCD"[values.index(max(values))]
  raise AssertionError(f"unknown question format: {prompt!r}")


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_answers_are_a_function_of_the_question(difficulty):
  rows = synthetic.make_split(ROWS_PER_CHECK, seed=3, difficulty=difficulty)
  assert all(_solve(r.prompt) == r.answer for r in rows)
  families = collections.Counter(r.dataset for r in rows)
  assert set(families) == {f"synthetic/{name}" for name, _ in synthetic.FAMILIES[:difficulty]}
  assert all(r.kind == "mcq" and r.task == "synthetic" and r.system == synthetic.SYSTEM_PROMPT for r in rows)
  assert len({r.idx for r in rows}) == len(rows)


def test_deterministic_per_seed():
  a = synthetic.make_split(300, seed=11, difficulty=3)
  assert a == synthetic.make_split(300, seed=11, difficulty=3)
  assert a != synthetic.make_split(300, seed=12, difficulty=3)
  assert a[:100] == synthetic.make_split(100, seed=11, difficulty=3)  # a prefix: n does not reshuffle
  assert warmstart_examples(40, seed=5) == warmstart_examples(40, seed=5)
  assert warmstart_examples(40, seed=5) != warmstart_examples(40, seed=6)


@pytest.mark.parametrize("difficulty", [1, 4])
def test_train_and_test_disjoint_for_any_seeds(difficulty):
  train = {r.prompt for seed in (0, 1, 2) for r in synthetic.make_split(1000, seed, difficulty, "train")}
  test = {r.prompt for seed in (0, 7) for r in synthetic.make_split(300, seed, difficulty, "test")}
  assert not train & test
  assert all(synthetic.split_of(p) == "train" for p in train) and all(synthetic.split_of(p) == "test" for p in test)
  tr, te = synthetic.make_train_test(50, 20, seed=0, difficulty=difficulty)
  assert {r.split for r in tr} == {"train"} and {r.split for r in te} == {"test"}
  assert not {r.idx for r in tr} & {r.idx for r in te}


def test_oracle_scores_one_wrong_letter_zero():
  rows = synthetic.make_split(400, seed=0, difficulty=4) + synthetic.make_split(100, seed=0, difficulty=4,
                                                                                split="test")
  for row in rows:
    assert mcq_reward(oracle_response(row), row.answer) == 1.0
    wrong = next(letter for letter in "ABCD" if letter != row.answer)
    assert mcq_reward(f"<answer>{wrong}</answer>", row.answer) == 0.0


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_answer_letters_not_degenerate(difficulty):
  counts = collections.Counter(r.answer for r in synthetic.make_split(ROWS_PER_CHECK, 0, difficulty))
  shares = [counts[letter] / ROWS_PER_CHECK for letter in "ABCD"]
  assert max(shares) < 0.35  # chance is 25%; always answering the most common letter stays near it
  assert min(shares) > 0.12  # "compare" never uses D, so D is rarer at difficulty 3-4


def test_difficulty_and_arguments_checked():
  with pytest.raises(ValueError, match="difficulty must be in 1..4"):
    synthetic.make_split(3, difficulty=0)
  with pytest.raises(ValueError, match="split must be"):
    synthetic.make_split(3, split="val")  # type: ignore[arg-type]


@pytest.mark.parametrize("difficulty", [1, 4])
def test_prompt_token_length_bound(tokenizer, difficulty):
  rows = synthetic.make_split(500, seed=1, difficulty=difficulty)
  out = render_prompts(rows, tokenizer, max_prompt_tokens=45)
  assert out.dropped == 0  # every prompt, chat template and system message included, is <= 45 tokens
  assert sum(map(len, out.ids)) / len(out.ids) < 45


def test_warmstart_does_not_teach_the_answers():
  examples = warmstart_examples(2000, seed=0, difficulty=4)
  kinds = collections.Counter(e.kind for e in examples)
  assert kinds == {"format": 1000, "teacher": 1000}
  targets = collections.Counter(e.target for e in examples)
  assert set(targets) == {f"<answer>{letter}</answer>" for letter in "ABCD"}
  assert all(abs(c / 2000 - 0.25) < 0.04 for c in targets.values())
  agree = 0
  for e in examples:
    question = e.messages[-1]["content"].split("\nCorrect solution:")[0]
    agree += e.target == f"<answer>{_solve(question)}</answer>"
    assert e.messages[0] == {"role": "system", "content": synthetic.SYSTEM_PROMPT}
    if e.kind == "format":
      assert e.messages[1]["content"] == question
    else:  # the target is the letter shown as the "Correct solution" in the teacher prompt
      assert e.messages[1]["content"] == (f"{question}\nCorrect solution:\n\n{e.target}\n\n"
                                          "Correctly solve the original question.")
  assert abs(agree / len(examples) - 0.25) < 0.04  # the target agrees with the true answer only by chance


def test_warmstart_messages_render(tokenizer):
  example = warmstart_examples(2, seed=0)[1]
  text = tokenizer.apply_chat_template(example.messages, tokenize=False, add_generation_prompt=True,
                                       enable_thinking=False)
  assert text.endswith("Correctly solve the original question.<|im_end|>\n<|im_start|>assistant\n"
                       "<think>\n\n</think>\n\n")
  assert build_messages(synthetic.make_split(1)[0])[0]["content"] == "Reply <answer>X</answer>."
