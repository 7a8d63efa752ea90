"""Run with .venv-aot/bin/python (JAX's CUDA plugin, no GPU needed): tests/test_plan.py's deviceless checks.

Compiles a small Qwen3's real `update` program (train_step.make_train_fns, SRPO with teacher rows) for an 8 × H100
topology (mesh fsdp=8) and for one H100, and prints one JSON line: whether cuDNN flash attention and the FSDP
collectives are in the 8-device program, both programs' FLOPs per device (counted from the optimised HLO), the
8-device program's temporaries and the planner's analytic bound for them. Then runs the planner's CLI on the paper's
Qwen3-8B config for one H100 without sharding (must fail on the state terms) and records its exit status and message.
"""
import json
import os
import subprocess
import sys

from srpo_jax import aot

aot.ensure_cuda_env()  # before jax creates its backends

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from srpo_jax import plan  # noqa: E402
from srpo_jax.config import AlgoConfig  # noqa: E402
from srpo_jax.models.qwen3 import Qwen3Config  # noqa: E402
from srpo_jax.train_step import LossHParams, make_train_fns  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small Qwen3 shape (bf16 compute, fp32 parameters, remat, cuDNN attention): 8 rollouts of 512 positions (256
# response), every one SDPO-routed with a 768-position teacher row.
QCFG = Qwen3Config.preset("tiny", hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=64, vocab_size=2048, dtype="bfloat16",
                          param_dtype="float32", remat=True, attention="cudnn")
ROWS, PROMPT, RESP, TEACHER_PROMPT = 8, 256, 256, 512


class _Cfg:
  """The few config fields `plan.Model.build` reads."""
  lr = 1e-5

  class optim:  # noqa: N801
    warmup_steps, weight_decay, b1, b2, eps, grad_clip = 0, 0.01, 0.9, 0.999, 1e-8, 1.0


def compile_update(num_devices: int):
  mesh = aot.make_mesh(aot.topology_devices(plan.TARGETS["h100x8"].config_text(), num_devices),
                       {"data": 1, "fsdp": num_devices, "tensor": 1})
  model = plan.Model.build(_Cfg, QCFG, mesh)
  fns = make_train_fns(model.graphdef, model.optimizer, LossHParams(algo=AlgoConfig(name="srpo", topk=16)),
                       model.shardings)
  s = PROMPT + RESP
  mbs = plan.abstract_micro_batch((1,), ROWS, s, RESP, ROWS, TEACHER_PROMPT + RESP)
  args = (model.params, model.opt_state, model.params, mbs, jax.ShapeDtypeStruct((), jnp.float32))
  compiled, summ = aot.compile_lowered("update", aot.lower_jitted(fns.update, args, donate_argnums=(0, 1)))
  shapes = plan.Shapes(row_shards=num_devices, prompt=PROMPT, resp=RESP, seq=s, teacher_seq=TEACHER_PROMPT + RESP,
                       budget_mode=False, micro_rows=ROWS, micro_batches=1, teacher_rows=ROWS, prep_rows=ROWS,
                       prep_teacher_rows=0, sampler_rows=0, sampler_prompt=0, sampler_new=0)
  bound = plan.analytic_activations(QCFG, shapes, num_devices, 1)["update"]  # gradients included
  return summ, aot.hlo_flops(compiled.as_text()), bound


def main():
  out = {}
  for n in (1, 8):
    summ, flops, bound = compile_update(n)
    out[str(n)] = {"cudnn_attention": summ.cudnn_attention, "collectives": summ.collectives,
                   "flops": flops.total, "attention_flops": flops.attention, "temp_bytes": summ.temp_bytes,
                   "analytic_bound": bound, "unknown_trip_counts": flops.unknown_trip_counts}
  proc = subprocess.run([sys.executable, "-m", "srpo_jax.plan", "--config=configs/qwen3_8b.py", "--target=h100x1",
                         "--config.mesh.fsdp=1"], cwd=REPO, capture_output=True, text=True, timeout=600)
  out["h100x1_fsdp1"] = {"rc": proc.returncode, "stderr_tail": proc.stderr[-3000:], "stdout": proc.stdout[-3000:]}
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  sys.exit(main())
