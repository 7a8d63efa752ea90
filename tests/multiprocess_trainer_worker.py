"""One process of the multi-process trainer tests (tests/test_multiprocess_trainer.py), or the single-process run
they are compared with.

  python -m tests.multiprocess_trainer_worker RUN_DIR STEPS RESUME [NUM_PROCESSES PROCESS_ID COORDINATOR]

Trains the fast tiny config (tests/e2e_utils.py) with the coin reward (mixed groups: both SRPO routes) on a
data 2 × fsdp 4 mesh over 8 devices (one device: no mesh), or resumes RUN_DIR when RESUME is 1, for STEPS steps in
all, checkpointing every step, evaluating after the last. Each process prints `WROTE <path>` the moment it first
opens a file for writing, creates, renames or removes one under RUN_DIR outside the checkpoint directory (Python
audit events), so the test can check that only process 0 writes run files even of a process it kills. Set the
device count with XLA_FLAGS before starting. Errors end the process as in `srpo_jax.main`
(`distributed.exit_on_failure`). The model is the tiny preset sharpened (tests/sharp_model.py), injected, so that
the DW weights and the SDPO term are material. SRPO_TEST_BREAK=kind[,kind...] (single process): one run per kind
in RUN_DIR/<kind>, with DW or the SDPO term broken (`sharp_model.broken`), the negative cases.
"""
import contextlib
import os
import sys
import time


def checkpoint_note(directory: str) -> str:
  from srpo_jax.checkpointing import describe_newest
  return describe_newest(directory)


def main():
  run_dir, steps, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
  num_processes, process_id, coordinator = (int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]) if len(sys.argv) > 4 \
      else (1, None, None)
  from srpo_jax import supervise
  if num_processes > 1 and not supervise.supervised():  # as srpo_jax.main: the work runs in a supervised child
    sys.exit(supervise.run_supervised([sys.executable, "-m", "tests.multiprocess_trainer_worker", *sys.argv[1:]],
                                      num_processes, process_id, coordinator,
                                      lambda: checkpoint_note(os.path.join(run_dir, "checkpoints"))))
  root = os.path.realpath(run_dir)
  wrote = set()

  def audit(event, args):  # writes under the run dir, checkpoints aside (every process writes its shards there)
    paths = []
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and isinstance(args[1], str) \
        and any(c in args[1] for c in "wax+"):
      paths = [args[0]]
    elif event in ("os.rename", "os.replace", "os.remove", "os.mkdir", "shutil.rmtree", "os.rmdir"):
      paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
    for p in paths:
      p = os.path.realpath(os.fsdecode(p))
      rel = os.path.relpath(p, root)
      if p.startswith(root + os.sep) and not rel.startswith("checkpoints") and rel not in wrote:
        wrote.add(rel)
        print(f"WROTE {rel}", flush=True)

  sys.addaudithook(audit)

  from srpo_jax import checkpointing, distributed, run
  hold = os.environ.get("SRPO_TEST_HOLD_SAVE")  # "STEP": process 0 stops inside checkpoint STEP's save (to be killed)
  if hold and process_id == 0:
    write_integrity = checkpointing._write_integrity

    def held(step_dir, step):
      if step == int(hold):
        print(f"HOLDING SAVE {step}", flush=True)
        time.sleep(600)
      write_integrity(step_dir, step)
    checkpointing._write_integrity = held
  from srpo_jax.tokenizer import load_tokenizer
  from srpo_jax.trainer import Trainer, build_model
  from tests.e2e_utils import coin_task, fast_config
  from tests.sharp_model import SHARPEN_TINY, broken, sharpen

  devices = num_processes * int(os.environ["XLA_FLAGS"].rsplit("=", 1)[1])  # --xla_force_host_platform_device_count
  mesh_layout = {"mesh.data": 2, "mesh.fsdp": 4} if devices == 8 else {"mesh.data": -1, "mesh.fsdp": 1}
  # top-k 16: sampling from the whole 152k vocabulary of a random model is so flat that the last-ulp differences
  # between layouts flip sampled tokens (BUILD_NOTES: "Multi-process runs"); 16 candidates are far apart.
  config = lambda d: fast_config(d, **{
      "train.steps": steps, "resume": resume, "rollout.prompts_per_step": 4, "optim.mini_batch_prompts": 2,
      "optim.micro_batch_size": 8, "eval.at_start": False, "eval.max_questions": 4, "checkpoint.keep": 10,
      "rollout.top_k": 16, "eval.top_k": 16, "mesh.num_processes": num_processes, "mesh.process_id": process_id,
      "mesh.coordinator": coordinator, **mesh_layout})
  cfg = config(run_dir)
  mesh = run.build_mesh(cfg)
  tokenizer = load_tokenizer(cfg.tokenizer.path)
  kinds = [k for k in os.environ.get("SRPO_TEST_BREAK", "").split(",") if k]
  with distributed.exit_on_failure(lambda: checkpoint_note(cfg.checkpoint_dir)):
    for kind in kinds or [None]:
      run_cfg = config(os.path.join(run_dir, kind)) if kind else cfg
      with broken(kind) if kind else contextlib.nullcontext():
        trainer = Trainer(run_cfg, tokenizer=tokenizer, mesh=mesh, task=coin_task(run_cfg, tokenizer),
                          model=sharpen(build_model(run_cfg), SHARPEN_TINY))
        trainer.run()


if __name__ == "__main__":
  main()
