"""Diagnostics of one policy-loss call (docs/design.md section 2), over response tokens.

Stable metric names (the trainer logs them under `objective/`):

    tokens                     number of response tokens
    ratio_mean/min/max         importance ratio r = pi/mu
    abs_log_ratio              mean |log r|  (training-inference mismatch)
    k3_kl                      mean of k3 = r - 1 - log r, an estimate of KL(mu || pi)
    tv_mean, tv_max            Binary-TV |pi - mu|
    beyond_boundary_pos_frac   fraction of A>0 tokens beyond the method's trust region in
    beyond_boundary_neg_frac   the harmful direction (and of A<0 tokens); 0 for methods
                               without a boundary (pg_is)
    weight_mean/min/max        gradient weight w over tokens with A != 0
    weight_zero_frac           fractions of those tokens with w == 0, 0 < w < 1 (attenuated),
    weight_attenuated_frac     w < 0 (corrective) and w > 1 (amplified)
    weight_corrective_frac
    weight_amplified_frac
    surrogate                  mean r*A
    regularizer                mean explicit regularizer term (J = surrogate-like term - it)
    long_tail_frac             fraction of tokens with mu <= 0.01
    kept_grad_mass             sum|A r w| / sum|A r|: near 1 healthy suppression, near 0 a
                               stuck policy; 1.0 when no token carries advantage
    nonfinite_tokens           response tokens with a NaN/inf logp, old_logp, advantage or
                               token weight, or a logp/old_logp > 1e-4 (dropped from the loss
                               with nonfinite="drop"; with "raise" these raise)
    loss                       the aggregated loss (added by policy_loss)

Weight statistics use tokens with A != 0 because only they carry policy gradient; when
there are none, weight_mean/min/max are 1 and the fractions 0. Every statistic is over the
tokens the loss used (response tokens, less the dropped non-finite ones).

Everything is computed on the inputs' device as 0-dim tensors (`diagnostic_tensors`, no host
sync); `policy_loss` moves them to the host in its one batched transfer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from drpo.objectives.methods import ratio
from drpo.objectives.registry import Method

LONG_TAIL_MU = 0.01

METRIC_NAMES = (
    "tokens",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
    "abs_log_ratio",
    "k3_kl",
    "tv_mean",
    "tv_max",
    "beyond_boundary_pos_frac",
    "beyond_boundary_neg_frac",
    "weight_mean",
    "weight_min",
    "weight_max",
    "weight_zero_frac",
    "weight_attenuated_frac",
    "weight_corrective_frac",
    "weight_amplified_frac",
    "surrogate",
    "regularizer",
    "long_tail_frac",
    "kept_grad_mass",
    "nonfinite_tokens",
)


def _masked_mean(x: Tensor, m: Tensor) -> Tensor:
    mf = m.to(x.dtype)
    return (x * mf).sum() / mf.sum().clamp(min=1.0)


def _masked_extreme(x: Tensor, m: Tensor, largest: bool, empty: float) -> Tensor:
    # No boolean indexing (its output size needs a host sync); `empty` when nothing is selected.
    if largest:
        v = torch.where(m, x, -math.inf).amax()
    else:
        v = torch.where(m, x, math.inf).amin()
    return torch.where(m.any(), v, empty)


def diagnostic_tensors(
    method: Method,
    params: dict,
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    mask: Tensor,
    penalty: Tensor,
) -> dict[str, Tensor]:
    """Every metric in METRIC_NAMES but `nonfinite_tokens`, as 0-dim tensors on the inputs'
    device, without a host sync. Inputs are already validated and padded neutrally."""
    lr = torch.clamp(logp - old_logp, -20.0, 20.0)
    r = ratio(logp, old_logp)
    pi, mu = logp.exp(), old_logp.exp()
    tv = (pi - mu).abs()
    w = method.weight(logp, old_logp, adv, **params)
    carries = mask & (adv != 0)
    pos, neg = mask & (adv > 0), mask & (adv < 0)
    if method.boundary is not None:
        out = method.boundary(logp, old_logp, adv, **params) & mask
    else:
        out = torch.zeros_like(mask)
    kept_den = torch.where(mask, (adv * r).abs(), 0.0).sum()
    kept_num = torch.where(mask, (adv * r * w).abs(), 0.0).sum()

    def frac(sel: Tensor, within: Tensor) -> Tensor:
        return sel.sum().to(r.dtype) / within.sum().clamp(min=1).to(r.dtype)

    return {
        "tokens": mask.sum().to(r.dtype),
        "ratio_mean": torch.where(mask.any(), _masked_mean(r, mask), 1.0),
        "ratio_min": _masked_extreme(r, mask, False, 1.0),
        "ratio_max": _masked_extreme(r, mask, True, 1.0),
        "abs_log_ratio": _masked_mean(lr.abs(), mask),
        "k3_kl": _masked_mean(r - 1 - lr, mask),
        "tv_mean": _masked_mean(tv, mask),
        "tv_max": _masked_extreme(tv, mask, True, 0.0),
        "beyond_boundary_pos_frac": frac(out & pos, pos),
        "beyond_boundary_neg_frac": frac(out & neg, neg),
        "weight_mean": torch.where(carries.any(), _masked_mean(w, carries), 1.0),
        "weight_min": _masked_extreme(w, carries, False, 1.0),
        "weight_max": _masked_extreme(w, carries, True, 1.0),
        "weight_zero_frac": frac(carries & (w == 0), carries),
        "weight_attenuated_frac": frac(carries & (w > 0) & (w < 1), carries),
        "weight_corrective_frac": frac(carries & (w < 0), carries),
        "weight_amplified_frac": frac(carries & (w > 1), carries),
        "surrogate": _masked_mean(r * adv, mask),
        "regularizer": _masked_mean(penalty, mask),
        "long_tail_frac": frac(mask & (mu <= LONG_TAIL_MU), mask),
        "kept_grad_mass": torch.where(kept_den > 0, kept_num / torch.where(kept_den > 0, kept_den, 1.0), 1.0),
    }


def diagnostics(
    method: Method,
    params: dict,
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    mask: Tensor,
    penalty: Tensor,
) -> dict[str, float]:
    """`diagnostic_tensors` moved to the host in one transfer (`nonfinite_tokens` is 0: the
    inputs here are already clean)."""
    values = diagnostic_tensors(method, params, logp, old_logp, adv, mask, penalty)
    values["nonfinite_tokens"] = torch.zeros_like(values["tokens"])
    host = torch.stack([values[k].reshape(()) for k in METRIC_NAMES]).tolist()
    return dict(zip(METRIC_NAMES, host))
