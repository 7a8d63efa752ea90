"""Checkpointer: bitwise round trip, keep-last-k, atomicity under a crash mid-save, mismatch errors, RNG <-> JSON."""
import os
import subprocess
import sys
import textwrap
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from srpo_jax.checkpointing import Checkpointer, CheckpointError


# ---------------------------------------------------------------------------------------------------------------------
# RNG state <-> JSON: test-only helpers showing that a JSON `meta` can carry RNG states exactly (the trainer saves
# none: its randomness is a function of (seed, step)).
# ---------------------------------------------------------------------------------------------------------------------
def _to_jsonable(x: Any) -> Any:
  if isinstance(x, np.ndarray):
    return {"__ndarray__": x.tolist(), "dtype": str(x.dtype)}
  if isinstance(x, Mapping):
    return {k: _to_jsonable(v) for k, v in x.items()}
  if isinstance(x, np.integer):
    return int(x)
  return x


def _from_jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    if "__ndarray__" in x:
      return np.asarray(x["__ndarray__"], dtype=x["dtype"])
    return {k: _from_jsonable(v) for k, v in x.items()}
  return x


def numpy_rng_to_json(rng: np.random.Generator) -> dict[str, Any]:
  """`Generator.bit_generator.state` as JSON (big ints stay ints: Python's json keeps them exact)."""
  return _to_jsonable(rng.bit_generator.state)


def numpy_rng_from_json(state: Mapping[str, Any]) -> np.random.Generator:
  """Inverse of `numpy_rng_to_json`: a Generator that continues the saved stream exactly."""
  name = state.get("bit_generator")
  bit_gen_cls = getattr(np.random, str(name), None)
  if bit_gen_cls is None or not isinstance(bit_gen_cls, type) or not issubclass(bit_gen_cls, np.random.BitGenerator):
    raise ValueError(f"numpy RNG state: unknown bit_generator {name!r}")
  bit_gen = bit_gen_cls()
  bit_gen.state = _from_jsonable(dict(state))
  return np.random.Generator(bit_gen)


def jax_key_to_json(key: jax.Array) -> dict[str, Any]:
  """A jax PRNG key (typed `jax.random.key` or legacy uint32 `PRNGKey`, any batch shape) as JSON."""
  typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  data = np.asarray(jax.random.key_data(key) if typed else key)
  return {"typed": bool(typed), "impl": str(jax.random.key_impl(key)) if typed else None,
          "data": data.tolist(), "dtype": str(data.dtype)}


def jax_key_from_json(d: Mapping[str, Any]) -> jax.Array:
  """Inverse of `jax_key_to_json`."""
  data = np.asarray(d["data"], dtype=d.get("dtype", "uint32"))
  if d.get("typed"):
    return jax.random.wrap_key_data(data, impl=d["impl"])
  return jax.numpy.asarray(data)


def _state(seed: int = 0):
  """params (bf16 + fp32), an adamw state after one update (non-zero moments), an nnx.State, PRNG keys."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {"w": jax.random.normal(k1, (3, 5), jnp.float32).astype(jnp.bfloat16),
            "b": jax.random.normal(k2, (5,), jnp.float32)}
  tx = optax.adamw(1e-3, weight_decay=0.01)
  opt = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, params)
  _, opt = tx.update(grads, opt, params)
  teacher = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(seed)))
  return {"params": params, "opt": opt, "teacher": teacher, "key": jax.random.key(seed + 7),
          "legacy_key": jax.random.PRNGKey(seed + 9), "step": jnp.asarray(seed, jnp.int32)}


def _bits(x):
  """Raw bytes of any leaf (PRNG keys via their key data), for bitwise comparison."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x).tobytes()


def _assert_bitwise_equal(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.sharding == y.sharding
    assert _bits(x) == _bits(y)


def test_round_trip_is_bitwise_with_dtypes_shardings_and_meta(tmp_path):
  state = _state(1)
  rng = np.random.default_rng(123)
  rng.random(5)  # advance it: the restored generator must continue mid-stream
  meta = {"step": 4, "data_pos": 17, "wall_time_s": 12.5, "np_rng": numpy_rng_to_json(rng),
          "key": jax_key_to_json(state["key"])}
  with Checkpointer(tmp_path / "ck", keep=3) as ck:
    assert ck.latest_step() is None
    assert ck.save(4, state, meta)
    assert ck.latest_step() == 4
    # Restore into a zeroed target of the same structure (the trainer's situation: freshly initialised state).
    abstract = jax.eval_shape(lambda: _state(2))
    restored, meta2 = ck.restore(4, abstract)
  _assert_bitwise_equal(state, restored)
  assert isinstance(restored["opt"][0], optax.ScaleByAdamState)
  assert float(np.abs(np.asarray(restored["opt"][0].mu["b"])).sum()) > 0  # the moments, not a fresh init
  assert meta2["step"] == 4 and meta2["data_pos"] == 17 and meta2["wall_time_s"] == 12.5
  rng2 = numpy_rng_from_json(meta2["np_rng"])
  np.testing.assert_array_equal(rng.random(4), rng2.random(4))
  key2 = jax_key_from_json(meta2["key"])
  np.testing.assert_array_equal(jax.random.key_data(key2), jax.random.key_data(state["key"]))


def test_keep_last_k_and_resave_is_noop(tmp_path):
  state = _state()
  ck = Checkpointer(tmp_path / "ck", keep=2)
  for step in (1, 2, 3, 4):
    assert ck.save(step, state, {"step": step})
  assert ck.all_steps() == [3, 4]
  assert sorted(p for p in os.listdir(tmp_path / "ck") if p.isdigit()) == ["3", "4"]
  assert not ck.save(4, state, {"step": 4})  # already saved: nothing written
  ck.close()
  assert Checkpointer(tmp_path / "ck", keep=2).latest_step() == 4  # a new process sees the same


def test_mismatched_target_names_step_dir_and_key(tmp_path):
  state = _state()
  ck = Checkpointer(tmp_path / "ck")
  ck.save(2, state, {"step": 2})
  step_dir = os.path.join(str(tmp_path / "ck"), "2")

  wrong_shape = jax.eval_shape(_state)
  wrong_shape["params"]["w"] = jax.ShapeDtypeStruct((3, 6), jnp.bfloat16)
  with pytest.raises(CheckpointError, match=r"'params\.w'.*\(3, 5\).*\(3, 6\)") as e:
    ck.restore(2, wrong_shape)
  assert step_dir in str(e.value)

  wrong_dtype = jax.eval_shape(_state)
  wrong_dtype["params"]["b"] = jax.ShapeDtypeStruct((5,), jnp.bfloat16)
  with pytest.raises(CheckpointError, match=r"'params\.b'.*float32.*bfloat16"):
    ck.restore(2, wrong_dtype)

  extra_key = jax.eval_shape(_state)
  extra_key["params"]["new"] = jax.ShapeDtypeStruct((2,), jnp.float32)
  with pytest.raises(CheckpointError, match=r"no key 'params\.new'") as e:
    ck.restore(2, extra_key)
  assert step_dir in str(e.value)

  missing_key = jax.eval_shape(_state)
  del missing_key["teacher"]
  with pytest.raises(CheckpointError, match=r"holds key 'teacher\.bias\.value'"):
    ck.restore(2, missing_key)

  with pytest.raises(CheckpointError, match=r"no checkpoint for step 9 .*available steps: \[2\]"):
    ck.restore(9, jax.eval_shape(_state))


def test_meta_must_be_json(tmp_path):
  ck = Checkpointer(tmp_path / "ck")
  with pytest.raises(TypeError, match=r"meta\.rng\.state"):
    ck.save(1, _state(), {"rng": {"state": np.zeros(2)}})
  with pytest.raises(TypeError, match=r"meta\.loss=nan"):
    ck.save(1, _state(), {"loss": float("nan")})
  assert ck.latest_step() is None  # nothing half-written


_CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    import jax, jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from srpo_jax.checkpointing import Checkpointer

    ck = Checkpointer(sys.argv[1], keep=3)
    ck.save(1, {"w": jnp.full((4, 4), 1.0)}, {"step": 1})

    async def die(self, *a, **k):  # all arrays written, the rename to the final name not yet done
      os._exit(17)
    atomicity.AtomicRenameTemporaryPath.finalize = die
    ck.save(2, {"w": jnp.full((4, 4), 2.0)}, {"step": 2})
    os._exit(0)  # not reached
""")


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path):
  directory = str(tmp_path / "ck")
  proc = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, directory], capture_output=True, text=True,
                        timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 17, proc.stderr[-2000:]
  leftovers = [p for p in os.listdir(directory) if p.startswith("2") and p != "2"]
  assert leftovers, os.listdir(directory)  # the interrupted save left its temporary directory behind
  ck = Checkpointer(directory, keep=3)
  assert ck.all_steps() == [1]
  state, meta = ck.restore(1, {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)})
  np.testing.assert_array_equal(np.asarray(state["w"]), np.ones((4, 4), np.float32))
  assert meta == {"step": 1}
  # The next save of step 2 succeeds over the leftovers.
  assert ck.save(2, {"w": jnp.full((4, 4), 2.0)}, {"step": 2})
  assert ck.latest_step() == 2


def test_partial_step_directory_without_commit_is_ignored(tmp_path):
  """A temporary directory from a crashed save (simulated by hand) is neither listed nor restored."""
  directory = tmp_path / "ck"
  ck = Checkpointer(directory)
  ck.save(1, {"w": jnp.ones(3)}, {"step": 1})
  ck.close()
  tmp = directory / "5.orbax-checkpoint-tmp-1234567890"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "garbage").write_bytes(b"\x00" * 10)
  ck = Checkpointer(directory)
  assert ck.latest_step() == 1
  state, _ = ck.restore(1, {"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
  np.testing.assert_array_equal(np.asarray(state["w"]), np.ones(3, np.float32))


@pytest.mark.parametrize("make_key", [lambda: jax.random.key(3), lambda: jax.random.key(3, impl="rbg"),
                                      lambda: jax.random.split(jax.random.key(1), 4), lambda: jax.random.PRNGKey(5)])
def test_jax_key_json_round_trip(make_key):
  key = make_key()
  back = jax_key_from_json(jax_key_to_json(key))
  assert back.dtype == key.dtype and back.shape == key.shape
  assert _bits(back) == _bits(key)
  # Same stream: the next split agrees.
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 0:
    assert _bits(jax.random.split(back)) == _bits(jax.random.split(key))


def test_numpy_rng_json_round_trip_mt19937():
  rng = np.random.Generator(np.random.MT19937(4))
  rng.integers(0, 10, 7)
  import json
  back = numpy_rng_from_json(json.loads(json.dumps(numpy_rng_to_json(rng))))
  np.testing.assert_array_equal(rng.integers(0, 1000, 9), back.integers(0, 1000, 9))


_SHARDING_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from srpo_jax.checkpointing import Checkpointer

    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    x = jax.device_put(jnp.arange(32, dtype=jnp.float32).reshape(4, 8).astype(jnp.bfloat16),
                       NamedSharding(mesh, P("fsdp", None)))
    ck = Checkpointer(sys.argv[1])
    ck.save(1, {"w": x}, {})
    for spec in (P(None, "fsdp"), P()):  # restore into a different layout: the target's sharding wins
      target = {"w": jax.ShapeDtypeStruct((4, 8), jnp.bfloat16, sharding=NamedSharding(mesh, spec))}
      y = ck.restore(1, target)[0]["w"]
      assert y.sharding == target["w"].sharding, (y.sharding, spec)
      assert y.dtype == jnp.bfloat16
      assert np.asarray(y).tobytes() == np.asarray(x).tobytes()
    print("OK", len(jax.devices()))
""")


def test_restore_uses_target_sharding_on_two_cpu_devices(tmp_path):
  proc = subprocess.run([sys.executable, "-c", _SHARDING_SCRIPT, str(tmp_path / "ck")], capture_output=True,
                        text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0 and "OK 2" in proc.stdout, proc.stderr[-3000:]
