"""Refit export (`hf_io.save_pretrained`, what `SGLangEngine.update_weights` runs) against this machine's memory-copy
bandwidth, for Qwen3-0.6B and Qwen3-8B shapes with random fp32 weights exported as bf16 (the trainer's refit).

Measured side by side in one run:
- copy: `np.copyto` of a 1 GiB array (bytes copied per second): the ceiling of any export that must at least copy.
- export: bf16 bytes written per second by `save_pretrained` (cast + HF layout on the devices, shards in parallel)
  into a RAM-backed directory (/dev/shm when it exists, as the trainer's exports), into a new directory and in place
  over the previous export (what a refit does once the engine recycles its oldest export); median of `--runs` after
  a warm-up export (which compiles the layout programs).
- host: the previous export (numpy cast and transpose on the host, shards one after another) on the same model.

Qwen3-8B is 16.4 GB in bf16 (32.8 GB of fp32 parameters): more than this machine's RAM beside the other jobs. It is
measured with its real layer shapes on `--layers_8b` layers and a `--vocab_8b` vocabulary (the LM head and embedding
are the same kind of tensor as the MLP's), and its full export is projected at the measured rate (bytes / GB/s).
The projected refit on a node (`sglang_memory.projected_refit_s`) adds SGLang's load of the export.

Run: `.venv/bin/python bench/refit.py [--runs 3 --layers_8b 4 --vocab_8b 16384]`. The last line is
`8B export / copy bandwidth: <ratio>` (target >= 0.5).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from srpo_jax.models import hf_io  # noqa: E402
from srpo_jax.models.qwen3 import Qwen3, Qwen3Config  # noqa: E402
from srpo_jax.rollout import sglang_memory  # noqa: E402

GB = 1e9


def copy_bandwidth(nbytes: int = 2**30, runs: int = 5) -> float:
  """Bytes per second of numpy copying a large array (pages touched first, median of `runs`)."""
  src = np.ones(nbytes // 8, np.float64)
  dst = np.zeros_like(src)
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    np.copyto(dst, src)
    times.append(time.perf_counter() - t0)
  return nbytes / statistics.median(times)


def file_write_bandwidth(directory: str, nbytes: int = 2**30, runs: int = 3) -> float:
  """Bytes per second of writing one large buffer into a new file in `directory` (one write call): the most a
  single writer of an export there can reach (tmpfs allocates and clears each page it writes)."""
  src = np.ones(nbytes // 8, np.float64)
  path = os.path.join(directory, "write-test")
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    with open(path, "wb") as f:
      f.write(src.data)
    times.append(time.perf_counter() - t0)
    os.remove(path)
  return nbytes / statistics.median(times)


def random_model(cfg: Qwen3Config, seed: int = 0) -> Qwen3:
  """fp32 parameters of `cfg`'s shapes filled from numpy (faster than the model's initialisers on a CPU)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda x: jax.device_put(rng.standard_normal(x.shape, np.float32) * np.float32(0.02)), state)
  return nnx.merge(graphdef, state)


def host_export(model: Qwen3, path: str, dtype: str = "bfloat16") -> None:
  """The export before issue 21: a numpy cast and transpose per tensor on the host, one shard after another."""
  out = np.dtype(jax.numpy.dtype(dtype))
  os.makedirs(path, exist_ok=True)
  table = list(hf_io.param_table(model.config))
  shards, cur, size = [], [], 0
  for entry in table:
    n = int(np.prod(hf_io._variable(model, entry[0]).get_value().shape)) * out.itemsize
    if cur and size + n > hf_io.DEFAULT_MAX_SHARD_BYTES:
      shards.append(cur)
      cur, size = [], 0
    cur.append(entry)
    size += n
  shards.append(cur)
  for si, shard in enumerate(shards):
    tensors = {}
    for attr, name, kind in shard:
      x = np.asarray(jax.device_get(hf_io._variable(model, attr).get_value())).astype(out)
      tensors[name] = np.ascontiguousarray(hf_io._to_hf(kind, x))
    save_file(tensors, os.path.join(path, f"model-{si + 1:05d}.safetensors"), metadata={"format": "pt"})


def timed(fn, runs: int, setup=None) -> float:
  times = []
  for _ in range(runs):
    if setup is not None:
      setup()
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench_model(label: str, cfg: Qwen3Config, out_root: str, runs: int, host: bool) -> dict:
  model = random_model(cfg)
  nbytes = sglang_memory.weight_bytes(cfg)
  path = os.path.join(out_root, "export")

  def export(in_place: bool):
    return lambda: hf_io.save_pretrained(model, path, dtype="bfloat16", in_place=in_place)

  export(False)()  # warm-up: compiles the layout programs
  row = dict(label=label, layers=cfg.num_hidden_layers, vocab=cfg.vocab_size, bytes=nbytes,
             export_s=timed(export(False), runs),  # a new directory, renamed into place
             reuse_s=timed(export(True), runs))  # over the previous export's files: the engine's recycled oldest
  # The host's part alone: the laid-out bf16 arrays (on a GPU node the cast and transpose take milliseconds of HBM
  # time) copied to the host and written, shards in parallel, as save_pretrained does.
  with open(os.path.join(path, hf_io.INDEX_FILE)) as f:
    weight_map = json.load(f)["weight_map"]
  laid = {name: hf_io._hf_layout(hf_io._variable(model, attr).get_value(), kind, np.dtype(jax.numpy.bfloat16))
          for attr, name, kind in hf_io.param_table(cfg)}
  jax.block_until_ready(list(laid.values()))
  hpath = os.path.join(out_root, "written")
  os.makedirs(hpath, exist_ok=True)
  files = {os.path.join(hpath, f): [(n, laid[n].shape, lambda n=n: jax.device_get(laid[n])) for n in laid
                                    if weight_map[n] == f] for f in sorted(set(weight_map.values()))}

  def write_all():
    hf_io.write_files(files, np.dtype(jax.numpy.bfloat16), {"format": "pt"})

  def remove_files():
    for f in files:
      if os.path.exists(f):
        os.remove(f)

  write_all()
  row["write_s"] = timed(write_all, runs, setup=remove_files)  # into new files
  row["write_reuse_s"] = timed(write_all, runs)  # over the same files (pages allocated)
  del laid
  shutil.rmtree(hpath, ignore_errors=True)
  if host:
    hpath = os.path.join(out_root, "host")
    row["host_s"] = timed(lambda: host_export(model, hpath), max(1, runs - 1))
    shutil.rmtree(hpath, ignore_errors=True)
  shutil.rmtree(path, ignore_errors=True)
  del model
  return row


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--layers_8b", type=int, default=4)
  ap.add_argument("--vocab_8b", type=int, default=16384)
  args = ap.parse_args()
  out_root = tempfile.mkdtemp(prefix="srpo-refit-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
  try:
    copy = copy_bandwidth()
    file_write = file_write_bandwidth(out_root)
    rows = [bench_model("Qwen3-0.6B", Qwen3Config.preset("0.6b", param_dtype="float32"), out_root, args.runs, True),
            bench_model(f"Qwen3-8B shapes ({args.layers_8b} layers, vocab {args.vocab_8b})",
                        Qwen3Config.preset("8b", param_dtype="float32", num_hidden_layers=args.layers_8b,
                                           vocab_size=args.vocab_8b), out_root, args.runs, True)]
  finally:
    shutil.rmtree(out_root, ignore_errors=True)
  print(f"machine: {os.cpu_count()} CPUs, jax {jax.__version__} on {jax.devices()[0].platform}; export into "
        f"{'/dev/shm' if os.path.isdir('/dev/shm') else tempfile.gettempdir()}")
  print(f"memory copy (np.copyto, 1 GiB): {copy / GB:.2f} GB/s; one 1 GiB write into a new file there: "
        f"{file_write / GB:.2f} GB/s ({file_write / copy:.2f} of the copy)")
  print("export: save_pretrained here (this CPU is the device: XLA's cast and transpose run on these cores), into "
        "a new directory / in place over the previous export (the engine recycles its oldest); write: its host part "
        "alone (laid-out arrays to the host and into the files, tensors in parallel), new files / in place; host: "
        "the previous numpy export")
  print(f"{'model':<44}{'bf16 GB':>8}{'export s':>9}{'in place':>9}{'GB/s':>6}{'/copy':>6}{'write s':>8}"
        f"{'in place':>9}{'GB/s':>6}{'/copy':>6}{'host s':>7}{'speedup':>8}")
  for r in rows:
    rate, wrate = r["bytes"] / r["reuse_s"], r["bytes"] / r["write_reuse_s"]
    print(f"{r['label']:<44}{r['bytes'] / GB:>8.3f}{r['export_s']:>9.2f}{r['reuse_s']:>9.2f}{rate / GB:>6.2f}"
          f"{rate / copy:>6.2f}{r['write_s']:>8.2f}{r['write_reuse_s']:>9.2f}{wrate / GB:>6.2f}{wrate / copy:>6.2f}"
          f"{r['host_s']:>7.2f}{r['host_s'] / r['reuse_s']:>8.1f}")
  full = sglang_memory.weight_bytes(Qwen3Config.preset("8b"))
  rate8, wrate8 = rows[1]["bytes"] / rows[1]["reuse_s"], rows[1]["bytes"] / rows[1]["write_reuse_s"]
  print(f"Qwen3-8B full ({full / GB:.1f} GB bf16) projected here, in place: export {full / rate8:.1f} s at "
        f"{rate8 / GB:.2f} GB/s, host part {full / wrate8:.1f} s at {wrate8 / GB:.2f} GB/s")
  print(f"projected 8B refit on a node: {sglang_memory.projected_refit_s(full, wrate8):.1f} s (the host part at "
        f"this machine's measured rate, a floor for a node's host; reload at an assumed "
        f"{sglang_memory.LOAD_BYTES_PER_S / 1e9:.0f} GB/s host-to-device per GPU)")
  print(f"8B export / copy bandwidth: {rate8 / copy:.2f} end to end on this CPU, {wrate8 / copy:.2f} for the host part "
        f"(in place)")


if __name__ == "__main__":
  main()
