"""The trainer on JAX's multi-process runtime (issue 12): two real processes × 4 CPU devices (jax.distributed, gloo)
against one process with 8 devices and with 1, through tests/multiprocess_trainer_worker.py.

One two-process run (3 steps configured) is killed: once it has checkpointed step 2, process 1 gets SIGKILL.
- Its 2 steps equal 1 × 8's: metrics and checkpointed state (parameters, EMA teacher, AdamW moments); only
  process 0 wrote run files.
- Process 0 then exits with status 5 (distributed.PEER_LOST_EXIT) naming process 1 within KILL_BOUND_S, and the
  newest checkpoint stays intact.
- That checkpoint of two processes resumes on 1 × 8 and on 1 × 1, and step 3 equals the uninterrupted 1 × 8 run.
- The model is sharpened (tests/sharp_model.py) so that these comparisons can see DW and the SDPO term: its DW
  weights spread over > 10% and its SDPO term is > 1% of the loss, and a 1 × 1 run with DW normalisation or the
  SDPO term broken fails the same comparison (the negative cases).

Tolerance: 1e-5 relative (fp32; measured ~1e-7 on parameters), with an absolute floor of 1e-6 for metrics that are
near-zero differences of log-probs (approx-KL ~2e-4). Only `batch/padding_frac` depends on the layout (rows are
padded to the row shards: 8 on the mesh, 1 on one device) and timings; those are not compared across layouts.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.e2e_utils import REPO, free_port

WORKER = [sys.executable, "-m", "tests.multiprocess_trainer_worker"]
KILL_BOUND_S = 30  # lost-peer detection (~2 s of stamps) well inside jax.distributed's 20 s heartbeat timeout


def _env(devices: int) -> dict:
  return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}",
          "HF_HUB_OFFLINE": "1"}


def wrote(out: str) -> set:
  return {line[len("WROTE "):] for line in out.splitlines() if line.startswith("WROTE ")}


def start_two(run_dir, steps: int) -> list:
  port = free_port()
  return [subprocess.Popen([*WORKER, str(run_dir), str(steps), "0", "2", str(i), f"127.0.0.1:{port}"], cwd=REPO,
                           env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(2)]


def run_one(run_dir, steps: int, devices: int, resume: bool = False, env=None) -> str:
  proc = subprocess.run([*WORKER, str(run_dir), str(steps), "1" if resume else "0"], cwd=REPO,
                        env={**_env(devices), **(env or {})}, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  return proc.stdout


def metrics(run_dir) -> dict:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f)}


def checkpoint_state(run_dir, step: int) -> dict:
  """{path: array} of every floating leaf of checkpoint `step` (params, teacher, optimizer state)."""
  import jax
  import orbax.checkpoint as ocp
  path, ck = os.path.join(run_dir, "checkpoints", str(step), "state"), ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # whatever the writers' mesh: onto this process
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        ck.metadata(path).item_metadata)
  tree = ck.restore(path, target)
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves if np.issubdtype(np.asarray(x).dtype, np.floating)}


def assert_same_state(a_dir, b_dir, step: int):
  a, b = checkpoint_state(a_dir, step), checkpoint_state(b_dir, step)
  assert sorted(a) == sorted(b)
  assert any("params" in k for k in a) and any("teacher" in k for k in a) and any("mu" in k for k in a), sorted(a)
  for k in a:
    scale = max(np.linalg.norm(b[k]), 1e-30)
    assert np.linalg.norm(a[k] - b[k]) <= 1e-5 * scale, (step, k, np.linalg.norm(a[k] - b[k]) / scale)


def compared(record: dict) -> list:
  """The metric names compared across layouts: all but clocks, throughputs and the padding fraction."""
  return sorted(k for k in record if "time" not in k and "per_s" not in k and k != "batch/padding_frac")


def assert_same_metrics(a: dict, b: dict, steps):
  for s in steps:
    ra, rb = a[s], b[s]
    keys = compared(ra)
    assert keys == compared(rb) and (s == 0 or len(keys) > 20)  # step 0: the initial evaluation alone
    for k in keys:
      if isinstance(ra[k], (int, float)):
        assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (s, k, ra[k], rb[k])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  procs = start_two(root / "two", 3)
  try:
    deadline = time.monotonic() + 400
    while not (root / "two" / "checkpoints" / "2").is_dir():  # two steps done and checkpointed
      assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()[0][-3000:]
      time.sleep(0.2)
    time.sleep(2.0)  # into step 3 (its rollouts and update: collectives)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    out0 = procs[0].communicate(timeout=KILL_BOUND_S + 60)[0]
    took = time.monotonic() - t0
    out1 = procs[1].communicate(timeout=10)[0]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  killed = {"rc": procs[0].returncode, "took": took, "out0": out0, "out1": out1}
  run_one(root / "ref", 3, devices=8)  # 1 × 8, uninterrupted: steps 1-3
  for name, devices in (("resume8", 8), ("resume1", 1)):
    shutil.copytree(root / "two", root / name)
    run_one(root / name, 3, devices=devices, resume=True)  # step 3 from the two processes' checkpoint 2
  run_one(root / "broken", 1, devices=1, env={"SRPO_TEST_BREAK": ",".join(BREAKS)})  # one process, a run per kind
  return root, killed


BREAKS = ("dw_unnormalised", "sdpo_term_dropped")


def test_two_processes_equal_one_process_with_eight_devices(runs):
  root, _ = runs
  two, ref = metrics(root / "two"), metrics(root / "ref")
  assert {1, 2} <= set(two)
  assert two[1]["route/frac_sdpo"] > 0 and two[1]["route/frac_grpo"] > 0  # both routes trained
  assert_same_metrics(two, ref, [1, 2])
  for step in (1, 2):
    assert_same_state(root / "two", root / "ref", step)


def test_the_comparison_sees_dw_and_the_sdpo_term(runs):
  """Negative cases: step 1 with DW normalisation or the SDPO term broken (tests/sharp_model.py `broken`) fails the
  comparison that the layouts pass; the DW weights spread over > 10% and the SDPO term is > 1% of the loss."""
  from tests.sharp_model import share
  root, _ = runs
  ref = metrics(root / "ref")
  assert ref[1]["dw/max"] / ref[1]["dw/min"] > 1.1 and ref[1]["route/frac_sdpo"] > 0
  for kind in BREAKS:
    with pytest.raises(AssertionError):
      assert_same_state(root / "broken" / kind, root / "ref", 1)
    with pytest.raises(AssertionError):
      assert_same_metrics(metrics(root / "broken" / kind), ref, [1])
  dropped = metrics(root / "broken" / "sdpo_term_dropped")[1]["loss/total"]
  assert share(ref[1]["loss/total"] - dropped, dropped) > 0.01


def test_only_process_zero_writes_run_files(runs):
  root, killed = runs
  assert wrote(killed["out1"]) == set(), killed["out1"][-2000:]
  assert {"metrics.jsonl", "tb"} <= wrote(killed["out0"])
  with open(root / "two" / "metrics.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps[:2] == [1, 2] and len(steps) == len(set(steps))  # one writer, no duplicate rows


def test_killed_peer_stops_the_other_with_its_name(runs):
  from srpo_jax.checkpointing import Checkpointer
  from srpo_jax.distributed import PEER_LOST_EXIT
  root, killed = runs
  assert killed["rc"] == PEER_LOST_EXIT, killed["out0"][-3000:]
  assert killed["took"] < KILL_BOUND_S, killed["took"]
  assert "process 0 of 2 lost process 1" in killed["out0"], killed["out0"][-3000:]
  assert "newest complete checkpoint" in killed["out0"]
  with Checkpointer(root / "two" / "checkpoints") as ck:
    assert ck.latest_step() == 2  # killed in step 3, before its save
    ck.verify(2)  # intact: every file as its integrity record says


@pytest.mark.parametrize("name", ["resume8", "resume1"])
def test_two_process_checkpoint_resumes_on_one_process(runs, name):
  root, _ = runs
  resumed, ref = metrics(root / name), metrics(root / "ref")
  assert sorted(resumed) == [1, 2, 3]
  assert_same_metrics(resumed, ref, [3])
  assert_same_state(root / name, root / "ref", 3)


def test_coordinator_killed_during_a_checkpoint_save_stops_the_other_with_its_name(tmp_path):
  """Process 0 (the coordination service's host) is SIGKILLed inside checkpoint 1's save (held in its integrity
  record's write, while process 1 waits in orbax's barrier). JAX's client aborts process 1's worker from a C++ thread
  (SIGABRT); its supervisor (srpo_jax/supervise.py) names the lost coordinator and exits PEER_LOST_EXIT."""
  from srpo_jax.distributed import PEER_LOST_EXIT
  port = free_port()
  env = {**_env(4), "SRPO_TEST_HOLD_SAVE": "1"}
  procs = [subprocess.Popen([*WORKER, str(tmp_path), "2", "0", "2", str(i), f"127.0.0.1:{port}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    for line in procs[0].stdout:  # process 0 reached the held save (process 1 is in the same save)
      if line.startswith("HOLDING SAVE 1"):
        break
    else:
      raise AssertionError(f"process 0 ended before the save: rc {procs[0].wait()}")
    time.sleep(1.0)
    procs[0].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    out1 = procs[1].communicate(timeout=KILL_BOUND_S + 60)[0]
    took = time.monotonic() - t0
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert procs[1].returncode == PEER_LOST_EXIT, out1[-3000:]
  assert took < KILL_BOUND_S, took
  last = out1.strip().splitlines()[-1]
  assert last.startswith("multi-process run: process 1 of 2 lost process 0 (the coordinator"), last
  assert f"No complete checkpoint in {tmp_path / 'checkpoints'}" in last  # checkpoint 1 was never completed
  assert not any(n.isdigit() for n in os.listdir(tmp_path / "checkpoints"))
