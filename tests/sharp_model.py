"""Random-init models sharp enough for the SDPO term and the DW weights to matter in a test (issue 23).

At random init (weights normal(0, 0.02)) the logits of a small model are ~0.1 apart: every distribution is within
1e-2 nats of uniform, every DW weight exp(−βH) / mean is 1.000 and the teacher–student JSD ~1e-4, so a test on such
a model cannot tell a wrong DW normaliser (or none) from the right one. `sharpen` multiplies the final RMSNorm's
scale, i.e. every logit, by `factor`: the model's shape and code path are unchanged, only its numbers.
"""
from __future__ import annotations

import contextlib

import numpy as np

SHARPEN = 10.0  # V = 384, D = 32: teacher entropies 1.4..4.5 nats, DW weights 0.28..2.4, SDPO ~2/3 of the loss
# The "tiny" preset (V = 151,936, D = 64) in the fast e2e config: step 1 DW weights 0.79..1.16, SDPO 2% of the loss
# (1.0000 and ~0 unsharpened). From ×15 on, the 4-token responses of a prompt's group come out identical and no
# group is mixed (nothing is SDPO-routed).
SHARPEN_TINY = 12.0


def sharpen(model, factor: float = SHARPEN):
  """`model` with its logits scaled by `factor` (in place; returned for chaining)."""
  model.final_norm.scale[...] = model.final_norm.scale[...] * factor
  return model


def dw_spread(weights) -> float:
  """max / min of DW weights (1.0: DW does nothing)."""
  w = np.asarray(weights, np.float64)
  return float(w.max() / w.min())


def share(part: float, rest: float) -> float:
  """|part| / (|part| + |rest|): how much of a loss one of its terms is."""
  return abs(part) / max(abs(part) + abs(rest), 1e-30)


BREAKS = ("dw_unnormalised", "dw_per_micro_batch", "sdpo_term_dropped")


@contextlib.contextmanager
def broken(kind: str):
  """The trainer with DW normalisation or the SDPO term deliberately broken, for the negative cases: `dw_unnormalised`
  (weights exp(−βH) without the normaliser), `dw_per_micro_batch` (normalised over the last teacher micro-batch
  instead of the mini-batch), `sdpo_term_dropped` (no teacher sequences: SDPO-routed rollouts carry zero loss but
  still count in the denominator). Host-side patches only: the compiled programs are the healthy ones."""
  import jax.numpy as jnp
  from srpo_jax import batching
  from srpo_jax import trainer as T
  real_scale, real_micro_batch = T.dw_scale, batching.micro_batch
  if kind == "dw_unnormalised":
    T.dw_scale = lambda parts: jnp.float32(1.0)
  elif kind == "dw_per_micro_batch":
    T.dw_scale = lambda parts: real_scale(parts[-1:])
  elif kind == "sdpo_term_dropped":
    batching.micro_batch = lambda *a, **kw: real_micro_batch(*a, **{**kw, "with_teacher": False})
  else:
    raise ValueError(f"broken: unknown kind {kind!r}; expected one of {BREAKS}")
  try:
    yield
  finally:
    T.dw_scale, batching.micro_batch = real_scale, real_micro_batch
