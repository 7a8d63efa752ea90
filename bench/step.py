"""The train step, measured: utilisation, SRPO's step time against the SDPO-routed fraction, JAX against PyTorch,
and a labelled projection of the Qwen3-8B step on 8 × H100 (issue: step efficiency).

Every time is the median of a few calls after a warm-up (compile excluded), all measured in this one run on this
machine, so the ratios are side by side; absolute times move with the machine's load.

1. Utilisation: achieved FLOP/s of the SRPO update (`trainer.run_updates`: route-pure micro-batches, half of the
   rollouts SDPO-routed) ÷ the FLOP/s of a large `jnp.dot` measured in the same run. FLOPs are XLA's cost analysis
   of the compiled `accumulate` and `apply` programs, exact here because the head is one token tile and one vocabulary
   chunk (cost analysis counts a loop body once) and attention is one key block.
2. SRPO's step (π_old pass where the trainer runs one + the updates) as the SDPO-routed fraction goes 0 → 1, beside
   GRPO and SDPO on the same batch with the same single optimizer step, and GRPO with 4 optimizer steps (its paper
   mini-batch: π_old pass + 4 updates).
3. The same SRPO loss-and-update step in PyTorch: transformers' Qwen3 (eager attention), the tests' reference losses
   (`tests/torch_ref_losses.py`: full-logits top-k JSD, DW, clipped GRPO, the objective) and torch AdamW.
4. The 8B projection: matmul FLOPs of one training step at the paper's shapes (`srpo_jax.plan.analytic_flops`, the
   planner's count, cross-checked against the HLO of the deviceless compile in tests/test_plan.py) ÷ (8 × H100 dense
   bf16 peak × an assumed MFU). A projection, not a measurement; printed beside the paper's measured H20 figures.

Run: `.venv/bin/python bench/step.py` (`make bench` runs it with the other benchmarks).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.torch_ref_losses

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from srpo_jax import batching, methods  # noqa: E402
from srpo_jax import trainer as T  # noqa: E402
from srpo_jax.config import AlgoConfig, CheckpointConfig, Config, OptimConfig, RolloutConfig, TrainConfig  # noqa
from srpo_jax.models.qwen3 import Qwen3Config, init_model  # noqa: E402
from srpo_jax.train_step import LossHParams, make_optimizer, make_train_fns  # noqa: E402

PAD = 0


def median_time(fn, runs: int) -> float:
  fn()  # warm-up: compiles
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_peak(n: int = 2048, runs: int = 5) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  return 2 * n ** 3 / median_time(lambda: f(a).block_until_ready(), runs)


class Setup:
  """A model, a step of `rows` rollouts in groups of 8 (prompt, response and teacher prompt of fixed lengths), and
  the trainer's functions for a method."""

  def __init__(self, hidden, layers, vocab, rows, prompt, resp, teacher_prompt, heads=8, kv=4, head_dim=None,
               tile_size=256):
    self.q = Qwen3Config.preset("tiny", vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                head_dim=head_dim or hidden // heads)
    self.graphdef, self.params = nnx.split(init_model(self.q, seed=1))
    self.teacher = jax.tree.map(lambda x: x * 0.9, self.params)
    rng = np.random.default_rng(0)
    self.rows, self.tile = rows, tile_size
    self.prompts = [list(rng.integers(1, vocab, prompt)) for _ in range(rows)]
    self.responses = [rng.integers(1, vocab, resp).astype(np.int32) for _ in range(rows)]
    self.teacher_prompts = {i: list(rng.integers(1, vocab, teacher_prompt)) for i in range(rows)}
    self.ro = T.Rollouts(prompt_rows=list(range(rows)), responses=self.responses,
                         rollout_logp=[np.full(resp, -1.0, np.float32) for _ in range(rows)], finish=["stop"] * rows,
                         texts=[""] * rows, group_ids=np.repeat(np.arange(rows // 8), 8))
    self.batch = T.assemble(self.ro, self.prompts, PAD)
    self.adv = rng.normal(size=rows).astype(np.float32)

  def cfg(self, method, mini_batch_prompts=None, **optim):
    n = 8
    return Config(run_dir="unused", train=TrainConfig(steps=1), checkpoint=CheckpointConfig(every_steps=1),
                  algo=AlgoConfig(name=method), rollout=RolloutConfig(prompts_per_step=self.rows // n, n=n),
                  optim=OptimConfig(mini_batch_prompts=mini_batch_prompts or self.rows // n, **optim))

  def scored(self, method, sdpo_frac):
    """Routing with `sdpo_frac` of the rollouts failed with a correct sibling (SRPO's SDPO rows)."""
    failed = np.zeros(self.rows, bool)
    failed[:round(sdpo_frac * self.rows)] = True
    if sdpo_frac < 1:
      failed[::8] = False  # a correct rollout per group (the siblings' teacher)
    correct, has_teacher = ~failed, np.ones(self.rows, bool)
    grpo, sdpo = methods.get(method).route_masks(correct, has_teacher)
    return T.Scored(rewards=correct.astype(np.float32), adv=self.adv, grpo=grpo, sdpo=sdpo,
                    sibling=np.zeros(self.rows, np.int32), correct=correct, has_teacher=has_teacher)

  def step_fn(self, cfg, sc):
    """One training step's train-side work (π_old pass where needed, the optimizer steps), blocking."""
    opt, _ = make_optimizer(1e-5, warmup_steps=0)
    fns = make_train_fns(self.graphdef, opt, LossHParams(algo=cfg.algo, loss_agg=cfg.loss_agg,
                                                         tile_size=self.tile))
    # The update donates params and optimizer state (as the trainer, each step continues from the last one's) and
    # `self.params` is shared by every setup: this one works on its own copy.
    params = jax.tree.map(jnp.copy, self.params)
    state = T.TrainState(params=params, opt_state=opt.init(params), teacher=self.teacher)
    current = [state]

    def run():
      st, old = current[0], None
      if T.needs_old_logp(cfg):
        groups = T.row_groups(np.arange(self.rows), self.batch.mask.sum(axis=1), cfg, 1)
        old = T.prepare(fns, st.params, self.batch, groups, PAD)
      out = T.run_updates(fns, st, self.batch, old, sc, self.teacher_prompts, self.responses, cfg, PAD)
      jax.block_until_ready(out[0])
      current[0] = dataclasses.replace(st, params=out[0], opt_state=out[1])
      return out
    return run, fns, state


def update_flops(s: Setup, cfg, sc) -> float:
  """XLA cost analysis of the programs `run_updates` calls for this step (each compiled program × its calls)."""
  _, fns, state = s.step_fn(cfg, sc)
  arrays = batching.StepArrays(ids=s.batch.ids, mask=s.batch.mask, start=s.batch.start, resp=s.batch.resp,
                               roll_logp=s.batch.roll_logp, adv=sc.adv, grpo=sc.grpo, sdpo=sc.sdpo)
  rows = np.arange(s.rows)
  total = 0.0
  grads = jax.tree.map(jnp.zeros_like, s.params)
  one, den = jnp.float32(1.0), jnp.float32(1000.0)
  for g in T.update_groups(rows, s.batch, sc, s.teacher_prompts, s.responses, cfg, 1):
    mb = batching.micro_batch(g, arrays, s.teacher_prompts, s.responses, PAD,
                              num_rows=batching.row_bucket(len(g), cfg.micro_batch_size), seq_len=s.batch.ids.shape[1],
                              resp_len=s.batch.resp.shape[1])
    c = fns.accumulate.lower(s.params, s.teacher, grads, one, mb, den).compile()
    total += float(c.cost_analysis()["flops"])
  c = fns.apply.lower(s.params, state.opt_state, grads, jnp.float32(1.0), one).compile()
  return total + float(c.cost_analysis()["flops"])


def torch_step(s: Setup, sc, runs: int) -> float:
  """The SRPO loss-and-update step in PyTorch (eager): student forward/backward on every row, teacher forward on the
  SDPO rows, full-logits losses from tests/torch_ref_losses.py, AdamW."""
  import torch
  import transformers
  from tests import torch_ref_losses as ref
  torch.manual_seed(0)
  q = s.q
  hf_cfg = transformers.Qwen3Config(
      vocab_size=q.vocab_size, hidden_size=q.hidden_size, intermediate_size=q.intermediate_size,
      num_hidden_layers=q.num_hidden_layers, num_attention_heads=q.num_attention_heads,
      num_key_value_heads=q.num_key_value_heads, head_dim=q.head_dim, max_position_embeddings=4096,
      tie_word_embeddings=True, dtype="float32", attn_implementation="eager")
  student = transformers.Qwen3ForCausalLM(hf_cfg)
  teacher = transformers.Qwen3ForCausalLM(hf_cfg).eval()
  opt = torch.optim.AdamW(student.parameters(), lr=1e-5, weight_decay=0.01)
  b = s.batch
  t_len = b.resp.shape[1]
  ids, mask = torch.tensor(b.ids, dtype=torch.long), torch.tensor(b.mask)
  pos = torch.tensor(np.clip(b.start[:, None] + np.arange(t_len), 0, b.ids.shape[1] - 1))
  targets = torch.gather(ids, 1, pos)
  rows = np.flatnonzero(sc.sdpo)
  tr = batching.teacher_sequences(rows, s.teacher_prompts, s.responses, t_len, PAD, num_rows=len(rows))
  t_ids, t_mask = torch.tensor(tr.ids, dtype=torch.long), torch.tensor(tr.mask)
  t_pos = torch.tensor(np.clip(tr.start[:, None] + np.arange(t_len), 0, tr.ids.shape[1] - 1))
  valid = torch.tensor(b.resp)
  adv = torch.tensor(sc.adv)[:, None].expand(-1, t_len)
  roll = torch.tensor(b.roll_logp)
  grpo_B, sdpo_B = torch.tensor(sc.grpo), torch.tensor(sc.sdpo)

  def step():
    opt.zero_grad()
    logits = student(input_ids=ids, attention_mask=mask).logits
    logits = torch.gather(logits, 1, (pos - 1).clamp(min=0)[..., None].expand(-1, -1, logits.shape[-1]))
    logp_all = torch.log_softmax(logits, -1)
    logp = torch.gather(logp_all, -1, targets[..., None])[..., 0]
    old = logp.detach()
    w_roll = ref.rollout_is_weight(old, roll)
    grpo = ref.grpo_token_loss(logp, old, adv, w_roll=w_roll)
    sdpo = torch.zeros_like(logp)
    dw = torch.ones_like(logp)
    if len(rows):
      with torch.no_grad():
        t_logits = teacher(input_ids=t_ids, attention_mask=t_mask).logits
        t_logits = torch.gather(t_logits, 1, (t_pos - 1).clamp(min=0)[..., None].expand(-1, -1, t_logits.shape[-1]))
        t_logp = torch.log_softmax(t_logits, -1)
        ent = -(t_logp.exp() * t_logp).sum(-1)
      jsd = ref.topk_jsd(logits[rows], t_logits, k=100, dtype=torch.float32)
      sd = ref.sdpo_token_loss(jsd, logp[rows], old[rows], w_roll=w_roll[rows])
      sdpo = sdpo.index_put((torch.tensor(rows),), sd)
      w = ref.dw_weights(ent, valid[rows]).float()
      dw = dw.index_put((torch.tensor(rows),), torch.where(valid[rows], w, torch.ones_like(w)))
    loss = ref.objective(grpo, sdpo, dw, valid, grpo_B, sdpo_B, "srpo", "token-mean")
    loss.backward()
    opt.step()

  return median_time(step, runs)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--mfu", type=float, default=0.4, help="assumed MFU of the 8 × H100 projection")
  args = ap.parse_args()
  print(f"JAX {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores; medians of "
        f"{args.runs} calls after a warm-up")

  # 1. Utilisation: hidden 512, 4 layers, 8 × 512 tokens (prompt 256 + response 256); V 8,192 (one vocabulary chunk).
  u = Setup(hidden=512, layers=4, vocab=8192, rows=8, prompt=256, resp=256, teacher_prompt=256, tile_size=1024)
  cfg = u.cfg("srpo")
  sc = u.scored("srpo", 0.5)
  flops = update_flops(u, cfg, sc)
  run, _, _ = u.step_fn(cfg, sc)
  t_jax = median_time(run, args.runs)
  peak = matmul_peak()
  print(f"\n1. SRPO update (8 rollouts × 512 tokens, 4 SDPO-routed; d=512, 4 layers, V=8192)")
  print(f"   XLA cost analysis: {flops / 1e9:.1f} GFLOP per step; {t_jax:.3f} s -> {flops / t_jax / 1e9:.1f} GFLOP/s; "
        f"jnp.dot peak {peak / 1e9:.1f} GFLOP/s")
  print(f"train-step utilisation: {100 * flops / t_jax / peak:.1f}%")

  # 3. PyTorch, same step, same sizes.
  t_torch = torch_step(u, sc, args.runs)
  print(f"\n3. the same SRPO loss-and-update step: JAX {t_jax:.3f} s, PyTorch (transformers eager + reference losses "
        f"+ AdamW) {t_torch:.3f} s")
  print(f"speedup vs PyTorch step: {t_torch / t_jax:.2f}x")

  # 2. Step time against the SDPO-routed fraction.
  s = Setup(hidden=256, layers=2, vocab=8192, rows=32, prompt=64, resp=64, teacher_prompt=192, tile_size=512)
  print(f"\n2. step time vs SDPO-routed fraction (32 rollouts: prompt 64, response 64, teacher prompt 192; d=256, "
        f"2 layers, V=8192; one optimizer step unless stated)")
  print(f"   {'method':<34} {'SDPO rows':>9} {'s/step':>8} {'/ GRPO':>7}")
  grpo_t = median_time(s.step_fn(s.cfg("grpo"), s.scored("grpo", 0.5))[0], args.runs)
  rows = [("grpo", 0.0, grpo_t)]
  grpo4 = median_time(s.step_fn(s.cfg("grpo", mini_batch_prompts=1), s.scored("grpo", 0.5))[0], args.runs)
  rows.append(("grpo (4 optimizer steps + π_old pass)", 0.0, grpo4))
  sdpo_sc = s.scored("sdpo", 0.5)
  rows.append(("sdpo", float(sdpo_sc.sdpo.mean()), median_time(s.step_fn(s.cfg("sdpo"), sdpo_sc)[0], args.runs)))
  for frac in (0.0, 0.25, 0.5, 1.0):
    sc = s.scored("srpo", frac)
    rows.append(("srpo", float(sc.sdpo.mean()), median_time(s.step_fn(s.cfg("srpo"), sc)[0], args.runs)))
  for name, f, t in rows:
    print(f"   {name:<34} {f:9.2f} {t:8.3f} {t / grpo_t:7.2f}")
  srpo = [(f, t) for n, f, t in rows if n == "srpo"]
  sdpo_t = rows[2][2]
  slope = (srpo[-1][1] - srpo[0][1]) / max(srpo[-1][0] - srpo[0][0], 1e-9)
  worst = max(t - (srpo[0][1] + slope * f) for f, t in srpo)
  print(f"srpo at fraction 0 / grpo: {srpo[0][1] / grpo_t:.3f}")
  print(f"srpo worst excess over the line from fraction 0 to 1: {worst / srpo[0][1]:+.3f} of the fraction-0 time")
  print(f"srpo / sdpo at fractions < 1: " + ", ".join(f"{t / sdpo_t:.2f}" for f, t in srpo if f < 1))

  # 4. Projection (no GPU here).
  try:
    projection(args.mfu)
  except Exception as e:  # the planner's API is the planner's; never let the projection hide the measurements
    print(f"\n4. projection skipped: {type(e).__name__}: {e}")


def projection(mfu: float) -> None:
  from srpo_jax import plan
  from srpo_jax.config import paper_config
  cfg = plan.planning_config(paper_config("Qwen3-8B"))
  target = plan.TARGETS["h100x8"]
  q = plan.model_config(cfg, target)
  shapes = plan.Shapes.from_config(cfg, row_shards=8)
  per_device = plan.analytic_flops(q, shapes, 8)
  # analytic_flops: per device and per call of each program (accumulate: one micro-batch).
  # Every rollout SDPO-routed: each micro-batch is a teacher micro-batch (`accumulate_t`).
  calls = {"accumulate_t": cfg.micro_batches_per_mini_batch * cfg.optimizer_steps_per_step,
           "prepare": cfg.micro_batches_per_mini_batch if T.needs_old_logp(cfg) else 0}
  per_step = sum(per_device.get(k, 0.0) * n for k, n in calls.items()) * 8
  if not per_step:
    raise ValueError(f"no accumulate/prepare FLOPs in the planner's count {sorted(per_device)}")
  h100 = 989e12
  print(f"\n4. PROJECTION (not measured): Qwen3-8B srpo step at the paper's shapes (256 rollouts, prompt "
        f"{cfg.data.max_prompt_tokens} + response {cfg.rollout.max_new_tokens} tokens, every rollout SDPO-routed and "
        f"at the maximum lengths, teacher rows at the full teacher budget: an upper bound): "
        f"{per_step / 1e15:.1f} PFLOP of train-side matmuls; at {mfu:.0%} MFU of 8 × H100 (989 TFLOP/s dense bf16 "
        f"each) {per_step / (8 * h100 * mfu):.1f} s per step, rollouts excluded")
  print("   paper, measured on 8 × H20 (whole step, rollouts included), s/step at 1 h / 5 h / 10 h: "
        "GRPO 71.0 / 82.4 / 91.5, SDPO 85.9 / 83.9 / 83.7, SRPO 83.4 / 78.3 / 75.8")


if __name__ == "__main__":
  main()
