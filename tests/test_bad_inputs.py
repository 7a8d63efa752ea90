"""Bad data and model inputs (issue 14, items 8-11): each gives a clear error naming the file / line / field / tensor,
or, for data rows under data.on_error=skip, a counted skip. Tiny files in tmp_path; no model hub, no GPU."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from srpo_jax import config as config_lib
from srpo_jax import metrics as M
from srpo_jax import task as task_lib
from srpo_jax.data import benchmarks, prompts
from srpo_jax.data.benchmarks import DataError

REPO = Path(__file__).resolve().parent.parent
GOOD_MCQ = {"idx": 1, "kind": "mcq", "dataset": "sciknoweval", "answer": "B", "prompt": "Q?", "system": "\nS"}
GOOD_TOOL = {"idx": 5, "kind": "tooluse", "answer": '[{"Action": "f", "Action_Input": "{}"}]', "prompt": "P",
             "system": None}
DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's recursion limit: json.loads raises RecursionError


def mcq(**changes) -> bytes:
  return json.dumps(dict(GOOD_MCQ, **changes)).encode()


def write_split(root: Path, task: str, split: str, lines: list[bytes]) -> Path:
  path = root / task / f"{split}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(b"".join(line + b"\n" for line in lines))
  return path


# ---------------------------------------------------------------------------------------------------------------------
# 8. Undecodable and too-deep lines: DataError path:line, skippable
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("bad", "reason"), [
    (mcq(idx=2, prompt="caf\u00e9").replace("\\u00e9".encode(), b"\xe9"), "not valid UTF-8 (byte 0xe9"),  # latin-1 é
    (b'{"idx": 2, "prompt": "\xff\xfe"}', "not valid UTF-8 (byte 0xff"),
    (DEEP.encode(), "JSON nested too deeply"),
    (('{"idx": 2, "kind": "mcq", "answer": "B", "prompt": "Q", "system": "S", "x": ' + DEEP + "}").encode(),
     "JSON nested too deeply"),
])
def test_undecodable_or_deep_line_names_file_and_line_and_is_skippable(tmp_path, bad, reason):
  path = write_split(tmp_path, "chemistry", "train", [mcq(), bad, mcq(idx=3)])
  with pytest.raises(DataError) as err:
    benchmarks.load_split("chemistry", "train", tmp_path)
  assert str(err.value).startswith(f"{path}:2: chemistry/train: ") and reason in str(err.value)
  loaded = benchmarks.load_split("chemistry", "train", tmp_path, on_error="skip")
  assert [r.idx for r in loaded] == [1, 3]
  assert len(loaded.skipped) == 1 and loaded.skipped[0].startswith(f"{path}:2:") and reason in loaded.skipped[0]


@pytest.mark.parametrize("field", ["prompt", "system"])
def test_lone_surrogate_is_a_data_error_not_a_tokenizer_type_error(tmp_path, tokenizer, field):
  """JSON `"\\ud800"` decodes to a str the tokenizer refuses with a bare TypeError; row validation names it."""
  bad = mcq(idx=2, **{field: "Q \ud800?"})
  assert b"\\ud800" in bad  # the file holds the escape; the line is valid UTF-8 and valid JSON
  path = write_split(tmp_path, "physics", "train", [mcq(), bad, mcq(idx=3)])
  write_split(tmp_path, "physics", "test", [mcq(idx=10)])
  reason = f"{path}:2: physics/train: '{field}' holds a lone surrogate U+D800 at character 3"
  with pytest.raises(DataError) as err:
    task_lib.load_task(_cfg(tmp_path), tokenizer)
  assert str(err.value).startswith(reason), str(err.value)
  task = task_lib.load_task(_cfg(tmp_path, on_error="skip"), tokenizer)
  assert [r.idx for r in task.train.rows] == [1, 3] and task.skipped_rows == 1


def test_deep_tooluse_answer_is_a_data_error(tmp_path):
  """The tool-use gold is itself JSON, decoded by the validator: its depth is checked as the line's."""
  bad = json.dumps(dict(GOOD_TOOL, idx=6, answer=DEEP)).encode()
  path = write_split(tmp_path, "tooluse", "test", [json.dumps(GOOD_TOOL).encode(), bad])
  with pytest.raises(DataError, match=f"^{path}:2: tooluse/test: JSON nested too deeply"):
    benchmarks.load_split("tooluse", "test", tmp_path)
  loaded = benchmarks.load_split("tooluse", "test", tmp_path, on_error="skip")
  assert [r.idx for r in loaded] == [5] and len(loaded.skipped) == 1


def test_valid_utf8_beyond_ascii_still_loads(tmp_path):
  line = json.dumps(dict(GOOD_MCQ, prompt="Δx ≥ ħ/2 — café"), ensure_ascii=False).encode("utf-8")
  write_split(tmp_path, "physics", "test", [line])
  assert benchmarks.load_split("physics", "test", tmp_path).rows[0].prompt == "Δx ≥ ħ/2 — café"


# ---------------------------------------------------------------------------------------------------------------------
# 9. Empty splits, all rows skipped, and the skip counts
# ---------------------------------------------------------------------------------------------------------------------
def test_empty_split_is_an_error(tmp_path):
  path = write_split(tmp_path, "physics", "test", [b"", b"   "])
  for on_error in ("raise", "skip"):
    with pytest.raises(DataError, match=f"^{path}: physics/test: the split is empty: the file has no rows"):
      benchmarks.load_split("physics", "test", tmp_path, on_error=on_error)


def test_split_whose_rows_are_all_skipped_is_an_error(tmp_path):
  path = write_split(tmp_path, "physics", "test", [mcq(answer="E"), b"\xff"])
  with pytest.raises(DataError) as err:
    benchmarks.load_split("physics", "test", tmp_path, on_error="skip")
  msg = str(err.value)
  assert msg.startswith(f"{path}: physics/test: the split is empty: all 2 rows were skipped under data.on_error=skip")
  assert f"(first: {path}:1: physics/test: 'answer' must be one of" in msg


def test_stats_cli_reports_a_bad_split_and_goes_on(tmp_path, capsys):
  from srpo_jax.data import stats
  write_split(tmp_path, "physics", "train", [mcq(), mcq(idx=2)])
  path = write_split(tmp_path, "physics", "test", [])
  assert stats.main(["--data-dir", str(tmp_path), "--tasks", "physics"]) == 0
  out = capsys.readouterr().out
  assert f"physics/test       error: {path}: physics/test: the split is empty" in out
  assert any(line.startswith("physics/train") and line.split()[1] == "2" for line in out.splitlines())


def _cfg(data_dir: Path, **data):
  spec = importlib.util.spec_from_file_location("tiny_config", REPO / "configs" / "tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.data.task, c.data.data_dir = "physics", str(data_dir)
  for key, value in data.items():
    c.data[key] = value
  c.eval.max_questions = None
  return config_lib.validate(c, check_files=False)


@pytest.fixture(scope="module")
def tokenizer():
  from srpo_jax.tokenizer import load_tokenizer
  return load_tokenizer()


def test_empty_train_split_says_empty_not_prompt_length(tmp_path, tokenizer):
  path = write_split(tmp_path, "physics", "train", [])
  write_split(tmp_path, "physics", "test", [mcq()])
  with pytest.raises(DataError, match=f"^{path}: physics/train: the split is empty"):
    task_lib.load_task(_cfg(tmp_path), tokenizer)


def test_no_test_prompt_fits_is_an_error(tmp_path, tokenizer):
  write_split(tmp_path, "physics", "train", [mcq()])
  write_split(tmp_path, "physics", "test", [mcq(idx=9, prompt="word " * 400)])
  with pytest.raises(ValueError, match=r"no test prompt fits data.max_prompt_tokens=128 \(1 dropped"):
    task_lib.load_task(_cfg(tmp_path), tokenizer)


def test_skipped_and_dropped_rows_are_counted_and_logged(tmp_path, tokenizer, caplog):
  write_split(tmp_path, "physics", "train", [mcq(), b"\xff", mcq(idx=2, prompt="word " * 400), mcq(idx=3)])
  write_split(tmp_path, "physics", "test", [mcq(idx=10), DEEP.encode(), mcq(idx=11, answer="Z")])
  with caplog.at_level("WARNING", logger="srpo_jax"):
    task = task_lib.load_task(_cfg(tmp_path, on_error="skip"), tokenizer)
  assert (task.skipped_rows, task.dropped_prompts) == (3, 1)
  assert [r.idx for r in task.train.rows] == [1, 3] and [r.idx for r in task.test.rows] == [10]
  assert "skipped 1 malformed rows" in caplog.text and "skipped 2 malformed rows" in caplog.text
  assert "train 1, test 0" in caplog.text


def test_more_prompts_per_step_than_training_prompts_warns_once_with_both_numbers(tmp_path, tokenizer, caplog):
  import dataclasses
  # 3 rows, one too long: 2 usable training prompts against tiny.py's rollout.prompts_per_step=16.
  write_split(tmp_path, "physics", "train", [mcq(), mcq(idx=2, prompt="word " * 400), mcq(idx=3)])
  write_split(tmp_path, "physics", "test", [mcq(idx=10)])
  cfg = _cfg(tmp_path)
  with caplog.at_level("WARNING", logger="srpo_jax"):
    task_lib.load_task(cfg, tokenizer)
  warned = [r.getMessage() for r in caplog.records if "rollout.prompts_per_step" in r.getMessage()]
  assert warned == ["rollout.prompts_per_step=16 is larger than the training set of data.task='physics' (2 prompts): "
                    "each step holds some prompts more than once"]
  caplog.clear()
  fits = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, prompts_per_step=2))
  with caplog.at_level("WARNING", logger="srpo_jax"):
    task_lib.load_task(fits, tokenizer)
  assert "rollout.prompts_per_step" not in caplog.text


def test_summary_reports_skipped_and_dropped_rows(tmp_path, tokenizer):
  import dataclasses
  from srpo_jax import trainer as trainer_lib
  from tests.e2e_utils import fast_config
  cfg = fast_config(tmp_path)
  task = dataclasses.replace(task_lib.load_task(cfg, tokenizer), skipped_rows=3, dropped_prompts=2)
  tr = trainer_lib.Trainer(cfg, tokenizer=tokenizer, task=task)
  try:
    tr.write_summary()
  finally:
    tr.close()
  saved = json.loads((tmp_path / M.SUMMARY_FILE).read_text())
  assert (saved[M.SUMMARY_SKIPPED_DATA_ROWS], saved[M.SUMMARY_DROPPED_PROMPTS]) == (3, 2)


def test_evaluate_refuses_an_empty_test_set():
  from srpo_jax import evaluation
  empty = prompts.RenderedPrompts(ids=[], rows=[], dropped=0)
  task = task_lib.Task(train=empty, test=empty, reward=lambda text, answer: 1.0)

  class NoEngine:
    def generate(self, *args, **kwargs):
      raise AssertionError("must not generate for an empty test set")

  with pytest.raises(ValueError, match="the test split has no prompts"):
    evaluation.evaluate(NoEngine(), task, None, _cfg(Path("/nonexistent")).eval, max_new_tokens=4, seed=0)


# ---------------------------------------------------------------------------------------------------------------------
# 10. HF checkpoints
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
  """A real 2-layer export (vocab 64, untied): config.json + one safetensors shard + index."""
  from srpo_jax.models import hf_io, qwen3
  cfg = qwen3.Qwen3Config.preset("tiny", vocab_size=64, tie_word_embeddings=False)
  return Path(hf_io.save_pretrained(qwen3.init_model(cfg), tmp_path_factory.mktemp("ckpt") / "hf"))


def _copy(checkpoint: Path, dst: Path, single_file: bool = False) -> tuple[Path, Path]:
  """A copy of the checkpoint; returns (dir, weights file). single_file: as model.safetensors without an index."""
  from srpo_jax.models import hf_io
  dst.mkdir()
  (dst / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
  shard = next(checkpoint.glob("model-*.safetensors"))
  if single_file:
    weights = dst / hf_io.SINGLE_FILE
  else:
    weights = dst / shard.name
    (dst / hf_io.INDEX_FILE).write_bytes((checkpoint / hf_io.INDEX_FILE).read_bytes())
  weights.write_bytes(shard.read_bytes())
  return dst, weights


def _load(path):
  from srpo_jax.models import hf_io
  return hf_io.load_pretrained(path)


def _edit_config(d: Path, **changes):
  cfg = json.loads((d / "config.json").read_text())
  for key, value in changes.items():
    if value is ...:
      cfg.pop(key)
    else:
      cfg[key] = value
  (d / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(weights: Path, edit):
  tensors = load_file(str(weights))
  edit(tensors)
  save_file(tensors, str(weights), metadata={"format": "pt"})


def test_intact_checkpoint_loads(checkpoint):
  model = _load(checkpoint)
  assert model.config.num_hidden_layers == 2 and np.isfinite(np.asarray(model.embed.get_value())).all()


@pytest.mark.parametrize("single_file", [False, True])
def test_truncated_safetensors_names_the_file(checkpoint, tmp_path, single_file):
  d, weights = _copy(checkpoint, tmp_path / "c", single_file)
  data = weights.read_bytes()
  weights.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=f"^{weights}: not a readable safetensors file"):
    _load(d)


def test_bad_index_json_names_the_file(checkpoint, tmp_path):
  from srpo_jax.models import hf_io
  d, _ = _copy(checkpoint, tmp_path / "c")
  (d / hf_io.INDEX_FILE).write_text('{"weight_map": ')
  with pytest.raises(ValueError, match=f"^{d / hf_io.INDEX_FILE}: not a safetensors index"):
    _load(d)


def test_invalid_config_json_names_the_file(checkpoint, tmp_path):
  d, _ = _copy(checkpoint, tmp_path / "c")
  (d / "config.json").write_text('{"model_type": "qwen3", ')
  with pytest.raises(ValueError, match=f"^{d / 'config.json'}: not a valid JSON file"):
    _load(d)


@pytest.mark.parametrize(("changes", "reason"), [
    ({"num_attention_heads": ...}, "missing required field 'num_attention_heads'"),
    ({"vocab_size": ...}, "missing required field 'vocab_size'"),
    ({"num_attention_heads": 0}, "field num_attention_heads=0 must be a positive integer"),
    ({"hidden_size": "64"}, "field hidden_size='64' must be a positive integer"),
    ({"hidden_act": "gelu"}, "field hidden_act='gelu' is not supported"),
    # Floats (Python's json reads NaN/Infinity literals): each used to load and give NaN or wrong logits.
    ({"rope_theta": float("nan")}, "field rope_theta=nan must be a finite number > 0"),
    ({"rope_theta": 0}, "field rope_theta=0 must be a finite number > 0"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1e6}},
     "field rope_parameters.rope_theta=-1000000.0 must be a finite number > 0"),
    ({"rms_norm_eps": float("nan")}, "field rms_norm_eps=nan must be a finite number > 0"),
    ({"rms_norm_eps": -1e-6}, "field rms_norm_eps=-1e-06 must be a finite number > 0"),
    ({"rms_norm_eps": 0.0}, "field rms_norm_eps=0.0 must be a finite number > 0"),
    ({"rms_norm_eps": "1e-6"}, "field rms_norm_eps='1e-6' must be a finite number > 0"),
    # RoPE scaling the model does not compute. The export also writes rope_parameters (default), which used to win,
    # so a YaRN rope_scaling added by hand (as Qwen's model card suggests for long contexts) was ignored.
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
     "field rope_scaling.rope_type='yarn' is not supported (only the default RoPE is implemented"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "field rope_scaling.type='linear' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}, "rope_scaling": ...},
     "field rope_parameters.rope_type='yarn' is not supported"),
    ({"rope_parameters": {"full_attention": {"rope_type": "dynamic", "rope_theta": 1e6}}},
     "field rope_parameters.full_attention.rope_type='dynamic' is not supported"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}},
     "field rope_parameters.partial_rotary_factor=0.5 is not supported"),
    ({"rope_scaling": "yarn"}, "field rope_scaling='yarn' must be an object or null"),
    ({"rope_theta": 10000.0}, "the RoPE base is given more than once, with different values: rope_theta=10000.0, "
                              "rope_parameters.rope_theta=1000000.0"),
])
def test_bad_config_field_names_file_and_field(checkpoint, tmp_path, changes, reason):
  d, _ = _copy(checkpoint, tmp_path / "c")
  _edit_config(d, **changes)
  with pytest.raises(ValueError) as err:
    _load(d)
  assert str(err.value).startswith(f"{d / 'config.json'}: ") and reason in str(err.value)


@pytest.mark.parametrize("changes", [
    {},  # the export: rope_theta, rope_scaling null, rope_parameters default
    {"rope_scaling": ..., "rope_parameters": ...},  # an older file: rope_theta at the top level only
    {"rope_theta": ..., "rope_scaling": {"rope_type": "default"}},
    {"rope_theta": ..., "rope_parameters": {"type": "default", "rope_theta": 1e6, "partial_rotary_factor": 1.0}},
    {"rope_theta": ..., "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}},
    {"rms_norm_eps": None},
], ids=["export", "top-level", "scaling-default", "legacy-type-key", "per-layer-type", "eps-null"])
def test_plain_rope_settings_still_load(checkpoint, tmp_path, changes):
  d, _ = _copy(checkpoint, tmp_path / "c")
  _edit_config(d, **changes)
  model = _load(d)
  assert (model.config.rope_theta, model.config.rms_norm_eps) == (1e6, 1e-6)


def test_config_with_fewer_layers_than_the_weights_lists_the_extra_tensors(checkpoint, tmp_path):
  d, _ = _copy(checkpoint, tmp_path / "c")
  _edit_config(d, num_hidden_layers=1)
  with pytest.raises(ValueError, match="num_hidden_layers=1") as err:
    _load(d)
  assert "has 11 tensors" in str(err.value) and "model.layers.1.mlp.down_proj.weight" in str(err.value)
  assert "model.layers.0." not in str(err.value)


def test_tied_config_with_an_lm_head_copy_still_loads(checkpoint, tmp_path):
  """transformers ignores a tied model's lm_head.weight (and RoPE inv_freq buffers); so do we."""
  d, weights = _copy(checkpoint, tmp_path / "c", single_file=True)
  _edit_config(d, tie_word_embeddings=True)
  _edit_tensors(weights, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}))
  assert _load(d).config.tie_word_embeddings


def test_integer_weights_name_the_tensor(checkpoint, tmp_path):
  d, weights = _copy(checkpoint, tmp_path / "c", single_file=True)
  name = "model.layers.1.mlp.up_proj.weight"
  _edit_tensors(weights, lambda t: t.update({name: t[name].astype(np.int8)}))
  with pytest.raises(ValueError, match=f"^{weights}: tensor '{name}' has dtype int8; weights must be floating"):
    _load(d)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_name_the_tensor(checkpoint, tmp_path, bad):
  d, weights = _copy(checkpoint, tmp_path / "c", single_file=True)
  name = "model.layers.0.self_attn.k_proj.weight"

  def poison(t):
    t[name] = t[name].copy()
    t[name][3, 5] = bad
  _edit_tensors(weights, poison)
  kind = "1 NaN, 0 inf" if np.isnan(bad) else "0 NaN, 1 inf"
  with pytest.raises(ValueError, match=f"^{weights}: tensor '{name}' has 1 non-finite values of .* \\({kind}\\)"):
    _load(d)


# ---------------------------------------------------------------------------------------------------------------------
# 11. --config.model.random_init=None clears the preset from the command line
# ---------------------------------------------------------------------------------------------------------------------
_FLAGS_SCRIPT = """
import sys
from absl import flags
from ml_collections import config_flags
from srpo_jax import config
config_flags.DEFINE_config_file("config", lock_config=True)
config.parse_flags(sys.argv)
cfg = config.validate(flags.FLAGS.config)
print(repr(cfg.model.random_init), cfg.model.path == sys.argv[-1].split("=", 1)[1])
"""


def test_random_init_none_on_the_command_line_clears_the_preset(checkpoint):
  def run(*args):
    return subprocess.run([sys.executable, "-c", _FLAGS_SCRIPT, "--config=configs/tiny.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  proc = run("--config.model.random_init=None", f"--config.model.path={checkpoint}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["None", "True"]
  proc = run("--config.model.random_init=None")  # then a model.path is required, and the error says so
  assert proc.returncode != 0 and "model.path=None: a model directory is required" in proc.stderr


def test_random_init_string_none_coerces_only_for_str_fields():
  c = config_lib.get_base_config()
  c.run_dir, c.train.steps, c.checkpoint.every_steps = "r", 1, 1
  c.model.random_init = "None"  # what config_flags passes for `--config.model.random_init=None`
  with pytest.raises(config_lib.ConfigError, match="model.path=None"):
    config_lib.validate(c, check_files=False)
  c.model.random_init = "tny"
  with pytest.raises(config_lib.ConfigError, match="model.random_init='tny' is not one of"):
    config_lib.validate(c, check_files=False)
