"""The five SRPO benchmarks (SDPO's copies of SciKnowEval chemistry/physics/biology/material and ToolAlpaca tool use).

Files live under a data directory as `<task>/<split>.json` (see `resolve_data_dir`); the split files are JSON Lines
despite their extension (one object per line, as written by HF `Dataset.to_json`). Every row is validated; a bad row
raises `DataError` naming the file and the 1-based line number (bytes that are not UTF-8 and JSON nested too deeply
to decode included), or is skipped and counted with `on_error="skip"`. A split with no usable row is a `DataError`.
Where the files come from and their hashes: `srpo_jax.data.download` and the data directory's SOURCES.md.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterator, Literal

SCIENCE_TASKS = ("chemistry", "physics", "biology", "material")
TASKS = SCIENCE_TASKS + ("tooluse",)
SPLITS = ("train", "test")
MCQ_LETTERS = ("A", "B", "C", "D")
ENV_DATA_DIR = "SRPO_DATA_DIR"

OnError = Literal["raise", "skip"]


@dataclasses.dataclass(frozen=True)
class Row:
  """One question.

  idx: the dataset's own id (train and test ids are disjoint). kind: "mcq" (answer is one of A-D) or "tooluse"
  (answer is a JSON list of {"Action", "Action_Input"} steps). prompt: the user message. system: the system message
  (science rows carry one that starts with a newline; tool-use rows have None). task/split: where it was loaded from.
  dataset: the source's `dataset` field ("sciknoweval", "tooluse", "synthetic/<family>").
  """
  idx: int
  kind: str
  answer: str
  prompt: str
  system: str | None
  task: str
  split: str
  dataset: str = ""


@dataclasses.dataclass(frozen=True)
class Split:
  """The rows of one `<task>/<split>.json`, plus the rows skipped under `on_error="skip"` ("path:line: reason")."""
  task: str
  split: str
  path: Path
  rows: tuple[Row, ...]
  skipped: tuple[str, ...] = ()

  def __len__(self) -> int:
    return len(self.rows)

  def __iter__(self) -> Iterator[Row]:
    return iter(self.rows)


class DataError(ValueError):
  """A malformed row (the message starts with `path:line:`) or a split with no usable rows (`path:`)."""


class DataFileMissing(FileNotFoundError):
  """A split file is absent; the message names the task, split and path and says how to fetch it."""


def default_cache_dir() -> Path:
  """Per-user cache: `srpo_jax.paths.data_cache_dir()` (`$SRPO_CACHE_DIR/data`, else `$XDG_CACHE_HOME/srpo_jax/data`,
  else `~/.cache/srpo_jax/data`)."""
  from srpo_jax import paths  # the one cache root
  return paths.data_cache_dir()


def resolve_data_dir(configured: str | os.PathLike | None) -> Path:
  """The configured directory if given, else env `SRPO_DATA_DIR`, else the per-user cache directory."""
  if configured:
    return Path(configured).expanduser()
  env = os.environ.get(ENV_DATA_DIR)
  if env:
    return Path(env).expanduser()
  return default_cache_dir()


def split_path(data_dir: str | os.PathLike | None, task: str, split: str) -> Path:
  """`<data_dir>/<task>/<split>.json`, checking the names."""
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  return resolve_data_dir(data_dir) / task / f"{split}.json"


def required_data_files(task: str) -> tuple[str, ...]:
  """The files `task` reads, relative to the data directory (the layout of `split_path`); () for the generated
  synthetic task."""
  if task == "synthetic":
    return ()
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS + ('synthetic',)}")
  return tuple(f"{task}/{split}.json" for split in SPLITS)


def _missing_message(task: str, split: str, path: Path) -> str:
  msg = (f"{task}/{split} data file not found: {path}. Fetch it with "
         f"`python -m srpo_jax.data.download --data-dir {path.parent.parent} --tasks {task}` "
         f"(or point --data-dir / ${ENV_DATA_DIR} at a directory that has it).")
  if (task, split) == ("tooluse", "train"):
    msg += (" Note: tooluse/train.json (4046 rows, ~28 MB, git blob b3f1449172a9a98389c03d38f83ab2795426d7f8) is "
            "not in the shared offline copy of the data (see its SOURCES.md); the download needs internet access.")
  return msg


def _validate_tooluse_answer(answer: str) -> None:
  """The gold must be a JSON list of objects with string "Action" and "Action_Input" (a JSON string)."""
  try:
    steps = json.loads(answer)
  except ValueError as err:
    raise ValueError(f"'answer' is not valid JSON ({err})") from None
  if not isinstance(steps, list) or not steps:
    raise ValueError(f"'answer' must be a non-empty JSON list of steps, got {answer[:80]!r}")
  for k, step in enumerate(steps):
    if not isinstance(step, dict):
      raise ValueError(f"'answer' step {k} must be an object, got {step!r:.80}")
    for key in ("Action", "Action_Input"):
      if not isinstance(step.get(key), str):
        raise ValueError(f"'answer' step {k} needs a string {key!r}, got {step.get(key)!r:.80}")


def _require_encodable(key: str, text: str) -> None:
  """JSON's `\\ud800` escape decodes to a lone surrogate: a str that is not text, which the tokenizer refuses with a
  bare TypeError. Caught here, at row validation, it is a row error like any other (named, skippable)."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as err:
    raise ValueError(f"{key!r} holds a lone surrogate U+{ord(text[err.start]):04X} at character {err.start + 1} "
                     "(a JSON \\u escape that is not a character)") from None


def parse_row(obj: object, task: str, split: str) -> Row:
  """Validates one decoded JSON object and returns its Row; raises ValueError naming the bad field."""
  if not isinstance(obj, dict):
    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
  for key in ("idx", "kind", "answer", "prompt"):
    if key not in obj:
      raise ValueError(f"missing field {key!r}")
  idx = obj["idx"]
  if not isinstance(idx, int) or isinstance(idx, bool):
    raise ValueError(f"'idx' must be an integer, got {idx!r:.80}")
  want_kind = "tooluse" if task == "tooluse" else "mcq"
  if obj["kind"] != want_kind:
    raise ValueError(f"'kind' must be {want_kind!r} for task {task!r}, got {obj['kind']!r:.80}")
  prompt, answer, system = obj["prompt"], obj["answer"], obj.get("system")
  if not isinstance(prompt, str) or not prompt.strip():
    raise ValueError(f"'prompt' must be a non-empty string, got {prompt!r:.80}")
  if not isinstance(answer, str):
    raise ValueError(f"'answer' must be a string, got {answer!r:.80}")
  if system is not None and not isinstance(system, str):
    raise ValueError(f"'system' must be a string or null, got {system!r:.80}")
  for key, text in (("prompt", prompt), ("system", system), ("answer", answer)):
    if text is not None:
      _require_encodable(key, text)
  if want_kind == "mcq":
    if answer not in MCQ_LETTERS:
      raise ValueError(f"'answer' must be one of {MCQ_LETTERS} for an mcq row, got {answer!r:.80}")
    if system is None:
      raise ValueError("missing field 'system' (science rows carry their system prompt)")
  else:
    _validate_tooluse_answer(answer)
  return Row(idx=idx, kind=want_kind, answer=answer, prompt=prompt, system=system, task=task, split=split,
             dataset=str(obj.get("dataset", "")))


def _decode_line(raw: bytes) -> object:
  """One line's JSON value; ValueError for bytes that are not UTF-8, bad JSON, or nesting Python cannot recurse into."""
  try:
    line = raw.decode("utf-8")
  except UnicodeDecodeError as err:  # decoded per line, so one bad byte names its line and can be skipped
    raise ValueError(f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})") from None
  try:
    return json.loads(line)
  except ValueError as err:
    raise ValueError(f"bad JSON ({err})") from None


def read_jsonl(path: Path, task: str, split: str, on_error: OnError = "raise") -> Split:
  """Reads and validates a JSON Lines split file. Blank lines are ignored; duplicate `idx` values are errors."""
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
  rows, skipped, seen = [], [], set()
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      try:
        try:
          obj = _decode_line(raw)
          row = parse_row(obj, task, split)
        except RecursionError:  # json.loads (of the line or a tool-use answer) or a repr of a very deep value
          raise ValueError("JSON nested too deeply") from None
        if row.idx in seen:
          raise ValueError(f"duplicate idx {row.idx}")
      except ValueError as err:
        where = f"{path}:{lineno}: {task}/{split}: {err}"
        if on_error == "raise":
          raise DataError(where) from None
        skipped.append(where)
        continue
      seen.add(row.idx)
      rows.append(row)
  return Split(task=task, split=split, path=path, rows=tuple(rows), skipped=tuple(skipped))


def load_split(task: str, split: str, data_dir: str | os.PathLike | None = None,
               on_error: OnError = "raise") -> Split:
  """Loads `<task>/<split>.json` from the resolved data directory (see `resolve_data_dir`); DataError if no row is
  usable (an empty file, or every row skipped)."""
  path = split_path(data_dir, task, split)
  if not path.is_file():
    raise DataFileMissing(_missing_message(task, split, path))
  loaded = read_jsonl(path, task, split, on_error=on_error)
  if not loaded.rows:  # never train or evaluate on nothing (an evaluation over 0 questions would report 0.0)
    why = (f"all {len(loaded.skipped)} rows were skipped under data.on_error=skip (first: {loaded.skipped[0]})"
           if loaded.skipped else "the file has no rows")
    raise DataError(f"{path}: {task}/{split}: the split is empty: {why}")
  return loaded
