"""Run with .venv-aot/bin/python (JAX's CUDA plugin and libtpu, no GPU or TPU needed): tests/test_plan.py's deviceless
checks. `python -m tests.aot_worker` compiles for H100s, `python -m tests.aot_worker tpu` for TPU v5p chips (below).

Compiles a small Qwen3's real `accumulate` program on a teacher micro-batch (train_step.make_train_fns, SRPO: every
row SDPO-routed beside its teacher row, gradients donated) for an 8 × H100 topology (mesh fsdp=8) and for one H100,
and the 8-device `apply`, and prints one JSON line: whether cuDNN flash attention and the FSDP collectives are in the
8-device accumulate, both accumulate programs' FLOPs per device (counted from the optimised HLO), the 8-device
programs' temporaries and the planner's analytic bounds for them, XLA's argument bytes against the planner's
state + batch, and the hosts of a 2-node × 8 topology's devices. Then runs the planner's CLI on the paper's
Qwen3-8B config for one H100 without sharding (must fail on the state terms) and records its exit status and message.
"""
import json
import os
import subprocess
import sys

from srpo_jax import aot

aot.ensure_cuda_env()  # before jax creates its backends

import jax  # noqa: E402

from srpo_jax import plan  # noqa: E402
from srpo_jax.config import AlgoConfig  # noqa: E402
from srpo_jax.models.qwen3 import Qwen3Config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small Qwen3 shape (bf16 compute, fp32 parameters, remat, "auto" attention compiled for the platform: cuDNN on
# GPUs, splash on TPUs): 8 rollouts of 512 positions (256 response), every one SDPO-routed with a 768-position
# teacher row. head_dim 128: a TPU lane's width, which splash's blocks need.
QCFG = {platform: Qwen3Config.preset(
    "tiny", hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=64 if platform == "gpu" else 128, vocab_size=2048, dtype="bfloat16", param_dtype="float32", remat=True,
    platform=platform) for platform in ("gpu", "tpu")}
ROWS, PROMPT, RESP, TEACHER_PROMPT = 8, 256, 256, 512


class _Cfg:
  """The few config fields `plan.Model.build` and `plan.build_programs` (LossHParams.from_config) read."""
  lr = 1e-5
  algo = AlgoConfig(name="srpo", topk=16)
  loss_agg = "token-mean"

  class rollout:  # noqa: N801
    temperature = 1.0

  class optim:  # noqa: N801
    warmup_steps, weight_decay, b1, b2, eps, grad_clip = 0, 0.01, 0.9, 0.999, 1e-8, 1.0


def compile_programs(num_devices: int, platform: str = "gpu"):
  """The planner's own `build_programs` on the worker's shapes: accumulate_t and apply (on-policy: no prepare), for
  num_devices H100s or chips of a TPU v5p-8 slice."""
  devices = (aot.topology_devices(plan.TARGETS["h100x8"].config_text(), num_devices) if platform == "gpu" else
             aot.tpu_topology_devices(plan.TARGETS["v5p-8"].tpu_topology)[:num_devices])
  mesh = aot.make_mesh(devices, {"data": 1, "fsdp": num_devices, "tensor": 1})
  qcfg = QCFG[platform]
  model = plan.Model.build(_Cfg, qcfg, mesh)
  s = PROMPT + RESP
  shapes = plan.Shapes(row_shards=num_devices, prompt=PROMPT, resp=RESP, seq=s, teacher_seq=TEACHER_PROMPT + RESP,
                       budget_mode=False, micro_rows=ROWS, teacher_rows=ROWS, micro_batches=1, prep_rows=0,
                       sampler_rows=0, sampler_prompt=0, sampler_new=0)
  progs = {p.name: p for p in plan.build_programs(_Cfg, model, shapes, mesh, donate=True)}
  bounds = plan.analytic_activations(qcfg, shapes, num_devices, 1)
  state = model.state_bytes()
  batch = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
      plan.abstract_micro_batch(ROWS, s, RESP, TEACHER_PROMPT + RESP))) // num_devices
  out = {"programs": sorted(progs)}
  for name in (plan.ACCUMULATE_T, "apply") if num_devices > 1 else (plan.ACCUMULATE_T,):
    compiled, summ = aot.compile_lowered(name, progs[name].lower())
    flops = aot.hlo_flops(compiled.as_text())
    out[name] = {"cudnn_attention": summ.cudnn_attention, "splash_attention": summ.splash_attention,
                 "xla_flops": summ.xla_flops, "collectives": summ.collectives,
                 "flops": flops.total, "attention_flops": flops.attention, "temp_bytes": summ.temp_bytes,
                 "analytic_bound": bounds[name], "unknown_trip_counts": flops.unknown_trip_counts,
                 "argument_bytes": summ.argument_bytes, "alias_bytes": summ.alias_bytes,
                 "state_in": sum(state[k] for k in progs[name].state_args), "batch": batch if name != "apply" else 0,
                 "gradients": state["gradients"]}
  return out


def blockwise_temporaries(layers: int, tokens: int = 10_240) -> int:
  """Temporaries of Qwen3-8B's `hidden_states` forward + backward (bf16 compute, fp32 parameters, remat, blockwise
  attention, the default call: no right_padded promise), one row of `tokens` per device on 8 H100s (fsdp 8), traced
  under the mesh as the train step is."""
  import jax.numpy as jnp
  from flax import nnx
  from srpo_jax import sharding
  from srpo_jax.models import qwen3
  devices = aot.topology_devices(plan.TARGETS["h100x8"].config_text(), 8)
  mesh = aot.make_mesh(devices, {"data": 1, "fsdp": 8, "tensor": 1})
  q = qwen3.Qwen3Config.preset("8b", num_hidden_layers=layers, dtype="bfloat16", remat=True, attention="blockwise",
                               platform="gpu")
  graphdef, params = nnx.split(nnx.eval_shape(lambda: qwen3.Qwen3(q, rngs=nnx.Rngs(0))))
  psh, rows = sharding.state_shardings(params, mesh), sharding.batch_sharding(mesh, 2)

  def loss(params, ids, mask):
    h = nnx.merge(graphdef, params).hidden_states(ids, mask)
    return jnp.sum(h.astype(jnp.float32) ** 2)

  grad = jax.jit(jax.grad(loss), in_shardings=(psh, rows, rows), out_shardings=psh)
  with jax.set_mesh(mesh):
    lowered = grad.lower(params, jax.ShapeDtypeStruct((8, tokens), jnp.int32), jax.ShapeDtypeStruct((8, tokens), bool))
  return int(lowered.compile().memory_analysis().temp_size_in_bytes)


def main():
  if sys.argv[1:] == ["tpu"]:
    out = {str(n): compile_programs(n, "tpu") for n in (1, 4)}
    out["v5p-16_hosts"] = [d.process_index for d in aot.tpu_topology_devices(plan.TARGETS["v5p-16"].tpu_topology)]
    print("RESULT " + json.dumps(out))
    return 0
  out = {str(n): compile_programs(n) for n in (1, 8)}
  # One program serves left and right padding (the layout is data; right_padded only lets "auto" pick cuDNN).
  out["blockwise_8b"] = {layers: blockwise_temporaries(layers) for layers in (2, 4)}
  out["two_hosts"] = [d.process_index for d in aot.topology_devices(plan.TARGETS["h100x8"].config_text(), 16, 2)]
  proc = subprocess.run([sys.executable, "-m", "srpo_jax.plan", "--config=configs/qwen3_8b.py", "--target=h100x1",
                         "--config.mesh.fsdp=1"], cwd=REPO, capture_output=True, text=True, timeout=600)
  out["h100x1_fsdp1"] = {"rc": proc.returncode, "stderr_tail": proc.stderr[-3000:], "stdout": proc.stdout[-3000:]}
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  sys.exit(main())
