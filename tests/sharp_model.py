"""Random-init models sharp enough for the SDPO term and the DW weights to matter in a test (issue 23).

At random init (weights normal(0, 0.02)) the logits of a small model are ~0.1 apart: every distribution is within
1e-2 nats of uniform, every DW weight exp(−βH) / mean is 1.000 and the teacher–student JSD ~1e-4, so a test on such
a model cannot tell a wrong DW normaliser (or none) from the right one. `sharpen` multiplies the final RMSNorm's
scale, i.e. every logit, by `factor`: the model's shape and code path are unchanged, only its numbers.
"""
from __future__ import annotations

import numpy as np

SHARPEN = 10.0  # V = 384, D = 32: teacher entropies 1.4..4.5 nats, DW weights 0.28..2.4, SDPO ~2/3 of the loss


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
