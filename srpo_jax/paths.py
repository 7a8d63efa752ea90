"""The one cache root of srpo_jax: what it builds or downloads once and reuses (bundled tokenizer, warm-start
weights, benchmark data)."""
from __future__ import annotations

import os
import pathlib


def cache_root() -> pathlib.Path:
  """`$SRPO_CACHE_DIR`, else `$XDG_CACHE_HOME/srpo_jax`, else `~/.cache/srpo_jax`."""
  env = os.environ.get("SRPO_CACHE_DIR")
  if env:
    return pathlib.Path(env).expanduser()
  xdg = os.environ.get("XDG_CACHE_HOME")
  return (pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache") / "srpo_jax"


def data_cache_dir() -> pathlib.Path:
  """Where `python -m srpo_jax.data.download` puts the benchmarks by default: `cache_root()/data`."""
  return cache_root() / "data"
