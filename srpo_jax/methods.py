"""What a method is: one frozen `Method` record per method, and the table of them (`METHODS`).

Routing (`algorithms.routing.route`), the objective (`algorithms.losses.routed_objective`), the train step, the
trainer's metrics and the config's method-dependent defaults read the record, never the method's name. Adding an
ablation is one new entry here (plus its test).

A rollout i has correctness `c_i = [r_i >= threshold]` and teacher availability `m_i` (a correct sibling j != i in
its group). Each record says which rollouts take which loss:

| method          | GRPO rows  | SDPO rows                   | DW  | combine | lr    | mini-batch | loss agg            |
|-----------------|------------|-----------------------------|-----|---------|-------|------------|---------------------|
| `grpo`          | all        | none                        | no  | sum     | 1e-6  | 8          | seq-mean-token-mean |
| `sdpo`          | none       | m_i (correct ones too)      | no  | sum     | 1e-5  | 32         | seq-mean-token-mean |
| `srpo`          | not SDPO   | (1 − c_i)·m_i               | yes | sum     | 5e-6  | 32         | token-mean          |
| `srpo_no_dw`    | not SDPO   | (1 − c_i)·m_i               | no  | sum     | 5e-6  | 32         | token-mean          |
| `advantage_mix` | all        | m_i                         | no  | mix (λ) | 5e-6  | 32         | token-mean          |
| `grpo_sdpo_all` | not SDPO   | m_i (correct ones too)      | no  | sum     | 5e-6  | 32         | token-mean          |

Defaults: the paper's Table 3 and the spec's "The two baselines as the paper ran them". `grpo_sdpo_all` is an
ablation between SDPO and SRPO (distil every rollout that has a teacher, GRPO only where there is none); it is not in
the paper, and takes the SRPO family's optimisation settings.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Union

GrpoRows = Literal["all", "not_sdpo", "none"]
SdpoRows = Literal["none", "has_teacher", "failed_with_teacher"]
LOSS_AGGS = ("token-mean", "seq-mean-token-mean")


@dataclasses.dataclass(frozen=True)
class Method:
  """One training method (hashable: a static argument of the jitted programs)."""
  name: str
  grpo_rows: GrpoRows  # which rollouts take the clipped GRPO loss
  sdpo_rows: SdpoRows  # which rollouts take the SDPO distillation loss (and need a teacher forward)
  dynamic_weighting: bool  # SDPO tokens weighted by exp(−β·H_teacher), normalised to mean 1 (DW-SDPO)
  combine: Literal["sum", "mix"]  # sum: a rollout's losses add; mix: λ·ℓ^GRPO + (1 − λ)·ℓ^SDPO where both apply
  lr: float  # paper learning rate (optim.lr = None)
  mini_batch_prompts: int  # prompts per optimizer step (optim.mini_batch_prompts = None)
  loss_agg: Literal[LOSS_AGGS]  # loss aggregation (algo.loss_agg = None)

  @property
  def uses_teacher(self) -> bool:
    """The EMA teacher exists (and is updated) only when some rollouts can be distilled."""
    return self.sdpo_rows != "none"

  def route_masks(self, correct_B, has_teacher_B):
    """(grpo_B, sdpo_B) bool masks from c_i and m_i; works on numpy and jax arrays (and inside jit)."""
    sdpo_B = {"none": has_teacher_B & False, "has_teacher": has_teacher_B,
              "failed_with_teacher": ~correct_B & has_teacher_B}[self.sdpo_rows]
    grpo_B = {"all": correct_B | True, "not_sdpo": ~sdpo_B, "none": correct_B & False}[self.grpo_rows]
    return grpo_B, sdpo_B


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("grpo", "all", "none", False, "sum", lr=1e-6, mini_batch_prompts=8, loss_agg="seq-mean-token-mean"),
    Method("sdpo", "none", "has_teacher", False, "sum", lr=1e-5, mini_batch_prompts=32,
           loss_agg="seq-mean-token-mean"),
    Method("srpo", "not_sdpo", "failed_with_teacher", True, "sum", lr=5e-6, mini_batch_prompts=32,
           loss_agg="token-mean"),
    Method("srpo_no_dw", "not_sdpo", "failed_with_teacher", False, "sum", lr=5e-6, mini_batch_prompts=32,
           loss_agg="token-mean"),
    Method("advantage_mix", "all", "has_teacher", False, "mix", lr=5e-6, mini_batch_prompts=32,
           loss_agg="token-mean"),
    Method("grpo_sdpo_all", "not_sdpo", "has_teacher", False, "sum", lr=5e-6, mini_batch_prompts=32,
           loss_agg="token-mean"),
)}
NAMES = tuple(METHODS)


def get(method: Union[str, Method]) -> Method:
  """The record for a name (or the record itself); a clear error for an unknown name."""
  if isinstance(method, Method):
    return method
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; expected one of {', '.join(NAMES)}")
  return METHODS[method]
