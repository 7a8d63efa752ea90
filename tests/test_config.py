"""Config: validation errors name the field and value; overrides; per-method derived defaults; the config files."""
import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import typing

import ml_collections
import pytest

from srpo_jax import config as C
from srpo_jax import methods
from srpo_jax.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


def _load(name: str, param: str = "") -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(param) if param else mod.get_config()


def _tiny(**overrides) -> ml_collections.ConfigDict:
  return C.apply_overrides(_load("tiny"), overrides)


def _err(cfg, **kw) -> str:
  with pytest.raises(ConfigError) as e:
    C.validate(cfg, **kw)
  return str(e.value)


def _dotted_keys(cd, prefix=""):
  for k, v in cd.items():
    if isinstance(v, ml_collections.ConfigDict):
      yield from _dotted_keys(v, f"{prefix}{k}.")
    else:
      yield prefix + k


def _dataclass_keys(cls, prefix=""):
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    if dataclasses.is_dataclass(hints[f.name]):
      yield from _dataclass_keys(hints[f.name], f"{prefix}{f.name}.")
    else:
      yield prefix + f.name


def test_base_config_keys_match_dataclasses_and_each_has_a_doc():
  assert set(_dotted_keys(C.get_base_config())) == set(_dataclass_keys(C.Config))
  docs = C.field_docs()
  assert set(docs) == set(_dataclass_keys(C.Config)) and all(docs.values())
  assert "Paper Table 3" in docs["algo.clip_high"] and "methods.Method.lr" in docs["optim.lr"]


def test_base_config_placeholders_are_typed():
  base = C.get_base_config()
  assert base.run_dir is None and base.train.steps is None and base.model.hidden_size is None
  assert base.train.time_budgets_h == (1.0, 5.0, 10.0) and base.rollout.sglang_args == ()
  for dotted, value in {"run_dir": "r", "train.steps": 3, "model.hidden_size": 32, "model.tie_word_embeddings": False,
                        "model.random_init": "0.6b", "algo.loss_agg": "token-mean", "optim.lr": 1e-5}.items():
    assert C.apply_overrides(base, {dotted: value}) is not None
  for dotted, value in {"train.steps": "3", "model.hidden_size": "wide", "model.tie_word_embeddings": "yes",
                        "model.random_init": 3}.items():
    with pytest.raises(ConfigError, match=re.escape(dotted)):
      C.apply_overrides(base, {dotted: value})


def test_tiny_config_validates_with_the_expected_model():
  cfg = C.validate(_load("tiny"))
  assert cfg.model.random_init == "tiny" and cfg.model.vocab_size is None  # None = the preset's
  assert cfg.model.qwen3_overrides == dict(dtype="float32", param_dtype="float32", remat=False, attention="auto")
  from srpo_jax.models import qwen3
  q = qwen3.Qwen3Config.preset(cfg.model.random_init, **cfg.model.qwen3_overrides)
  assert (q.vocab_size, q.hidden_size, q.num_hidden_layers, q.num_attention_heads, q.num_key_value_heads, q.head_dim,
          q.intermediate_size, q.tie_word_embeddings) == (151_936, 64, 2, 4, 2, 16, 128, True)
  assert cfg.data.task == "synthetic" and cfg.rollout.engine == "jax" and cfg.run_dir == "runs/tiny"
  assert cfg.lr == 1e-3 and cfg.rollout.rollouts_per_step == 128
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.algo.name = "grpo"


@pytest.mark.parametrize("field, value, pattern", [
    ("run_dir", None, r"run_dir is required \(got None\)"),
    ("train.steps", None, r"train\.steps is required"),
    ("checkpoint.every_steps", None, r"checkpoint\.every_steps is required"),
    ("train.steps", -1, r"train\.steps=-1: must be >= 0"),
    ("algo.name", "ppo", r"algo\.name='ppo' is not one of 'grpo', 'sdpo', 'srpo'"),
    ("data.task", "math", r"data\.task='math' is not one of"),
    ("model.dtype", "float16", r"model\.dtype='float16' is not one of 'float32', 'bfloat16'"),
    ("model.param_dtype", "fp32", r"model\.param_dtype='fp32'"),
    ("model.random_init", "huge", r"model\.random_init='huge' is not one of"),
    ("algo.loss_agg", "sum", r"algo\.loss_agg='sum'"),
    ("rollout.engine", "vllm", r"rollout\.engine='vllm'"),
    ("data.on_error", "ignore", r"data\.on_error='ignore'"),
    ("rollout.n", 1, r"rollout\.n=1: need at least 2"),
    ("algo.jsd_alpha", 1.5, r"algo\.jsd_alpha=1\.5: must be in \[0, 1\]"),
    ("rollout.top_p", 0.0, r"rollout\.top_p=0\.0: must be in \(0, 1\]"),
    ("optim.lr", -1.0, r"optim\.lr=-1\.0: must be > 0"),
    ("algo.clip_c", 1.0, r"algo\.clip_c=1\.0: the dual clip c must be > 1"),
    ("mesh.fsdp", 0, r"mesh\.fsdp=0"),
    ("rollout.length_buckets", (256, 128), r"rollout\.length_buckets=\(256, 128\)"),
    ("model.num_kv_heads", 3, r"model\.num_heads=4: must be a multiple of model\.num_kv_heads=3"),
    ("model.head_dim", 15, r"model\.head_dim=15: must be even"),
    ("model.hidden_size", 0, r"model\.hidden_size=0: must be > 0"),
    ("rollout.length_buckets", (64, 96), r"rollout\.length_buckets=\(64, 96\): the largest bucket must be >= "
                                          r"data\.max_prompt_tokens=128"),
    ("run_dir", " ", r"run_dir=' ': must be a non-empty path"),
    ("mesh.process_id", 1, r"mesh\.process_id=1: must be in \[0, mesh\.num_processes=1\)"),
])
def test_bad_values_name_field_and_value(field, value, pattern):
  assert re.search(pattern, _err(_tiny(**{field: value}))), _err(_tiny(**{field: value}))


@pytest.mark.parametrize("field, value, pattern", [
    ("algo.clip_high", "high", r"algo\.clip_high='high' must be a float, got str"),
    ("algo.norm_adv_by_std", 1, r"algo\.norm_adv_by_std=1 must be a bool"),
    ("rollout.n", 8.0, r"rollout\.n=8\.0 must be an int, got float"),
    ("rollout.sglang_args", "--tp 2", r"rollout\.sglang_args='--tp 2' must be a tuple/list of str"),
    ("train.time_budgets_h", (1, "x"), r"train\.time_budgets_h\[1\]='x' must be a float"),
    ("algo", 3, r"algo must be a section"),
])
def test_wrong_types_name_field_and_value(field, value, pattern):
  raw = _load("tiny").to_dict()  # a plain dict: the ConfigDict's own type checks would stop some of these earlier
  *parents, leaf = field.split(".")
  node = raw
  for p in parents:
    node = node[p]
  node[leaf] = value
  assert re.search(pattern, _err(raw))


def test_typed_configdict_rejects_wrong_type_on_override():
  with pytest.raises(ConfigError, match=r"rollout\.n='eight'"):
    _tiny(**{"rollout.n": "eight"})
  with pytest.raises(ConfigError, match=r"optim\.mini_batch_prompts='8'"):  # a typed None placeholder
    _tiny(**{"optim.mini_batch_prompts": "8"})


def test_unknown_keys_are_named_with_a_suggestion():
  with pytest.raises(ConfigError, match=r"unknown config key 'algo\.nme'; did you mean 'algo\.name'\?"):
    _tiny(**{"algo.nme": "grpo"})
  with pytest.raises(ConfigError, match=r"unknown config key 'optimizer'"):
    _tiny(**{"optimizer.lr": 1.0})
  raw = _load("tiny").to_dict()
  raw["rollout"]["temprature"] = 0.7
  assert re.search(r"unknown config key 'rollout\.temprature'; did you mean 'rollout\.temperature'", _err(raw))
  with pytest.raises(ConfigError, match=r"unknown config key 'eval\.n_sample'.*--config\.eval\.n_sample=3"):
    C.check_override_flags(["prog", "--config=configs/tiny.py", "--config.eval.n_sample=3"])


def test_batch_divisibility_errors():
  msg = _err(_tiny(**{"rollout.prompts_per_step": 16, "optim.mini_batch_prompts": 6}))
  assert "optim.mini_batch_prompts=6 does not divide rollout.prompts_per_step=16" in msg
  msg = _err(_tiny(**{"optim.mini_batch_prompts": 4, "optim.micro_batch_size": 5}))
  assert "optim.micro_batch_size=5 does not divide the rollouts per mini-batch (rollout.n=8 × mini_batch_prompts=4" \
      in msg
  cfg = C.validate(_tiny(**{"optim.mini_batch_prompts": 4, "optim.micro_batch_size": 8}))
  assert (cfg.optimizer_steps_per_step, cfg.rollouts_per_mini_batch, cfg.micro_batches_per_mini_batch) == (4, 32, 4)


def test_model_path_required_and_placeholder_message():
  msg = _err(_tiny(**{"model.random_init": None}))
  assert "model.path=None" in msg and "--config.model.path=/path/to/Qwen3-8B" in msg
  msg = _err(_tiny(**{"model.random_init": None, "model.path": "/x", "model.hidden_size": 32}), check_files=False)
  assert msg.startswith("model.hidden_size=32: the model dimensions apply only with model.random_init")
  msg = _err(_load("qwen3_8b"))
  assert msg == ("model.path='<REQUIRED: /path/to/Qwen3-8B>' is a placeholder: pass "
                 "--config.model.path=/path/to/Qwen3-8B")
  assert "--config.model.path=/path/to/Qwen3-4B" in _err(_load("qwen3_4b"))
  msg = _err(C.apply_overrides(_load("qwen3_0_6b"), {"model.path": "/nonexistent/qwen"}))
  assert "model.path='/nonexistent/qwen': no config.json there" in msg


def test_data_dir_missing_files_message(tmp_path, monkeypatch):
  (tmp_path / "chemistry").mkdir()
  (tmp_path / "chemistry" / "train.json").write_text("{}\n")
  msg = _err(_tiny(**{"data.task": "chemistry", "data.data_dir": str(tmp_path)}))
  assert f"data.task='chemistry': missing file 'chemistry/test.json' in data directory '{tmp_path}'" in msg
  assert f"python -m srpo_jax.data.download --data-dir {tmp_path} --tasks chemistry" in msg
  # data_dir None -> $SRPO_DATA_DIR, and the message says where the directory came from.
  monkeypatch.setenv("SRPO_DATA_DIR", str(tmp_path))
  msg = _err(_tiny(**{"data.task": "physics"}))
  assert f"'physics/train.json' in data directory '{tmp_path}' ($SRPO_DATA_DIR)" in msg
  (tmp_path / "chemistry" / "test.json").write_text("{}\n")
  cfg = C.validate(_tiny(**{"data.task": "chemistry"}))
  assert cfg.data.resolved_data_dir == str(tmp_path) and cfg.data.data_dir is None  # resolved, not written back
  monkeypatch.delenv("SRPO_DATA_DIR")
  monkeypatch.delenv("SRPO_CACHE_DIR", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  assert C.resolve_data_dir(None) == str(tmp_path / "cache" / "srpo_jax" / "data")
  assert C.validate(_tiny(**{"data.task": "chemistry"}), check_files=False).data.task == "chemistry"


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="shared benchmark data not present")
def test_shared_data_dir_has_science_tasks_but_not_tooluse_train():
  for task in C.BENCHMARK_TASKS[:4]:
    C.validate(_tiny(**{"data.task": task, "data.data_dir": SHARED_DATA}))
  assert "missing file 'tooluse/train.json'" in _err(_tiny(**{"data.task": "tooluse", "data.data_dir": SHARED_DATA}))


def test_data_rules_agree_with_the_data_package(tmp_path, monkeypatch):
  benchmarks = pytest.importorskip("srpo_jax.data.benchmarks")
  synthetic = pytest.importorskip("srpo_jax.data.synthetic")
  assert C.SYNTHETIC_MAX_DIFFICULTY == synthetic.MAX_DIFFICULTY
  assert "data.synthetic_difficulty=5" in _err(_tiny(**{"data.synthetic_difficulty": 5}))
  monkeypatch.delenv("SRPO_CACHE_DIR", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
  for env in (None, str(tmp_path / "env")):
    if env:
      monkeypatch.setenv("SRPO_DATA_DIR", env)
    else:
      monkeypatch.delenv("SRPO_DATA_DIR", raising=False)
    for configured in (None, str(tmp_path / "d")):
      assert C.resolve_data_dir(configured) == str(benchmarks.resolve_data_dir(configured))
    for task in C.BENCHMARK_TASKS:
      for rel, split in zip(benchmarks.required_data_files(task), ("train", "test")):
        assert os.path.join(C.resolve_data_dir(None), rel) == str(benchmarks.split_path(None, task, split))


@pytest.mark.parametrize("algo, lr, mini_batch, agg, opt_steps", [
    ("grpo", 1e-6, 8, "seq-mean-token-mean", 4),
    ("sdpo", 1e-5, 32, "seq-mean-token-mean", 1),
    ("srpo", 5e-6, 32, "token-mean", 1),
    ("srpo_no_dw", 5e-6, 32, "token-mean", 1),
    ("advantage_mix", 5e-6, 32, "token-mean", 1),
    ("grpo_sdpo_all", 5e-6, 32, "token-mean", 1),
])
def test_per_method_paper_defaults(algo, lr, mini_batch, agg, opt_steps):
  cd = C.apply_overrides(_load("qwen3_8b", algo), {"model.path": None, "model.random_init": "8b"})
  cfg = C.validate(cd, check_files=False)
  assert (cfg.lr, cfg.mini_batch_prompts, cfg.loss_agg, cfg.optimizer_steps_per_step) == (lr, mini_batch, agg,
                                                                                             opt_steps)
  assert cfg.method is methods.get(algo) and cfg.method.name == algo
  assert cfg.method.uses_teacher == (algo != "grpo") and cfg.method.dynamic_weighting == (algo == "srpo")
  assert cd.optim.lr is None and cd.optim.mini_batch_prompts is None and cd.algo.loss_agg is None  # not written back
  assert cfg.to_dict()["derived"]["lr"] == lr
  # Explicit values win over the method's.
  cfg = C.validate(C.apply_overrides(cd, {"optim.lr": 3e-6, "optim.mini_batch_prompts": 16,
                                          "algo.loss_agg": "token-mean"}), check_files=False)
  assert (cfg.lr, cfg.mini_batch_prompts, cfg.loss_agg, cfg.optimizer_steps_per_step) == (3e-6, 16, "token-mean", 2)


def test_method_mini_batch_is_capped_by_prompts_per_step():
  assert C.validate(_tiny(**{"algo.name": "srpo"})).mini_batch_prompts == 16  # paper 32 > tiny's 16 prompts
  assert C.validate(_tiny(**{"algo.name": "grpo"})).mini_batch_prompts == 8


def test_paper_configs_follow_the_paper():
  cd = _load("qwen3_8b", "grpo,physics")
  cd.model.path, cd.model.random_init = None, "8b"
  cfg = C.validate(cd, check_files=False)
  assert (cfg.algo.name, cfg.data.task, cfg.run_dir) == ("grpo", "physics", "runs/qwen3_8b_grpo_physics")
  assert (cfg.model.dtype, cfg.model.remat, cfg.rollout.engine) == ("bfloat16", True, "sglang")
  assert (cfg.rollout.prompts_per_step, cfg.rollout.n, cfg.rollout.max_new_tokens, cfg.rollout.temperature) == (
      32, 8, 8192, 1.0)
  assert (cfg.algo.clip_high, cfg.algo.rollout_is_cap, cfg.algo.topk, cfg.algo.jsd_alpha, cfg.algo.ema_rate,
          cfg.algo.dw_beta, cfg.algo.entropy_coef) == (0.28, 2.0, 100, 0.5, 0.05, 1.0, 0.0)
  assert (cfg.optim.b1, cfg.optim.b2, cfg.optim.weight_decay, cfg.optim.grad_clip, cfg.optim.warmup_steps) == (
      0.9, 0.999, 0.01, 1.0, 10)
  assert (cfg.eval.every_steps, cfg.eval.n_samples, cfg.eval.temperature, cfg.eval.top_p) == (5, 16, 0.6, 0.95)
  assert cfg.data.max_prompt_tokens == 2048 and cfg.train.time_budgets_h == (1.0, 5.0, 10.0)
  # Step-0 evaluation as the official configs' val_before_train: GRPO's True, SDPO's and SRPO's False; the tiny
  # demo keeps its baseline. verl's balance_batch (on in every official run) shapes GRPO's 4 mini-batches.
  others = {}
  for algo in ("sdpo", "srpo"):
    other = _load("qwen3_8b", algo)
    other.model.path, other.model.random_init = None, "8b"
    others[algo] = C.validate(other, check_files=False)
  assert cfg.eval.at_start is True and not any(o.eval.at_start for o in others.values())
  assert C.validate(_tiny(), check_files=False).eval.at_start is True
  assert cfg.optim.balance_batch and all(o.optim.balance_batch for o in others.values())
  assert cfg.optim.balance_batch_ranks == 8 and cfg.optimizer_steps_per_step == 4
  assert not C.validate(_tiny(), check_files=False).optim.balance_batch
  assert "optim.balance_batch_ranks=3: must divide the rollouts per mini-batch" in _err(
      _tiny(**{"optim.balance_batch": True, "optim.balance_batch_ranks": 3}))
  assert cfg.algo.teacher_max_tokens == 10240  # official max_reprompt_len: the teacher prompt alone
  assert cfg.mesh.axis_sizes(8) == {"data": 1, "fsdp": 8, "tensor": 1}
  assert _load("qwen3_0_6b").mesh.fsdp == 1
  with pytest.raises(ConfigError, match=r"config parameter 'ppo'"):
    _load("qwen3_8b", "ppo")


def test_mesh_axis_sizes():
  mesh = C.MeshConfig(data=-1, fsdp=2, tensor=1)
  assert mesh.axis_sizes(8) == {"data": 4, "fsdp": 2, "tensor": 1}
  with pytest.raises(ConfigError, match="do not divide the 6 available devices"):
    C.MeshConfig(data=-1, fsdp=4).axis_sizes(6)
  with pytest.raises(ConfigError, match="use 4 devices but 8"):
    C.MeshConfig(data=2, fsdp=2).axis_sizes(8)
  assert "at most one axis may be -1" in _err(_tiny(**{"mesh.fsdp": -1}))
  assert "mesh.coordinator=None" in _err(_tiny(**{"mesh.num_processes": 2}))
  assert C.resolve_axis_sizes({"data": 2, "fsdp": -1, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ConfigError, match="at most one axis may be -1"):
    C.resolve_axis_sizes({"data": -1, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(ConfigError, match=r"mesh\.tensor=0: must be >= 1"):
    C.resolve_axis_sizes({"data": -1, "fsdp": 1, "tensor": 0}, 8)


def test_make_mesh_uses_the_same_rule():
  import jax
  from srpo_jax import sharding
  one = jax.devices()[:1]
  assert dict(sharding.make_mesh(devices=one).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match="do not divide the 1 available devices"):
    sharding.make_mesh(data=2, devices=one)
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.make_mesh(data=-1, fsdp=-1, devices=one)


def test_any_random_init_preset_takes_dimension_overrides():
  cd = C.apply_overrides(_load("qwen3_0_6b"), {"model.path": None, "model.random_init": "0.6b",
                                                "model.num_layers": 2, "model.vocab_size": 1024})
  cfg = C.validate(cd, check_files=False)
  assert cfg.model.qwen3_overrides == dict(dtype="bfloat16", param_dtype="float32", remat=True, attention="auto",
                                           num_hidden_layers=2, vocab_size=1024)
  # Head checks use the preset's values for the fields left at None (0.6b: 16 heads, 8 kv heads, head_dim 128).
  msg = _err(C.apply_overrides(cd, {"model.num_kv_heads": 6}), check_files=False)
  assert msg.startswith("model.num_heads=16: must be a multiple of model.num_kv_heads=6")


def test_import_is_light():
  code = "import sys, srpo_jax.config; print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'numpy')))"
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]


_FLAGS_SCRIPT = """
import sys
from absl import flags
from ml_collections import config_flags
from srpo_jax import config
config_flags.DEFINE_config_file("config", lock_config=True)
config.parse_flags(sys.argv)
cfg = config.validate(flags.FLAGS.config)
print(cfg.algo.name, cfg.lr, cfg.mini_batch_prompts, cfg.rollout.n, cfg.data.data_dir, cfg.rollout.sglang_args,
      flags.FLAGS.config.optim.lr)
"""


def test_config_flags_dotted_overrides_end_to_end():
  def run(*args):
    return subprocess.run([sys.executable, "-c", _FLAGS_SCRIPT, "--config=configs/tiny.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
  proc = run("--config.algo.name=grpo", "--config.rollout.n=4", "--config.data.data_dir=None",
             "--config.rollout.sglang_args=('--tp','2')")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "grpo 0.001 8 4 None ('--tp', '2') 0.001"
  proc = run("--config.algo.nam=grpo")
  assert proc.returncode == 1 and proc.stderr.startswith(
      "FATAL Flags parsing error: unknown config key 'algo.nam'; did you mean 'algo.name'?")
  proc = run("--config.rollout.n=eight")  # absl's own parse errors keep their one-line form
  assert proc.returncode == 1 and "FATAL Flags parsing error: flag --config.rollout.n=eight" in proc.stderr


def test_config_file_without_get_config_is_one_line_naming_the_file(tmp_path):
  bad = tmp_path / "x.py"
  bad.write_text("from srpo_jax import config\nc = config.get_base_config()\n")  # the function was forgotten
  for entry, args in (("srpo_jax.main", [f"--config={bad}"]),
                      ("srpo_jax.main", ["--config=configs/tiny.py", f"--mesh={bad}"])):
    proc = subprocess.run([sys.executable, "-m", entry, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [f"config error: {bad}: no get_config() (a config file defines "
                                        "`get_config(param='')` returning the ConfigDict, as configs/tiny.py does)"]
