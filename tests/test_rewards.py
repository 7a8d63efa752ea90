"""Rewards (spec "Rewards"): every spec case, the non-greedy quirk on the real test set, and robustness properties."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import srpo_jax.rewards as rewards_pkg
from srpo_jax.data import benchmarks
from srpo_jax.rewards import mcq_reward, tooluse_reward
from srpo_jax.rewards import tooluse as tooluse_mod
from tests.test_data import data_dir  # noqa: F401  (the shared data-dir fixture)

# ----------------------------------------------------------------------------------------------------------------
# Multiple choice
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("response", "answer", "reward"), [
    ("<reasoning>...</reasoning>\n<answer>\nB\n</answer>", "B", 1.0),  # the format the system prompt asks for
    ("<answer>B</answer>", "B", 1.0),
    ("<answer> B </answer>", "B", 1.0),  # stripped
    ("<answer>A</answer> then <answer>B</answer>", "B", 1.0),  # the LAST <answer> counts
    ("<answer>B</answer> then <answer>A</answer>", "B", 0.0),
    ("<answer>B</answer></answer>C</answer>", "B", 1.0),  # up to the NEXT </answer>
    ("<answer>b</answer>", "B", 0.0),  # exact, case-sensitive
    ("<answer>B.</answer>", "B", 0.0),
    ("<answer>B) liquid</answer>", "B", 0.0),
    ("<answer>B</answer>", "A", 0.0),
    ("<answer>\nB", "B", 1.0),  # no closing tag: to the end (SDPO's split semantics)
    ("B", "B", 1.0),  # no tag at all: the whole text (SDPO's split semantics; no format reward)
    ("The answer is B", "B", 0.0),
    ("", "B", 0.0),
    ("<answer></answer>", "B", 0.0),
    ("<answer><answer>B</answer>", "B", 1.0),
])
def test_mcq_cases(response, answer, reward):
  assert mcq_reward(response, answer) == reward


def _sdpo_mcq(response: str, answer: str) -> float:
  """The SDPO code's extraction (verl/utils/reward_score/feedback/mcq.py), as an independent reference."""
  return float(response.split("<answer>")[-1].split("</answer>")[0].strip() == answer)


_MCQ_ALPHABET = st.sampled_from(["<answer>", "</answer>", "A", "B", " ", "\n", "<", ">", "/", "answer", "x", "\u00a0"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_MCQ_ALPHABET, max_size=30).map("".join), st.sampled_from("ABCD"))
def test_mcq_matches_sdpo_split_semantics(response, answer):
  assert mcq_reward(response, answer) == _sdpo_mcq(response, answer)


# ----------------------------------------------------------------------------------------------------------------
# Tool use
# ----------------------------------------------------------------------------------------------------------------


def _gold(*steps: tuple[str, dict | str]) -> str:
  return json.dumps([{"Action": a, "Action_Input": i if isinstance(i, str) else json.dumps(i)} for a, i in steps])


GOLD_ONE = _gold(("getWeather", {"city": "Paris", "days": 3}))
GOLD_TWO = _gold(("search", {"q": "cats"}), ("getPage", {"page": 2}))


@pytest.mark.parametrize(("response", "gold", "reward"), [
    ('Thought: x\nAction: getWeather\nAction Input: {"city": "Paris", "days": 3}', GOLD_ONE, 1.0),
    ('Action: getWeather\nAction Input: {"days": 3, "city": "Paris"}', GOLD_ONE, 1.0),  # dict equality, any order
    ('Action:getWeather\nAction Input:{"city": "Paris", "days": 3}', GOLD_ONE, 1.0),  # \s* may be empty
    ('Action: getWeather\nAction Input: {"city": "Paris", "days": "3"}', GOLD_ONE, 0.0),  # types matter
    ('Action: getWeather\nAction Input: {"city": "Paris"}', GOLD_ONE, 0.0),
    ('Action: getWeather\nAction Input: {"city": "Paris", "days": 3, "x": 1}', GOLD_ONE, 0.0),
    ('Action: getWeatherX\nAction Input: {"city": "Paris", "days": 3}', GOLD_ONE, 0.0),
    ('Action: getWeather\nAction: getWeather\nAction Input: {"city": "Paris", "days": 3}', GOLD_ONE, 0.0),  # multiset
    ('Action Input: {"city": "Paris", "days": 3}', GOLD_ONE, 0.0),  # no action
    ('Action: getWeather\nAction Input: city=Paris', GOLD_ONE, 0.0),
    # merge with dict.update: the later call's value wins
    ('Action: getWeather\nAction Input: {"city": "Rome", "days": 3}\nAction Input: {"city": "Paris"}', GOLD_ONE, 1.0),
    ('Action: getWeather\nAction Input: {"city": "Paris", "days": 3}\nAction Input: {"city": "Rome"}', GOLD_ONE, 0.0),
    # an unparseable input is skipped, the others still merge
    ('Action: getWeather\nAction Input: {city: Paris}\nAction Input: {"city": "Paris", "days": 3}', GOLD_ONE, 1.0),
    # action multiset: order free, counts exact; inputs merged across calls
    ('Action: getPage\nAction Input: {"page": 2}\nAction: search\nAction Input: {"q": "cats"}', GOLD_TWO, 1.0),
    ('Action: search\nAction Input: {"q": "cats", "page": 2}\nAction: getPage\nAction Input: {}', GOLD_TWO, 1.0),
    ('Action: search\nAction Input: {"q": "cats"}', GOLD_TWO, 0.0),
    # "Action Input:" is not an "Action:" match, and \w+ stops at the first non-word character
    ('Action: search(q)\nAction Input: {"q": "cats"}\nAction: getPage\nAction Input: {"page": 2}', GOLD_TWO, 1.0),
    ('anything', "not json", 0.0),  # a malformed gold scores 0 instead of raising
    ('Action: f\nAction Input: {}', '{"Action": "f"}', 0.0),
    ('Action: f\nAction Input: {}', _gold(("f", "{not json")), 1.0),  # unparseable gold input contributes {}
])
def test_tooluse_cases(response, gold, reward):
  assert tooluse_reward(response, gold) == reward


NESTED_GOLD = _gold(("updateProfile", {"id": "u1", "profile": {"url": "https://x/y.jpg"}}))
NESTED_RESPONSE = 'Action: updateProfile\nAction Input: {"id": "u1", "profile": {"url": "https://x/y.jpg"}}'


def test_nested_input_quirk_and_strict_variant():
  # The non-greedy regex cuts at the first "}": '{"id": "u1", "profile": {"url": "https://x/y.jpg"}' does not parse.
  assert tooluse_mod.extract_action_inputs(NESTED_RESPONSE) == {}
  assert tooluse_reward(NESTED_RESPONSE, NESTED_GOLD) == 0.0
  assert tooluse_reward(NESTED_RESPONSE, NESTED_GOLD, strict=True) == 1.0
  assert tooluse_reward(NESTED_RESPONSE.replace("y.jpg", "z.jpg"), NESTED_GOLD, strict=True) == 0.0
  # Strict reads a JSON object after the colon, followed by anything, and skips non-objects.
  flat = 'Action: getWeather\nAction Input: {"city": "Paris", "days": 3} trailing text\nAction Input: [1, 2]'
  assert tooluse_reward(flat, GOLD_ONE, strict=True) == 1.0
  # An "Action Input:" inside a decoded string value is not read again (scan resumes after the decoded object).
  inner = 'Action: getWeather\nAction Input: {"city": "Paris", "days": 3, "note": "Action Input: {\\"x\\": 1}"}'
  assert tooluse_mod.extract_action_inputs(inner, strict=True) == {"city": "Paris", "days": 3,
                                                                   "note": 'Action Input: {"x": 1}'}


def _render_gold(answer: str) -> str:
  """The gold answer written as a perfect response, one Action / Action Input pair per step."""
  return "".join(f"Action: {s['Action']}\nAction Input: {s['Action_Input']}\n" for s in json.loads(answer))


def _has_nested_object(answer: str) -> bool:
  for step in json.loads(answer):
    value = json.loads(step["Action_Input"])
    if isinstance(value, dict) and any(isinstance(v, dict) for v in value.values()):
      return True
  return False


def test_gold_as_response_on_tooluse_test_set(data_dir):  # noqa: F811
  """Spec: the non-greedy regex cannot parse nested objects. On the 68 test items the gold answer written as a
  response scores 1 except for the items whose gold input nests an object (idx 4072, 4079): 0 under the default
  scorer. Strict parsing rescues 4072; 4079 still scores 0 because its gold action '[Optional]updateUserProfile'
  is not matched by `Action:\\s*(\\w+)` (in either mode)."""
  rows = benchmarks.load_split("tooluse", "test", data_dir).rows
  nested = {r.idx for r in rows if _has_nested_object(r.answer)}
  assert nested == {4072, 4079}
  default = {r.idx: tooluse_reward(_render_gold(r.answer), r.answer) for r in rows}
  strict = {r.idx: tooluse_reward(_render_gold(r.answer), r.answer, strict=True) for r in rows}
  assert {i for i, v in default.items() if v == 0.0} == nested
  assert {i for i, v in strict.items() if v == 0.0} == {4079}
  assert sum(strict.values()) - sum(default.values()) == 1


# ----------------------------------------------------------------------------------------------------------------
# Equivalence of the linear-time scan with the reference regex, and robustness
# ----------------------------------------------------------------------------------------------------------------

_TOOL_FRAGMENTS = ["Action:", "Action Input:", "Action", " Input:", "{", "}", '"a"', '"b"', ":", ",", "1", "[", "]",
                   " ", "\n", "\t", "\u2003", "x", '"', "\\", "null", "{}", '{"a": 1}', '{"a": {"b": 2}}', "getX",
                   '"' + "v" * 70 + '"', "9" * 70, '{"k": "' + "w" * 60]  # long ones cross the 64-char window
_tool_text = st.lists(st.sampled_from(_TOOL_FRAGMENTS), max_size=40).map("".join)


@settings(max_examples=400, deadline=None)
@given(_tool_text)
def test_input_scan_equals_reference_regex(text):
  reference = re.findall(r"Action Input:\s*({.*?})", text, re.DOTALL)
  assert tooluse_mod._regex_input_blocks(text) == reference  # pylint: disable=protected-access


def _reference_strict_inputs(text: str) -> dict:
  """Strict reference: raw_decode at every non-overlapping `Action Input:` whose next non-space char is `{`."""
  merged, pos, decoder = {}, 0, json.JSONDecoder()
  while (m := re.compile(r"Action Input:\s*(?=\{)").search(text, pos)) is not None:
    pos = m.start() + 1
    try:
      value, end = decoder.raw_decode(text, m.end())
    except ValueError:
      continue
    if isinstance(value, dict):
      merged.update(value)
      pos = end
  return merged


@settings(max_examples=300, deadline=None)
@given(_tool_text)
def test_strict_scan_equals_plain_raw_decode(text):
  assert tooluse_mod.extract_action_inputs(text, strict=True) == _reference_strict_inputs(text)


def test_strict_long_values_cross_the_window():
  """Values longer than the first 64-character window, strings included, still decode (the window grows)."""
  long_value = {"k": "v" * 5000, "n": list(range(300)), "o": {"p": "q" * 700}}
  response = "Action: f\nAction Input: " + json.dumps(long_value) + "\nObservation: ..."
  assert tooluse_reward(response, _gold(("f", long_value)), strict=True) == 1.0
  assert tooluse_reward(response, _gold(("f", long_value))) == 0.0  # nested "o" defeats the regex


def _big_strings():
  """Strings of 0.5 to 1 MB: a random prefix, then a random small pattern repeated, then a random suffix.
  Repetition builds the adversarial shapes (many `Action Input: {`, deep nesting, long runs of one character)."""
  fragments = _TOOL_FRAGMENTS + ["<answer>", "</answer>", "A", "<think>", "</think>", "{" * 50, "[" * 50, "9" * 50,
                                 'Action Input: {"a": 1}\n', "Action: getWeather\n", 'Action Input: {"a": "',
                                 "Action Input: {", 'Action Input: {"city": "Paris", "days": 3}']
  piece = st.lists(st.sampled_from(fragments), min_size=1, max_size=12).map("".join)
  return st.tuples(piece, piece, piece, st.integers(1 << 19, 1 << 20)).map(
      lambda t: t[0] + t[1] * max(1, t[3] // len(t[1])) + t[2])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(_big_strings(), st.sampled_from(["A", "B", GOLD_ONE, NESTED_GOLD, '[{"Action": "Action", "Action_Input": "{}"}]']))
def test_rewards_never_raise_and_are_fast_on_big_strings(response, gold):
  assert len(response) <= (1 << 20) + 1000
  for fn in (lambda: mcq_reward(response, gold), lambda: tooluse_reward(response, gold),
             lambda: tooluse_reward(response, gold, strict=True),
             lambda: tooluse_mod.extract_action_inputs(response),
             lambda: tooluse_mod.extract_action_inputs(response, strict=True)):
    start = time.process_time()  # CPU time: other processes on the shared machine do not count
    result = fn()
    elapsed = time.process_time() - start
    # A guard against super-linear blow-ups (the quadratic regex takes minutes here), not a speed target: the
    # linear code needs a few ms, and a loaded 2-core machine must not flake it.
    assert elapsed < 1.0, f"{elapsed * 1e3:.1f} ms on a {len(response)}-character string"
    assert result in (0.0, 1.0) or isinstance(result, dict)


@pytest.mark.parametrize(("response", "inputs"), [
    ("Action Input: {" * 70_000, {}),  # the quadratic case of the plain non-greedy regex
    ("Action Input: {\"" * 70_000, {}),
    ("{" * 1_000_000, {}),
    ("Action Input: {\"a\": " + "[" * 1_000_000 + "}", {}),  # RecursionError inside json
    ("Action Input: {\"a\": " + "1" * 1_000_000 + "}", {}),  # int() digit limit
    ("Action:" + " " * 1_000_000, {}),
    ("<answer>" * 125_000, {}),
    ('Action Input: {"a": 1}\n' * 45_000, {"a": 1}),  # 45k identical calls: each distinct text decoded once
    ('Action Input: {"a": {"b": "' * 40_000, {}),
])
def test_rewards_adversarial_strings(response, inputs):
  gold = '[{"Action": "a", "Action_Input": "{\\"a\\": 1}"}]'
  for strict in (False, True):
    start = time.process_time()
    assert tooluse_reward(response, gold, strict=strict) == 0.0  # no "Action: a" in any of them
    assert tooluse_mod.extract_action_inputs(response, strict=strict) == inputs
    assert time.process_time() - start < 2.0  # super-linear guard (quadratic: minutes), not a speed target
  assert mcq_reward(response, "A") == 0.0


@pytest.mark.parametrize("bad", [None, 3, b"<answer>A</answer>", ["A"]])
def test_rewards_never_raise_on_wrong_types(bad):
  assert mcq_reward(bad, "A") == 0.0  # type: ignore[arg-type]
  assert tooluse_reward(bad, GOLD_ONE) == 0.0  # type: ignore[arg-type]
  assert tooluse_reward("Action: f", bad) == 0.0  # type: ignore[arg-type]


def test_rewards_package_never_evaluates_code():
  package_dir = Path(rewards_pkg.__file__).parent
  sources = sorted(package_dir.glob("*.py"))
  assert len(sources) >= 3
  for path in sources:
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"\b(eval|exec)\s*\(", text), f"{path} calls eval/exec"
    assert "import subprocess" not in text and "os.system" not in text


def test_reward_for_kind_dispatch():
  assert rewards_pkg.reward_for_kind("mcq", "<answer>C</answer>", "C") == 1.0
  assert rewards_pkg.reward_for_kind("tooluse", NESTED_RESPONSE, NESTED_GOLD, strict_tooluse=True) == 1.0
  with pytest.raises(ValueError, match="unknown row kind 'math'"):
    rewards_pkg.reward_for_kind("math", "", "")
