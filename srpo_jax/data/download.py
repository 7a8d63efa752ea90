"""Fetches the benchmark files from the SDPO repository at a pinned commit and verifies their git blob hashes.

    python -m srpo_jax.data.download [--data-dir D] [--tasks chemistry tooluse ...] [--with-full] [--verify-only]

Every file is checked against the git blob SHA-1 (`sha1(b"blob <len>\\0" + content)`, what `git hash-object` prints)
listed in `FILES` (copied from the data directory's SOURCES.md) before it is written, atomically (temporary file in the
same directory, then rename). Files already present and correct are not fetched again. `--verify-only` checks an
existing directory and fetches nothing. Exit status 1 when any file is missing or wrong.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Sequence

from srpo_jax.data.benchmarks import TASKS, resolve_data_dir

REPO = "lasgroup/SDPO"
COMMIT = "0e6d5106abe69f578c63bf38a9394e22905c8773"
RAW_URL = f"https://raw.githubusercontent.com/{REPO}/{COMMIT}/"


@dataclasses.dataclass(frozen=True)
class DataFile:
  """local: path under the data dir. upstream: path in the SDPO repo. sha: git blob SHA-1. size: bytes.
  rows: row count. full: the pre-split `<domain>.json` arrays (not used by the loaders; fetched with --with-full)."""
  local: str
  upstream: str
  sha: str
  size: int
  rows: int
  full: bool = False

  @property
  def task(self) -> str:
    return self.local.split("/")[0]

  @property
  def url(self) -> str:
    return RAW_URL + self.upstream


_SKE = "datasets/sciknoweval"
FILES: tuple[DataFile, ...] = (
    DataFile("biology/train.json", f"{_SKE}/biology/train.json", "cbf2bc599eaf09c1384bcf0fd0737dc73885ae1c", 605352, 450),
    DataFile("biology/test.json", f"{_SKE}/biology/test.json", "166c4562910c235a50d28bb75a01e454784e746a", 66613, 50),
    DataFile("biology/biology.json", f"{_SKE}/biology.json", "eb3ba01d99b86928807daaf3c81f2407fd3ea9ec", 673468, 500,
             full=True),
    DataFile("chemistry/train.json", f"{_SKE}/chemistry/train.json", "2c4cb4fcb22f7a18770d3c75b2e858dca0186668",
             2227709, 1890),
    DataFile("chemistry/test.json", f"{_SKE}/chemistry/test.json", "7356e65b1a803710460e941cc7b471dc473e34b7", 244955,
             210),
    DataFile("chemistry/chemistry.json", f"{_SKE}/chemistry.json", "3bdde936a6c370369c4b7104afce62e513419cd9",
             2478967, 2100, full=True),
    DataFile("material/train.json", f"{_SKE}/material/train.json", "848767d48095b4c08fed315b07f96003c458e9ab", 1715905,
             841),
    DataFile("material/test.json", f"{_SKE}/material/test.json", "b90ab6a44daf9ea929b70946a29b0e506d03ec41", 185646,
             94),
    DataFile("material/material.json", f"{_SKE}/material.json", "df834bca5702184c9d80d94950ee79d9746c1802", 1884433,
             935, full=True),
    DataFile("physics/train.json", f"{_SKE}/physics/train.json", "afc03776fbbbc39ab1f496bc3be9a8e2b001e1f9", 1030282,
             720),
    DataFile("physics/test.json", f"{_SKE}/physics/test.json", "b1f4875ed5e25f37d30958e7b70a0d1f210f4cf3", 116111, 80),
    DataFile("physics/physics.json", f"{_SKE}/physics.json", "e34ce8e6140efab572047768d80d12c9e9dedd95", 1144618, 800,
             full=True),
    # Size not recorded in SOURCES.md (the shared copy lacks this file): -1 = unknown, only the hash is checked.
    DataFile("tooluse/train.json", "datasets/tooluse/train.json", "b3f1449172a9a98389c03d38f83ab2795426d7f8", -1, 4046),
    DataFile("tooluse/test.json", "datasets/tooluse/test.json", "64ef17062731ece73d034c4a28cebdf2afe061bb", 475880, 68),
)


class ChecksumError(ValueError):
  """A file's git blob hash differs from the table; the message names the file and both hashes."""


def git_blob_sha1(content: bytes) -> str:
  """What `git hash-object` prints for a file with these bytes."""
  return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def select(tasks: Sequence[str] | None = None, with_full: bool = False) -> list[DataFile]:
  """The table entries for `tasks` (all when None); pre-split `<domain>.json` files only with `with_full`."""
  for task in tasks or ():
    if task not in TASKS:
      raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
  return [f for f in FILES if (tasks is None or f.task in tasks) and (with_full or not f.full)]


def check_content(entry: DataFile, content: bytes, where: str) -> None:
  """Raises ChecksumError naming `where` unless `content` hashes to the entry's blob SHA-1."""
  got = git_blob_sha1(content)
  if got != entry.sha:
    raise ChecksumError(f"{where}: git blob sha1 {got} != expected {entry.sha} for {entry.upstream} @ {COMMIT[:7]} "
                        f"({len(content)} bytes; expected {entry.size if entry.size >= 0 else 'unknown'})")


def verify_file(data_dir: Path, entry: DataFile) -> str | None:
  """None if `<data_dir>/<entry.local>` is present and correct, else a message naming the file."""
  path = Path(data_dir) / entry.local
  if not path.is_file():
    return f"{path}: missing"
  try:
    check_content(entry, path.read_bytes(), str(path))
  except ChecksumError as err:
    return str(err)
  return None


def verify_dir(data_dir: Path, entries: Sequence[DataFile]) -> list[str]:
  """Messages for every missing or wrong file among `entries` (empty when all are fine)."""
  return [msg for msg in (verify_file(data_dir, e) for e in entries) if msg is not None]


def write_atomic(path: Path, content: bytes) -> None:
  """Writes via a temporary file in the same directory and a rename, so a crash never leaves a partial file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(content)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def fetch(entry: DataFile, data_dir: Path, timeout_s: float = 120.0) -> Path:
  """Downloads one file, checks its hash, writes it atomically; returns its path."""
  with urllib.request.urlopen(entry.url, timeout=timeout_s) as response:  # noqa: S310 (fixed https URL)
    content = response.read()
  check_content(entry, content, entry.url)
  path = Path(data_dir) / entry.local
  write_atomic(path, content)
  return path


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m srpo_jax.data.download", description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", default=None,
                      help="target directory (default: $SRPO_DATA_DIR, else ~/.cache/srpo_jax/data)")
  parser.add_argument("--tasks", nargs="+", choices=TASKS, default=None, help="default: all five")
  parser.add_argument("--with-full", action="store_true", help="also the pre-split <domain>.json arrays")
  parser.add_argument("--verify-only", action="store_true", help="check the files present; fetch nothing")
  args = parser.parse_args(argv)
  data_dir = resolve_data_dir(args.data_dir)
  entries = select(args.tasks, args.with_full)
  if args.verify_only:
    problems = verify_dir(data_dir, entries)
    for msg in problems:
      print(f"FAIL {msg}", file=sys.stderr)
    print(f"{data_dir}: {len(entries) - len(problems)}/{len(entries)} files verified")
    return 1 if problems else 0
  failed = 0
  for entry in entries:
    if verify_file(data_dir, entry) is None:
      print(f"ok (present) {entry.local}")
      continue
    try:
      fetch(entry, data_dir)
      print(f"fetched {entry.local}")
    except (OSError, ChecksumError) as err:
      failed += 1
      print(f"FAIL {entry.local}: {err}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
