"""The trust-region methods: each a pure per-token objective paired with its closed-form
gradient weight and its trust-region boundary.

Notation (docs/design.md section 1), per sampled response token:
    mu = exp(old_logp)   behaviour (anchor) probability, detached
    pi = exp(logp)       current policy probability, differentiable
    r  = pi / mu         importance ratio, log-ratio clamped to +-LOG_RATIO_CLAMP
    A  = advantage       detached
    D  = pi - mu         signed Binary-TV shift

Every method's gradient is `dJ/dlogp = A * r * w`; `w` is the method's gradient weight.

Each method provides three pure functions of `[batch, seq]` tensors, all taking
`(logp, old_logp, adv, **params)`:
    objective -> (J, penalty): J is maximized (loss = -J); `penalty` is the explicit
                 regularizer term subtracted from the surrogate (zeros if none).
    weight    -> w, the closed-form gradient weight.
    gradient  -> dJ/dlogp in closed form (optional; only methods whose gradient is not A*r*w
                 everywhere define it: the unweighted penalties at A == 0).
    boundary  -> bool, tokens beyond the method's trust region in the harmful direction
                 (where it stops or reverses a diverging push); None if the method has none.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from typing import Mapping

from drpo.objectives.registry import get_method, register_method

LOG_RATIO_CLAMP = 20.0


def log_ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    # Clamped before exp so one long-tail token cannot overflow the ratio.
    return torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    return torch.exp(log_ratio(logp, old_logp))


def tv_shift(logp: Tensor, old_logp: Tensor) -> Tensor:
    """Signed Binary-TV shift D = pi - mu (no gradient)."""
    return (logp.detach().exp() - old_logp.exp())


# 1/k! for k = 2..12: expm1(v) - v = v^2 * sum_k v^(k-2)/k!, truncation < 2e-10 relative on |v| < 1.
_EXPM1_MINUS_X = tuple(1.0 / math.factorial(k) for k in range(2, 13))


def _gen_kl(a: Tensor, b: Tensor, v: Tensor) -> Tensor:
    """a*log(a/b) - a + b >= 0 (generalized KL term) given v = log(b/a), without cancellation:
    a*(expm1(v) - v) by its series for |v| < 1, else (b - a) - a*v (the two differ by >= e^|v|)."""
    small = v.abs() < 1
    vs = torch.where(small, v, torch.zeros_like(v))
    poly = torch.full_like(v, _EXPM1_MINUS_X[-1])
    for c in reversed(_EXPM1_MINUS_X[:-1]):
        poly = poly * vs + c
    return torch.where(small, a * vs * vs * poly, (b - a) - a * v)


def binary_kl(logp: Tensor, old_logp: Tensor) -> Tensor:
    """Binary KL(mu || pi) over {sampled token, everything else} (no gradient).

    Written as the sum of two non-negative terms, g(mu, pi) + g(1-mu, 1-pi) with
    g(a, b) = a*log(a/b) - a + b, each from log-probs with expm1/log1p, so it is accurate to
    a few fp32 ulps relative everywhere: no inf while pi < 1 (a saturated token with
    logp = -1e-8 has 1 - pi = 1e-8, not 0 as exp(logp) rounds it) and no cancellation
    when pi ~ mu. Exactly inf only where the true value is (pi == 1 > mu)."""
    lp, lm = logp.detach(), old_logp
    d = lp - lm
    mu, pi = lm.exp(), lp.exp()
    g_tok = _gen_kl(mu, pi, d)
    one_m_mu, one_m_pi = -torch.expm1(lm), -torch.expm1(lp)
    # log((1-pi)/(1-mu)) = log1p(-x) with x = (pi-mu)/(1-mu), taken as expm1(d)/expm1(-lm) where
    # pi ~ mu (no cancellation); the ratio form where 1-pi << 1-mu (x near 1).
    x = torch.where(d.abs() < 1, torch.expm1(d) / torch.expm1(-lm), (pi - mu) / one_m_mu)
    v_rest = torch.where(x < 0.5, torch.log1p(-x), torch.log(one_m_pi / one_m_mu))
    g_rest = torch.where(one_m_mu > 0, _gen_kl(one_m_mu, one_m_pi, v_rest), one_m_pi)
    return g_tok + g_rest


def _zeros(x: Tensor) -> Tensor:
    return torch.zeros_like(x)


def _penalty_scale(adv: Tensor, advantage_weighted: bool) -> Tensor | float:
    return adv.abs() if advantage_weighted else 1.0


def _unweighted_weight(adv: Tensor, correction: Tensor) -> Tensor:
    # With advantage_weighted=False the gradient is r*(A - correction), so w = 1 - correction/A.
    # At A == 0 no finite weight reproduces it; we report 1 there (see `logp_gradient`).
    safe = torch.where(adv == 0, torch.ones_like(adv), adv)
    return torch.where(adv == 0, torch.ones_like(adv), 1 - correction / safe)


# --------------------------------------------------------------------------- pg_is
# Unregularized importance-sampled surrogate.
#   J = r*A
#   w = 1
@register_method("pg_is", params={})
class PgIs:
    @staticmethod
    def objective(logp, old_logp, adv):
        r = ratio(logp, old_logp)
        return r * adv, _zeros(r)

    @staticmethod
    def weight(logp, old_logp, adv):
        return torch.ones_like(logp)

    boundary = None


# --------------------------------------------------------------------------- grpo
def _check_dual_clip(p):
    if p["dual_clip"] <= 1:
        raise ValueError(f"method 'grpo': parameter 'dual_clip' must be > 1 (inf = off), got {p['dual_clip']!r}")


# PPO/GRPO ratio clipping (clip-higher: eps_high=0.28; dual-clip PPO: dual_clip=3, verl's default).
#   J = min(r*A, clip(r, 1-eps_low, 1+eps_high)*A); for A<0, J = max(J, dual_clip*A)
#   w = 0 if (A>0 and r>1+eps_high) or (A<0 and (r<1-eps_low or r>dual_clip)) else 1
@register_method(
    "grpo",
    params={"eps_low": 0.2, "eps_high": 0.2, "dual_clip": math.inf},
    check_params=_check_dual_clip,
)
class Grpo:
    @staticmethod
    def objective(logp, old_logp, adv, *, eps_low, eps_high, dual_clip):
        r = ratio(logp, old_logp)
        unclipped = r * adv
        clipped = torch.clamp(r, 1 - eps_low, 1 + eps_high) * adv
        j = torch.minimum(unclipped, clipped)
        if dual_clip != math.inf:  # bounds the loss of a negative-advantage token whose ratio exploded
            j = torch.where(adv < 0, torch.maximum(j, dual_clip * adv), j)
        return j, unclipped.detach() - j.detach()

    @staticmethod
    def boundary(logp, old_logp, adv, *, eps_low, eps_high, dual_clip):
        r = ratio(logp.detach(), old_logp)
        return ((adv > 0) & (r > 1 + eps_high)) | ((adv < 0) & ((r < 1 - eps_low) | (r > dual_clip)))

    @classmethod
    def weight(cls, logp, old_logp, adv, *, eps_low, eps_high, dual_clip):
        out = cls.boundary(logp, old_logp, adv, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)
        return (~out).to(logp.dtype)


# --------------------------------------------------------------------------- cispo
# Clipped IS-weight policy optimization (MiniMax-M1); eps_low >= 1 (default) means no lower clip.
#   J = sg(clip(r, 1-eps_low, 1+eps_high)) * A * log(pi)
#   w = clip(r, 1-eps_low, 1+eps_high) / r
@register_method("cispo", params={"eps_low": 1.0, "eps_high": 0.2})
class Cispo:
    @staticmethod
    def objective(logp, old_logp, adv, *, eps_low, eps_high):
        r = ratio(logp, old_logp)
        is_weight = torch.clamp(r, 1 - eps_low, 1 + eps_high).detach()
        return is_weight * adv * logp, _zeros(r)

    @staticmethod
    def weight(logp, old_logp, adv, *, eps_low, eps_high):
        r = ratio(logp.detach(), old_logp)
        return torch.clamp(r, 1 - eps_low, 1 + eps_high) / r

    @staticmethod
    def boundary(logp, old_logp, adv, *, eps_low, eps_high):
        r = ratio(logp.detach(), old_logp)
        return (adv != 0) & ((r > 1 + eps_high) | (r < 1 - eps_low))


# --------------------------------------------------------------------------- spo
# Simple policy optimization: ratio-quadratic penalty (Pearson chi-square).
#   J = r*A - |A|/(2*eps) * (r-1)^2
#   w = 1 - sign(A)*(r-1)/eps   (unbounded as mu -> 0)
@register_method("spo", params={"eps": 12.5, "advantage_weighted": True})
class Spo:
    @staticmethod
    def objective(logp, old_logp, adv, *, eps, advantage_weighted):
        r = ratio(logp, old_logp)
        penalty = _penalty_scale(adv, advantage_weighted) * (r - 1) ** 2 / (2 * eps)
        return r * adv - penalty, penalty.detach()

    @staticmethod
    def weight(logp, old_logp, adv, *, eps, advantage_weighted):
        r = ratio(logp.detach(), old_logp)
        if advantage_weighted:
            return 1 - torch.sign(adv) * (r - 1) / eps
        return _unweighted_weight(adv, (r - 1) / eps)

    @staticmethod
    def gradient(logp, old_logp, adv, *, eps, advantage_weighted):
        r = ratio(logp.detach(), old_logp)
        return r * (adv - _penalty_scale(adv, advantage_weighted) * (r - 1) / eps)

    @staticmethod
    def boundary(logp, old_logp, adv, *, eps, advantage_weighted):
        r = ratio(logp.detach(), old_logp)
        return ((adv > 0) & (r - 1 > eps)) | ((adv < 0) & (r - 1 < -eps))


# --------------------------------------------------------------------------- dppo_tv / dppo_kl
def _tv_outside(logp, old_logp, adv, delta_low, delta_high):
    d = tv_shift(logp, old_logp)
    return ((adv > 0) & (d > delta_high)) | ((adv < 0) & (d < -delta_low))


def _kl_outside(logp, old_logp, adv, delta_low, delta_high):
    kl = binary_kl(logp, old_logp)
    d = tv_shift(logp, old_logp)
    return ((adv > 0) & (d > 0) & (kl > delta_high)) | ((adv < 0) & (d < 0) & (kl > delta_low))


def _hard_mask_method(outside_fn):
    """DPPO: J = M*r*A with a detached mask M that drops tokens past the divergence boundary
    in the harmful direction, and optionally the ratio truncated at ratio_cap (truncated IS,
    as verl's dppo losses do with clip_ratio_c): J = M*sg(min(r, cap)/r)*r*A, whose gradient
    is A*min(r, cap)*M; w = M*min(r, cap)/r. Only the divergence (`outside_fn`) differs."""

    class HardMask:
        @staticmethod
        def objective(logp, old_logp, adv, *, delta_low, delta_high, ratio_cap):
            r = ratio(logp, old_logp)
            outside = outside_fn(logp, old_logp, adv, delta_low, delta_high)
            capped = r if ratio_cap == math.inf else r * (torch.clamp(r, max=ratio_cap) / r).detach()
            return torch.where(outside, _zeros(r), capped * adv), torch.where(outside, (r * adv).detach(), _zeros(r))

        @staticmethod
        def weight(logp, old_logp, adv, *, delta_low, delta_high, ratio_cap):
            r = ratio(logp.detach(), old_logp)
            keep = (~outside_fn(logp, old_logp, adv, delta_low, delta_high)).to(logp.dtype)
            return keep if ratio_cap == math.inf else keep * (torch.clamp(r, max=ratio_cap) / r)

        @staticmethod
        def boundary(logp, old_logp, adv, *, delta_low, delta_high, ratio_cap):
            return outside_fn(logp, old_logp, adv, delta_low, delta_high)

    return HardMask


# DPPO with a Binary-TV hard trust-region mask (ratio_cap: truncated IS, inf = off).
#   J = M*sg(min(r, ratio_cap)/r)*r*A, M = sg(mask)
#   w = 0 if (A>0 and D>delta_high) or (A<0 and D<-delta_low) else min(r, ratio_cap)/r
DppoTv = register_method(
    "dppo_tv",
    params={"delta_low": 0.15, "delta_high": 0.15, "ratio_cap": math.inf},
)(_hard_mask_method(_tv_outside))

# DPPO with a Binary-KL hard trust-region mask (ratio_cap: truncated IS, inf = off).
#   J = M*sg(min(r, ratio_cap)/r)*r*A, M = sg(mask), KL = mu*log(mu/pi) + (1-mu)*log((1-mu)/(1-pi))
#   w = 0 if (A>0 and pi>mu and KL>delta_high) or (A<0 and pi<mu and KL>delta_low) else min(r, ratio_cap)/r
DppoKl = register_method(
    "dppo_kl",
    params={"delta_low": 0.05, "delta_high": 0.05, "ratio_cap": math.inf},
)(_hard_mask_method(_kl_outside))


# --------------------------------------------------------------------------- drpo
def _drpo_penalty(r, old_logp, adv, delta, advantage_weighted):
    # |A| * mu * (r-1)^2 / (2 delta) == |A| * D^2 / (2 delta mu), written in r for autograd.
    return _penalty_scale(adv, advantage_weighted) * old_logp.exp() * (r - 1) ** 2 / (2 * delta)


def _drpo_gradient(logp, old_logp, adv, delta, advantage_weighted):
    # d/dlogp of r*A - scale*mu*(r-1)^2/(2 delta) = r*(A - scale*D/delta), since mu*(r-1) = D.
    r = ratio(logp.detach(), old_logp)
    return r * (adv - _penalty_scale(adv, advantage_weighted) * tv_shift(logp, old_logp) / delta)


def _drpo_weight(logp, old_logp, adv, delta, advantage_weighted):
    d = tv_shift(logp, old_logp)
    if advantage_weighted:
        return 1 - torch.sign(adv) * d / delta
    return _unweighted_weight(adv, d / delta)


def _drpo_boundary(logp, old_logp, adv, delta, advantage_weighted):
    return _tv_outside(logp, old_logp, adv, delta, delta)


# Divergence Regularized Policy Optimization: Binary-TV quadratic penalty.
#   J = r*A - |A|*mu*(r-1)^2/(2*delta) = r*A - |A|*D^2/(2*delta*mu)
#   w = 1 - sign(A)*D/delta, bounded in [1-1/delta, 1+1/delta]
@register_method("drpo", params={"delta": 12.5, "advantage_weighted": True})
class Drpo:
    @staticmethod
    def objective(logp, old_logp, adv, *, delta, advantage_weighted):
        r = ratio(logp, old_logp)
        penalty = _drpo_penalty(r, old_logp, adv, delta, advantage_weighted)
        return r * adv - penalty, penalty.detach()

    weight = staticmethod(_drpo_weight)
    gradient = staticmethod(_drpo_gradient)
    boundary = staticmethod(_drpo_boundary)


def loose_threshold_note(method: str, params: Mapping) -> str | None:
    """Why DRPO or Mask-DRPO with delta >= 1 is no tight trust region, or None: |pi - mu| < 1, so
    no token reaches the Binary-TV boundary and DRPO's weight 1 - sign(A)(pi - mu)/delta stays
    within [1 - 1/delta, 1 + 1/delta] (Mask-DRPO's is then 1 everywhere: pg_is). The registered
    default 12.5 is the public implementations' value, not the paper's matched comparison."""
    if method not in ("drpo", "mask_drpo"):
        return None
    params = get_method(method).resolve_params(params)
    delta = float(params["delta"])
    if delta < 1:
        return None
    head = f"{method} with delta={delta:g} >= 1: no token can reach its Binary-TV boundary (|pi - mu| < 1 <= delta)"
    if method == "mask_drpo":
        return f"{head}, so every weight is 1: this is the unregularized pg_is surrogate"
    weights = (f", and its weights stay within [1-1/delta, 1+1/delta] = [{1 - 1 / delta:.3f}, {1 + 1 / delta:.3f}]"
               if params["advantage_weighted"] else "")
    dppo = get_method("dppo_tv").params["delta_high"]
    return (f"{head}{weights}: a bounded reweighting of the unregularized pg_is surrogate, not a trust region "
            f"that binds (the paper matches DPPO's Binary-TV threshold, {dppo:g})")


# --------------------------------------------------------------------------- mask_drpo
# Ablation: DPPO's gradient inside the Binary-TV boundary, DRPO's outside.
#   J = r*A inside sign(A)*D <= delta, DRPO's J outside
#   w = 1 if sign(A)*D <= delta else 1 - sign(A)*D/delta (negative)
@register_method("mask_drpo", params={"delta": 12.5, "advantage_weighted": True})
class MaskDrpo:
    @staticmethod
    def objective(logp, old_logp, adv, *, delta, advantage_weighted):
        r = ratio(logp, old_logp)
        outside = _tv_outside(logp, old_logp, adv, delta, delta)
        penalty = torch.where(outside, _drpo_penalty(r, old_logp, adv, delta, advantage_weighted), _zeros(r))
        return r * adv - penalty, penalty.detach()

    @staticmethod
    def weight(logp, old_logp, adv, *, delta, advantage_weighted):
        outside = _tv_outside(logp, old_logp, adv, delta, delta)
        w = _drpo_weight(logp, old_logp, adv, delta, advantage_weighted)
        return torch.where(outside, w, torch.ones_like(w))

    @staticmethod
    def gradient(logp, old_logp, adv, *, delta, advantage_weighted):
        outside = _tv_outside(logp, old_logp, adv, delta, delta)  # never at A == 0
        inside = adv * ratio(logp.detach(), old_logp)
        return torch.where(outside, _drpo_gradient(logp, old_logp, adv, delta, advantage_weighted), inside)

    boundary = staticmethod(_drpo_boundary)
