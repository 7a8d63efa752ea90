"""The config schema (the frozen dataclasses of srpo_jax.config) is complete and live.

* `get_base_config()` has exactly the dataclasses' fields, and every field has a doc.
* No config field is silently ignored: every leaf field `section.name` is read (an attribute `.name`) somewhere in
  the code that runs a training: `srpo_jax/**/*.py` and `kernels/**/*.py`, where in `srpo_jax/config.py` only the
  `@property` methods and `axis_sizes` count (its validation reads a field without using it). The rule is by
  attribute name, so a field whose name is also read for another reason passes; it still catches a field that
  nothing reads at all (as `algo.kl_coef` was).
"""
from __future__ import annotations

import ast
import dataclasses
import pathlib
import typing

import ml_collections
import pytest

from srpo_jax import config as C

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG_PY = REPO / "srpo_jax" / "config.py"
# config.py functions whose reads count (derived values the trainer uses), besides every @property.
CONFIG_READERS = {"axis_sizes"}
# Fields read only dynamically (getattr with a computed name, dataclasses.asdict, ...), with the reason. Keep minimal.
ALLOWED_UNREAD: dict[str, str] = {}


def schema_fields(cls: type = C.Config, prefix: str = "") -> list[str]:
  """Dotted names of every leaf field, recursively from `cls`."""
  hints = typing.get_type_hints(cls)
  out = []
  for f in dataclasses.fields(cls):
    if dataclasses.is_dataclass(hints[f.name]):
      out += schema_fields(hints[f.name], f"{prefix}{f.name}.")
    else:
      out.append(prefix + f.name)
  return out


def _reads(tree: ast.AST) -> set[str]:
  """Attribute names read in `tree`: `x.name` (any context but a store), and `getattr(x, "name"[, default])`."""
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and not isinstance(node.ctx, ast.Store):
      names.add(node.attr)
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
          and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
      names.add(node.args[1].value)
  return names


def _is_reader(fn: ast.FunctionDef) -> bool:
  decorators = {d.id if isinstance(d, ast.Name) else getattr(d, "attr", None) for d in fn.decorator_list}
  return "property" in decorators or fn.name in CONFIG_READERS


def reads_of_config_module(source: str) -> set[str]:
  """Reads inside config.py's readers only (properties, `axis_sizes`): not its validation or its declarations."""
  names = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_reader(node):
      names |= _reads(node)
  return names


def unread(fields: list[str], reads: set[str]) -> list[str]:
  """The dotted fields whose leaf name is never read."""
  return [f for f in fields if f.rsplit(".", 1)[-1] not in reads]


def code_reads() -> set[str]:
  files = [p for d in ("srpo_jax", "kernels") for p in sorted((REPO / d).rglob("*.py")) if p != CONFIG_PY]
  assert len(files) > 10, files
  names = reads_of_config_module(CONFIG_PY.read_text())
  for p in files:
    names |= _reads(ast.parse(p.read_text(), filename=str(p)))
  return names


# ---------------------------------------------------------------------------------------------------------------------
def _dotted_keys(cd: ml_collections.ConfigDict, prefix: str = ""):
  for k, v in cd.items():
    if isinstance(v, ml_collections.ConfigDict):
      yield from _dotted_keys(v, f"{prefix}{k}.")
    else:
      yield prefix + k


def test_base_config_has_exactly_the_schema_fields():
  base_keys = list(_dotted_keys(C.get_base_config()))
  assert sorted(base_keys) == sorted(schema_fields()) and len(set(base_keys)) == len(base_keys)


def test_every_field_and_section_has_a_doc():
  def walk(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
      assert f.metadata.get("doc", "").strip(), f"{prefix}{f.name} has no doc"
      if dataclasses.is_dataclass(hints[f.name]):
        walk(hints[f.name], f"{prefix}{f.name}.")
  walk(C.Config)
  assert set(C.field_docs()) == set(schema_fields())


def test_checks_are_declared_once_as_field_metadata():
  checks = {f: m for f, m in _field_metadata().items() if m.get("check") is not None}
  assert all(isinstance(m["check"], C.Check) for m in checks.values())
  assert {"algo.clip_c", "rollout.n", "rollout.top_p", "mesh.data", "rollout.length_buckets"} <= set(checks)


def _field_metadata(cls=C.Config, prefix=""):
  hints = typing.get_type_hints(cls)
  out = {}
  for f in dataclasses.fields(cls):
    if dataclasses.is_dataclass(hints[f.name]):
      out.update(_field_metadata(hints[f.name], f"{prefix}{f.name}."))
    else:
      out[prefix + f.name] = f.metadata
  return out


def test_no_config_field_is_silently_ignored():
  stale = set(ALLOWED_UNREAD) - set(schema_fields())
  assert not stale, f"allow-list entries that are no longer fields: {sorted(stale)}"
  missing = [f for f in unread(schema_fields(), code_reads()) if f not in ALLOWED_UNREAD]
  assert not missing, (f"config fields that no code reads (remove them, or read them): {missing}")


def test_the_scanner_reports_a_field_nothing_reads():
  fields = ["algo.clip_low", "algo.kl_coef", "mesh.tensor", "run_dir"]
  src = ("def f(cfg):\n"
         "  cfg.algo.kl_coef = 1\n"  # a store is not a read
         "  x = cfg.algo.clip_low\n"
         "  return getattr(cfg.mesh, 'tensor'), cfg.run_dir\n")
  assert unread(fields, _reads(ast.parse(src))) == ["algo.kl_coef"]
  # In config.py only the readers count: a validation-only read does not.
  config_src = ("class M:\n"
                "  @property\n"
                "  def total(self):\n"
                "    return self.clip_low\n"
                "def _check(c):\n"
                "  return c.algo.kl_coef > 0\n")
  assert unread(fields[:2], reads_of_config_module(config_src)) == ["algo.kl_coef"]


def test_model_overrides_are_qwen3_config_fields():
  from srpo_jax.models import qwen3
  assert set(C.RANDOM_INIT_PRESETS) == set(qwen3.PRESETS)
  dims = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=48,
              tie_word_embeddings=False, vocab_size=512)
  overrides = C.ModelConfig(random_init="tiny", **dims).qwen3_overrides
  q = qwen3.Qwen3Config.preset("tiny", **overrides)  # HF names that Qwen3Config accepts
  assert (q.hidden_size, q.num_hidden_layers, q.num_attention_heads, q.num_key_value_heads, q.head_dim,
          q.intermediate_size, q.tie_word_embeddings, q.vocab_size) == tuple(dims.values())
  assert not {n for n in vars(C.ModelConfig) if not n.startswith("_")} - {f.name for f in dataclasses.fields(
      C.ModelConfig)} - {"qwen3_overrides"}


def _float_fields() -> dict[str, bool]:
  """{dotted name: is a tuple of floats} for every float field of the schema (Optional[float] included)."""
  out = {}
  for path in schema_fields():
    *sections, name = path.split(".")
    cls = C.Config
    for s in sections:
      cls = typing.get_type_hints(cls)[s]
    tp = typing.get_type_hints(cls)[name]
    if typing.get_origin(tp) is typing.Union:
      (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    if tp is float or (typing.get_origin(tp) is tuple and typing.get_args(tp)[0] is float):
      out[path] = tp is not float
  return out


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
def test_every_float_field_refuses_non_finite_values(bad):
  """One check in validation covers every float field, present and future: the config is stored as JSON in each
  checkpoint (no NaN/inf there), so `optim.lr=inf` used to train and then fail at the first save."""
  fields = _float_fields()
  assert {"optim.lr", "algo.clip_high", "train.max_wall_time_h", "train.time_budgets_h",
          "rollout.request_deadline_s"} <= set(fields)
  for path, is_tuple in fields.items():
    cd = C.get_base_config()
    cd.run_dir, cd.train.steps, cd.checkpoint.every_steps, cd.model.random_init = "r", 1, 1, "tiny"
    raw = cd.to_dict()
    *sections, name = path.split(".")
    node = raw
    for s in sections:
      node = node[s]
    node[name] = (1.0, bad) if is_tuple else bad
    with pytest.raises(C.ConfigError) as err:
      C.validate(raw, check_files=False)
    where = f"{path}[1]" if is_tuple else path
    assert str(err.value) == f"{where}={bad!r}: must be a finite number", str(err.value)
