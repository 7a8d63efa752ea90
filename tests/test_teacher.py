"""SDPO self-teacher prompts (spec "SDPO branch"; paper Appendix B, Tables 6 and 7)."""
from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from srpo_jax.algorithms import routing, teacher
from srpo_jax.data.prompts import encode_text, render_messages

SYSTEM = "\nGiven a question and four options, please select the right answer."
QUESTION = "Which gas is inert?\n\nA: O2\nB: Ar\nC: H2\nD: Cl2\nPlease reason step by step."
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
SIBLING = "<think>\nlet me think\n</think>\n\n<reasoning>\nNoble gas.\n</reasoning>\n<answer>\nB\n</answer>"
SIBLING_STRIPPED = "<reasoning>\nNoble gas.\n</reasoning>\n<answer>\nB\n</answer>"


@pytest.fixture(scope="module")
def tokenizer():
  tokenizer_module = pytest.importorskip("srpo_jax.tokenizer", reason="srpo_jax.tokenizer not available")
  return tokenizer_module.load_tokenizer()


def _build(messages, sibling, tokenizer, **kw):
  """`build_teacher_prompt_ids` with the data package's renderer and encoder bound to `tokenizer` (as the trainer)."""
  return teacher.build_teacher_prompt_ids(messages, sibling, render=lambda m: render_messages(tokenizer, m),
                                          encode=lambda text: encode_text(tokenizer, text), **kw)


def test_teacher_messages_template():
  out = teacher.teacher_messages(MESSAGES, SIBLING)
  assert out == [
      {"role": "system", "content": SYSTEM},
      {"role": "user", "content": QUESTION + "\nCorrect solution:\n\n" + SIBLING_STRIPPED
                                  + "\n\nCorrectly solve the original question."},
  ]
  assert MESSAGES[1]["content"] == QUESTION  # the student's messages are not modified
  tool_only = teacher.teacher_messages([{"role": "user", "content": "Q"}], "Action: f")
  assert tool_only == [{"role": "user",
                        "content": "Q\nCorrect solution:\n\nAction: f\n\nCorrectly solve the original question."}]


@pytest.mark.parametrize("messages", [
    [{"role": "system", "content": "s"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
])
def test_teacher_messages_rejects_multi_turn(messages):
  with pytest.raises(ValueError, match="exactly one user message"):
    teacher.teacher_messages(messages, "x")


def test_rendered_teacher_prompt_is_the_spec_template_byte_for_byte(tokenizer):
  ids, truncated = _build(MESSAGES, SIBLING, tokenizer)
  expected = ("<|im_start|>system\n" + SYSTEM + "<|im_end|>\n"
              "<|im_start|>user\n" + QUESTION + "\nCorrect solution:\n\n" + SIBLING_STRIPPED
              + "\n\nCorrectly solve the original question.<|im_end|>\n"
              "<|im_start|>assistant\n<think>\n\n</think>\n\n")
  assert not truncated
  assert tokenizer.decode(ids) == expected
  assert ids == tokenizer.encode(expected, add_special_tokens=False)


@pytest.mark.parametrize(("text", "stripped"), [
    ("<think>a</think>\n\nB", "B"),
    ("<think>\n\n</think>\n\n<answer>A</answer>", "<answer>A</answer>"),
    ("x<think>a</think> y<think>b</think>\tz", "xyz"),
    ("<think>a<think>b</think>c", "c"),  # non-greedy from the first <think>
    ("<think>never closed", "<think>never closed"),
    ("no thinking", "no thinking"),
    ("</think>x<think>", "</think>x<think>"),
])
def test_strip_think_cases(text, stripped):
  assert teacher.strip_think(text) == stripped


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["<think>", "</think>", "a", " ", "\n", "<", ">", "think", "/"]), max_size=25)
       .map("".join))
def test_strip_think_equals_reference_regex(text):
  assert teacher.strip_think(text) == re.sub(r"<think>.*?</think>\s*", "", text, flags=re.DOTALL)


def _sibling(rewards, i, choice="first", key=None):
  """The teacher's source for rollout i of one group, as the trainer picks it (`routing.route`); None if none."""
  r = routing.route(np.asarray(rewards, np.float32), np.zeros(len(rewards), np.int32), sibling_choice=choice, rng=key)
  j = int(r.sibling_B[i])
  return None if j < 0 else j


def test_sibling_first_never_itself():
  rewards = [0.0, 1.0, 1.0, 0.0]
  assert _sibling(rewards, 0) == 1
  assert _sibling(rewards, 1) == 2  # not itself
  assert _sibling(rewards, 2) == 1
  assert _sibling([0.49, 0.5, 0.0], 0) == 1  # correct means r >= 0.5
  assert _sibling([0.49, 0.0], 1) is None
  assert _sibling([1.0], 0) is None


def test_sibling_random_is_uniform_over_correct_siblings():
  rewards = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
  keys = jax.random.split(jax.random.PRNGKey(0), 3000)
  picks = [_sibling(rewards, 0, "random", k) for k in keys]
  counts = {j: picks.count(j) for j in set(picks)}
  assert set(counts) == {2, 3, 5}  # correct ones, never itself (0)
  assert all(abs(c / 3000 - 1 / 3) < 0.04 for c in counts.values())
  assert picks[:20] == [_sibling(rewards, 0, "random", k) for k in keys[:20]]  # same key, same pick
  assert _sibling(rewards, 1, "random", keys[0]) in {0, 2, 3, 5}
  assert _sibling([0.0, 1.0], 1, "random", keys[0]) is None


def test_sibling_errors():
  with pytest.raises(ValueError, match="needs rng"):
    _sibling([1.0, 1.0], 0, "random")
  with pytest.raises(ValueError, match="sibling_choice"):
    _sibling([1.0, 1.0], 0, "best")


def _route(rewards, i):
  """Paper Table 7: z_SDPO = (1 - c_i) * m_i, with m_i = a correct sibling j != i exists."""
  c = rewards[i] >= 0.5
  m = _sibling(rewards, i) is not None
  return ("SDPO" if (not c and m) else "GRPO"), m


def test_paper_table6_example():
  """G = 8, rollouts y2 and y3 correct (1-based), the other six wrong."""
  rewards = [0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
  assert _route(rewards, 0) == ("SDPO", True) and _sibling(rewards, 0) == 1  # y1 uses y2
  assert _route(rewards, 1) == ("GRPO", True) and _sibling(rewards, 1) == 2  # available, unused
  assert _route(rewards, 2) == ("GRPO", True) and _sibling(rewards, 2) == 1
  assert _route(rewards, 3) == ("SDPO", True) and _sibling(rewards, 3) == 1  # y4 uses y2
  assert [_route(rewards, i)[0] for i in range(8)].count("SDPO") == 6


@pytest.mark.parametrize(("rewards", "i", "route", "available"), [
    ([1.0, 1.0, 0.0], 0, "GRPO", True),  # correct, sibling available
    ([1.0, 0.0, 0.0], 0, "GRPO", False),  # the only correct one is not its own teacher
    ([1.0, 0.0, 0.0], 1, "SDPO", True),  # wrong, a correct sibling exists
    ([0.0, 0.0, 0.0], 1, "GRPO", False),  # all wrong: fallback to GRPO
])
def test_paper_table7_decision_logic(rewards, i, route, available):
  assert _route(rewards, i) == (route, available)


def test_teacher_prompt_truncates_only_the_solution(tokenizer):
  head_and_tail, _ = _build(MESSAGES, "", tokenizer)
  solution = "<think>hidden</think>" + " ".join(f"step{k}" for k in range(400)) + "\n<answer>B</answer>"
  full, truncated = _build(MESSAGES, solution, tokenizer)
  assert not truncated
  limit = len(head_and_tail) + 50
  assert len(full) > limit
  ids, truncated = _build(MESSAGES, solution, tokenizer, max_tokens=limit)
  assert truncated and len(ids) == limit
  text = tokenizer.decode(ids)
  head = "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n<|im_start|>user\n" + QUESTION + "\nCorrect solution:\n\n"
  tail = "\n\nCorrectly solve the original question.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
  assert text.startswith(head + "step0 step1") and text.endswith(tail)
  kept_solution = text[len(head):-len(tail)]
  assert "hidden" not in kept_solution and "<answer>" not in kept_solution  # its END was cut
  assert teacher.strip_think(solution).startswith(kept_solution)
  assert encode_text(tokenizer, head) == ids[:len(encode_text(tokenizer, head))]
  exact, truncated = _build(MESSAGES, solution, tokenizer, max_tokens=len(full))
  assert exact == full and not truncated
  # Question longer than the limit: the solution goes entirely, the question is never cut.
  ids, truncated = _build(MESSAGES, solution, tokenizer, max_tokens=len(head_and_tail) - 5)
  assert truncated and tokenizer.decode(ids) == head + tail
