"""A real training process for the resume test: tiny config, fast overrides, mixed (coin) rewards so updates are
non-trivial. Usage: python -m tests.resume_driver RUN_DIR STEPS RESUME(0|1)."""
import logging
import sys

from srpo_jax import trainer
from srpo_jax.tokenizer import load_tokenizer
from tests.e2e_utils import coin_task, fast_config


def main():
  logging.basicConfig(level=logging.INFO)
  run_dir, steps, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
  cfg = fast_config(run_dir, **{"train.steps": steps, "checkpoint.every_steps": 1, "resume": resume,
                                "algo.name": "srpo", "eval.every_steps": 2})
  tok = load_tokenizer()
  tr = trainer.Trainer(cfg, tokenizer=tok, task=coin_task(cfg, tok))
  print(f"start step {tr.step}", flush=True)
  tr.run()


if __name__ == "__main__":
  main()
