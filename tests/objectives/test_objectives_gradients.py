"""Autograd gradient of every objective == A * r * w (closed form) == finite differences."""

import pytest
import torch

from drpo.objectives import METHODS, get_method, gradient_weight, logp_gradient, per_token_objective

F64 = torch.float64

# Parameter settings per method: defaults plus tight thresholds that put tokens on every side
# of the trust-region boundary.
SETTINGS = {
    "pg_is": [{}],
    "grpo": [{}, {"eps_low": 0.2, "eps_high": 0.28}],
    "cispo": [{}, {"eps_high": 0.1}],
    "spo": [{}, {"eps": 0.3}, {"eps": 0.3, "advantage_weighted": False}],
    "dppo_tv": [{}, {"delta_low": 0.05, "delta_high": 0.2}],
    "dppo_kl": [{}, {"delta_low": 0.01, "delta_high": 0.02}],
    "drpo": [{}, {"delta": 0.15}, {"delta": 0.05, "advantage_weighted": False}],
    "mask_drpo": [{}, {"delta": 0.15}, {"delta": 0.05, "advantage_weighted": False}],
}
CASES = [(name, params) for name, plist in SETTINGS.items() for params in plist]


def builtin_methods() -> set[str]:
    """The methods drpo itself registers (drpo.objectives.methods), not a test's or a user's."""
    return {name for name, m in METHODS.items() if m.objective.__module__ == "drpo.objectives.methods"}


def test_every_registered_builtin_is_covered():
    # every built-in has settings here (a new one without them fails), and the settings name
    # only built-ins
    assert builtin_methods() == set(SETTINGS)
    assert {"pg_is", "grpo", "cispo", "spo", "dppo_tv", "dppo_kl", "drpo", "mask_drpo"} <= builtin_methods()


def random_tokens(n=4000, seed=0):
    """mu spread over (1e-8, 1) incl. near 0 and near 1; pi moved from mu by a random log-shift."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=F64)
    log_mu = torch.cat(
        [
            torch.log(torch.rand(n // 4, generator=g, dtype=F64) * 1e-3 + 1e-8),  # long tail: mu near 0
            torch.log1p(-torch.rand(n // 4, generator=g, dtype=F64) * 1e-4),  # mu near 1
            torch.log(u[: n - n // 2].clamp(min=1e-6)),
        ]
    )
    shift = torch.randn(n, generator=g, dtype=F64) * 0.5
    logp = torch.clamp(log_mu + shift, max=-1e-9)
    adv = torch.randn(n, generator=g, dtype=F64)
    adv[::17] = 0.0
    return logp.reshape(-1, 40), log_mu.reshape(-1, 40), adv.reshape(-1, 40)


def autograd_grad(method, logp, old_logp, adv, params):
    x = logp.clone().requires_grad_(True)
    j, _ = per_token_objective(method, x, old_logp, adv, **params)
    (g,) = torch.autograd.grad(j.sum(), x)
    return g


def finite_difference(method, logp, old_logp, adv, params, h=1e-6):
    # J is per-token (elementwise), so one central difference of the whole tensor gives every token's derivative.
    if method == "cispo":
        # CISPO's objective holds a stop-gradient IS weight: its gradient is the derivative with
        # that weight frozen at the base point, c * A * log(pi) with c = min(r, 1 + eps_high).
        eps_high = params.get("eps_high", 0.2)
        c = torch.clamp(torch.exp(logp - old_logp), max=1 + eps_high)
        return (c * adv * (logp + h) - c * adv * (logp - h)) / (2 * h)
    jp, _ = per_token_objective(method, logp + h, old_logp, adv, **params)
    jm, _ = per_token_objective(method, logp - h, old_logp, adv, **params)
    return (jp - jm) / (2 * h)


def away_from_switches(method, logp, old_logp, adv, params, h=1e-6):
    """Tokens whose boundary decision does not flip within +-10h (finite differences straddling a
    hard mask are meaningless)."""
    m = get_method(method)
    if m.boundary is None:
        return torch.ones_like(logp, dtype=torch.bool)
    resolved = m.resolve_params(params)
    b = [m.boundary(logp + s * 10 * h, old_logp, adv, **resolved) for s in (-1, 0, 1)]
    return (b[0] == b[1]) & (b[1] == b[2])


@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_autograd_equals_closed_form_weight(method, params):
    logp, old_logp, adv = random_tokens()
    if params.get("advantage_weighted") is False:
        adv = torch.where(adv == 0, torch.full_like(adv, 0.3), adv)  # weight undefined at A == 0
    g = autograd_grad(method, logp, old_logp, adv, params)
    r = torch.exp(logp - old_logp)
    w = gradient_weight(method, logp, old_logp, adv, **params)
    expected = adv * r * w
    torch.testing.assert_close(g, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_closed_form_matches_finite_differences(method, params):
    logp, old_logp, adv = random_tokens(seed=1)
    g_closed = logp_gradient(method, logp, old_logp, adv, **params)
    g_fd = finite_difference(method, logp, old_logp, adv, params)
    keep = away_from_switches(method, logp, old_logp, adv, params)
    assert keep.float().mean() > 0.95
    scale = g_closed.abs().clamp(min=1.0)  # relative for |g| >= 1, absolute below
    err = ((g_fd - g_closed).abs() / scale)[keep]
    assert err.max() < 1e-8, f"{method}: max scaled FD error {err.max():.3e}"


@pytest.mark.parametrize("method", ["spo", "drpo"])
def test_unweighted_gradient_at_zero_advantage_is_the_penalty_gradient(method):
    logp, old_logp, _ = random_tokens(seed=2)
    adv = torch.zeros_like(logp)
    params = {"advantage_weighted": False, ("eps" if method == "spo" else "delta"): 0.2}
    g = autograd_grad(method, logp, old_logp, adv, params)
    r = torch.exp(logp - old_logp)
    if method == "spo":
        expected = -(r - 1) * r / 0.2
    else:
        expected = -(logp.exp() - old_logp.exp()) * r / 0.2
    torch.testing.assert_close(g, expected, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(logp_gradient(method, logp, old_logp, adv, **params), expected, rtol=1e-8, atol=1e-12)


def test_tokens_near_zero_and_one_are_present():
    _, old_logp, _ = random_tokens()
    mu = old_logp.exp()
    assert (mu < 1e-3).sum() > 100 and (mu > 0.9999).sum() > 100
