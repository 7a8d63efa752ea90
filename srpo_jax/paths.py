"""Where srpo_jax keeps what it builds once and reuses (bundled tokenizer, warm-start weights)."""
from __future__ import annotations

import os
import pathlib


def cache_root() -> pathlib.Path:
  """`$SRPO_CACHE_DIR`, else `~/.cache/srpo_jax`."""
  return pathlib.Path(os.environ.get("SRPO_CACHE_DIR") or "~/.cache/srpo_jax").expanduser()
