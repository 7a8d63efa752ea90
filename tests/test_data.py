"""Benchmark loaders, validation, prompt rendering, the download table and the stats CLI.

The benchmark files are found at $SRPO_DATA_DIR or ../shared/data next to the repository (fixture `data_dir`); when
absent these tests fail under CI=true and are skipped elsewhere.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from srpo_jax.data import benchmarks, download, prompts, stats
from srpo_jax.data.benchmarks import DataError, DataFileMissing, Row

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPECTED_ROWS = {
    ("chemistry", "train"): 1890, ("chemistry", "test"): 210,
    ("physics", "train"): 720, ("physics", "test"): 80,
    ("biology", "train"): 450, ("biology", "test"): 50,
    ("material", "train"): 841, ("material", "test"): 94,
    ("tooluse", "test"): 68,
}


@pytest.fixture(scope="session")
def data_dir() -> Path:
  """The benchmark data directory: $SRPO_DATA_DIR, else ../shared/data beside the repo. FAIL under CI=true."""
  candidates = [os.environ.get("SRPO_DATA_DIR"), str(REPO_ROOT.parent / "shared" / "data")]
  for candidate in candidates:
    if candidate and (Path(candidate) / "chemistry" / "test.json").is_file():
      return Path(candidate)
  reason = f"benchmark data not found (looked at $SRPO_DATA_DIR and {candidates[1]})"
  if os.environ.get("CI", "").lower() == "true":
    pytest.fail(reason + "; CI=true requires it")
  pytest.skip(reason)


@pytest.fixture(scope="module")
def tokenizer():
  tokenizer_module = pytest.importorskip("srpo_jax.tokenizer", reason="srpo_jax.tokenizer not available")
  return tokenizer_module.load_tokenizer()


# ----------------------------------------------------------------------------------------------------------------
# Loading the real files
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("task", "split"), sorted(EXPECTED_ROWS))
def test_row_counts_and_fields(data_dir, task, split):
  rows = benchmarks.load_split(task, split, data_dir)
  assert len(rows) == EXPECTED_ROWS[(task, split)]
  assert rows.skipped == ()
  assert all(r.task == task and r.split == split for r in rows)
  if task == "tooluse":
    assert all(r.kind == "tooluse" and r.system is None for r in rows)
    assert sorted(r.idx for r in rows) == list(range(4046, 4114))  # SOURCES.md: test idx 4046..4113
  else:
    assert all(r.kind == "mcq" and r.answer in "ABCD" and r.system.startswith("\n") for r in rows)


@pytest.mark.parametrize("task", benchmarks.SCIENCE_TASKS)
def test_train_test_disjoint(data_dir, task):
  train = {r.idx for r in benchmarks.load_split(task, "train", data_dir)}
  test = {r.idx for r in benchmarks.load_split(task, "test", data_dir)}
  assert not train & test


def test_tooluse_train_missing_says_so(tmp_path):
  with pytest.raises(DataFileMissing) as err:
    benchmarks.load_split("tooluse", "train", tmp_path)
  msg = str(err.value)
  assert "tooluse/train" in msg and str(tmp_path / "tooluse" / "train.json") in msg
  assert "python -m srpo_jax.data.download" in msg and "not in the shared offline copy" in msg


def test_missing_file_names_task_split_path(tmp_path):
  with pytest.raises(DataFileMissing) as err:
    benchmarks.load_split("physics", "test", tmp_path)
  msg = str(err.value)
  assert "physics/test" in msg and str(tmp_path / "physics" / "test.json") in msg
  assert "python -m srpo_jax.data.download" in msg and "--tasks physics" in msg


def test_unknown_task_or_split():
  with pytest.raises(ValueError, match="unknown task 'chem'"):
    benchmarks.split_path("/x", "chem", "train")
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    benchmarks.split_path("/x", "physics", "dev")


def test_resolve_data_dir_order(monkeypatch, tmp_path):
  monkeypatch.setenv("SRPO_DATA_DIR", str(tmp_path / "env"))
  assert benchmarks.resolve_data_dir(str(tmp_path / "cfg")) == tmp_path / "cfg"
  assert benchmarks.resolve_data_dir(None) == tmp_path / "env"
  monkeypatch.delenv("SRPO_DATA_DIR")
  monkeypatch.delenv("SRPO_CACHE_DIR", raising=False)  # the one cache root (srpo_jax.paths) honours it first
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  assert benchmarks.resolve_data_dir(None) == tmp_path / "cache" / "srpo_jax" / "data"
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert benchmarks.resolve_data_dir("") == Path.home() / ".cache" / "srpo_jax" / "data"


# ----------------------------------------------------------------------------------------------------------------
# Validation of malformed rows
# ----------------------------------------------------------------------------------------------------------------

_GOOD_MCQ = {"idx": 1, "kind": "mcq", "dataset": "sciknoweval", "answer": "B", "prompt": "Q?", "system": "\nS"}
_GOOD_TOOL = {"idx": 5, "kind": "tooluse", "answer": '[{"Action": "f", "Action_Input": "{}"}]', "prompt": "P",
              "system": None}


def _write_lines(path: Path, lines: list[str]) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return path


def _mcq(**changes) -> str:
  obj = dict(_GOOD_MCQ, **changes)
  return json.dumps({k: v for k, v in obj.items() if v is not ...})


@pytest.mark.parametrize(("bad_line", "reason"), [
    ('{"idx": 2, "kind": "mcq", ', "bad JSON"),
    (_mcq(idx=2, answer="E"), "'answer' must be one of"),
    (_mcq(idx=2, answer="a"), "'answer' must be one of"),
    (_mcq(idx=2, prompt=...), "missing field 'prompt'"),
    (_mcq(idx=2, system=...), "missing field 'system'"),
    (_mcq(idx=2, kind="tooluse"), "'kind' must be 'mcq'"),
    (_mcq(idx="2"), "'idx' must be an integer"),
    (_mcq(idx=1), "duplicate idx 1"),
    ("[1, 2]", "expected a JSON object"),
])
def test_malformed_mcq_row_raises_with_file_and_line(tmp_path, bad_line, reason):
  path = _write_lines(tmp_path / "chemistry" / "train.json", [_mcq(), "", bad_line, _mcq(idx=3)])
  with pytest.raises(DataError) as err:
    benchmarks.load_split("chemistry", "train", tmp_path)
  assert str(err.value).startswith(f"{path}:3: chemistry/train: ")  # line 2 is blank and ignored
  assert reason in str(err.value)
  skipped = benchmarks.load_split("chemistry", "train", tmp_path, on_error="skip")
  assert [r.idx for r in skipped] == [1, 3]
  assert len(skipped.skipped) == 1 and skipped.skipped[0].startswith(f"{path}:3:")


@pytest.mark.parametrize(("answer", "reason"), [
    ("not json", "not valid JSON"),
    ('{"Action": "f"}', "non-empty JSON list"),
    ("[]", "non-empty JSON list"),
    ('[{"Action": "f"}]', "string 'Action_Input'"),
    ('[{"Action": 3, "Action_Input": "{}"}]', "string 'Action'"),
    ('["f"]', "must be an object"),
])
def test_malformed_tooluse_answer(tmp_path, answer, reason):
  bad = json.dumps(dict(_GOOD_TOOL, idx=6, answer=answer))
  path = _write_lines(tmp_path / "tooluse" / "test.json", [json.dumps(_GOOD_TOOL), bad])
  with pytest.raises(DataError, match=re.escape(f"{path}:2: tooluse/test: ") + ".*" + re.escape(reason)):
    benchmarks.load_split("tooluse", "test", tmp_path)
  loaded = benchmarks.load_split("tooluse", "test", tmp_path, on_error="skip")
  assert [r.idx for r in loaded] == [5] and len(loaded.skipped) == 1


def test_on_error_value_checked(tmp_path):
  _write_lines(tmp_path / "physics" / "test.json", [_mcq()])
  with pytest.raises(ValueError, match="on_error"):
    benchmarks.load_split("physics", "test", tmp_path, on_error="ignore")


def test_rows_are_frozen():
  row = Row(idx=0, kind="mcq", answer="A", prompt="p", system="s", task="physics", split="test")
  with pytest.raises(AttributeError):
    row.answer = "B"  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------------------------
# Messages and rendering
# ----------------------------------------------------------------------------------------------------------------

CHEMISTRY_TEST_ROW0_SYSTEM = (
    '\n'
    'Given a question and four options, please select the right answer. Respond in the following format:\n'
    '<reasoning>\n'
    '...\n'
    '</reasoning>\n'
    '<answer>\n'
    '...\n'
    '</answer>\n'
    '\n'
    'For the answer, only output the letter corresponding to the correct option (A, B, C, or D), and '
    'nothing else. Do not restate the answer text. For example, if the answer is "A", just output:\n'
    '<answer>\n'
    'A\n'
    '</answer>\n'
)
CHEMISTRY_TEST_ROW0_PROMPT = (
    'Which of the following molecules is the only correct reactant used in the synthesis of the product '
    '"Nc1ccn(Cc2ccc(Cl)cc2C(F)(F)F)n1" ?\n'
    '\n'
    'A: O=C1c2ccccc2C(=O)N1c1ccn(Cc2ccc(Cl)cc2C(F)(F)F)n1\n'
    'B: O=C1c2ccccc2C(Cl)N1c1ccc2ccc(Cl)nc2n1\n'
    'C: O=C1c2ccccc2C(=O)N1Cc1ccc(Oc2ccc(Cl)c(C(F)(F)F)c2)cc1\n'
    'D: O=C1c2ccccc2C(=O)N1CC=C(Cc1ccccc1)C(F)(F)F\n'
    'Please reason step by step.'
)
TOOLUSE_TEST_ROW0_PROMPT = (
    "Your task is to answer the user's question using available tools. \n"
    'You have access to the following tools:\n'
    'Name: Axolotl\n'
    'Description: Collection of axolotl pictures and facts\n'
    'Documentation:\n'
    'getRandomAxolotlImage: Retrieve a random axolotl image with information on the image source.\n'
    'Parameters: {}\n'
    'Output: Successful response.\n'
    ' - Format: application/json\n'
    ' - Structure: Object{url, source, description}\n'
    'searchAxolotlImages: Search for axolotl images based on specific criteria such as color, gender, '
    'and size.\n'
    'Parameters: {"color": "string. One of: [wild, leucistic, albino]. The color of the axolotl (e.g., '
    '\'wild\', \'leucistic\', \'albino\', etc.).", "gender": "string. One of: [male, female]. The gender of '
    'the axolotl (\'male\', \'female\').", "size": "string. One of: [small, medium, large]. The size of the '
    'axolotl (\'small\', \'medium\', \'large\').", "page": "integer. The page number for pagination '
    'purposes."}\n'
    'Output: Successful response.\n'
    ' - Format: application/json\n'
    ' - Structure: Object{results: Array[Object{url, source, description}], pagination: '
    'Object{current_page, total_pages, total_results}}\n'
    'getAxolotlFacts: Retrieve interesting facts about axolotls such as their habits, habitats, and '
    'physical characteristics.\n'
    'Parameters: {"category": "string. One of: [habits, habitat, physical characteristics]. The category '
    'of facts to retrieve (e.g., \'habits\', \'habitat\', \'physical characteristics\').", "limit": "integer. '
    'The maximum number of facts to return."}\n'
    'Output: Successful response.\n'
    ' - Format: application/json\n'
    ' - Structure: Array[Object{fact, source}]\n'
    '\n'
    'Use the following format:\n'
    'Thought: you should always think about what to do\n'
    'Action: the action to take, should be one of the tool names.\n'
    'Action Input: the input to the action, must be in JSON format. All of the action input must be '
    'realistic and from the user.\n'
    '\n'
    'Begin!\n'
    'Question: Hey, can you show me a random picture of an axolotl?'
)
# Qwen3 chat template, thinking off (spec "Prompts"), written out literally.
EXPECTED_CHEMISTRY_RENDER = ("<|im_start|>system\n" + CHEMISTRY_TEST_ROW0_SYSTEM + "<|im_end|>\n<|im_start|>user\n"
                             + CHEMISTRY_TEST_ROW0_PROMPT
                             + "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
EXPECTED_TOOLUSE_RENDER = ("<|im_start|>user\n" + TOOLUSE_TEST_ROW0_PROMPT
                           + "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_first_rows_are_the_frozen_ones(data_dir):
  chem = benchmarks.load_split("chemistry", "test", data_dir).rows[0]
  assert (chem.idx, chem.answer) == (1522, "A")
  assert chem.system == CHEMISTRY_TEST_ROW0_SYSTEM and chem.prompt == CHEMISTRY_TEST_ROW0_PROMPT
  tool = benchmarks.load_split("tooluse", "test", data_dir).rows[0]
  assert tool.idx == 4046 and tool.prompt == TOOLUSE_TEST_ROW0_PROMPT
  assert json.loads(tool.answer) == [{"Action": "getRandomAxolotlImage", "Action_Input": "{}"}]


def test_build_messages():
  science = Row(idx=0, kind="mcq", answer="A", prompt="Q", system="\nSYS", task="physics", split="test")
  assert prompts.build_messages(science) == [{"role": "system", "content": "\nSYS"}, {"role": "user", "content": "Q"}]
  assert prompts.build_messages(science, tooluse_system_prompt=True) == prompts.build_messages(science)
  tool = Row(idx=0, kind="tooluse", answer="[]", prompt="T", system=None, task="tooluse", split="test")
  assert prompts.build_messages(tool) == [{"role": "user", "content": "T"}]
  assert prompts.build_messages(tool, tooluse_system_prompt=True) == [
      {"role": "system", "content": "You are a tool-use assistant. Solve each request by reasoning about the task "
                                    "and calling the provided tools when needed.\nUse only the tools provided in the "
                                    "user message.\nFollow the required response format exactly."},
      {"role": "user", "content": "T"}]


def test_rendered_strings_frozen(data_dir, tokenizer):
  chem = benchmarks.load_split("chemistry", "test", data_dir).rows[0]
  tool = benchmarks.load_split("tooluse", "test", data_dir).rows[0]
  assert prompts.render_messages(tokenizer, prompts.build_messages(chem)) == EXPECTED_CHEMISTRY_RENDER
  assert prompts.render_messages(tokenizer, prompts.build_messages(tool)) == EXPECTED_TOOLUSE_RENDER


def test_render_prompts_drops_and_never_truncates(data_dir, tokenizer):
  rows = benchmarks.load_split("physics", "test", data_dir).rows
  full = [tokenizer.encode(prompts.render_messages(tokenizer, prompts.build_messages(r)), add_special_tokens=False)
          for r in rows]
  limit = sorted(len(ids) for ids in full)[len(full) // 2]  # the median: about half are dropped
  out = prompts.render_prompts(rows, tokenizer, max_prompt_tokens=limit)
  expected_kept = [(r, ids) for r, ids in zip(rows, full) if len(ids) <= limit]
  assert out.dropped == len(rows) - len(expected_kept) > 0
  assert out.rows == [r for r, _ in expected_kept]
  assert out.ids == [ids for _, ids in expected_kept]  # whole prompts, never cut
  assert set(out.dropped_idx) == {r.idx for r, ids in zip(rows, full) if len(ids) > limit}
  everything = prompts.render_prompts(rows, tokenizer)
  assert everything.dropped == 0 and everything.ids == full
  assert full[0][-5:] == tokenizer.encode("<|im_start|>assistant\n<think>\n\n</think>\n\n")[-5:]


# ----------------------------------------------------------------------------------------------------------------
# Download table and verification (offline)
# ----------------------------------------------------------------------------------------------------------------


def _sources_table(data_dir: Path) -> dict[str, tuple[str, str, int | None, int]]:
  """local -> (repo path, sha, bytes, rows) parsed from SOURCES.md (its table and the MISSING section)."""
  text = (data_dir / "SOURCES.md").read_text(encoding="utf-8")
  table = {}
  for m in re.finditer(r"^\| (\S+\.json) \| (\S+)(?: \([^|]*\))? \| ([0-9a-f]{40}) \| (\d+) \| (\d+) \|$", text, re.M):
    table[m[1]] = (m[2], m[3], int(m[4]), int(m[5]))
  missing = re.search(r"`(datasets/tooluse/train\.json)` is in the tree at this commit \(blob `([0-9a-f]{40})`", text)
  table["tooluse/train.json"] = (missing[1], missing[2], None, 4046)
  assert download.COMMIT in text
  return table


def test_download_table_matches_sources_md(data_dir):
  table = _sources_table(data_dir)
  assert len(table) == 14
  ours = {f.local: (f.upstream, f.sha, f.size if f.size >= 0 else None, f.rows) for f in download.FILES}
  assert ours == table
  for f in download.FILES:
    assert f.url == f"https://raw.githubusercontent.com/lasgroup/SDPO/{download.COMMIT}/{f.upstream}"


def test_git_blob_sha1_known_values():
  assert download.git_blob_sha1(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's empty blob
  assert download.git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_every_present_file_hashes_to_its_sha(data_dir):
  entries = download.select(with_full=True)
  present = [e for e in entries if (data_dir / e.local).is_file()]
  assert len(present) >= 13
  assert download.verify_dir(data_dir, present) == []
  for e in present:
    if e.size >= 0:
      assert (data_dir / e.local).stat().st_size == e.size


def test_modified_copy_fails_verification(data_dir, tmp_path, capsys):
  entry = next(e for e in download.FILES if e.local == "physics/test.json")
  target = tmp_path / "physics" / "test.json"
  target.parent.mkdir()
  content = (data_dir / entry.local).read_bytes()
  target.write_bytes(content)
  assert download.verify_file(tmp_path, entry) is None
  target.write_bytes(content.replace(b'"answer":"A"', b'"answer":"B"', 1))
  msg = download.verify_file(tmp_path, entry)
  assert msg is not None and str(target) in msg and entry.sha in msg
  assert download.main(["--data-dir", str(tmp_path), "--tasks", "physics", "--verify-only"]) == 1
  assert str(target) in capsys.readouterr().err
  target.write_bytes(content)
  (tmp_path / "physics" / "train.json").write_bytes((data_dir / "physics" / "train.json").read_bytes())
  assert download.main(["--data-dir", str(tmp_path), "--tasks", "physics", "--verify-only"]) == 0


def test_fetch_checks_hash_and_writes_atomically(data_dir, tmp_path, monkeypatch):
  """urlopen is replaced: no network. A wrong payload is rejected and leaves nothing behind."""
  entry = next(e for e in download.FILES if e.local == "biology/test.json")
  payload = {"bytes": (data_dir / entry.local).read_bytes()}
  seen_urls = []

  class _Response:
    def __enter__(self):
      return self

    def __exit__(self, *args):
      return False

    def read(self):
      return payload["bytes"]

  def fake_urlopen(url, timeout):
    seen_urls.append(url)
    return _Response()

  monkeypatch.setattr(download.urllib.request, "urlopen", fake_urlopen)
  payload_ok = payload["bytes"]
  payload["bytes"] = payload_ok[:-10]
  with pytest.raises(download.ChecksumError, match=re.escape(entry.url)):
    download.fetch(entry, tmp_path)
  assert not (tmp_path / entry.local).exists() and not list(tmp_path.rglob("*.tmp"))
  payload["bytes"] = payload_ok
  assert download.fetch(entry, tmp_path) == tmp_path / entry.local
  assert (tmp_path / entry.local).read_bytes() == payload_ok
  assert seen_urls == [entry.url, entry.url]
  assert download.main(["--data-dir", str(tmp_path), "--tasks", "biology"]) == 1  # train.json: bad payload
  assert len(seen_urls) == 3  # test.json was present and correct: not fetched again


def test_stats_summary_and_cli(data_dir, capsys):
  import numpy as np
  s = stats.summarize(np.arange(1, 101), max_prompt_tokens=95)
  assert (s["rows"], s["max"], s["over"]) == (100, 100, 5)
  assert s["p50"] == pytest.approx(50.5) and s["p99"] == pytest.approx(99.01)
  pytest.importorskip("srpo_jax.tokenizer")
  assert stats.main(["--data-dir", str(data_dir), "--tasks", "biology"]) == 0
  out = capsys.readouterr().out
  assert re.search(r"biology/train\s+450\s", out) and re.search(r"biology/test\s+50\s", out)
