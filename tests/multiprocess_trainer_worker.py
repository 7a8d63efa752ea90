"""One process of the multi-process trainer tests (tests/test_multiprocess_trainer.py), or the single-process run
they are compared with.

  python -m tests.multiprocess_trainer_worker RUN_DIR STEPS RESUME OUT.npz [NUM_PROCESSES PROCESS_ID COORDINATOR]

Trains the fast tiny config (tests/e2e_utils.py) with the coin reward (mixed groups: both SRPO routes) on a
data 2 × fsdp 4 mesh over 8 devices (one device: no mesh), or resumes RUN_DIR when RESUME is 1, for STEPS steps in
all. Process 0 (the only process of a single-process run) then writes OUT.npz: the final parameters and EMA
teacher, by path. Every process prints one line `WROTE <json list>`: the files it opened for writing, created,
renamed or removed under RUN_DIR outside the checkpoint directory (Python audit events), so the test can check that
only process 0 writes run files. Set the device count with XLA_FLAGS before starting.
"""
import json
import os
import sys


def main():
  run_dir, steps, resume, out = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
  num_processes, process_id, coordinator = (int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]) if len(sys.argv) > 5 \
      else (1, None, None)
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
      if p.startswith(root + os.sep) and not os.path.relpath(p, root).startswith("checkpoints"):
        wrote.add(os.path.relpath(p, root))

  sys.addaudithook(audit)

  import jax
  import numpy as np
  from srpo_jax import distributed, run
  from srpo_jax.tokenizer import load_tokenizer
  from srpo_jax.trainer import Trainer
  from tests.e2e_utils import coin_task, fast_config

  mesh_layout = {"mesh.data": 2, "mesh.fsdp": 4} if os.environ.get("XLA_FLAGS", "").endswith("=8") or \
      num_processes > 1 else {"mesh.data": -1, "mesh.fsdp": 1}
  cfg = fast_config(run_dir, **{"train.steps": steps, "resume": resume, "rollout.prompts_per_step": 4,
                                "optim.mini_batch_prompts": 2, "optim.micro_batch_size": 8, "eval.every_steps": 2,
                                "eval.max_questions": 4, "checkpoint.keep": 10, "rollout.top_k": 16, "eval.top_k": 16, "mesh.num_processes": num_processes,
                                "mesh.process_id": process_id, "mesh.coordinator": coordinator, **mesh_layout})
  mesh = run.build_mesh(cfg)
  tokenizer = load_tokenizer(cfg.tokenizer.path)
  trainer = Trainer(cfg, tokenizer=tokenizer, mesh=mesh, task=coin_task(cfg, tokenizer))
  trainer.run()
  arrays = {"params": trainer.state.params, "teacher": trainer.state.teacher}
  if distributed.multi_process():
    arrays = distributed.local_replica(arrays, distributed.local_mesh(mesh))
  if distributed.is_main():
    leaves, _ = jax.tree_util.tree_flatten_with_path(arrays)
    np.savez(out, **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})
  print("WROTE " + json.dumps(sorted(wrote)), flush=True)


if __name__ == "__main__":
  main()
