"""Checkpoint integrity (issue 14, items 1-3, 5, 16, 17): integrity records verified at restore, the fallback to the
newest intact checkpoint, nothing non-finite saved, a full disk said in one line, the run directory's lock, and the
resume config comparison. Unit tests of `srpo_jax.checkpointing` (no trainer)."""
import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from srpo_jax import checkpointing as C
from srpo_jax.checkpointing import Checkpointer, CheckpointError, CorruptCheckpoint, NonFiniteError


def _state(value: float = 1.0):
  params = {"embed": jnp.full((16, 8), value, jnp.float32), "norm": jnp.full((8,), value, jnp.bfloat16)}
  opt = optax.adam(1e-3).init(params)
  return {"params": params, "opt_state": opt, "teacher": dict(params)}


def _abstract():
  return jax.eval_shape(_state)


def _saved(tmp_path, steps=(1, 2), keep=3):
  ck = Checkpointer(tmp_path / "ck", keep=keep)
  for s in steps:
    assert ck.save(s, _state(float(s)), {"step": s})
  return ck


def _largest_data_file(step_dir):
  files = [os.path.join(d, n) for d, _, ns in os.walk(os.path.join(step_dir, "state")) for n in ns]
  return max(files, key=os.path.getsize)


def _reopen(ck):
  ck.close()
  return Checkpointer(ck.directory)


# ---------------------------------------------------------------------------------------------------------------------
# Item 1: corrupted bytes are caught at restore; item 2: the newest intact checkpoint is used.
# ---------------------------------------------------------------------------------------------------------------------
def test_flipped_bytes_are_caught_and_the_older_checkpoint_is_used(tmp_path, caplog):
  ck = _saved(tmp_path)
  step2 = ck.step_dir(2)
  data = _largest_data_file(step2)
  raw = bytearray(open(data, "rb").read())
  for i in range(0, min(64, len(raw))):  # 64 flipped bytes, the adversarial test's corruption
    raw[len(raw) // 3 + i - 32] ^= 0xFF
  open(data, "wb").write(bytes(raw))
  ck = _reopen(ck)
  with pytest.raises(CorruptCheckpoint, match=r"different SHA-256") as e:
    ck.restore(2, _abstract())
  assert os.path.relpath(data, step2) in str(e.value) and step2 in str(e.value)

  with caplog.at_level(logging.WARNING, logger="srpo_jax"):
    found = ck.restore_newest_intact(_abstract())
  assert found.step == 1 and [p for p, _ in found.skipped] == [step2]
  assert step2 in caplog.text and "SHA-256" in caplog.text
  np.testing.assert_array_equal(np.asarray(found.state["params"]["embed"]), np.full((16, 8), 1.0, np.float32))
  # The corrupt one is kept for inspection, out of the way: the resumed run saves step 2 afresh.
  assert ck.all_steps() == [1] and not os.path.exists(step2)
  (moved,) = os.listdir(ck.bad_directory)
  assert moved.startswith("2-")
  assert ck.save(2, _state(5.0), {"step": 2})
  assert ck.restore_newest_intact(_abstract()).step == 2


@pytest.mark.parametrize("damage", ["truncate", "delete_state", "empty_dir", "no_record", "record_of_other_step"])
def test_unreadable_newest_falls_back_by_path(tmp_path, damage):
  ck = _saved(tmp_path)
  step2 = ck.step_dir(2)
  if damage == "truncate":
    data = _largest_data_file(step2)
    os.truncate(data, os.path.getsize(data) // 2)
    want = r"has \d+ bytes, \d+ were written"
  elif damage == "delete_state":
    import shutil
    shutil.rmtree(os.path.join(step2, "state"))
    want = r"'state/.*' is missing"
  elif damage == "empty_dir":  # an interrupted copy: the step's directory exists, nothing in it
    os.makedirs(ck.step_dir(7))
    step2 = ck.step_dir(7)
    want = "an empty directory"
  elif damage == "no_record":  # a directory from another writer (or a version before integrity records)
    os.remove(os.path.join(step2, C.INTEGRITY_FILE))
    want = "no integrity record"
  else:  # a checkpoint directory copied under another step's name
    record = json.load(open(os.path.join(step2, C.INTEGRITY_FILE)))
    record["step"] = 5
    json.dump(record, open(os.path.join(step2, C.INTEGRITY_FILE), "w"))
    want = "is for step 5, not 2"
  ck = _reopen(ck)
  with pytest.raises(CorruptCheckpoint, match=want):
    ck.verify(int(os.path.basename(step2)))
  found = ck.restore_newest_intact(_abstract())
  intact = 2 if damage == "empty_dir" else 1  # the empty step 7 is newer than the intact step 2
  assert found.step == intact and [p for p, _ in found.skipped] == [step2]
  assert float(found.state["params"]["embed"][0, 0]) == intact


def test_no_intact_checkpoint_lists_every_path_and_reason(tmp_path):
  ck = _saved(tmp_path)
  for s in (1, 2):
    os.remove(os.path.join(ck.step_dir(s), C.INTEGRITY_FILE))
  ck = _reopen(ck)
  with pytest.raises(CorruptCheckpoint, match="no intact checkpoint") as e:
    ck.restore_newest_intact(_abstract())
  assert ck.step_dir(1) in str(e.value) and ck.step_dir(2) in str(e.value)
  assert ck.all_steps() == [1, 2]  # nothing moved when nothing could be used
  with pytest.raises(CheckpointError, match="no checkpoint in"):
    Checkpointer(tmp_path / "empty").restore_newest_intact(_abstract())


def test_meta_check_failure_falls_back_but_other_errors_stop(tmp_path):
  ck = _saved(tmp_path)

  def check(step, meta):
    if step == 2:
      raise CorruptCheckpoint("meta.counters is missing")
  assert ck.restore_newest_intact(_abstract(), check_meta=check).step == 1

  ck = _saved(tmp_path / "b")

  def refuse(step, meta):
    raise C.ConfigChanged("different config")
  with pytest.raises(C.ConfigChanged):
    ck.restore_newest_intact(_abstract(), check_meta=refuse)
  assert ck.all_steps() == [1, 2]


def test_integrity_record_lists_every_file_with_size_and_sha256(tmp_path):
  ck = _saved(tmp_path, steps=(3,))
  record = json.load(open(os.path.join(ck.step_dir(3), C.INTEGRITY_FILE)))
  assert record["step"] == 3 and record["version"] == C.INTEGRITY_VERSION
  on_disk = sorted(os.path.relpath(os.path.join(d, n), ck.step_dir(3)) for d, _, ns in os.walk(ck.step_dir(3))
                   for n in ns)
  # All but the record itself and orbax's top-level commit marker and timestamp (written after it, no state).
  assert sorted(record["files"]) == [f for f in on_disk if f not in (C.INTEGRITY_FILE, "commit_success.txt",
                                                                      "_CHECKPOINT_METADATA")]
  assert any(f.startswith("meta/") for f in record["files"]) and any(f.startswith("state/") for f in record["files"])
  assert all(len(v["sha256"]) == 64 and v["size"] >= 0 for v in record["files"].values())
  ck.verify(3)  # intact


# ---------------------------------------------------------------------------------------------------------------------
# Item 5: nothing non-finite is saved.
# ---------------------------------------------------------------------------------------------------------------------
def test_nonfinite_state_is_never_saved_and_names_the_leaf(tmp_path):
  ck = _saved(tmp_path, steps=(1,))
  bad = _state(1.0)
  bad["opt_state"][0].mu["embed"] = bad["opt_state"][0].mu["embed"].at[3, 4].set(jnp.inf)
  with pytest.raises(NonFiniteError, match=r"opt_state\.0\.mu\.embed holds 1 NaN/inf of 128 values") as e:
    ck.save(2, bad, {"step": 2})
  assert "previous checkpoints are kept (newest: 1)" in str(e.value) and ck.step_dir(2) in str(e.value)
  bad = _state(1.0)
  bad["teacher"]["norm"] = jnp.full((8,), jnp.nan, jnp.bfloat16)  # bf16 counts as floating
  with pytest.raises(NonFiniteError, match=r"teacher\.norm holds 8 NaN/inf"):
    ck.save(2, bad, {"step": 2})
  assert ck.all_steps() == [1] and not os.path.exists(ck.step_dir(2))


def test_nonfinite_leaves_ignores_integers_and_keys():
  tree = {"i": jnp.arange(3), "k": jax.random.key(0), "f": jnp.array([1.0, jnp.nan, jnp.inf]),
          "ok": jnp.ones(2, jnp.bfloat16)}
  assert C.nonfinite_leaves(tree) == [("f", 2, 3)]
  assert C.nonfinite_leaves({"i": jnp.arange(3)}) == []
  C.require_finite({"ok": jnp.ones(2)}, "x")  # no error


# ---------------------------------------------------------------------------------------------------------------------
# Item 16: a full disk is said in one line, naming the path.
# ---------------------------------------------------------------------------------------------------------------------
def test_save_that_cannot_fit_is_refused_before_writing(tmp_path, monkeypatch):
  ck = _saved(tmp_path, steps=(1,))
  real = C.shutil.disk_usage
  monkeypatch.setattr(C.shutil, "disk_usage", lambda p: real(p)._replace(free=100))
  with pytest.raises(CheckpointError) as e:
    ck.save(2, _state(), {"step": 2})
  first = str(e.value).splitlines()[0]
  assert first.startswith(ck.step_dir(2) + ": No space left on device") and "newest: 1" in first
  assert ck.all_steps() == [1] and not any(p.startswith("2") for p in os.listdir(ck.directory))


def test_disk_full_during_the_write_is_one_clear_line(tmp_path, monkeypatch):
  ck = _saved(tmp_path, steps=(1,))

  def full_disk(step, args, force=False):  # as tensorstore reports it, deep inside orbax's chain
    os.makedirs(os.path.join(ck.directory, f"{step}.orbax-checkpoint-tmp-123", "state"))
    try:
      raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as inner:
      raise RuntimeError("Event loop is closed") from inner
  monkeypatch.setattr(ck._mgr, "save", full_disk)
  with pytest.raises(CheckpointError) as e:
    ck.save(2, _state(), {"step": 2})
  msg = str(e.value)
  assert len(msg.splitlines()) == 1 and e.value.__cause__ is None and e.value.__suppress_context__
  assert msg.startswith(f"{ck.step_dir(2)}: No space left on device while saving checkpoint 2")
  assert os.listdir(ck.directory) == ["1"]  # the unfinished write's space is given back
  monkeypatch.undo()
  assert ck.restore_newest_intact(_abstract()).step == 1


def test_other_save_errors_pass_through(tmp_path, monkeypatch):
  ck = _saved(tmp_path, steps=(1,))
  monkeypatch.setattr(ck._mgr, "save", lambda *a, **k: (_ for _ in ()).throw(PermissionError("read-only")))
  with pytest.raises(PermissionError, match="read-only"):
    ck.save(2, _state(), {"step": 2})


# ---------------------------------------------------------------------------------------------------------------------
# Item 17: one run per run_dir.
# ---------------------------------------------------------------------------------------------------------------------
_HOLDER = textwrap.dedent("""
    import sys, time
    from srpo_jax.checkpointing import RunDirLock
    lock = RunDirLock(sys.argv[1])
    print("LOCKED", flush=True)
    time.sleep(120)
""")


def test_second_run_on_the_same_run_dir_names_the_holder(tmp_path):
  run_dir = str(tmp_path / "run")
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, run_dir], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    assert holder.stdout.readline().strip() == "LOCKED"
    with pytest.raises(C.RunDirInUse, match=rf"in use by another run \(pid {holder.pid} on host "):
      C.RunDirLock(run_dir)
  finally:
    holder.kill()
    holder.wait()
  # The kernel dropped the dead holder's lock: no stale lock blocks the resume.
  lock = C.RunDirLock(run_dir)
  assert f"pid {os.getpid()} " in open(os.path.join(run_dir, C.LOCK_FILE)).read()
  again = C.RunDirLock(run_dir)  # re-entrant in one process
  again.release()
  lock.release()
  lock.release()  # idempotent
  assert os.path.realpath(os.path.join(run_dir, C.LOCK_FILE)) not in C._HELD


# ---------------------------------------------------------------------------------------------------------------------
# Item 4: which config changes a resume reports.
# ---------------------------------------------------------------------------------------------------------------------
def test_config_changes_lists_computed_fields_only():
  from tests.e2e_utils import fast_config
  stored = json.loads(json.dumps(fast_config("/tmp/a").to_dict()))
  same_math = fast_config("/tmp/b", **{"train.steps": 9, "checkpoint.keep": 1, "eval.every_steps": 3,
                                       "optim.micro_batch_size": 4, "resume": True}).to_dict()
  assert C.config_changes(stored, same_math) == []
  changed = fast_config("/tmp/a", **{"seed": 3, "rollout.prompts_per_step": 4, "optim.lr": 1e-2,
                                     "data.task": "synthetic", "rollout.length_buckets": (256,)}).to_dict()
  got = {k: (a, b) for k, a, b in C.config_changes(stored, changed)}
  assert got["seed"] == (0, 3) and got["rollout.prompts_per_step"] == (2, 4) and got["optim.lr"] == (1e-3, 1e-2)
  assert got["derived.lr"] == (1e-3, 1e-2) and got["rollout.length_buckets"] == ([], [256])
  assert "data.task" not in got  # unchanged
  # A field that the checkpoint's config lacks (added since) counts as a change.
  del stored["algo"]["topk"]
  assert ("algo.topk", "<absent>", 100) in C.config_changes(stored, fast_config("/tmp/a").to_dict())


def test_resume_safe_fields_are_real_config_fields():
  from srpo_jax import config as config_lib
  from tests.e2e_utils import fast_config
  real = set(C._flatten(fast_config("/tmp/a").to_dict()))
  assert C.RESUME_SAFE_FIELDS <= real, sorted(C.RESUME_SAFE_FIELDS - real)
  assert "checkpoint.allow_config_change" in config_lib.field_docs()


_KILL_AT_RENAME = textwrap.dedent("""
    import os, sys
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from srpo_jax.checkpointing import Checkpointer, INTEGRITY_FILE

    ck = Checkpointer(sys.argv[1], keep=3)
    ck.save(1, {"w": jnp.full((4, 4), 1.0)}, {"step": 1})
    real = atomicity.AtomicRenameTemporaryPath.finalize

    async def rename_then_die(self, *a, **k):  # the step directory appears, then the process dies
      await real(self, *a, **k)
      if os.path.basename(os.fspath(self.get_final())).isdigit():
        assert os.path.isfile(os.path.join(os.fspath(self.get_final()), INTEGRITY_FILE))
        os._exit(17)
    atomicity.AtomicRenameTemporaryPath.finalize = rename_then_die
    ck.save(2, {"w": jnp.full((4, 4), 2.0)}, {"step": 2})
""")


def test_a_step_directory_never_appears_without_its_record(tmp_path):
  """The record is written inside orbax's temporary directory before the rename: a kill right after the step
  directory appears leaves a complete, verifiable checkpoint."""
  directory = str(tmp_path / "ck")
  proc = subprocess.run([sys.executable, "-c", _KILL_AT_RENAME, directory], capture_output=True, text=True,
                        timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 17, proc.stderr[-2000:]
  ck = Checkpointer(directory)
  ck.verify(2)
  state, meta = ck.restore(2, {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)})
  assert meta == {"step": 2} and float(state["w"][0, 0]) == 2.0


# ---------------------------------------------------------------------------------------------------------------------
# Issue 20: a record of a newer format is refused, not taken for corrupt; restored state is finite.
# ---------------------------------------------------------------------------------------------------------------------
def test_newer_integrity_format_is_refused_naming_both_versions(tmp_path):
  ck = _saved(tmp_path)
  path = os.path.join(ck.step_dir(2), C.INTEGRITY_FILE)
  record = json.load(open(path))
  record["version"] = C.INTEGRITY_VERSION + 1
  json.dump(record, open(path, "w"))
  with pytest.raises(CheckpointError) as e:
    ck.restore_newest_intact(_abstract())
  assert not isinstance(e.value, C.CorruptCheckpoint)  # no silent fallback to checkpoint 1
  msg = str(e.value)
  assert f"format version {C.INTEGRITY_VERSION + 1}, newer than this srpo_jax reads ({C.INTEGRITY_VERSION})" in msg
  assert ck.step_dir(2) in msg and os.path.isdir(ck.step_dir(2))  # left where it is


def test_restored_non_finite_state_is_corrupt_and_falls_back(tmp_path, monkeypatch):
  """Damaged data under a record that matches it (as when the record is regenerated): it restores NaN."""
  ck = _saved(tmp_path, steps=(1,))
  monkeypatch.setattr(C, "require_finite", lambda tree, what: None)  # what damaged data amounts to
  bad = _state(2.0)
  bad["teacher"]["embed"] = bad["teacher"]["embed"].at[3, 4].set(jnp.nan)
  assert ck.save(2, bad, {"step": 2})
  monkeypatch.undo()
  ck.verify(2)  # the record matches the bytes
  with pytest.raises(C.CorruptCheckpoint, match=r"restored non-finite values.*teacher\.embed holds 1 NaN/inf"):
    ck.restore(2, _abstract())
  found = ck.restore_newest_intact(_abstract())
  assert found.step == 1 and found.skipped[0][0] == ck.step_dir(2)
