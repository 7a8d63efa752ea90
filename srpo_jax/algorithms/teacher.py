"""SDPO self-teacher prompts (spec "SDPO branch"): the question plus a correct sibling's solution.

For a rollout `i` of a group, the teacher information is the response of a correct sibling `j != i` (correct means
`r_j >= 0.5`; `routing.route` picks it: the first in group order by default, or a random one). The teacher
prompt keeps the original system message(s) and replaces the user turn by exactly

    "{original user message}\\nCorrect solution:\\n\\n{sibling response}\\n\\nCorrectly solve the original question."

with `<think>...</think>` and the whitespace after it removed from the sibling, rendered with Qwen3's chat template
(thinking off, generation prompt added). The teacher re-scores the student's own response after this prompt. This is
the template of the configuration the official SDPO code runs (its actor.yaml), not a departure.

Departure from the SDPO code: SDPO truncates an over-long teacher prompt from the right as a whole (cutting the
generation prompt); here only the sibling solution is cut (its end), so the template's head (system, question) and
tail (closing instruction and generation prompt) stay intact (`build_teacher_prompt_ids`).

Nothing here imports the data package (or a tokenizer): `build_teacher_prompt_ids` takes the chat-template renderer
and the text encoder as callables, e.g. `render_messages` and `encode_text` of data/prompts.py bound to one tokenizer.
"""
from __future__ import annotations

import re
from typing import Callable

Messages = list[dict[str, str]]  # chat messages (the `Messages` of data/prompts.py).

_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"
_LEADING_SPACE_RE = re.compile(r"\s*")


def strip_think(text: str) -> str:
  """Removes every `<think>...</think>` block and the whitespace that follows it (the regex `<think>.*?</think>\\s*`
  with DOTALL), scanning with `str.find` so that many unclosed `<think>` cost linear time. An unclosed `<think>` is
  kept as it is."""
  out, pos = [], 0
  while True:
    start = text.find(_THINK_OPEN, pos)
    if start < 0:
      break
    end = text.find(_THINK_CLOSE, start + len(_THINK_OPEN))
    if end < 0:
      break  # No `</think>` after this `<think>`: none after any later one either.
    out.append(text[pos:start])
    pos = _LEADING_SPACE_RE.match(text, end + len(_THINK_CLOSE)).end()
  out.append(text[pos:])
  return "".join(out)


def teacher_user_content(user_message: str, sibling_response: str) -> str:
  """The teacher's single user message (spec template), with the sibling's thinking stripped."""
  solution = strip_think(sibling_response)
  return f"{user_message}\nCorrect solution:\n\n{solution}\n\nCorrectly solve the original question."


def teacher_messages(messages: Messages, sibling_response: str) -> Messages:
  """The original system message(s), then ONE user message carrying the question and the sibling's solution.

  messages: the student's prompt messages: system message(s) then exactly one user message (single turn).
  Raises ValueError for any other layout (several user turns, assistant turns, unknown roles).
  """
  systems = [dict(m) for m in messages if m.get("role") == "system"]
  users = [m for m in messages if m.get("role") == "user"]
  others = [m.get("role") for m in messages if m.get("role") not in ("system", "user")]
  if len(users) != 1 or others or messages[-1].get("role") != "user":
    raise ValueError("teacher_messages expects system message(s) then exactly one user message; got roles "
                     f"{[m.get('role') for m in messages]}")
  return systems + [{"role": "user", "content": teacher_user_content(users[0]["content"], sibling_response)}]


def build_teacher_prompt_ids(messages: Messages, sibling_response: str, *, render: Callable[[Messages], str],
                             encode: Callable[[str], list[int]], max_tokens: int = 10240) -> tuple[list[int], bool]:
  """Token ids of the rendered teacher prompt, and whether the sibling solution had to be cut.

  render: chat messages -> the chat-template string with the generation prompt (e.g.
  `functools.partial(prompts.render_messages, tokenizer)`); encode: a rendered string -> its token ids without added
  special tokens (e.g. `functools.partial(prompts.encode_text, tokenizer)`).

  When the whole prompt fits in `max_tokens` the ids are exactly `encode(render(teacher_messages(...)))`.
  Otherwise the rendered string is split around the solution into head (template, system, question, "Correct
  solution:\\n\\n") and tail ("\\n\\nCorrectly solve the original question." and the generation prompt); the three
  parts are tokenized separately and the solution's tokens are cut from the END to fit (the right truncation of the
  SDPO code, applied to the solution only). If head and tail alone exceed `max_tokens` (a question longer than the
  limit) the solution is dropped entirely and the ids are longer than `max_tokens`; nothing raises mid-training.
  """
  if max_tokens <= 0:
    raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
  full_ids = list(encode(render(teacher_messages(messages, sibling_response))))
  if len(full_ids) <= max_tokens:
    return full_ids, False
  solution = strip_think(sibling_response)
  # Render once with a marker in place of the solution to find the template's head and tail around it.
  marker = "\u2063SRPO_SOLUTION_MARKER\u2063"
  rendered = render(teacher_messages(messages, marker))
  if rendered.count(marker) != 1:
    raise ValueError("the solution marker must occur exactly once in the rendered teacher prompt")
  head, tail = rendered.split(marker)
  head_ids, tail_ids = list(encode(head)), list(encode(tail))
  # Never negative: when head and tail alone exceed the limit the whole solution goes and the result is longer
  # than `max_tokens` (the question is never cut); the caller sees truncated=True and may skip the rollout.
  budget = max(max_tokens - len(head_ids) - len(tail_ids), 0)
  solution_ids = list(encode(solution))[:budget]
  return head_ids + solution_ids + tail_ids, True
