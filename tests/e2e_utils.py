"""Helpers for end-to-end tests: the tiny config made fast, and deterministic mixed rewards."""
import dataclasses
import importlib.util
import os
import socket
import subprocess
import sys
import zlib

from srpo_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config_dict():
  spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(REPO, "configs", "tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


FAST = {"train.steps": 2, "train.warmstart_steps": 0, "rollout.prompts_per_step": 2, "rollout.n": 4,
        "rollout.max_new_tokens": 4, "eval.n_samples": 2, "eval.max_questions": 2, "eval.every_steps": 0,
        "checkpoint.every_steps": 1, "data.synthetic_train_size": 16, "data.synthetic_test_size": 4,
        "optim.warmup_steps": 0, "checkpoint.export_hf": False, "optim.mini_batch_prompts": 1,
        "optim.micro_batch_size": 2}


def fast_overrides(run_dir, **extra):
  return {**FAST, "run_dir": str(run_dir), **extra}


def fast_config(run_dir, **extra):
  return config_lib.validate(config_lib.apply_overrides(tiny_config_dict(), fast_overrides(run_dir, **extra)))


def copied(tree):
  """A copy of every array of `tree`: the train step's programs donate params, optimizer state and gradients (as on
  GPUs), so a test that passes the same arrays twice passes copies."""
  import jax
  import jax.numpy as jnp
  return jax.tree.map(jnp.copy, tree)


def fresh(state):
  """`state` (a trainer.TrainState) with its own copies of the arrays (`copied`)."""
  return dataclasses.replace(state, params=copied(state.params), opt_state=copied(state.opt_state),
                             teacher=copied(state.teacher))


def coin_reward(text: str, answer: str) -> float:
  """A deterministic 0/1 'reward' of the text alone: random-init models then produce mixed groups to route."""
  del answer
  return float(zlib.crc32(text.encode("utf-8")) % 2)


def coin_task(cfg, tokenizer, reward=coin_reward):
  """The configured task with the coin reward injected (so random-init models produce mixed groups)."""
  from srpo_jax.task import load_task
  return dataclasses.replace(load_task(cfg, tokenizer), reward=reward)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_driver(run_dir, steps: int, resume: bool) -> subprocess.Popen:
  """A real training process (tests/resume_driver.py), output captured."""
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  return subprocess.Popen([sys.executable, "-m", "tests.resume_driver", str(run_dir), str(steps), "1" if resume else "0"],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
