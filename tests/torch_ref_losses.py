"""PyTorch reference of the SRPO / GRPO / SDPO math, written from `docs/srpo_spec.md` (not from the JAX code).

Deliberately plain: explicit probabilities instead of log-space tricks where the spec states a formula in
probabilities, Python loops for routing and advantages, float64-capable. Used only by the tests.
"""
from __future__ import annotations

import torch


def group_advantages(rewards: list[float], group_ids: list[int], norm_adv_by_std: bool = False,
                     eps: float = 1e-6) -> list[float]:
  """A_i = r_i - mean of its group, optionally / (unbiased std of the group + eps)."""
  out = []
  for i, g in enumerate(group_ids):
    group = torch.tensor([r for r, h in zip(rewards, group_ids) if h == g], dtype=torch.float64)
    a = rewards[i] - group.mean().item()
    if norm_adv_by_std:
      std = group.std(unbiased=True).item() if len(group) > 1 else 0.0
      a = a / (std + eps)
    out.append(a)
  return out


def route(rewards: list[float], group_ids: list[int], method: str) -> tuple[list[bool], list[bool], list[int]]:
  """(grpo, sdpo, sibling) per rollout, by the spec's rules, with loops."""
  grpo, sdpo, sibling = [], [], []
  for i, (r, g) in enumerate(zip(rewards, group_ids)):
    correct = r >= 0.5
    sibs = [j for j, (rj, gj) in enumerate(zip(rewards, group_ids)) if gj == g and j != i and rj >= 0.5]
    has_teacher = len(sibs) > 0
    sibling.append(sibs[0] if sibs else -1)
    if method == "grpo":
      grpo.append(True), sdpo.append(False)
    elif method == "sdpo":
      grpo.append(False), sdpo.append(has_teacher)
    elif method == "advantage_mix":
      grpo.append(True), sdpo.append(has_teacher)
    elif method == "grpo_sdpo_all":  # ablation: distil every rollout with a teacher, GRPO on the rest
      grpo.append(not has_teacher), sdpo.append(has_teacher)
    else:
      z_sdpo = (not correct) and has_teacher
      grpo.append(not z_sdpo), sdpo.append(z_sdpo)
  return grpo, sdpo, sibling


def topk_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int = 100, alpha: float = 0.5,
             add_tail: bool = True, temperature: float = 1.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
  """Spec "SDPO branch": student top-k support, full-vocab normalisation, tail bucket, generalized JSD.

  Runs in `dtype` (float64 by default: a more exact yardstick for the float32 JAX code)."""
  s = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
  t = torch.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
  idx = torch.topk(student_logits.detach(), k, dim=-1).indices
  ps = torch.gather(s, -1, idx).exp()
  pt = torch.gather(t, -1, idx).exp()
  if add_tail:
    def with_tail(p):
      lse = torch.logsumexp(p.log(), dim=-1, keepdim=True).clamp(max=-1e-7)
      return torch.cat([p, -torch.expm1(lse)], dim=-1)  # probability 1 - Σ p, computed stably
    ps, pt = with_tail(ps), with_tail(pt)
  else:
    ps, pt = ps / ps.sum(-1, keepdim=True), pt / pt.sum(-1, keepdim=True)

  def kl(p, q):
    return (p * (p.log() - q.log())).sum(-1)

  if alpha == 0.0:
    return kl(pt, ps)
  if alpha == 1.0:
    return kl(ps, pt)
  m = (1 - alpha) * ps + alpha * pt
  return (1 - alpha) * kl(ps, m) + alpha * kl(pt, m)


def rollout_is_weight(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float = 2.0) -> torch.Tensor:
  return torch.clamp(torch.exp(old_logp - rollout_logp), max=cap).detach()


def grpo_token_loss(logp, old_logp, adv_BT, clip_low=0.2, clip_high=0.28, clip_c=3.0, w_roll=None):
  ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
  l1 = -adv_BT * ratio
  l2 = -adv_BT * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
  loss = torch.maximum(l1, l2)
  loss = torch.where(adv_BT < 0, torch.minimum(loss, -clip_c * adv_BT), loss)
  return loss if w_roll is None else loss * w_roll.detach()


def sdpo_token_loss(jsd, logp, old_logp, is_clip=2.0, w_roll=None):
  ratio = torch.clamp(torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0)), max=is_clip).detach()
  loss = jsd * ratio
  return loss if w_roll is None else loss * w_roll.detach()


def dw_weights(teacher_entropy: torch.Tensor, mask: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
  """w = exp(-βH) / mean over Ω of exp(-βH); 0 off Ω."""
  w = torch.exp(-beta * teacher_entropy.double())
  on = mask.bool()
  if on.sum() == 0:
    return torch.zeros_like(w)
  return torch.where(on, w / w[on].mean(), torch.zeros_like(w)).detach()


def objective(grpo_BT, sdpo_BT, dw_BT, valid_BT, grpo_B, sdpo_B, method, loss_agg, mix_lambda=0.9,
              entropy_BT=None, entropy_coef=0.0):
  """The spec's objective, loops over rollouts; returns the scalar loss. With `entropy_coef`, minus the entropy
  bonus as verl's actor takes it: `agg_loss(entropy, response_mask, loss_agg_mode)`, every valid token of every
  rollout whatever its route, never DW-weighted."""
  bonus = 0.0
  if entropy_coef:
    rows = [entropy_BT[i][valid_BT[i].bool()] for i in range(valid_BT.shape[0])]
    if loss_agg == "token-mean":
      bonus = torch.cat(rows).sum() / max(sum(len(r) for r in rows), 1)
    else:
      bonus = torch.stack([r.mean() for r in rows if len(r)]).mean()
  return _policy_objective(grpo_BT, sdpo_BT, dw_BT, valid_BT, grpo_B, sdpo_B, method, loss_agg,
                           mix_lambda) - entropy_coef * bonus


def _policy_objective(grpo_BT, sdpo_BT, dw_BT, valid_BT, grpo_B, sdpo_B, method, loss_agg, mix_lambda):
  per_seq = []
  total, denom = 0.0, 0.0
  for i in range(valid_BT.shape[0]):
    v = valid_BT[i].bool()
    g = grpo_BT[i][v]
    s = sdpo_BT[i][v]
    w = dw_BT[i][v] if method == "srpo" else torch.ones_like(s)
    if method == "advantage_mix":
      tok = mix_lambda * g + (1 - mix_lambda) * s if sdpo_B[i] else g
      routed = True
    else:
      tok = torch.zeros_like(g)
      if grpo_B[i]:
        tok = tok + g
      if sdpo_B[i]:
        tok = tok + w * s
      routed = bool(grpo_B[i] or sdpo_B[i])
    if loss_agg == "token-mean":
      if routed:
        total = total + tok.sum()
        denom += int(v.sum())
    else:
      if int(v.sum()) > 0:
        per_seq.append(tok.mean())
  if loss_agg == "token-mean":
    return total / max(denom, 1.0)
  return torch.stack(per_seq).mean() if per_seq else torch.tensor(0.0)
