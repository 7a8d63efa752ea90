"""configs/mesh/*.py (one-flag mesh layouts), main's --mesh flag and the launchers in launch/ (no compile, seconds).

Every layout file loads, applies over the paper's Qwen3-8B config and resolves to a valid mesh for the devices it is
meant for (GPUs per process at most one node's 8); `main --mesh=...` is wired to the validation; launch/local.sh
starts N real jax.distributed processes (gloo) that join one mesh (launch/check_mesh.py), and stops the others when
one fails.
"""
import glob
import importlib.util
import os
import subprocess
import sys
import time

import pytest

from srpo_jax import config as config_lib
from srpo_jax import plan
from tests.e2e_utils import REPO

# file[:param] -> (GPUs it is meant for, processes): every file of configs/mesh/ must be listed here.
LAYOUTS = {"1gpu.py": (1, 1), "2gpu.py": (2, 1), "4gpu.py": (4, 1), "8gpu.py": (8, 1), "8gpu_tp2.py": (8, 1),
           "nodes.py": (16, 2), "nodes.py:4": (32, 4)}


def load_layout(name: str):
  path, _, param = name.partition(":")
  spec = importlib.util.spec_from_file_location("mesh_layout", os.path.join(REPO, "configs", "mesh", path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(param)


def paper_config():
  spec = importlib.util.spec_from_file_location("cfg_8b", os.path.join(REPO, "configs", "qwen3_8b.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("")


def test_every_mesh_file_is_listed():
  files = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs", "mesh", "*.py"))}
  assert files == {k.partition(":")[0] for k in LAYOUTS}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_resolves_for_its_devices(name):
  gpus, procs = LAYOUTS[name]
  layout = load_layout(name)
  cfg = plan.planning_config(config_lib.apply_mesh_layout(paper_config(), layout))
  sizes = cfg.mesh.axis_sizes(gpus)
  assert sizes == {k: layout[k] for k in ("data", "fsdp", "tensor")}  # nothing left to a -1
  assert cfg.mesh.num_processes == procs
  per_process = gpus // procs
  assert per_process <= 8 and gpus % procs == 0
  # FSDP and TP stay inside one process (a node): an fsdp × tensor group is a whole number of groups per process.
  assert per_process % (sizes["fsdp"] * sizes["tensor"]) == 0
  with pytest.raises(config_lib.ConfigError):
    cfg.mesh.axis_sizes(gpus * 3)  # fixed sizes: a wrong device count is refused, not silently resized
  # The layout replaces the config's mesh values (qwen3_8b.py sets fsdp=8).
  assert cfg.mesh.fsdp == layout.fsdp


def test_layout_errors_name_the_flag_and_key():
  with pytest.raises(config_lib.ConfigError, match=r"--mesh: .*mesh\.fdsp"):
    config_lib.apply_mesh_layout(paper_config(), {"fdsp": 8})
  with pytest.raises(ValueError, match="number of nodes"):
    load_layout("nodes.py:0")


def test_main_applies_the_mesh_flag():
  spec = importlib.util.spec_from_file_location("cfg_tiny", os.path.join(REPO, "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  raw = config_lib.apply_overrides(module.get_config(""), {"mesh.coordinator": "127.0.0.1:1", "mesh.fsdp": 1})
  cfg = config_lib.build_config(raw, load_layout("nodes.py:2"))
  # The layout's values win over the config's; what it does not set (the launcher's coordinator) is kept.
  assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.num_processes, cfg.mesh.coordinator) == (2, 8, 2, "127.0.0.1:1")
  assert config_lib.build_config(raw).mesh.fsdp == 1  # no layout: the config's own


def test_main_mesh_flag_reaches_validation(tmp_path):
  """`python -m srpo_jax.main --mesh=...`: the layout is applied before validation (a bad value exits 2 naming it)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  proc = subprocess.run([sys.executable, "-m", "srpo_jax.main", "--config=configs/tiny.py",
                         f"--config.run_dir={tmp_path}", "--mesh=configs/mesh/2gpu.py", "--mesh.tensor=0"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "config error: " in proc.stderr and "mesh.tensor" in proc.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["launch/local.sh", "launch/slurm.sbatch"])
def test_launchers_parse(script):
  assert subprocess.run(["bash", "-n", os.path.join(REPO, script)], capture_output=True).returncode == 0


def _local(*args, timeout_s=120, env_extra=None):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(PYTHON=sys.executable, TIMEOUT=str(timeout_s), **(env_extra or {}))
  return subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout_s + 30)


def test_local_sh_joins_two_processes_into_one_mesh():
  """Two real processes × 2 CPU devices, gloo: the nodes layout (data across processes, fsdp inside each)."""
  proc = _local("2", "2", "launch/check_mesh.py", "--config=configs/tiny.py", "--mesh=configs/mesh/nodes.py:2",
                "--mesh.fsdp=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = sorted(line for line in proc.stdout.splitlines() if "RESULT" in line)
  assert len(results) == 2, proc.stdout[-2000:]
  for i, line in enumerate(results):
    assert line.startswith(f"[p{i}] RESULT process={i}/2 devices=2/4 mesh=data=2,fsdp=2,tensor=1 "
                           f"fsdp_in_process=yes sum=6 expected=6"), line


def test_local_sh_stops_the_others_when_one_fails(tmp_path):
  """Process 1 exits 3 at once; process 0 would sleep 120 s: the launcher kills it and exits 3 within seconds."""
  script = tmp_path / "worker.py"
  script.write_text("import sys, time\n"
                    "pid = [a for a in sys.argv if a.startswith('--config.mesh.process_id=')][0].split('=')[1]\n"
                    "sys.exit(3) if pid == '1' else time.sleep(120)\n")
  t0 = time.monotonic()
  proc = _local("2", "1", str(script))
  assert proc.returncode == 3, proc.stderr[-2000:]
  assert time.monotonic() - t0 < 30
  assert "exited with status 3; stopping the others" in proc.stderr
