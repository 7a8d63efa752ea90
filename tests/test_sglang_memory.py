"""SGLang's side of each GPU beside JAX (srpo_jax/rollout/sglang_memory.py, issue 21 items 3-4): the arithmetic is
tied to the model and the export it sizes, reproduces the issue's failure of the old fixed fraction, and the trainer
launches the server with every GPU as a data-parallel rank, which the fake server shows requests spread over."""
from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest
from flax import nnx

from srpo_jax import plan, trainer
from srpo_jax.models import hf_io
from srpo_jax.models.qwen3 import Qwen3, Qwen3Config, init_model
from srpo_jax.rollout import sglang_memory as sm
from srpo_jax.rollout.engine import SamplingParams
from tests.fake_server_utils import fake_engine

H100 = plan.TARGETS["h100x8"].device_memory_bytes()
H200 = plan.TARGETS["h200x8"].device_memory_bytes()


@pytest.mark.parametrize("preset", ["tiny", "0.6b", "8b"])
def test_param_count_is_the_models(preset):
  q = Qwen3Config.preset(preset)
  abstract = nnx.state(nnx.eval_shape(lambda: Qwen3(q, rngs=nnx.Rngs(0))), nnx.Param)
  assert sm.param_count(q) == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))


def test_weight_bytes_are_the_exports(tmp_path):
  q = Qwen3Config.preset("tiny", tie_word_embeddings=False)
  out = hf_io.save_pretrained(init_model(q), tmp_path / "e", dtype="bfloat16")
  assert json.load(open(os.path.join(out, hf_io.INDEX_FILE)))["metadata"]["total_size"] == sm.weight_bytes(q)


def test_kv_bytes_per_token():
  q = Qwen3Config.preset("8b")  # 36 layers, 8 KV heads of 128
  assert sm.kv_bytes_per_token(q) == 2 * 36 * 8 * 128 * 2
  assert sm.kv_bytes_per_token(q, tp=2) == sm.kv_bytes_per_token(q) // 2


def _sglang_kv(mem: sm.SGLangMemory, fraction: float) -> int:
  """SGLang's own computation (kv_cache_configurator._profile_available_bytes) for a server started on `pre` free
  bytes: free after its weights minus pre × (1 - mem_fraction_static)."""
  pre = mem.free_at_start
  return (pre - mem.weights) - int(pre * (1 - fraction))


def test_the_issues_failure_and_the_sized_fraction():
  """Qwen3-8B beside JAX's 55% of an H100: the old --mem-fraction-static 0.35 leaves SGLang a negative KV budget
  ("Loaded weights leave no GPU memory for the KV cache"); the sized fraction leaves exactly the headroom as slack
  and a positive pool, every other byte."""
  q = Qwen3Config.preset("8b")
  mem = sm.plan(q, device_memory=H100, jax_fraction=0.55, gpus=8, prompts_per_step=32, n=8, max_prompt=2048,
                max_new=8192)
  assert _sglang_kv(mem, 0.35) < 0
  assert mem.starts and abs(_sglang_kv(mem, mem.mem_fraction_static) - mem.kv_bytes) <= 1
  slack = mem.free_at_start * (1 - mem.mem_fraction_static)
  assert mem.headroom <= slack <= mem.headroom + 0.001 * mem.free_at_start
  assert mem.dp == 8 and mem.need_tokens == 32 * 8 // 8 * (2048 + 8192)
  assert not mem.fits  # 8B at 8k responses: 45 GiB of KV per GPU, more than an H100 has beside JAX


def test_fits_flips_at_the_jax_share_it_names():
  q = Qwen3Config.preset("8b")
  kw = dict(device_memory=H200, gpus=8, prompts_per_step=32, n=8, max_prompt=2048, max_new=8192)
  short = sm.plan(q, jax_fraction=0.55, **kw)
  assert not short.fits
  to_fit = short.jax_fraction_to_fit()
  assert sm.plan(q, jax_fraction=to_fit, **kw).fits
  assert not sm.plan(q, jax_fraction=to_fit + 0.01, **kw).fits


def test_nodes_split_the_prompts_and_tp_the_weights():
  q = Qwen3Config.preset("8b")
  kw = dict(device_memory=H100, jax_fraction=0.55, prompts_per_step=32, n=8, max_prompt=2048, max_new=8192)
  one, two = sm.plan(q, gpus=8, **kw), sm.plan(q, gpus=8, nodes=2, **kw)
  assert two.need_tokens == one.need_tokens // 2
  tp2 = sm.plan(q, gpus=8, tp=2, **kw)
  assert tp2.dp == 4 and tp2.weights == one.weights // 2 and tp2.kv_per_token == one.kv_per_token // 2
  with pytest.raises(ValueError, match="--tp-size 3"):
    sm.plan(q, gpus=8, tp=3, **kw)


def test_owned_args_keep_the_users_flags():
  q = Qwen3Config.preset("0.6b")
  mem = sm.plan(q, device_memory=H200, jax_fraction=0.55, gpus=8, prompts_per_step=32, n=8, max_prompt=2048,
                max_new=8192)
  args = sm.owned_server_args([], mem)
  assert sm.flag_value(args, "--dp-size") == "8" and sm.flag_value(args, "--tp-size") == "1"
  assert float(sm.flag_value(args, "--mem-fraction-static")) == mem.mem_fraction_static
  mine = sm.owned_server_args(["--mem-fraction-static=0.5", "--tp", "2"], mem)
  assert sm.flag_value(mine, "--mem-fraction-static") == "0.5" and "--tp-size" not in mine
  assert sm.flag_value(mine, "--dp-size") == "8"


class _FakeGPU:
  platform = "gpu"

  def __init__(self, limit):
    self.limit = limit

  def memory_stats(self):
    return {"bytes_limit": self.limit}


def test_trainer_sizes_an_owned_server_on_gpus(monkeypatch):
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.55")
  from tests.test_plan import load_config
  cfg = load_config("configs/qwen3_0_6b.py", {"rollout.sglang_sleep": False})
  assert cfg.rollout.sglang_args == ()  # no fixed fraction any more: the trainer sizes it
  args = trainer.owned_sglang_args(cfg, [_FakeGPU(int(H200 * 0.55))] * 8)
  expected = sm.for_config(cfg, plan.model_config(cfg, plan.TARGETS["h200x8"]),
                           device_memory=int(int(H200 * 0.55) / 0.55), jax_fraction=0.55, gpus=8)
  assert args == expected.cli() and expected.fits
  assert trainer.owned_sglang_args(cfg, jax.local_devices()) == []  # the CPU: nothing to size
  big = load_config("configs/qwen3_8b.py", {"mesh.fsdp": 1, "mesh.data": -1, "rollout.sglang_sleep": False})
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.8")
  with pytest.raises(RuntimeError, match="cannot start beside JAX"):  # 15 GiB of weights, 14.8 GiB beside JAX's 0.8
    trainer.owned_sglang_args(big, [_FakeGPU(int(H100 * 0.8))] * 8)


def test_rollouts_spread_over_every_data_parallel_rank(tmp_path):
  """The owned server's flags (--dp-size = the node's 8 GPUs) reach the server, and a step's rollouts are spread
  over all 8 ranks (the fake counts each rank's sequences as SGLang's round-robin router assigns them)."""
  q = Qwen3Config.preset("0.6b")
  mem = sm.plan(q, device_memory=H200, jax_fraction=0.55, gpus=8, prompts_per_step=4, n=8, max_prompt=16,
                max_new=8)
  with fake_engine(tmp_path, *sm.owned_server_args([], mem), vocab=32, max_batch_size=16) as eng:
    out = eng.generate([[1, 2], [3], [4, 5, 6], [7]], SamplingParams(max_new_tokens=4, seed=1), n=8)
    assert sum(len(g) for g in out) == 32
    per_rank = eng.get_model_info()["fake_dp_sequences"]
  assert len(per_rank) == 8 and sum(per_rank) == 32 and min(per_rank) > 0, per_rank


def test_projected_refit_is_export_plus_load():
  w = sm.weight_bytes(Qwen3Config.preset("8b"))
  assert sm.projected_refit_s(w, 2e9, 25e9) == pytest.approx(w / 2e9 + w / 25e9)
  assert math.isclose(sm.projected_refit_s(w), w / sm.MEASURED_EXPORT_BYTES_PER_S + w / sm.LOAD_BYTES_PER_S)


def test_exports_in_ram_are_removed_at_close(tmp_path):
  """A RAM-backed exports directory (`ram_exports_dir`: named after the run, None without room) holds the refits
  and is emptied at start (a crashed run's leftovers) and removed when the engine closes."""
  from srpo_jax.rollout import sglang_engine as se
  root = tmp_path / "shm"
  root.mkdir()
  assert se.ram_exports_dir(tmp_path / "run", 1 << 62, root=str(root)) is None  # no room
  assert se.ram_exports_dir(tmp_path / "run", 1, root=str(tmp_path / "missing")) is None
  ram = se.ram_exports_dir(tmp_path / "run", 1, root=str(root))
  assert ram.parent == root and ram == se.ram_exports_dir(tmp_path / "run", 1, root=str(root))
  assert ram != se.ram_exports_dir(tmp_path / "other", 1, root=str(root))
  (ram / "v00000007").mkdir(parents=True)  # left by a crashed run

  def export(params, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    open(os.path.join(out_dir, "w.safetensors"), "w").write(str(params))

  with fake_engine(tmp_path, vocab=32, export_fn=export, exports_dir=ram, remove_exports_dir=True) as eng:
    assert not ram.exists()
    eng.update_weights("a", 1)
    assert eng.get_model_info()["model_path"] == str(ram / "v00000001")
    assert sorted(os.listdir(ram)) == ["v00000001"]
  assert not ram.exists()


# ---------------------------------------------------------------------------------------------------------------------
# Time-shared (rollout.sglang_sleep, the paper configs' default)
# ---------------------------------------------------------------------------------------------------------------------
PAPER = [(c, t) for c in ("configs/qwen3_4b.py", "configs/qwen3_8b.py") for t in ("h100x8", "h200x8", "h20x8")]


@pytest.mark.parametrize("config,target", PAPER)
def test_time_shared_paper_configs_hold_the_steps_rollouts(config, target):
  """Issue 21 item 3: every paper config on its targets holds SGLang's weights and a KV pool for all of the step's
  rollouts beside JAX (its parameters while the server generates), JAX's peak fits beside the sleeping server, and
  the refit fits; the arithmetic closes on the GPU's bytes."""
  from tests.test_plan import load_config
  cfg = load_config(config)
  assert cfg.rollout.sglang_sleep and cfg.rollout.engine == "sglang"
  tgt = plan.TARGETS[target]
  p = plan.make_plan(cfg, tgt, analytic=True)
  sg, total = p.sglang, tgt.device_memory_bytes()
  assert sg["sleep"] and "--enable-memory-saver" in sg["summary"]
  assert p.jax_fits and sg["fits"] and sg["kv_tokens"] >= sg["need_tokens"], p.sglang["summary"]
  # SGLang starts beside JAX's parameters and its outside memory; awake it takes pre × f and leaves the headroom.
  assert sg["free_at_start"] + sg["jax_rollout_bytes"] + sm.JAX_OUTSIDE_POOL_BYTES + sm.SGLANG_CONTEXT_BYTES == total
  assert sg["jax_rollout_bytes"] == p.state["parameters"]
  assert sg["kv_bytes"] + sg["weights"] <= sg["free_at_start"] * sg["mem_fraction_static"] + 1
  # Asleep it keeps its context and reserve; JAX's budget is the rest.
  assert p.budget == int(total * (1 - (sm.JAX_OUTSIDE_POOL_BYTES + sm.sleep_reserve_bytes()) / total))
  assert sg["refit_bytes"] <= total


def test_time_sharing_is_what_fits_qwen3_8b_on_an_h100():
  """The same config beside JAX's fixed 55% share: SGLang's KV pool holds fewer than half of the step's rollouts."""
  from tests.test_plan import load_config
  shared = plan.make_plan(load_config("configs/qwen3_8b.py"), plan.TARGETS["h100x8"], analytic=True)
  fixed = plan.make_plan(load_config("configs/qwen3_8b.py", {"rollout.sglang_sleep": False}), plan.TARGETS["h100x8"],
                         analytic=True)
  assert shared.fits and not fixed.fits
  assert fixed.sglang["kv_tokens"] < fixed.sglang["need_tokens"] / 2 < shared.sglang["need_tokens"]
  assert "time-shared" in plan.format_plan(shared) and "time-shared" not in plan.format_plan(fixed)
  tight = plan.make_plan(load_config("configs/qwen3_8b.py", {"rollout.max_new_tokens": 16384}),
                         plan.TARGETS["h100x8"], analytic=True)
  assert not tight.fits and "rollout.sglang_sleep" in plan.failure_message(None, tight)


def test_time_shared_owned_server_args(monkeypatch):
  """The trainer launches a time-shared server with the memory saver, sized from the GPU's total memory (nvidia-smi)
  beside JAX's parameters as the planner counts them; the switch is added once, never over the user's."""
  from tests.test_plan import load_config
  cfg = load_config("configs/qwen3_8b.py")
  monkeypatch.setattr(sm, "gpu_memory_bytes", lambda timeout_s=10.0: H100)
  args = trainer.owned_sglang_args(cfg, [_FakeGPU(0)] * 8)
  p = plan.make_plan(cfg, plan.TARGETS["h100x8"], analytic=True)
  assert args == sm.owned_server_args([], sm.for_config(
      cfg, plan.model_config(cfg, plan.TARGETS["h100x8"]), device_memory=H100, jax_fraction=p.fraction, gpus=8,
      jax_state=p.state))
  assert args.count("--enable-memory-saver") == 1 and float(sm.flag_value(args, "--mem-fraction-static")) > 0.9
  assert sm.owned_server_args(["--enable-memory-saver", "--dp-size", "4"], p_mem := sm.for_config(
      cfg, plan.model_config(cfg, plan.TARGETS["h100x8"]), device_memory=H100, jax_fraction=p.fraction, gpus=8,
      jax_state=p.state)).count("--enable-memory-saver") == 1
  assert p_mem.sleep and sm.flag_value(sm.owned_server_args(["--dp-size", "4"], p_mem), "--dp-size") == "4"
  monkeypatch.setattr(sm, "gpu_memory_bytes", lambda timeout_s=10.0: None)
  with pytest.warns(UserWarning, match="unsized"):
    assert trainer.owned_sglang_args(cfg, [_FakeGPU(0)] * 8) == []
