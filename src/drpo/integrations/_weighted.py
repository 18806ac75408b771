"""A drpo policy loss whose per-token terms carry an extra non-negative weight (verl's
rollout-correction IS weights, TRL's vLLM importance-sampling ratio) before aggregation,
as both frameworks apply theirs. Shared by the verl and TRL adapters."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from drpo.objectives import aggregate, per_token_objective, policy_loss


def weighted_policy_loss(
    method: str,
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    weights: Tensor | None,
    *,
    agg: str,
    horizon: int | None = None,
    weights_name: str = "weights",
    **params: Any,
) -> tuple[Tensor, dict[str, float]]:
    """`drpo.objectives.policy_loss`, with each token's loss multiplied by `weights`
    (broadcastable to `logp`, e.g. [batch, seq] or [batch, 1]) when given.

    policy_loss validates the inputs and computes the diagnostics (of the unweighted tokens);
    with weights the loss is aggregate(-J * weights) over the same neutrally padded tokens.
    """
    loss, metrics = policy_loss(method, logp, old_logp, advantages, mask, agg=agg, horizon=horizon, **params)
    if weights is None:
        return loss, metrics
    mask = mask != 0  # validated 0/1 by policy_loss
    try:
        w = torch.broadcast_to(weights.detach(), logp.shape)
    except RuntimeError:
        raise ValueError(
            f"`{weights_name}` shape {tuple(weights.shape)} does not broadcast to log-prob shape {tuple(logp.shape)}"
        ) from None
    bad = mask & ~(torch.isfinite(w) & (w >= 0))
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"`{weights_name}` must be finite and >= 0, got {w[idx].item()} at position {idx}")
    dtype = torch.promote_types(logp.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    # Same neutral padding as policy_loss (pi = mu = 1, A = 0): padding cannot produce NaN.
    logp_n = torch.where(mask, logp.to(dtype), zero).clamp(max=0.0)
    old_n = torch.where(mask, old_logp.detach().to(dtype), zero).clamp(max=0.0)
    adv = advantages.detach().to(dtype)
    if adv.dim() == 1:
        adv = adv[:, None]
    adv_n = torch.where(mask, adv.expand_as(logp_n), zero)
    j, _ = per_token_objective(method, logp_n, old_n, adv_n, **params)
    per_token = -j * torch.where(mask, w.to(dtype), zero)
    return aggregate(per_token, mask, agg, horizon=horizon), metrics
