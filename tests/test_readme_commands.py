"""The README's commands, run as written (shortened by extra flags only), from an empty cache.

The quick start's `make demo` and the multi-process example (`launch/local.sh 2 4 -m srpo_jax.main ...`) both train
the tiny config, whose supervised format warm-start runs first when no cached copy exists: here it always runs, from
an empty `SRPO_CACHE_DIR` (2 steps instead of 100), in one process and in two. `make plan` runs the README's planner
line analytically (the full-depth compile takes minutes; tests/test_plan.py compiles deviceless). `make test` is this
suite. The commands are read from README.md, so an edit there that breaks one fails here.

Runs in the solo pass of `make test` (Makefile SOLO_TESTS): its two processes × 4 devices would compete with the
other xdist worker for this machine's cores.
"""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.e2e_utils import FAST, REPO

README = open(os.path.join(REPO, "README.md")).read()
WARMSTART_STEPS = 2


def flags(overrides: dict) -> list:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def env(cache_dir=None) -> dict:
  """A user's shell: no device count or make state of ours; an empty cache when `cache_dir` is given."""
  keep = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
  return {**keep, "HF_HUB_OFFLINE": "1", **({"SRPO_CACHE_DIR": str(cache_dir)} if cache_dir else {})}


def readme_command(pattern: str) -> list:
  """The README's one command matching `pattern` (in backticks or a code block), split like a shell would."""
  found = sorted({m.strip() for m in re.findall(rf"`({pattern}[^`\n]*)`", README)} |
                 {m.strip() for m in re.findall(rf"^({pattern}.*?)(?:\s+#.*)?$", README, re.M)})
  assert len(found) == 1, (pattern, found)
  return shlex.split(found[0])


def warmstart_entries(cache_dir) -> list:
  root = os.path.join(cache_dir, "warmstart")
  return sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "config.json"))) \
      if os.path.isdir(root) else []


def test_quick_start_is_make_demo_and_make_test():
  block = re.search(r"## Quick start\n+```bash\n(.*?)```", README, re.S).group(1)
  assert [line.split("#")[0].strip() for line in block.strip().splitlines()] == ["make demo", "make test"]


def test_make_demo_warm_starts_from_an_empty_cache(tmp_path):
  cache, run_dir = tmp_path / "cache", tmp_path / "demo"
  extra = flags({**FAST, "train.steps": 1, "train.warmstart_steps": WARMSTART_STEPS})
  proc = subprocess.run(["make", "-s", "demo", f"DEMO_RUN_DIR={run_dir}", f"DEMO_ARGS={shlex.join(extra)}"],
                        cwd=REPO, env=env(cache), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  assert f"warm-start: {WARMSTART_STEPS} supervised format steps" in proc.stderr, proc.stderr[-3000:]
  assert len(warmstart_entries(cache)) == 1  # computed, then cached
  assert json.load(open(run_dir / "summary.json"))["steps"] == 1
  # A second demo reads the cached warm-start (and trains from the same weights: the same step-0 accuracy).
  again = subprocess.run(["make", "-s", "demo", f"DEMO_RUN_DIR={tmp_path / 'again'}",
                          f"DEMO_ARGS={shlex.join(extra + ['--config.train.steps=0'])}"],
                         cwd=REPO, env=env(cache), capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
  assert "warm-start: loading cached" in again.stderr
  first, second = (json.load(open(d / "summary.json")) for d in (run_dir, tmp_path / "again"))
  assert first["initial_eval_accuracy"] == second["initial_eval_accuracy"]


def test_multi_process_example_warm_starts_from_an_empty_cache(tmp_path):
  cmd = readme_command(r"launch/local\.sh 2 4 -m srpo_jax\.main")
  cache, run_dir = tmp_path / "cache", tmp_path / "run"
  # 4 prompts: one whole group per row shard of the data 2 × fsdp 4 mesh per mini-batch (as the multi-process tests)
  extra = flags({**FAST, "run_dir": run_dir, "train.steps": 1, "train.warmstart_steps": WARMSTART_STEPS,
                 "rollout.prompts_per_step": 4, "optim.mini_batch_prompts": 2, "optim.micro_batch_size": 8})
  mesh_at = next(i for i, a in enumerate(cmd) if a.startswith("--mesh"))  # --config.* before the layout's flags
  cmd = ["bash", *cmd[:mesh_at], *extra, *cmd[mesh_at:]]
  proc = subprocess.run(cmd, cwd=REPO, env={**env(cache), "PYTHON": sys.executable, "TIMEOUT": "540"},
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  for p in (0, 1):  # each process warm-starts (process 1 does not read process 0's cache entry while it is written)
    assert f"[p{p}] " in proc.stderr and re.search(
        rf"^\[p{p}\] .*warm-start: {WARMSTART_STEPS} supervised format steps", proc.stderr, re.M), proc.stderr[-3000:]
  assert len(warmstart_entries(cache)) == 1  # written by process 0 alone
  summary = json.load(open(run_dir / "summary.json"))
  assert summary["steps"] == 1
  step1 = [json.loads(line) for line in open(run_dir / "metrics.jsonl")][-1]
  assert step1["step"] == 1 and isinstance(step1["loss/total"], float)


@pytest.mark.skipif(not os.path.exists(os.path.join(REPO, ".venv-aot", "bin", "python")),
                    reason=".venv-aot missing (make test builds it)")
def test_make_plan_as_in_the_readme():
  cmd = readme_command(r"make plan ")
  proc = subprocess.run([*cmd, "PLAN_ARGS=--analytic"], cwd=REPO, env=env(), capture_output=True, text=True,
                        timeout=600)
  target = next(a.split("=", 1)[1] for a in cmd if a.startswith("TARGET="))
  out = proc.stdout + proc.stderr
  # The planner exits 0 (fits), 1 (does not) or 2 (bad input); make reports a failed recipe as its own status 2.
  planner_rc = 0 if proc.returncode == 0 else int(re.search(r"\] Error (\d+)$", out, re.M).group(1))
  assert planner_rc in (0, 1), out[-3000:]
  assert f" on {target} (" in out and re.search(r"^(FITS|DOES NOT FIT)\b", out, re.M), out[-3000:]
  assert ("DOES NOT FIT" in out) == (planner_rc == 1)
