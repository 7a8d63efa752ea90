"""Supervised format warm-start for the tiny demo (train.warmstart_steps > 0): cached, deterministic.

A random-init model never emits `<answer>X</answer>`, so every group would be all-wrong and RL would have nothing to
route. The warm-start teaches the answer FORMAT (random letters) and reading a given solution from a teacher prompt,
not the answers (`data.synthetic.warmstart_examples`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from srpo_jax import batching
from srpo_jax.algorithms.teacher import teacher_messages
from srpo_jax.data import prompts as prompt_lib, synthetic
from srpo_jax.models import hf_io
from srpo_jax.models.qwen3 import Qwen3
from srpo_jax.train_step import LossHParams, student_logp

log = logging.getLogger("srpo_jax")
BATCH = 32  # examples per supervised step
VERSION = "v1"  # part of the cache key: bump when the recipe changes


def cache_key(cfg) -> str:
  """A hash of everything that determines the warm-started weights."""
  t = cfg.train
  return hashlib.sha1(json.dumps([dataclasses.asdict(cfg.model), t.warmstart_steps, t.warmstart_lr, cfg.seed,
                                  cfg.data.synthetic_difficulty, VERSION], sort_keys=True).encode()).hexdigest()[:16]


def warmstart(model: Qwen3, cfg, tokenizer, cache_root: Optional[str]) -> Qwen3:
  """`cfg.train.warmstart_steps` Adam steps on format examples; cached as an HF directory under `cache_root` (None:
  computed, not cached)."""
  t = cfg.train
  path = None if cache_root is None else os.path.join(cache_root, f"warmstart-{cache_key(cfg)}")
  if path is not None and os.path.isfile(os.path.join(path, "config.json")):
    log.info("warm-start: loading cached %s", path)
    return hf_io.load_pretrained(path, **cfg.model.qwen3_overrides)
  log.info("warm-start: %d supervised format steps (cached afterwards at %s)", t.warmstart_steps, path or "-")
  examples = synthetic.warmstart_examples(t.warmstart_steps * BATCH, seed=cfg.seed,
                                          difficulty=cfg.data.synthetic_difficulty, teacher_messages=teacher_messages)
  eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
  prompts = [prompt_lib.encode_text(tokenizer, prompt_lib.render_messages(tokenizer, e.messages)) for e in examples]
  targets = [prompt_lib.encode_text(tokenizer, e.target) + [eos] for e in examples]
  p_len = batching.pow2_bucket(max(map(len, prompts)), 16)
  r_len = batching.pow2_bucket(max(map(len, targets)), 8)
  graphdef, params = nnx.split(model)
  opt = optax.adam(t.warmstart_lr)
  opt_state = opt.init(params)
  hp = LossHParams()

  @jax.jit
  def sft_step(params, opt_state, ids, mask, start, resp):
    def loss_fn(p):
      logp = student_logp(nnx.merge(graphdef, p), ids, mask, start, r_len, hp)
      return -jnp.sum(jnp.where(resp, logp, 0.0)) / jnp.sum(resp)
    loss, g = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  pad = tokenizer.pad_token_id
  for s in range(t.warmstart_steps):
    sl = slice(s * BATCH, (s + 1) * BATCH)
    seq = batching.sequences(prompts[sl], targets[sl], p_len, r_len, pad)
    params, opt_state, loss = sft_step(params, opt_state, seq.ids, seq.mask, seq.start, seq.resp)
    if s % 50 == 0 or s == t.warmstart_steps - 1:
      log.info("warm-start step %d/%d  loss %.4f", s + 1, t.warmstart_steps, float(loss))
  model = nnx.merge(graphdef, params)
  if path is not None:
    hf_io.save_pretrained(model, path)
  return model
