"""Science multiple-choice reward (spec "Rewards"): exact match of the last `<answer>` block with the gold letter.

Semantics, matching the SDPO code (`verl/utils/reward_score/feedback/mcq.py`, which does
`text.split("<answer>")[-1].split("</answer>")[0].strip() == ground_truth`):
  * the prediction is the text after the LAST `<answer>`, up to the next `</answer>` (or the end of the text when
    there is none), stripped of surrounding whitespace;
  * where the spec is silent, the SDPO code decides: a response with no `<answer>` at all is taken whole, so a bare
    "B" scores 1 against gold "B" (SDPO does the same; there is no format reward);
  * the comparison is exact and case-sensitive: "b" does not match "B".
Worked example: "<answer>A</answer> ... <answer>\n C \n</answer>" -> "C".
"""
from __future__ import annotations

_OPEN = "<answer>"
_CLOSE = "</answer>"


def extract_answer(response: str) -> str:
  """The stripped text after the last `<answer>` and before the next `</answer>` (linear time, no regex)."""
  start = response.rfind(_OPEN)
  # No tag: `str.split(_OPEN)[-1]` in the SDPO code is then the whole response.
  body = response if start < 0 else response[start + len(_OPEN):]
  end = body.find(_CLOSE)
  if end >= 0:
    body = body[:end]
  return body.strip()


def mcq_reward(response: str, answer: str) -> float:
  """1.0 iff the extracted answer equals the gold letter `answer` exactly, else 0.0. Never raises."""
  try:
    return 1.0 if extract_answer(response) == answer else 0.0
  except Exception:  # pylint: disable=broad-except  # a reward must never crash the trainer
    return 0.0
