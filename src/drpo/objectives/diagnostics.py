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

The per-token measurements behind them are defined once here, for the trainer, the inspector
and the mismatch tool alike: `token_mismatch` (log r, r, k3), `long_tail`, `weight_categories`
and `grad_mass` (the kept gradient mass's per-token terms).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from drpo.objectives.methods import log_ratio
from drpo.objectives.registry import Method

LONG_TAIL_MU = 0.01


def long_tail(logp: Tensor) -> Tensor:
    """The long tail (bool per token): probability exp(logp) <= LONG_TAIL_MU, in logp's dtype."""
    return logp.exp() <= LONG_TAIL_MU

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


class TokenMismatch(NamedTuple):
    """Per-token mismatch of pi (the policy's log-probs) against mu (the anchor's)."""

    log_ratio: Tensor  # log r = log pi - log mu, clamped to +-LOG_RATIO_CLAMP as the objectives see it
    ratio: Tensor  # r = pi / mu
    k3: Tensor  # r - 1 - log r >= 0, per-token estimate of KL(mu || pi)


def token_mismatch(logp: Tensor, old_logp: Tensor) -> TokenMismatch:
    lr = log_ratio(logp, old_logp)
    r = torch.exp(lr)
    return TokenMismatch(lr, r, r - 1 - lr)


# A token's gradient weight is w == 0 (zeroed), 0 < w < 1 (attenuated), w < 0 (corrective), w > 1 (amplified).
WEIGHT_CATEGORIES = ("zero", "attenuated", "corrective", "amplified")


def weight_categories(w: Tensor) -> dict[str, Tensor]:
    """Which category of WEIGHT_CATEGORIES each token's gradient weight falls in (bool masks)."""
    return {"zero": w == 0, "attenuated": (w > 0) & (w < 1), "corrective": w < 0, "amplified": w > 1}


def grad_mass(adv: Tensor, r: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Per token (|A r w|, |A r|): the gradient magnitude the weight keeps and the unweighted
    one; kept_grad_mass is the ratio of their sums (1.0 when the second sums to 0)."""
    ar = (adv * r).abs()
    return (ar * w).abs(), ar


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


def diagnostic_tensors(method: Method, params: dict, logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor,
                       penalty: Tensor) -> dict[str, Tensor]:
    """Every metric in METRIC_NAMES but `nonfinite_tokens`, as 0-dim tensors on the inputs'
    device, without a host sync. Inputs are already validated and padded neutrally."""
    lr, r, k3 = token_mismatch(logp, old_logp)
    pi, mu = logp.exp(), old_logp.exp()
    tv = (pi - mu).abs()
    w = method.weight(logp, old_logp, adv, **params)
    carries = mask & (adv != 0)
    pos, neg = mask & (adv > 0), mask & (adv < 0)
    if method.boundary is not None:
        out = method.boundary(logp, old_logp, adv, **params) & mask
    else:
        out = torch.zeros_like(mask)
    kept, unweighted = grad_mass(adv, r, w)
    kept_num, kept_den = torch.where(mask, kept, 0.0).sum(), torch.where(mask, unweighted, 0.0).sum()
    category = weight_categories(w)

    def frac(sel: Tensor, within: Tensor) -> Tensor:
        return sel.sum().to(r.dtype) / within.sum().clamp(min=1).to(r.dtype)

    return {
        "tokens": mask.sum().to(r.dtype),
        "ratio_mean": torch.where(mask.any(), _masked_mean(r, mask), 1.0),
        "ratio_min": _masked_extreme(r, mask, False, 1.0),
        "ratio_max": _masked_extreme(r, mask, True, 1.0),
        "abs_log_ratio": _masked_mean(lr.abs(), mask),
        "k3_kl": _masked_mean(k3, mask),
        "tv_mean": _masked_mean(tv, mask),
        "tv_max": _masked_extreme(tv, mask, True, 0.0),
        "beyond_boundary_pos_frac": frac(out & pos, pos),
        "beyond_boundary_neg_frac": frac(out & neg, neg),
        "weight_mean": torch.where(carries.any(), _masked_mean(w, carries), 1.0),
        "weight_min": _masked_extreme(w, carries, False, 1.0),
        "weight_max": _masked_extreme(w, carries, True, 1.0),
        **{f"weight_{c}_frac": frac(carries & category[c], carries) for c in WEIGHT_CATEGORIES},
        "surrogate": _masked_mean(r * adv, mask),
        "regularizer": _masked_mean(penalty, mask),
        "long_tail_frac": frac(mask & long_tail(old_logp), mask),
        "kept_grad_mass": torch.where(kept_den > 0, kept_num / torch.where(kept_den > 0, kept_den, 1.0), 1.0),
    }

