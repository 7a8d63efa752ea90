"""Training checkpoints with Orbax, their integrity, and the run directory's lock.

Layout (orbax `CheckpointManager`): `<dir>/<step>/state/` (arrays: any pytree, optax states and `nnx.State`
included; the trainer saves params, optimizer state and the EMA teacher), `<dir>/<step>/meta/` (JSON; the trainer
saves the step, the data position, counters, accuracies, the seed, wall time and the config that made the run) and
`<dir>/<step>/integrity.json` (the step and the size and SHA-256 of every file written). No RNG state is saved: the
trainer's randomness is a function of (seed, step), so a resumed run redraws the same numbers.

Saves are synchronous and atomic: orbax writes into `<step>.orbax-checkpoint-tmp-*`, the integrity record is
written into it once everything else is on disk, and it is renamed to `<step>` (`_RenameWithIntegrity`). A crash at
any point leaves the previous step as the newest one; the unfinished temporary directory is removed when the next
`Checkpointer` opens the directory. A step directory without its record (an interrupted copy, another writer) is
reported and set aside at restore. Nothing that is not finite is ever written (`save` checks every
floating leaf first), and a save that would not fit on the disk is refused before anything is written.

    ckpt = Checkpointer(cfg.checkpoint_dir, keep=cfg.checkpoint.keep)
    ckpt.save(step, {"params": p, "opt_state": opt_state, "teacher": t}, meta={"step": step, ...})
    found = ckpt.restore_newest_intact(abstract_state)   # abstract: arrays or jax.ShapeDtypeStruct
    ckpt.close()

Restore verifies the integrity record (a flipped byte, a truncated or missing file, an empty directory: a
`CorruptCheckpoint` naming the path), then checks the stored tree against the target (keys, shapes, dtypes) and names
the step directory and the dotted key of any mismatch; arrays come back bitwise equal, with the target's dtypes and
shardings. `restore_newest_intact` falls back from a corrupt newest checkpoint to the newest intact one and moves the
corrupt ones aside to `<dir>.bad/` (kept for inspection, out of the way of the resumed run's own saves).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import atomicity

PyTree = Any
log = logging.getLogger("srpo_jax")

INTEGRITY_FILE = "integrity.json"
INTEGRITY_VERSION = 1
# Written by orbax's finalize after the record (a commit marker and a timestamp: no state); not in the record.
_FINALIZE_FILES = frozenset({"commit_success.txt", "_CHECKPOINT_METADATA"})
LOCK_FILE = ".lock"
_NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device": also how tensorstore reports it, as text


class CheckpointError(ValueError):
  """A missing checkpoint, or one whose contents do not match the restore target."""


class CorruptCheckpoint(CheckpointError):
  """A checkpoint that cannot be trusted: no integrity record, a file missing or changed, an unreadable meta record.
  `Checkpointer.restore_newest_intact` falls back to an older checkpoint on this error (and on this one only)."""


class NonFiniteError(RuntimeError):
  """A parameter, optimizer-state or teacher leaf holds NaN/inf where it would be saved, EMA'd or exported."""


class RunDirInUse(RuntimeError):
  """Another live process holds the run directory's lock."""


class ConfigChanged(CheckpointError):
  """A resume whose config differs from the checkpoint's in fields that change what is computed."""


class Restored(NamedTuple):
  step: int
  state: PyTree
  meta: dict[str, Any]
  skipped: list[tuple[str, str]]  # (path, reason) of each newer checkpoint that was corrupt, moved aside


class Checkpointer:
  """Keeps the last `keep` step checkpoints under `directory`; save/restore a (state pytree, JSON meta) pair.

  Every process of a multi-host run must call save/restore (orbax coordinates the writes; the primary host writes
  the integrity record in orbax's finalize, process 0 moves corrupt checkpoints aside).
  """

  def __init__(self, directory: str | os.PathLike, keep: int = 3):
    if keep < 1:
      raise ValueError(f"Checkpointer: keep={keep} must be >= 1")
    self.directory = os.path.abspath(os.fspath(directory))
    self.bad_directory = self.directory + ".bad"
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=False,  # The trainer saves between steps; simple beats overlapped here.
        create=True,
        cleanup_tmp_directories=True,  # Remove the leftovers of a save that crashed before its final rename.
        temporary_path_class=_RenameWithIntegrity,  # the record goes in before the step directory appears
    )
    # Naming the item handlers lets a fresh manager (a resumed process) read item metadata before any restore.
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    self._mgr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def all_steps(self) -> list[int]:
    """Step directories, ascending (read when the manager opened, updated by its own saves); an intact one holds
    its integrity record (`verify`)."""
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> Optional[int]:
    """The newest step directory, or None when there is none (`restore_newest_intact` checks it is intact)."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state_pytree: PyTree, meta: Mapping[str, Any], force: bool = False) -> bool:
    """Writes `state_pytree` and `meta` as checkpoint `step`, then its integrity record; drops the oldest beyond
    `keep`.

    Returns False (and writes nothing) when `step` is already saved — the trainer's final save can coincide with a
    periodic one; True otherwise. `force` saves even where orbax's save policy would skip the step.
    Raises, before anything is written: TypeError naming the key if `meta` is not JSON-serialisable;
    NonFiniteError naming the leaf if a floating leaf of `state_pytree` holds NaN/inf; CheckpointError saying
    "No space left on device" with the path when the state does not fit in the free space (the same one-line
    error when the disk fills during the write). The previous checkpoints are kept in every case.
    """
    meta = dict(meta)
    _check_json(meta)
    if step in self.all_steps():
      return False
    where = f"checkpoint {step} ({self.step_dir(step)})"
    require_finite(state_pytree, f"refusing to save {where}; the previous checkpoints are kept "
                                 f"(newest: {self.latest_step()})")
    self._check_space(step)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state_pytree), meta=ocp.args.JsonSave(meta))
    absl_log = logging.getLogger("absl")
    absl_log.addFilter(_no_space_record)  # orbax's writer threads log the error we report in one line below
    _quiet_abandoned_writes()
    try:
      saved = self._mgr.save(step, args=args, force=force)
      self._mgr.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - re-raised; a full disk gets one clear line instead of orbax's chain
      if _is_no_space(e):
        for name in os.listdir(self.directory):  # give the space back: orbax's unfinished temporary directory
          if name.startswith(f"{step}.orbax-checkpoint-tmp"):
            shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        raise CheckpointError(f"{self.step_dir(step)}: {_NO_SPACE} while saving checkpoint {step} "
                              f"({_free_gb(self.directory)} free); the previous checkpoints are kept (newest: "
                              f"{self.latest_step()})") from None
      raise
    finally:
      absl_log.removeFilter(_no_space_record)
    return bool(saved)

  def _check_space(self, step: int) -> None:
    """Refuses a save that cannot fit. The estimate is the newest checkpoint's size on disk: the same tree, written
    the same way (orbax compresses, so the arrays' own bytes over-count: 0.157 GB for a 0.11 GB tiny checkpoint).
    Without a checkpoint there is no estimate that could not refuse a save that fits; the write reports a full disk
    in one line all the same."""
    newest = self.latest_step()
    if newest is None:
      return
    need = sum(_file_size(os.path.join(d, n)) for d, _, names in os.walk(self.step_dir(newest)) for n in names)
    free = shutil.disk_usage(self.directory).free
    if need > free:
      raise CheckpointError(f"{self.step_dir(step)}: {_NO_SPACE}: checkpoint {step} needs about "
                            f"{need / 1e9:.3f} GB (checkpoint {newest}'s size), {free / 1e9:.3f} GB free; nothing "
                            f"written, the previous checkpoints are kept (newest: {newest})")

  def verify(self, step: int) -> None:
    """Raises CorruptCheckpoint naming the path unless checkpoint `step` matches its integrity record: the record
    exists and names this step, and every file it lists has its size and SHA-256."""
    step_dir = self.step_dir(step)
    path = os.path.join(step_dir, INTEGRITY_FILE)
    if not os.path.isfile(path):
      what = "an empty directory" if os.path.isdir(step_dir) and not os.listdir(step_dir) else "no integrity record"
      raise CorruptCheckpoint(f"checkpoint {step_dir!r}: {what} ({INTEGRITY_FILE} missing: an interrupted copy, "
                              "or a directory not written by this version of the trainer)")
    try:
      with open(path) as f:
        record = json.load(f)
      files, stored_step, version = dict(record["files"]), record["step"], record.get("version", 1)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise CorruptCheckpoint(f"checkpoint {step_dir!r}: unreadable {INTEGRITY_FILE}: {type(e).__name__}: {e}") from e
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
      raise CorruptCheckpoint(f"checkpoint {step_dir!r}: {INTEGRITY_FILE} has format version {version!r}, not a "
                              "positive integer")
    if version > INTEGRITY_VERSION:  # not corrupt, so no fallback to an older one: a newer srpo_jax wrote it
      raise CheckpointError(f"checkpoint {step_dir!r}: {INTEGRITY_FILE} has format version {version}, newer than "
                            f"this srpo_jax reads ({INTEGRITY_VERSION}): resume it with the version that wrote it")
    if stored_step != step:
      raise CorruptCheckpoint(f"checkpoint {step_dir!r}: {INTEGRITY_FILE} is for step {stored_step!r}, not {step} "
                              "(a checkpoint directory copied or renamed by hand?)")
    if not files:
      raise CorruptCheckpoint(f"checkpoint {step_dir!r}: {INTEGRITY_FILE} lists no files")
    actual = _digests(step_dir, sorted(files))
    bad = [(rel, want, actual.get(rel)) for rel, want in sorted(files.items()) if actual.get(rel) != want]
    if bad:
      rel, want, got = bad[0]
      why = "is missing" if got is None else (
          f"has {got['size']} bytes, {want['size']} were written" if got["size"] != want["size"]
          else "has a different SHA-256 than was written (its bytes changed)")
      raise CorruptCheckpoint(f"checkpoint {step_dir!r}: file {rel!r} {why}; {len(bad)} of {len(files)} files "
                              f"differ from {INTEGRITY_FILE}")

  def read_meta(self, step: int) -> dict[str, Any]:
    """The verified meta record of checkpoint `step` (CorruptCheckpoint when it is not intact or not an object)."""
    self._require_step(step)
    self.verify(step)
    try:
      meta = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for an unreadable item
      raise CorruptCheckpoint(f"checkpoint {self.step_dir(step)!r}: meta unreadable: {type(e).__name__}: {e}") from e
    if not isinstance(meta, Mapping):
      raise CorruptCheckpoint(f"checkpoint {self.step_dir(step)!r}: meta is a {type(meta).__name__}, not an object")
    return dict(meta)

  def restore(self, step: int, abstract_state: PyTree, verify: bool = True) -> tuple[PyTree, dict[str, Any]]:
    """Loads checkpoint `step` into the structure, dtypes and shardings of `abstract_state`.

    Args:
      step: a step in `all_steps()`.
      abstract_state: the target pytree; leaves are arrays or `jax.ShapeDtypeStruct` (with `sharding` to place
        the restored arrays; without one they land on the default device). `jax.eval_shape` output works.
      verify: check the integrity record first (False: it was just checked, e.g. by `read_meta`).
    Returns:
      (state, meta): the state pytree with the target's tree structure, and the JSON meta dict.
    Raises:
      CorruptCheckpoint naming the path of a checkpoint that does not match its integrity record, or whose restored
      state holds NaN/inf (naming the leaf); CheckpointError naming both versions for a record of a newer format;
      CheckpointError naming the step directory and the dotted key of a missing/extra leaf or a shape/dtype
      mismatch, or listing the available steps when `step` does not exist.
    """
    self._require_step(step)
    if verify:
      self.verify(step)
    target = jax.tree.map(_abstract_leaf, abstract_state)
    step_dir = self.step_dir(step)
    try:
      stored = self._mgr.item_metadata(step)["state"]
    except Exception as e:  # noqa: BLE001
      raise CorruptCheckpoint(f"checkpoint {step_dir!r}: state metadata unreadable: {type(e).__name__}: {e}") from e
    _check_against_metadata(step_dir, stored, target)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
    try:
      restored = self._mgr.restore(step, args=args)
    except Exception as e:  # noqa: BLE001
      raise CorruptCheckpoint(f"checkpoint {step_dir!r}: unreadable: {type(e).__name__}: {e}") from e
    # Nothing non-finite is ever saved (`save`), so NaN/inf here means data damaged under a record that matches it
    # (e.g. one regenerated by hand): as corrupt as a failed checksum.
    try:
      require_finite(restored.state, f"checkpoint {step_dir!r} restored non-finite values, which are never saved")
    except NonFiniteError as e:
      raise CorruptCheckpoint(str(e)) from None
    return restored.state, dict(restored.meta)

  def restore_newest_intact(self, abstract_state: PyTree,
                            check_meta: Optional[Callable[[int, dict[str, Any]], None]] = None) -> Restored:
    """The newest checkpoint that is intact, its meta accepted by `check_meta(step, meta)` (which raises
    CorruptCheckpoint for a meta record it cannot use, any other error to stop), restored into `abstract_state`.

    Each newer corrupt checkpoint is logged with its path and reason, and moved to `<dir>.bad/` once an intact
    one is found (the resumed run then saves those steps afresh). Raises CheckpointError listing every checkpoint
    and why when none is intact, or when there is none.
    """
    skipped: list[tuple[str, str]] = []
    for step in reversed(self.all_steps()):
      try:
        meta = self.read_meta(step)
        if check_meta is not None:
          check_meta(step, meta)
        state, _ = self.restore(step, abstract_state, verify=False)
      except CorruptCheckpoint as e:
        log.warning("%s; trying the previous checkpoint", e)
        skipped.append((self.step_dir(step), str(e)))
        continue
      for path, _ in skipped:
        self._move_aside(path)
      if skipped:
        log.warning("resuming from the newest intact checkpoint %s (step %d); %d newer corrupt checkpoint(s) moved "
                    "to %s", self.step_dir(step), step, len(skipped), self.bad_directory)
      return Restored(step, state, meta, skipped)
    if not skipped:
      raise CheckpointError(f"no checkpoint in {self.directory!r}")
    raise CorruptCheckpoint(f"no intact checkpoint in {self.directory!r}: "
                            + "; ".join(reason for _, reason in skipped))

  def _require_step(self, step: int) -> None:
    steps = self.all_steps()
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} at {self.step_dir(step)!r}; available steps: {steps}")

  def _move_aside(self, path: str) -> None:
    """Renames a corrupt step directory into `<dir>.bad/` (kept for inspection, never deleted)."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"srpo_jax checkpoint move aside {path}")
    if jax.process_index() == 0 and os.path.exists(path):
      os.makedirs(self.bad_directory, exist_ok=True)
      dest = os.path.join(self.bad_directory, f"{os.path.basename(path)}-{time.strftime('%Y%m%d-%H%M%S')}")
      while os.path.exists(dest):
        dest += "+"
      os.rename(path, dest)
      log.warning("moved corrupt checkpoint %s to %s", path, dest)
    self._mgr.reload()

  def close(self) -> None:
    self._mgr.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def describe_newest(directory: str | os.PathLike) -> str:
  """One line naming the newest step directory under `directory` with an integrity record (what a resume would try
  first), read from the file system alone: for error messages of a process that is stopping."""
  directory = os.fspath(directory)
  try:
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()
             and os.path.isfile(os.path.join(directory, n, INTEGRITY_FILE))]
  except OSError:
    steps = []
  if not steps:
    return f"No complete checkpoint in {directory}"
  return f"The newest complete checkpoint is {os.path.join(directory, str(max(steps)))}"


# ---------------------------------------------------------------------------------------------------------------------
# Integrity records
# ---------------------------------------------------------------------------------------------------------------------
def _files_under(root: str) -> list[str]:
  out = []
  for d, _, names in os.walk(root):
    out += [os.path.relpath(os.path.join(d, n), root) for n in names]
  return sorted(r for r in out if r != INTEGRITY_FILE and r not in _FINALIZE_FILES)


def _digest(path: str) -> dict[str, Any]:
  h, size = hashlib.sha256(), 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      h.update(chunk)
      size += len(chunk)
  return {"size": size, "sha256": h.hexdigest()}


def _digests(root: str, rels: list[str]) -> dict[str, dict[str, Any]]:
  """{relative path: size and SHA-256} of the files that exist (hashlib releases the GIL: files hash in parallel)."""
  rels = [r for r in rels if os.path.isfile(os.path.join(root, r))]
  with concurrent.futures.ThreadPoolExecutor(min(8, max(1, len(rels)))) as pool:
    return dict(zip(rels, pool.map(lambda r: _digest(os.path.join(root, r)), rels)))


class _RenameWithIntegrity(atomicity.AtomicRenameTemporaryPath):
  """Orbax's atomic rename of a step directory, with the integrity record written into the temporary directory just
  before it is renamed: a step directory is never seen without its record (a kill at any point leaves either the
  previous checkpoint as the newest, or the new one complete). Item directories inside pass through unchanged."""

  async def finalize(self):
    final = os.fspath(self.get_final())
    if os.path.basename(final).isdigit():  # the step directory (its items are finalised before it)
      await asyncio.to_thread(_write_integrity, os.fspath(self.get()), int(os.path.basename(final)))
    await super().finalize()


def _write_integrity(step_dir: str, step: int) -> None:
  """Writes `<step_dir>/integrity.json`: the step and every file's size and SHA-256 (temporary name, renamed)."""
  record = {"version": INTEGRITY_VERSION, "step": step, "files": _digests(step_dir, _files_under(step_dir))}
  tmp = os.path.join(step_dir, INTEGRITY_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.rename(tmp, os.path.join(step_dir, INTEGRITY_FILE))


def _is_no_space(e: BaseException) -> bool:
  """Whether `e` or anything in its cause/context chain is ENOSPC (tensorstore reports it as text)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or _NO_SPACE in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def _file_size(path: str) -> int:
  try:
    return os.path.getsize(path)
  except OSError:
    return 0


def _no_space_record(record: logging.LogRecord) -> bool:
  """A logging filter: False (drop) for a record about a full disk, which `Checkpointer.save` reports itself."""
  text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info and record.exc_info[1] else "")
  return _NO_SPACE not in text


_ABANDONED = ("Event loop is closed", "sys.meta_path is None")
_hook_installed = False


def _quiet_abandoned_writes() -> None:
  """After a failed orbax write, the writes it abandoned still complete, into an event loop already closed (and at
  interpreter exit into a half torn-down interpreter): Python reports each as an unraisable exception, hundreds of
  tracebacks after the one error that matters, some before orbax's save even returns. From the first save on, those
  two messages alone are dropped."""
  global _hook_installed
  if _hook_installed:
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    e = unraisable.exc_value
    if isinstance(e, (RuntimeError, ImportError)) and any(m in str(e) for m in _ABANDONED):
      return
    previous(unraisable)
  sys.unraisablehook = hook
  _hook_installed = True


def _free_gb(directory: str) -> str:
  try:
    return f"{shutil.disk_usage(directory).free / 1e9:.3f} GB"
  except OSError:
    return "unknown"


# ---------------------------------------------------------------------------------------------------------------------
# Finite state: nothing non-finite is saved, EMA'd or exported
# ---------------------------------------------------------------------------------------------------------------------
@jax.jit
def _nonfinite_counts(leaves: list[jax.Array]) -> list[jax.Array]:
  return [jnp.count_nonzero(~jnp.isfinite(x)) for x in leaves]


def nonfinite_leaves(tree: PyTree) -> list[tuple[str, int, int]]:
  """(dotted path, non-finite count, size) of every floating leaf holding NaN/inf: one jitted reduction per leaf and
  one host transfer for the whole tree (integer and PRNG-key leaves cannot be non-finite)."""
  flat = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  if not flat:
    return []
  counts = jax.device_get(_nonfinite_counts([x for _, x in flat]))
  return [(_path_str(p), int(c), int(np.prod(x.shape))) for (p, x), c in zip(flat, counts) if c]


def require_finite(tree: PyTree, what: Union[str, Callable[[], str]]) -> None:
  """Raises NonFiniteError("<what>: <leaf> holds N NaN/inf of M values ...") when a floating leaf is not finite.
  `what` may be a callable, built only on failure (the train step calls this every step)."""
  bad = nonfinite_leaves(tree)
  if bad:
    path, count, size = bad[0]
    more = f" ({len(bad)} leaves affected: {[b[0] for b in bad[:5]]})" if len(bad) > 1 else ""
    what = what() if callable(what) else what
    raise NonFiniteError(f"{what}: {path} holds {count} NaN/inf of {size} values{more}")


# ---------------------------------------------------------------------------------------------------------------------
# Resume config check
# ---------------------------------------------------------------------------------------------------------------------
# Config fields (dotted, as `Config.to_dict()`) that may differ between a checkpoint and its resume: where things go,
# when to stop, evaluate or save, and how the same computation is laid out over memory and devices. Every other
# field (new ones included) changes what is computed and makes a resume refuse unless checkpoint.allow_config_change.
RESUME_SAFE_FIELDS = frozenset({
    "run_dir", "resume", "train.steps", "train.max_nonfinite_in_row", "train.time_budgets_h",
    "train.max_wall_time_h", "train.log_every", "train.warmstart_steps", "train.warmstart_lr",
    "checkpoint.every_steps", "checkpoint.keep", "checkpoint.export_hf", "checkpoint.allow_config_change",
    "eval.every_steps", "eval.at_start", "model.path", "model.remat", "model.attention", "data.data_dir",
    "rollout.sglang_url", "rollout.sglang_args", "rollout.sglang_python", "optim.micro_batch_tokens",
    "optim.micro_batch_size", "derived.micro_batch_size", "mesh.data", "mesh.fsdp", "mesh.tensor",
    "mesh.num_processes", "mesh.coordinator", "mesh.process_id",
})
_ABSENT = "<absent>"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    out.update(_flatten(v, key + ".") if isinstance(v, Mapping) else {key: v})
  return out


def config_changes(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
  """(field, checkpoint's value, current value) of each field outside RESUME_SAFE_FIELDS that differs, sorted;
  both are `Config.to_dict()` trees (the current one compared after a JSON round trip, as stored)."""
  old, new = _flatten(stored), _flatten(json.loads(json.dumps(current)))
  return [(k, old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in sorted(set(old) | set(new))
          if k not in RESUME_SAFE_FIELDS and old.get(k, _ABSENT) != new.get(k, _ABSENT)]


# ---------------------------------------------------------------------------------------------------------------------
# The run directory's lock
# ---------------------------------------------------------------------------------------------------------------------
_HELD: dict[str, list] = {}  # real path -> [open lock file, holders in this process]


class RunDirLock:
  """An exclusive `flock` on `<run_dir>/.lock` holding this process's pid, host and start time.

  A second process gets RunDirInUse naming the holder. The kernel drops the lock when its holder dies (SIGKILL
  included), so a stale lock never blocks a resume. Re-entrant within one process (flock is per open file: a
  process that builds a second Trainer on the same run_dir, e.g. after a failed one, must not lock itself out).
  """

  def __init__(self, run_dir: str | os.PathLike):
    os.makedirs(run_dir, exist_ok=True)
    self.path = os.path.realpath(os.path.join(os.fspath(run_dir), LOCK_FILE))
    self._released = False
    held = _HELD.get(self.path)
    if held is not None:
      held[1] += 1
      return
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      f.seek(0)
      holder = f.read().strip() or "an unknown process"
      f.close()
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      raise RunDirInUse(f"run_dir {os.path.dirname(self.path)!r} is in use by another run ({holder}; lock file "
                        f"{self.path}): wait for it to end, or choose another run_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _HELD[self.path] = [f, 1]

  def release(self) -> None:
    """Drops this holder; the lock goes when the last holder in the process releases it."""
    if self._released:
      return
    self._released = True
    held = _HELD.get(self.path)
    if held is None:
      return
    held[1] -= 1
    if held[1] == 0:
      del _HELD[self.path]
      fcntl.flock(held[0], fcntl.LOCK_UN)
      held[0].close()


# ---------------------------------------------------------------------------------------------------------------------
# Tree checks
# ---------------------------------------------------------------------------------------------------------------------
def _abstract_leaf(x: Any) -> Any:
  """Arrays -> ShapeDtypeStruct keeping the sharding; ShapeDtypeStructs and Python scalars pass through."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  if isinstance(x, np.ndarray):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return x


def _path_str(path: tuple) -> str:
  """('params', 'w') style key path -> "params.w" (dict keys, sequence indices and attribute names alike)."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return ".".join(parts)


def _stored_shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype] | None:
  """Shape and dtype as orbax stores a target leaf (typed PRNG keys are stored as their uint32 key data)."""
  if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
    return None
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    return tuple(data.shape), np.dtype(data.dtype)
  return tuple(leaf.shape), np.dtype(leaf.dtype)


def _check_against_metadata(step_dir: str, stored: PyTree, target: PyTree) -> None:
  """Same keys, shapes and dtypes in the checkpoint's metadata tree and the restore target, else CheckpointError."""
  have = {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
  want = {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(target)[0]}
  missing = sorted(set(want) - set(have))
  if missing:
    raise CheckpointError(f"checkpoint {step_dir!r} has no key {missing[0]!r} that the restore target expects "
                          f"({len(missing)} missing: {missing[:5]})")
  extra = sorted(set(have) - set(want))
  if extra:
    raise CheckpointError(f"checkpoint {step_dir!r} holds key {extra[0]!r} that the restore target lacks "
                          f"({len(extra)} extra: {extra[:5]}); tree structures differ")
  for key, leaf in want.items():
    expect = _stored_shape_dtype(leaf)
    meta = have[key]
    if expect is None or getattr(meta, "shape", None) is None:
      continue
    got = (tuple(meta.shape), np.dtype(meta.dtype))
    if got != expect:
      raise CheckpointError(f"checkpoint {step_dir!r}, key {key!r}: stored shape {got[0]} dtype {got[1]}, "
                            f"but the restore target has shape {expect[0]} dtype {expect[1]}")


def _check_json(meta: Mapping[str, Any], prefix: str = "meta") -> None:
  """Raises TypeError naming the first value JSON cannot hold (NaN/inf included: they are not JSON)."""
  for k, v in meta.items():
    path = f"{prefix}.{k}"
    if not isinstance(k, str):
      raise TypeError(f"{path}: JSON keys must be str, got {type(k).__name__}")
    if isinstance(v, Mapping):
      _check_json(v, path)
    elif isinstance(v, (list, tuple)):
      _check_json({str(i): x for i, x in enumerate(v)}, path)
    elif isinstance(v, float) and not math.isfinite(v):
      raise TypeError(f"{path}={v!r}: non-finite floats are not valid JSON")
    elif not (v is None or isinstance(v, (bool, int, float, str))):
      raise TypeError(f"{path}={v!r}: {type(v).__name__} is not JSON-serialisable; convert it first "
                      "(e.g. .item() / .tolist() for numpy values)")

