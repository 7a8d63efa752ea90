"""Qwen3 in Flax NNX vs transformers' Qwen3ForCausalLM (PyTorch, eager, fp32), KV cache, HF round trips."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import srpo_jax
from srpo_jax.models import hf_io
from srpo_jax.models.qwen3 import Qwen3Config, init_model, positions_from_mask
from tests.hf_models import tiny_hf_qwen3


def _torch_logits(model, ids, mask=None, positions=None):
  with torch.no_grad():
    kw = {}
    if mask is not None:
      kw["attention_mask"] = torch.tensor(np.asarray(mask), dtype=torch.long)
    if positions is not None:
      kw["position_ids"] = torch.tensor(np.asarray(positions), dtype=torch.long)
    return model(torch.tensor(np.asarray(ids)), **kw).logits.float().numpy()


@pytest.fixture(scope="module", params=[(True, 4, 4), (False, 4, 2), (True, 8, 2)], ids=["tied-gqa1", "untied-gqa2",
                                                                                          "tied-gqa4"])
def pair(request, tmp_path_factory):
  tied, heads, kv = request.param
  hf = tiny_hf_qwen3(tied=tied, num_heads=heads, num_kv_heads=kv)
  d = tmp_path_factory.mktemp("hf")
  hf.save_pretrained(d)
  return hf, srpo_jax.load_pretrained(d), d


def test_config_reads_rope_theta_in_both_places():
  base = {"model_type": "qwen3", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
          "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4}
  assert Qwen3Config.from_hf_dict({**base, "rope_theta": 123.0}).rope_theta == 123.0
  assert Qwen3Config.from_hf_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}).rope_theta == 7.0


def test_presets_match_published_parameter_counts():
  # Parameter counts from the Qwen3 model cards / HF configs (embedding included): 0.6B ≈ 0.60e9, 8B ≈ 8.19e9.
  for name, lo, hi in (("0.6b", 0.55e9, 0.65e9), ("8b", 8.0e9, 8.4e9), ("32b", 32.0e9, 33.5e9)):
    cfg = Qwen3Config.preset(name)
    abstract = jax.eval_shape(lambda: jax.tree.leaves(__import__("flax").nnx.state(init_model(cfg))))
    n = sum(int(np.prod(x.shape)) for x in abstract)
    assert lo <= n <= hi, (name, n)


def test_parity_no_padding(pair):
  hf, ours, _ = pair
  ids = np.random.default_rng(0).integers(0, 512, (2, 11))
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids))), _torch_logits(hf, ids), atol=1e-4, rtol=0)


def test_parity_right_and_left_padding(pair):
  hf, ours, _ = pair
  rng = np.random.default_rng(1)
  ids = rng.integers(0, 512, (3, 9))
  lengths = np.array([9, 6, 3])
  right = (np.arange(9)[None] < lengths[:, None]).astype(np.int32)
  left = right[:, ::-1].copy()
  for mask in (right, left):
    pos = np.asarray(positions_from_mask(jnp.asarray(mask)))
    got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos)))
    want = _torch_logits(hf, ids, mask, pos)
    valid = mask.astype(bool)
    assert np.abs(got[valid] - want[valid]).max() <= 1e-4
    # default positions come from the mask
    got_default = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got_default[valid], got[valid], atol=1e-6)


def test_rope_theta_matters_and_matches():
  hf = tiny_hf_qwen3(tied=False, rope_theta=1e6, seed=3)
  ours = init_model(Qwen3Config.preset("tiny", vocab_size=512))  # different weights: only to have a model object
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    ours = srpo_jax.load_pretrained(d)
    assert ours.config.rope_theta == 1e6
    ids = np.random.default_rng(2).integers(0, 512, (1, 40))
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids))), _torch_logits(hf, ids), atol=1e-4, rtol=0)


def test_kv_cache_decoding_matches_full_forward(pair):
  _, ours, _ = pair
  rng = np.random.default_rng(3)
  b, prompt, new = 3, 7, 6
  ids = rng.integers(0, 512, (b, prompt + new))
  lengths = np.array([7, 4, 2])
  prompt_mask = (np.arange(prompt)[None] >= prompt - lengths[:, None])  # left padded prompts
  full_mask = np.concatenate([prompt_mask, np.ones((b, new), bool)], axis=1)
  full = np.asarray(ours(jnp.asarray(ids), jnp.asarray(full_mask)))
  cache = ours.init_cache(b, prompt + new + 3)
  pos = positions_from_mask(jnp.asarray(full_mask))
  h, cache = ours.forward_with_cache(jnp.asarray(ids[:, :prompt]), pos[:, :prompt], jnp.asarray(prompt_mask), cache, 0)
  step_logits = [np.asarray(ours.logits(h))[:, -1]]
  for t in range(prompt, prompt + new - 1):
    h, cache = ours.forward_with_cache(jnp.asarray(ids[:, t:t + 1]), pos[:, t:t + 1], jnp.ones((b, 1), bool), cache,
                                       jnp.int32(t))
    step_logits.append(np.asarray(ours.logits(h))[:, 0])
  np.testing.assert_allclose(np.stack(step_logits, 1), full[:, prompt - 1:prompt + new - 1], atol=1e-4, rtol=0)


def test_export_loads_in_transformers_with_same_logits(pair, tmp_path):
  hf, ours, _ = pair
  out = srpo_jax.save_pretrained(ours, tmp_path / "export")
  back = transformers.Qwen3ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  ids = np.random.default_rng(4).integers(0, 512, (2, 8))
  np.testing.assert_allclose(_torch_logits(back, ids), _torch_logits(hf, ids), atol=1e-5, rtol=0)
  np.testing.assert_allclose(_torch_logits(back, ids), np.asarray(ours(jnp.asarray(ids))), atol=1e-4, rtol=0)


def test_sharded_index_checkpoint_loads(pair, tmp_path):
  hf, ours, _ = pair
  out = hf_io.save_pretrained(ours, tmp_path / "sharded", max_shard_bytes=40_000)
  index = json.load(open(os.path.join(out, hf_io.INDEX_FILE)))
  assert len(set(index["weight_map"].values())) > 2
  again = srpo_jax.load_pretrained(out)
  ids = np.random.default_rng(5).integers(0, 512, (1, 6))
  np.testing.assert_array_equal(np.asarray(again(jnp.asarray(ids))), np.asarray(ours(jnp.asarray(ids))))
  # transformers reads the index too
  back = transformers.Qwen3ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  np.testing.assert_allclose(_torch_logits(back, ids), _torch_logits(hf, ids), atol=1e-5, rtol=0)



@pytest.mark.parametrize("dtype,in_place", [("bfloat16", False), ("float32", False), ("bfloat16", True)])
def test_export_files_are_the_host_conversions_bytes(pair, tmp_path, dtype, in_place):
  """The device-side cast and layout (hf_io._hf_layout) and the parallel shard writes give the very files of the
  host conversion (numpy astype, then the HF transpose), byte for byte, values chosen to round both ways. In place
  (a refit over the engine's recycled oldest export): the same bytes in the same files (same inodes: their pages
  reused), over an export of other values, and a stale shard of another layout removed."""
  from safetensors.numpy import save_file
  _, ours, _ = pair
  from flax import nnx
  graphdef, state = nnx.split(ours)
  rng = np.random.default_rng(6)
  # Values between bf16 neighbours (ties included) so that a different rounding than numpy's shows in the bytes.
  state = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32) + np.float32(2.0**-9),
                                             x.dtype), state)
  model = nnx.merge(graphdef, state)
  inodes = {}
  if in_place:
    before = hf_io.save_pretrained(ours, tmp_path / "export", dtype=dtype, max_shard_bytes=30_000)
    inodes = {f: os.stat(os.path.join(before, f)).st_ino for f in os.listdir(before) if f.endswith(".safetensors")}
    open(os.path.join(before, "model-00099-of-00099.safetensors"), "wb").close()  # another layout's shard
  out = hf_io.save_pretrained(model, tmp_path / "export", dtype=dtype, max_shard_bytes=30_000, in_place=in_place)
  index = json.load(open(os.path.join(out, hf_io.INDEX_FILE)))
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2
  assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == files
  if in_place:
    assert sorted(inodes) == files and all(os.stat(os.path.join(out, f)).st_ino == inodes[f] for f in files)
  dt = np.dtype(jnp.dtype(dtype))
  for fname in files:
    ref = {name: np.ascontiguousarray(hf_io._to_hf(kind, np.asarray(hf_io._variable(model, attr).get_value())
                                                   .astype(dt)))
           for attr, name, kind in hf_io.param_table(model.config) if index["weight_map"][name] == fname}
    save_file(ref, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "ref.safetensors").read_bytes() == open(os.path.join(out, fname), "rb").read(), fname
  assert index["metadata"]["total_size"] == sum(
      int(np.prod(hf_io._variable(model, a).get_value().shape)) * dt.itemsize for a, _, _ in
      hf_io.param_table(model.config))

def test_bf16_close_to_fp32_reference(pair):
  hf, _, d = pair
  ours = srpo_jax.load_pretrained(d, dtype="bfloat16")
  assert ours.embed[...].dtype == jnp.bfloat16
  ids = np.random.default_rng(6).integers(0, 512, (2, 16))
  ref = torch.log_softmax(torch.tensor(_torch_logits(hf, ids)), -1)
  got = torch.log_softmax(torch.tensor(np.asarray(ours(jnp.asarray(ids)), np.float32)), -1)
  kl = (ref.exp() * (ref - got)).sum(-1).mean().item()
  assert kl <= 1e-2, kl


def test_bf16_checkpoint_loads(tmp_path):
  hf = tiny_hf_qwen3(tied=True).to(torch.bfloat16)
  hf.save_pretrained(tmp_path)
  ours = srpo_jax.load_pretrained(tmp_path)
  assert ours.embed[...].dtype == jnp.bfloat16 and ours.config.dtype == "bfloat16"
  np.testing.assert_array_equal(np.asarray(ours.embed[...].astype(jnp.float32)),
                                hf.model.embed_tokens.weight.float().detach().numpy())


def test_remat_gives_same_logits_and_grads(pair):
  from flax import nnx
  _, ours, d = pair
  rematted = srpo_jax.load_pretrained(d, remat=True)
  ids = jnp.asarray(np.random.default_rng(7).integers(0, 512, (2, 5)))
  loss = lambda m: m(ids).sum()
  g1 = nnx.grad(loss)(ours)
  g2 = nnx.grad(loss)(rematted)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


# -- bad input ---------------------------------------------------------------------------------------------------------
def test_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="does-not-exist"):
    srpo_jax.load_pretrained(tmp_path / "does-not-exist")


def test_missing_tensor_named(pair, tmp_path):
  from safetensors.numpy import load_file, save_file
  _, _, d = pair
  tensors = load_file(os.path.join(d, "model.safetensors"))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text(open(os.path.join(d, "config.json")).read())
  with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
    srpo_jax.load_pretrained(tmp_path)


def test_wrong_shape_named(pair, tmp_path):
  from safetensors.numpy import load_file, save_file
  _, _, d = pair
  tensors = load_file(os.path.join(d, "model.safetensors"))
  tensors["model.layers.0.self_attn.k_norm.weight"] = np.ones(3, np.float32)
  save_file(tensors, tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text(open(os.path.join(d, "config.json")).read())
  with pytest.raises(ValueError, match=r"k_norm\.weight.*\(3,\)"):
    srpo_jax.load_pretrained(tmp_path)


@pytest.mark.parametrize("patch,field", [({"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]},
                                          "model_type"),
                                         ({"num_experts": 8}, "num_experts"),
                                         ({"use_sliding_window": True}, "use_sliding_window")])
def test_unsupported_architecture_named(pair, tmp_path, patch, field):
  _, _, d = pair
  cfg = json.load(open(os.path.join(d, "config.json")))
  cfg.update(patch)
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=field):
    srpo_jax.load_pretrained(tmp_path)


def test_load_with_mesh_places_each_tensor_sharded(tmp_path):
  """4 forced CPU devices, mesh fsdp=2 × tensor=2: tensors land sharded by their logical axes; logits unchanged."""
  import subprocess
  import sys
  tiny_hf_qwen3(tied=False).save_pretrained(tmp_path)
  code = f"""
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
import jax, numpy as np, srpo_jax
from jax.sharding import PartitionSpec as P
from srpo_jax.sharding import make_mesh
mesh = make_mesh(data=1, fsdp=2, tensor=2)
m = srpo_jax.load_pretrained({str(tmp_path)!r}, mesh=mesh)
ref = srpo_jax.load_pretrained({str(tmp_path)!r})
q = m.layers[0].attn.q[...]
assert q.sharding.spec == P("fsdp", "tensor", None), q.sharding.spec
assert len(q.sharding.device_set) == 4
assert m.lm_head[...].sharding.spec == P("fsdp", "tensor"), m.lm_head[...].sharding.spec
ids = (np.arange(10)[None] * 37) % 512
np.testing.assert_allclose(np.asarray(m(ids)), np.asarray(ref(ids)), atol=1e-5)
print("SHARDED-OK")
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert "SHARDED-OK" in out.stdout, out.stderr[-3000:]
