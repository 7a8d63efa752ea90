"""Real multi-process JAX on CPU (gloo collectives): two processes, one mesh, a batch sharded across them."""
import os
import subprocess
import sys

from tests.e2e_utils import REPO, free_port


def test_two_process_forward_matches_single_process():
  port = free_port()
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(port), str(i)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  results = [line.split() for out, _ in outs for line in out.splitlines() if line.startswith("RESULT")]
  assert len(results) == 2
  for _, pid, total, ref in results:
    assert abs(float(total) - float(ref)) <= 1e-3 * max(1.0, abs(float(ref))), (pid, total, ref)
  assert results[0][2] == results[1][2]  # both processes see the same global value


def test_trainer_runs_on_a_two_device_fsdp_mesh(tmp_path):
  """`main` builds the mesh from config when there is more than one device; one SRPO step on 2 CPU devices."""
  import json
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"}
  args = ["--config=configs/tiny.py", f"--config.run_dir={tmp_path}", "--config.train.steps=1",
          "--config.train.warmstart_steps=0", "--config.rollout.prompts_per_step=2", "--config.rollout.n=4",
          "--config.rollout.max_new_tokens=4", "--config.eval.n_samples=2", "--config.eval.max_questions=2",
          "--config.checkpoint.every_steps=1", "--config.mesh.fsdp=2", "--config.data.synthetic_train_size=16"]
  out = subprocess.run([sys.executable, "-m", "srpo_jax.main", *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["steps"] == 1
  step1 = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")][-1]
  assert step1["step"] == 1 and isinstance(step1["loss/total"], float)
