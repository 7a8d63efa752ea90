"""HF checkpoint directories <-> the Flax NNX Qwen3.

Load reads tensor by tensor (safetensors memory-maps each file), converts one tensor to our layout, places it
(with its NamedSharding when a mesh is given) and drops the host copy before reading the next, so the host never
holds a second full copy of the model. Export writes config.json, safetensors shards with an index, and the tokenizer
files when given, into a temporary directory that is renamed into place (a reader — SGLang's refit — never sees a
half-written checkpoint).

Letters (the alphabet of `srpo_jax.models.qwen3`): D model width, N query heads, H head dim ("heads" is N for q, K
for k and v).
"""
from __future__ import annotations

import concurrent.futures
import functools
import glob
import json
import mmap
import os
import shutil
import tempfile
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from srpo_jax.models.qwen3 import Qwen3, Qwen3Config, as_dtype

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3
EXPORT_TMP_PREFIXES = (".tmp-export-", ".tmp-old-")  # save_pretrained's temporary dirs (beside the target)


# ---------------------------------------------------------------------------------------------------------------------
# Name and layout table. HF Linear weights are [out, in]; ours are [in, out] with heads split out.
# ---------------------------------------------------------------------------------------------------------------------
def _to_ours(kind: str, x: np.ndarray, cfg: Qwen3Config) -> np.ndarray:
  h = cfg.head_dim
  if kind in ("same",):
    return x
  if kind == "linear":  # [out, in] -> [in, out]
    return x.T
  if kind == "in_heads":  # [heads*H, D] -> [D, heads, H]
    return x.reshape(-1, h, x.shape[-1]).transpose(2, 0, 1)
  if kind == "out_heads":  # [D, N*H] -> [N, H, D]
    return x.T.reshape(-1, h, x.shape[0])
  if kind == "bias_heads":  # [heads*H] -> [heads, H]
    return x.reshape(-1, h)
  raise AssertionError(kind)


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == "same":
    return x
  if kind == "linear":
    return x.T
  if kind == "in_heads":  # [D, heads, H] -> [heads*H, D]
    return x.transpose(1, 2, 0).reshape(-1, x.shape[0])
  if kind == "out_heads":  # [N, H, D] -> [D, N*H]
    return x.reshape(-1, x.shape[-1]).T
  if kind == "bias_heads":
    return x.reshape(-1)
  raise AssertionError(kind)


def param_table(cfg: Qwen3Config) -> Iterator[tuple[tuple[Any, ...], str, str]]:
  """(our attribute path, HF tensor name, layout kind) for every parameter of `Qwen3(cfg)`."""
  yield ("embed",), "model.embed_tokens.weight", "same"
  for i in range(cfg.num_hidden_layers):
    p = f"model.layers.{i}."
    for ours, hf in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
      yield ("layers", i, "attn", ours), f"{p}self_attn.{hf}.weight", "in_heads"
      if cfg.attention_bias:
        yield ("layers", i, "attn", f"{ours}_bias"), f"{p}self_attn.{hf}.bias", "bias_heads"
    yield ("layers", i, "attn", "o"), f"{p}self_attn.o_proj.weight", "out_heads"
    yield ("layers", i, "attn", "q_norm", "scale"), f"{p}self_attn.q_norm.weight", "same"
    yield ("layers", i, "attn", "k_norm", "scale"), f"{p}self_attn.k_norm.weight", "same"
    yield ("layers", i, "mlp", "gate"), f"{p}mlp.gate_proj.weight", "linear"
    yield ("layers", i, "mlp", "up"), f"{p}mlp.up_proj.weight", "linear"
    yield ("layers", i, "mlp", "down"), f"{p}mlp.down_proj.weight", "linear"
    yield ("layers", i, "input_norm", "scale"), f"{p}input_layernorm.weight", "same"
    yield ("layers", i, "post_attn_norm", "scale"), f"{p}post_attention_layernorm.weight", "same"
  yield ("final_norm", "scale"), "model.norm.weight", "same"
  if not cfg.tie_word_embeddings:
    yield ("lm_head",), "lm_head.weight", "linear"


def _variable(model: nnx.Module, path: tuple[Any, ...]) -> nnx.Variable:
  node = model
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


# ---------------------------------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------------------------------
def _safe_open(fpath: str):
  """safe_open, with the file named in its errors (safetensors' own, e.g. "incomplete metadata", name none)."""
  try:
    return safe_open(fpath, framework="numpy")
  except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ...: all mean an unreadable file
    raise ValueError(f"{fpath}: not a readable safetensors file (truncated or corrupt?): "
                     f"{type(err).__name__}: {err}") from None


class _TensorIndex:
  """Tensor name -> file, for a single-file or an index-sharded checkpoint; opens each file once, lazily."""

  def __init__(self, path: str):
    self.path = path
    index_path, single = os.path.join(path, INDEX_FILE), os.path.join(path, SINGLE_FILE)
    if os.path.isfile(index_path):
      try:
        with open(index_path, encoding="utf-8") as f:
          weight_map = json.load(f)["weight_map"]
        self.where = {str(k): str(v) for k, v in weight_map.items()}
      except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{index_path}: not a safetensors index (a JSON object with a 'weight_map' object of "
                         f"tensor name -> file): {type(err).__name__}: {err}") from None
      self.source = index_path
    elif os.path.isfile(single):
      with _safe_open(single) as f:
        self.where = {k: SINGLE_FILE for k in f.keys()}
      self.source = single
    else:
      raise FileNotFoundError(f"checkpoint directory {path!r} has neither {INDEX_FILE} nor {SINGLE_FILE}")
    self._open: dict[str, Any] = {}

  def file_of(self, name: str) -> str:
    return os.path.join(self.path, self.where[name])

  def get(self, name: str) -> np.ndarray:
    if name not in self.where:
      raise KeyError(f"tensor {name!r} is missing from checkpoint {self.source!r}")
    fname, fpath = self.where[name], self.file_of(name)
    if fname not in self._open:
      if not os.path.isfile(fpath):
        raise FileNotFoundError(f"{self.source!r} maps tensor {name!r} to {fname!r}, which does not exist")
      self._open[fname] = _safe_open(fpath)
    try:
      return self._open[fname].get_tensor(name)
    except Exception as err:  # noqa: BLE001 - e.g. a tensor the index names but this file lacks, or bad bytes
      raise ValueError(f"{fpath}: cannot read tensor {name!r}: {type(err).__name__}: {err}") from None

  def close(self):
    self._open.clear()


# Tensors a file may hold that the model does not read, as transformers ignores them: RoPE's recomputed inverse
# frequencies (older exports), and a tied model's copy of the LM head (the embedding is used).
def _ignorable(name: str, cfg: Qwen3Config) -> bool:
  return name.endswith(".rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight")


def _check_unexpected(index: _TensorIndex, cfg: Qwen3Config, wanted: set[str]) -> None:
  """Every tensor of the checkpoint must be read: extra ones mean config.json describes a different (e.g. shallower)
  model than the weights, which would otherwise load as a silently smaller model."""
  extra = sorted(n for n in index.where if n not in wanted and not _ignorable(n, cfg))
  if extra:
    shown = ", ".join(extra[:8]) + (f", ... ({len(extra)} in all)" if len(extra) > 8 else "")
    raise ValueError(f"checkpoint {index.source!r} has {len(extra)} tensors that the model described by its "
                     f"config.json (num_hidden_layers={cfg.num_hidden_layers}, tie_word_embeddings="
                     f"{cfg.tie_word_embeddings}, attention_bias={cfg.attention_bias}) does not use: {shown}")


_FINITE_CHUNK = 1 << 24  # elements per isfinite pass: bounds the temporary mask, whatever the tensor's size


def _check_values(name: str, x: np.ndarray, fpath: str) -> None:
  """A weight must be floating point and finite (a NaN/inf weight poisons every forward and update)."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{fpath}: tensor {name!r} has dtype {x.dtype}; weights must be floating point "
                     "(a quantized checkpoint is not supported)")
  flat = x.reshape(-1)
  for start in range(0, flat.size, _FINITE_CHUNK):
    if not np.isfinite(flat[start:start + _FINITE_CHUNK]).all():
      bad = flat[~np.isfinite(flat)]
      raise ValueError(f"{fpath}: tensor {name!r} has {bad.size} non-finite values of {flat.size} "
                       f"({int(np.isnan(bad).sum())} NaN, {int(np.isinf(bad).sum())} inf)")


def load_pretrained(path: str | os.PathLike, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
                    **config_overrides) -> Qwen3:
  """Loads an HF Qwen3 directory. `dtype` sets both parameter and compute dtype (default: the checkpoint's).

  Raises ValueError naming the file and the tensor or field for: an unreadable config.json or safetensors file, a
  missing, misshapen, non-float or non-finite tensor, and tensors the config's model does not use."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
  overrides = dict(config_overrides)
  if dtype is not None:
    overrides.setdefault("param_dtype", str(as_dtype(dtype)))
    overrides.setdefault("dtype", str(as_dtype(dtype)))
  cfg = Qwen3Config.from_dir(path, **overrides)
  # Build the module without allocating weights, then fill each Variable from the file.
  model = nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)))
  shardings = None
  if mesh is not None:
    from srpo_jax import sharding as shd
    shardings = shd
  index = _TensorIndex(path)
  try:
    table = list(param_table(cfg))
    _check_unexpected(index, cfg, {hf_name for _, hf_name, _ in table})
    for attr_path, hf_name, kind in table:
      var = _variable(model, attr_path)
      expected = var.get_value()
      raw = index.get(hf_name)
      _check_values(hf_name, raw, index.file_of(hf_name))
      x = _to_ours(kind, raw, cfg)
      del raw
      if tuple(x.shape) != tuple(expected.shape):
        raise ValueError(f"tensor {hf_name!r} in {index.source!r} has shape {tuple(index.get(hf_name).shape)}, "
                         f"which does not fit config.json (expected {tuple(_to_hf(kind, np.empty(expected.shape)).shape)})")
      if shardings is not None:
        spec = shardings.logical_to_spec(var.get_metadata().get("logical_axes"), x.shape, mesh)
        value = jax.device_put(x.astype(expected.dtype), jax.sharding.NamedSharding(mesh, spec))
      else:
        value = jnp.asarray(x, dtype=expected.dtype)
      var.set_value(value)
      del x
  finally:
    index.close()
  return model


# ---------------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------------
def remove_export_leftovers(*directories: str | os.PathLike) -> list[str]:
  """Deletes the temporary directories an interrupted `save_pretrained` left in `directories` (the parents of its
  targets); returns their paths. Only for a directory no export is writing to (the trainer holds the run lock)."""
  removed = []
  for d in directories:
    if not os.path.isdir(d):
      continue
    for name in sorted(os.listdir(d)):
      path = os.path.join(d, name)
      if name.startswith(EXPORT_TMP_PREFIXES) and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
  return removed


def _hf_shape(kind: str, shape: tuple[int, ...], cfg: Qwen3Config) -> tuple[int, ...]:
  """The HF shape of one of our parameters of `shape` (`_to_hf` on shapes)."""
  return tuple(jax.eval_shape(lambda x: _to_hf(kind, x), jax.ShapeDtypeStruct(tuple(shape), np.float32)).shape)


@functools.partial(jax.jit, static_argnames=("kind", "dtype"))
def _hf_layout(x, kind: str, dtype):
  """One parameter cast and laid out as HF stores it, on the devices that hold it (XLA's convert rounds to nearest
  even, as numpy's astype: the bytes are those of the host conversion)."""
  return _to_hf(kind, x.astype(dtype))


_SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64"}
MAX_EXPORT_WORKERS = 16


def safetensors_header(entries: list[tuple[str, tuple[int, ...]]], dtype, metadata: dict[str, str]
                       ) -> tuple[bytes, dict[str, int]]:
  """The header safetensors' save_file writes for tensors (name, shape) of one `dtype` (they are then stored in name
  order), and each tensor's offset in the file. Writing the data at those offsets gives save_file's file, byte for
  byte (tests/test_qwen3.py compares them)."""
  header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
  ends, start = {}, 0
  for name, shape in sorted(entries):
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _SAFETENSORS_DTYPES[str(np.dtype(dtype))], "shape": list(shape),
                    "data_offsets": [start, start + nbytes]}
    ends[name], start = start, start + nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the format pads it
  raw = len(raw).to_bytes(8, "little") + raw
  return raw, {name: len(raw) + offset for name, offset in ends.items()}


def export_workers(num_tensors: int) -> int:
  """Tensors copied to the host and written at once: one per CPU (at most MAX_EXPORT_WORKERS), each holding one
  tensor on the host while it is written."""
  return max(1, min(num_tensors, os.cpu_count() or 1, MAX_EXPORT_WORKERS))


def write_files(files: dict[str, list[tuple[str, tuple[int, ...], Any]]], dtype, metadata: dict[str, str]) -> None:
  """Safetensors files {path: [(tensor name, shape, fetch)]}, every tensor copied to its offset by a pool of
  `export_workers` threads (`fetch()` gives the host array: a device copy, started when a worker takes it), so the
  copies and writes of all files overlap and no file waits for another.

  An existing file is overwritten in place, cut or grown to its new size (not truncated to 0 first), so its pages
  stay allocated (a refit over the engine's recycled oldest export), and it is mapped (MAP_POPULATE: its page table
  filled in one call) and the tensors copied into the mapping: on tmpfs 0.4–0.5 of a memory copy where a pwrite per
  tensor ran at 0.35 and writing new pages at 0.2 (BUILD_NOTES.md, "Refit export"). A new file is written with one
  pwrite per tensor (mapping it would fault in and clear each page first)."""
  jobs, maps, fds = [], [], []
  itemsize = np.dtype(dtype).itemsize
  flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
  try:
    for path, entries in files.items():
      header, offsets = safetensors_header([(n, shape) for n, shape, _ in entries], dtype, metadata)
      size = max(offsets[n] + int(np.prod(shape, dtype=np.int64)) * itemsize for n, shape, _ in entries)
      existed = os.path.exists(path)
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
      fds.append(fd)
      os.ftruncate(fd, size)
      os.pwrite(fd, header, 0)
      out = fd
      if existed:
        out = mmap.mmap(fd, size, flags=flags)
        maps.append(out)
      jobs += [(out, offsets[name], shape, fetch) for name, shape, fetch in entries]

    def write(job) -> None:
      out, pos, shape, fetch = job
      a = np.ascontiguousarray(fetch())
      if a.shape != tuple(shape) or a.dtype != np.dtype(dtype):
        raise AssertionError(f"export: got {a.dtype}{a.shape}, planned {np.dtype(dtype)}{tuple(shape)}")
      if isinstance(out, mmap.mmap):
        dst = np.frombuffer(out, np.uint8, count=a.nbytes, offset=pos)
        try:
          np.copyto(dst, a.reshape(-1).view(np.uint8))  # releases the GIL: the workers copy in parallel
        finally:
          del dst  # a live view would keep the mapping from closing
        return
      view = memoryview(a.reshape(-1).view(np.uint8))
      while view:  # one pwrite moves at most ~2 GiB on Linux
        n = os.pwrite(out, view, pos)
        view, pos = view[n:], pos + n

    # Largest first: the long copies start early and the small ones fill in at the end.
    jobs.sort(key=lambda j: -int(np.prod(j[2], dtype=np.int64)))
    with concurrent.futures.ThreadPoolExecutor(export_workers(len(jobs))) as pool:
      for fut in [pool.submit(write, job) for job in jobs]:
        fut.result()
  finally:
    jobs.clear()
    for m in maps:
      m.close()
    for fd in fds:
      os.close(fd)


def save_pretrained(model: Qwen3, path: str | os.PathLike, tokenizer=None, *, dtype: str | None = None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, in_place: bool = False) -> str:
  """Writes `model` as an HF directory (config.json, sharded safetensors + index, tokenizer files if given).

  Each tensor is cast and transposed on its devices (`_hf_layout`, jitted), then copied to the host and written at
  its offset in its shard by a pool of threads (`write_files`): a refit's export runs at memory speed, not at a host
  transpose's.

  By default the directory is written beside `path` and renamed into place (a reader never sees half of it). With
  `in_place`, an existing `path` (an earlier export the caller recycles, e.g. `SGLangEngine`'s oldest, renamed to a
  directory no reader knows) is overwritten file by file, its shard files' pages reused; shards it has beyond this
  model's are removed.
  """
  cfg = model.config
  get = lambda attr_path: _variable(model, attr_path).get_value()
  path = os.path.abspath(os.fspath(path))
  out_dtype = as_dtype(dtype or cfg.param_dtype)
  table = list(param_table(cfg))
  # Plan the shards from shapes alone; the tensors are laid out and fetched one per writer thread.
  shards, cur, cur_bytes = [], [], 0
  for entry in table:
    nbytes = int(np.prod(get(entry[0]).shape)) * out_dtype.itemsize
    if cur and cur_bytes + nbytes > max_shard_bytes:
      shards.append(cur)
      cur, cur_bytes = [], 0
    cur.append(entry)
    cur_bytes += nbytes
  shards.append(cur)

  parent = os.path.dirname(path) or "."
  os.makedirs(parent, exist_ok=True)
  in_place = in_place and os.path.isdir(path)
  tmp = path if in_place else tempfile.mkdtemp(prefix=EXPORT_TMP_PREFIXES[0], dir=parent)
  try:
    weight_map, total = {}, 0
    fnames = [f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors" for si in range(len(shards))]
    for fname, shard in zip(fnames, shards):
      for attr_path, hf_name, _ in shard:
        weight_map[hf_name] = fname
        total += int(np.prod(get(attr_path).shape)) * out_dtype.itemsize

    for stale in set(glob.glob(os.path.join(tmp, "*.safetensors"))) - {os.path.join(tmp, f) for f in fnames}:
      os.remove(stale)  # an in-place export over a directory of another shard layout
    files = {os.path.join(tmp, fname): [(hf_name, _hf_shape(kind, get(attr_path).shape, cfg),
                                         lambda a=attr_path, k=kind: jax.device_get(_hf_layout(get(a), k, out_dtype)))
                                        for attr_path, hf_name, kind in shard]
             for fname, shard in zip(fnames, shards)}
    if str(out_dtype) in _SAFETENSORS_DTYPES:
      write_files(files, out_dtype, {"format": "pt"})
    else:  # a dtype our writer does not name: safetensors' own, one shard at a time
      for fpath, entries in files.items():
        save_file({n: np.asarray(fetch()) for n, _, fetch in entries}, fpath, metadata={"format": "pt"})
    with open(os.path.join(tmp, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf_cfg = cfg.to_hf_dict()
    hf_cfg["dtype"] = hf_cfg["torch_dtype"] = str(out_dtype)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_cfg, f, indent=2)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
      json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": [cfg.eos_token_id, cfg.bos_token_id],
                 "pad_token_id": cfg.bos_token_id}, f, indent=2)
    if tokenizer is not None:
      tokenizer.save_pretrained(tmp)
    if not in_place and os.path.exists(path):
      old = tempfile.mkdtemp(prefix=EXPORT_TMP_PREFIXES[1], dir=parent)
      os.rename(path, os.path.join(old, "x"))
      os.rename(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    elif not in_place:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)  # in place too: a half-overwritten export is no export
    raise
  return path
