"""Group advantages: rewards of the G samples of each prompt -> one advantage per sample.

    mean   A_i = r_i - mean_g(r)                      (the paper's recipe: no std division)
    grpo   A_i = (r_i - mean_g(r)) / (std_g(r) + eps)  (unbiased std, as torch.std / verl)
    rloo   A_i = r_i - mean_{j != i} r_j = G/(G-1) * (r_i - mean_g(r))

Rows i*G..(i+1)*G-1 hold prompt i's samples (the rollout engine's layout).
"""

from __future__ import annotations

import torch
from torch import Tensor

ESTIMATORS = ("mean", "grpo", "rloo")
GRPO_EPS = 1e-6


def group_advantages(rewards: Tensor, group_size: int, estimator: str = "mean", *, eps: float = GRPO_EPS) -> Tensor:
    """[N] rewards (N = prompts * group_size) -> [N] fp32 advantages."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if not isinstance(rewards, Tensor) or rewards.dim() != 1:
        shape = tuple(rewards.shape) if isinstance(rewards, Tensor) else type(rewards).__name__
        raise ValueError(f"`rewards` must be a 1-D tensor, got {shape}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"`group_size` must be a positive int, got {group_size!r}")
    if rewards.numel() == 0 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards cannot be split into groups of {group_size}")
    if not torch.isfinite(rewards).all():
        raise ValueError(f"`rewards` has non-finite values: {rewards[~torch.isfinite(rewards)].tolist()}")
    if estimator in ("grpo", "rloo") and group_size < 2:
        raise ValueError(f"advantage estimator {estimator!r} needs group_size >= 2, got {group_size}")
    r = rewards.to(torch.float32).view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)  # "mean"; grpo and rloo rescale it
    if estimator == "grpo":
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    elif estimator == "rloo":
        adv = adv * (group_size / (group_size - 1))
    return adv.reshape(-1)
