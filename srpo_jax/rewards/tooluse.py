"""Tool-use (ToolAlpaca) reward (spec "Rewards"): predicted actions and merged action inputs equal the gold ones.

Default scorer, as the SDPO code (`verl/utils/reward_score/feedback/tooluse.py`):
  * predicted actions: every match of `Action:\\s*(\\w+)`;
  * predicted inputs: every match of `Action Input:\\s*({.*?})` (non-greedy, DOTALL), each `json.loads`-ed, the
    unparseable ones skipped, merged in order with `dict.update`;
  * gold: a JSON list of `{"Action": str, "Action_Input": str}` whose inputs are JSON strings, merged the same way;
  * reward 1.0 iff the action multisets are equal and the merged input dicts are equal.
The non-greedy pattern stops at the first `}`, so a nested input such as `{"a": {"b": 1}}` is cut to
`{"a": {"b": 1}` and fails to parse: such a call can never score (2 of the 68 test items have nested gold inputs).
It is kept for comparability with the paper; `strict=True` parses each input with a real JSON decoder
(`json.JSONDecoder.raw_decode` at the first non-space character after each `Action Input:`), which handles nesting.

Speed: on adversarial text (many `Action Input: {` and no `}`) the plain `re.findall` rescans to the end of the string
from every start, which is quadratic (minutes on 1 MB); `_regex_input_blocks` returns exactly the same list in linear
time (tested against the plain regex on random strings). The strict decoder works on bounded windows for the same
reason (see `_decode_at`).

Differences from the SDPO code, all on inputs SDPO would crash on or never see: the gold is parsed defensively (a gold
step whose input is not a JSON object contributes `{}`; a gold that is not a JSON list scores 0), and nothing here
ever raises (RecursionError from deeply nested JSON, huge integers, bad types all give 0.0).
"""
from __future__ import annotations

import collections
import json
import re
from typing import Any

_ACTION_RE = re.compile(r"Action:\s*(\w+)")
_INPUT_RE = re.compile(r"Action Input:\s*({.*?})", re.DOTALL)
# Starts worth decoding in strict mode: `Action Input:`, spaces, then what every JSON object begins with (`{` and `}`,
# or `{`, a key string and `:`). A cheap filter in C: anything it rejects cannot decode to an object.
_STRICT_START_RE = re.compile(r'Action Input:\s*(?=\{\s*(?:\}|"(?:[^"\\]|\\.)*"\s*:))')
_DECODER = json.JSONDecoder()


def extract_actions(response: str) -> list[str]:
  """All `Action:\\s*(\\w+)` captures, in order."""
  return _ACTION_RE.findall(response)


def _regex_input_blocks(text: str) -> list[str]:
  """Exactly `re.findall(r"Action Input:\\s*({.*?})", text, re.DOTALL)`, in linear time.

  The pattern is quadratic only through starts that find no `}` after them: each such start rescans to the end of
  the text. Those are exactly the starts after the last `}`, which can never match, so cutting the text after its
  last `}` gives the same matches, and every remaining start stops at its first `}`.
  """
  last_close = text.rfind("}")
  if last_close < 0:
    return []
  return _INPUT_RE.findall(text, 0, last_close + 1)


def _window_outcome(window: str, cache: dict[str, tuple]) -> tuple:
  """Decodes the JSON value at the start of `window`: ("ok", value, used) | ("fail",) | ("cut",), memoised.

  "cut": the failure is at (or near) the window's end, or an unterminated string, so a longer window may parse.
  The outcome depends on the window's text alone, so repeated text (a response looping on one call) decodes once.
  """
  if window in cache:
    return cache[window]
  try:
    value, used = _DECODER.raw_decode(window)
    outcome = ("ok", value, used)
  except RecursionError:
    outcome = ("fail",)
  except json.JSONDecodeError as err:
    cut = err.pos >= len(window) - 16 or err.msg.startswith("Unterminated string")
    outcome = ("cut",) if cut else ("fail",)
  except ValueError:  # int() over 4300 digits: a longer window cannot fix it.
    outcome = ("fail",)
  cache[window] = outcome
  return outcome


def _decode_at(text: str, start: int, budget: list[int], cache: dict[str, tuple]) -> tuple[Any, int] | None:
  """`raw_decode` of the JSON value at `text[start]`, on a growing window; None when it does not parse.

  Why a window: `JSONDecodeError` computes the error's line number by counting newlines from the start of the
  document, so decoding in place makes every failed start cost O(start): quadratic with many starts. On a window
  the cost is O(window); the window doubles only while the failure may come from the cut itself.
  `budget[0]` counts the characters still allowed to be copied into windows for this response; when it runs out the
  value counts as unparseable (only adversarial inputs get there: it bounds the time on any string).
  """
  size = 64
  while True:
    end = min(len(text), start + size)
    if end - start > budget[0]:
      return None
    budget[0] -= end - start
    outcome = _window_outcome(text[start:end], cache)
    if outcome[0] == "ok":
      return outcome[1], start + outcome[2]
    if outcome[0] == "fail" or end == len(text):
      return None
    size *= 2


def _strict_inputs(text: str) -> list[Any]:
  """JSON values decoded at each `Action Input:` whose first non-space character is `{`.

  Non-overlapping like the regex: after a successful decode the scan resumes at the end of the decoded value, so an
  `Action Input:` inside a string of a previous input is not read again.
  """
  values = []
  budget = [16 * len(text) + (1 << 20)]
  cache: dict[str, tuple] = {}
  pos = 0
  while True:
    match = _STRICT_START_RE.search(text, pos)
    if match is None:
      return values
    decoded = _decode_at(text, match.end(), budget, cache)
    if decoded is None:
      pos = match.start() + 1
    else:
      values.append(decoded[0])
      pos = decoded[1]


def extract_action_inputs(response: str, strict: bool = False) -> dict[str, Any]:
  """The predicted input dicts merged with `dict.update`, unparseable (or non-object) inputs skipped."""
  merged: dict[str, Any] = {}
  if strict:
    values = _strict_inputs(response)
  else:
    values = []
    parsed: dict[str, Any] = {}  # Repeated blocks are decoded once (a response may repeat one call 10^4 times).
    for block in _regex_input_blocks(response):
      if block not in parsed:
        try:
          parsed[block] = json.loads(block)
        except (ValueError, RecursionError):
          parsed[block] = None
      if parsed[block] is not None:
        values.append(parsed[block])
  for value in values:
    if isinstance(value, dict):
      merged.update(value)
  return merged


def parse_gold(answer: str) -> tuple[list[str], dict[str, Any]]:
  """Gold actions and merged gold inputs from the row's `answer` (a JSON list of {"Action", "Action_Input"}).

  Raises ValueError when `answer` is not a JSON list of objects with a string "Action" (the loader validates rows
  with this; the reward catches it and scores 0).
  """
  steps = json.loads(answer)
  if not isinstance(steps, list):
    raise ValueError(f"tool-use answer must be a JSON list, got {type(steps).__name__}")
  actions, merged = [], {}
  for k, step in enumerate(steps):
    if not isinstance(step, dict) or not isinstance(step.get("Action"), str):
      raise ValueError(f"tool-use answer step {k} must be an object with a string 'Action', got {step!r:.200}")
    actions.append(step["Action"])
    raw = step.get("Action_Input", "{}")
    try:
      value = json.loads(raw) if isinstance(raw, str) else raw
    except (ValueError, RecursionError):
      value = {}  # As SDPO: an unparseable gold input contributes nothing.
    if isinstance(value, dict):
      merged.update(value)
  return actions, merged


def tooluse_reward(response: str, answer: str, strict: bool = False) -> float:
  """1.0 iff the action multisets match and the merged input dicts match, else 0.0. Never raises.

  response: the model's text. answer: the row's gold JSON string. strict: decode inputs with a real JSON parser
  (nested objects work) instead of the paper's non-greedy regex.
  """
  try:
    gold_actions, gold_inputs = parse_gold(answer)
    if collections.Counter(extract_actions(response)) != collections.Counter(gold_actions):
      return 0.0
    return 1.0 if extract_action_inputs(response, strict=strict) == gold_inputs else 0.0
  except Exception:  # pylint: disable=broad-except  # a reward must never crash the trainer
    return 0.0
