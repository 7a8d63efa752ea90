"""Run with 8 forced CPU devices (tests/test_sharded_step.py): one SRPO update (the trainer's `run_updates`: route-pure
micro-batches, deferred DW) on 1 device and on several meshes, printing one JSON line with the losses, the relative
parameter difference per mesh and the compiled `accumulate`'s input sharding of a teacher micro-batch; and, on 1
device, how far the update moves when the DW normaliser or the SDPO term is broken (what the comparison must see).
The models are sharpened (tests/sharp_model.py) so that the SDPO term and the DW weights are material."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from srpo_jax import batching, sharding  # noqa: E402
from srpo_jax import trainer as T  # noqa: E402
from srpo_jax.config import (AlgoConfig, CheckpointConfig, Config, OptimConfig, RolloutConfig,  # noqa: E402
                             TrainConfig)
from srpo_jax.models.qwen3 import Qwen3Config, init_model  # noqa: E402
import optax  # noqa: E402

from srpo_jax.train_step import LossHParams, TrainShardings, make_train_fns  # noqa: E402
from srpo_jax import metrics as M  # noqa: E402
from tests.e2e_utils import fresh  # noqa: E402
from tests.sharp_model import broken, sharpen  # noqa: E402

V, PAD, B = 384, 0, 16


def step(rng):
  prompts = [list(rng.integers(1, V, rng.integers(3, 9))) for _ in range(B)]
  responses = [list(rng.integers(1, V, rng.integers(1, 7))) for _ in range(B)]
  rewards = rng.integers(0, 2, B).astype(np.float32)
  sdpo = rewards == 0
  seq = batching.sequences(prompts, responses, 16, 8, PAD)
  roll = np.where(seq.resp, -rng.uniform(0.1, 3.0, seq.resp.shape), 0.0).astype(np.float32)
  batch = T.StepBatch(ids=seq.ids, mask=seq.mask, start=seq.start, resp=seq.resp, roll_logp=roll)
  sc = T.Scored(rewards=rewards, adv=(rewards - rewards.mean()).astype(np.float32), grpo=~sdpo, sdpo=sdpo,
                sibling=np.zeros(B, np.int32), correct=rewards > 0, has_teacher=np.ones(B, bool))
  teacher_prompts = {int(i): list(rng.integers(1, V, 6)) for i in np.flatnonzero(sdpo)}
  return batch, sc, teacher_prompts, [np.asarray(r, np.int32) for r in responses]


def broken_updates(fns, state, batch, sc, tps, responses, run_cfg, params0, ref):
  """The 1-device update with the DW normaliser left out and with the SDPO term dropped (tests/sharp_model.py
  `broken`): {case: {loss, relative update diff}}."""
  out = {}
  for kind in ("dw_unnormalised", "sdpo_term_dropped"):
    with broken(kind):
      new_params, _, stats, _ = T.run_updates(fns, fresh(state), batch, None, sc, tps, responses, run_cfg, PAD, 1)
    delta = np.concatenate([(np.asarray(a) - np.asarray(b)).ravel() for a, b in
                            zip(jax.tree.leaves(new_params), jax.tree.leaves(params0))])
    out[kind] = {"loss": float(stats[0].loss),
                 "rel_update_diff": float(np.linalg.norm(delta - ref[1]) / np.linalg.norm(ref[1]))}
  return out


def main():
  cfg = Qwen3Config.preset("tiny", vocab_size=V, hidden_size=32, intermediate_size=64, head_dim=8)
  graphdef, params0 = nnx.split(sharpen(init_model(cfg, seed=1)))
  teacher0 = nnx.split(sharpen(init_model(cfg, seed=7)))[1]
  # SGD with lr 1: the parameter change is the accumulated gradient itself, which is what sharding must preserve
  # (Adam's g / (|g| + eps) would turn fp32 summation-order noise in tiny gradients into visible differences).
  opt = optax.sgd(1.0)
  run_cfg = Config(run_dir="unused", train=TrainConfig(steps=1), checkpoint=CheckpointConfig(every_steps=1),
                   algo=AlgoConfig(name="srpo", topk=16), rollout=RolloutConfig(prompts_per_step=2, n=B // 2),
                   optim=OptimConfig(micro_batch_size=8))
  hp = LossHParams(algo=run_cfg.algo, loss_agg=run_cfg.loss_agg, tile_size=32)
  batch, sc, tps, responses = step(np.random.default_rng(0))
  out = {}
  ref = None
  for shape in [None, (8, 1, 1), (1, 8, 1), (2, 2, 2)]:  # data, fsdp (the paper configs'), all three axes
    if shape is None:
      fns, params, teacher, rows = make_train_fns(graphdef, opt, hp), params0, teacher0, 1
      opt_state = opt.init(params)
    else:
      mesh = sharding.make_mesh(*shape)
      sh = TrainShardings.build(mesh, params0, opt)
      params, teacher = jax.device_put(params0, sh.params), jax.device_put(teacher0, sh.params)
      opt_state = jax.device_put(opt.init(params), sh.opt_state)
      fns, rows = make_train_fns(graphdef, opt, hp, sh), shape[0] * shape[1]
    state = T.TrainState(params=params, opt_state=opt_state, teacher=teacher)
    new_params, _, stats, _ = T.run_updates(fns, fresh(state), batch, None, sc, tps, responses, run_cfg, PAD, rows)
    delta = np.concatenate([(np.asarray(a) - np.asarray(b)).ravel() for a, b in
                            zip(jax.tree.leaves(new_params), jax.tree.leaves(params0))])
    if shape is None:
      ref = (float(stats[0].loss), delta)
      out["ref_loss"] = ref[0]
      m = T.update_metrics(jax.device_get(stats))
      out["dw_spread"] = m[M.DW_MAX] / m[M.DW_MIN]
      out["broken"] = broken_updates(fns, state, batch, sc, tps, responses, run_cfg, params0, ref)
      continue
    rel = float(np.linalg.norm(delta - ref[1]) / np.linalg.norm(ref[1]))
    arrays = batching.StepArrays(ids=batch.ids, mask=batch.mask, start=batch.start, resp=batch.resp,
                                 roll_logp=batch.roll_logp, adv=sc.adv, grpo=sc.grpo, sdpo=sc.sdpo)
    mb = batching.micro_batch(np.flatnonzero(sc.sdpo)[:8], arrays, tps, responses, PAD, num_rows=8, row_multiple=rows)
    grads = jax.tree.map(jnp.zeros_like, params)
    compiled = fns.accumulate.lower(params, teacher, grads, jnp.float32(1.0), mb, jnp.float32(10.0)).compile()
    batch_spec = compiled.input_shardings[0][4].ids.spec
    out[str(shape)] = {"loss": float(stats[0].loss), "rel_update_diff": rel, "batch_ids_spec": str(batch_spec),
                       "collectives": sorted({op for op in ("all-gather", "reduce-scatter", "all-reduce")
                                              if op in compiled.as_text()})}
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  sys.exit(main())
