"""The paper's statements about the weights and penalties (docs/design.md, section 1)."""

import math

import pytest
import torch

from drpo.objectives import METHODS, gradient_weight, per_token_objective

F64 = torch.float64


def t(x):
    return torch.as_tensor(x, dtype=F64)


def weight_at(method, mu, pi, adv, **params):
    return gradient_weight(method, torch.log(t(pi)), torch.log(t(mu)), t(adv), **params)


MUS = [0.9, 0.5, 0.3, 0.1, 0.01]


# (delta, mu, sign) where the boundary pi = mu + sign*delta lies inside (0, 1]
BOUNDARY_CASES = [
    (d, mu, s) for d in (0.05, 0.15, 0.3) for mu in MUS for s in (1.0, -1.0) if 0 < mu + s * d <= 1
]


@pytest.mark.parametrize("delta,mu,sign", BOUNDARY_CASES)
def test_drpo_weight_is_zero_on_the_binary_tv_boundary(delta, mu, sign):
    pi = mu + sign * delta
    w = weight_at("drpo", [mu], [pi], [2.0 * sign], delta=delta)
    assert abs(float(w)) < 1e-12
    # The same point is where dppo_tv with the same threshold switches its mask off.
    just_in = weight_at("dppo_tv", [mu], [pi - sign * 1e-9], [sign], delta_low=delta, delta_high=delta)
    just_out = weight_at("dppo_tv", [mu], [pi + sign * 1e-9], [sign], delta_low=delta, delta_high=delta)
    if 0 < pi + sign * 1e-9 <= 1:
        assert float(just_in) == 1.0 and float(just_out) == 0.0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_drpo_weight_regions(sign):
    delta = 0.15
    mu = torch.linspace(0.2, 0.8, 61, dtype=F64)
    adv = torch.full_like(mu, 1.7 * sign)
    frac = torch.linspace(0.01, 0.99, 61, dtype=F64)
    # diverging inside: 0 < sign(A) D < delta  -> 0 < w < 1
    w_in = gradient_weight("drpo", torch.log(mu + sign * frac * delta), torch.log(mu), adv, delta=delta)
    assert ((w_in > 0) & (w_in < 1)).all()
    # beyond: sign(A) D > delta  -> w < 0 (corrective)
    pi_out = mu + sign * delta * (1 + frac * 0.3)
    ok = (pi_out > 0) & (pi_out <= 1)
    w_out = gradient_weight("drpo", torch.log(pi_out[ok]), torch.log(mu[ok]), adv[ok], delta=delta)
    assert ok.sum() > 10 and (w_out < 0).all()
    # converging: sign(A) D < 0 -> w > 1
    w_back = gradient_weight("drpo", torch.log(mu - sign * frac * 0.1), torch.log(mu), adv, delta=delta)
    assert (w_back > 1).all()


@pytest.mark.parametrize("delta", [0.05, 0.15, 1.0, 12.5])
def test_drpo_weight_bounded_for_every_mu(delta):
    g = torch.Generator().manual_seed(0)
    log_mu = torch.cat([torch.log(torch.rand(20000, generator=g, dtype=F64)), t([-40.0, -1e-12, 0.0])])
    log_pi = torch.cat([torch.log(torch.rand(20000, generator=g, dtype=F64)), t([0.0, -40.0, -1e-12])])
    adv = torch.randn(log_mu.shape, generator=g, dtype=F64)
    w = gradient_weight("drpo", log_pi, log_mu, adv, delta=delta)
    assert w.min() >= 1 - 1 / delta - 1e-12 and w.max() <= 1 + 1 / delta + 1e-12
    # The bound is attained in the limits D -> +-1.
    assert w.max() > 1 + 0.99 / delta and w.min() < 1 - 0.99 / delta


def test_default_drpo_weight_range_matches_the_reference_threshold():
    assert METHODS["drpo"].params["delta"] == 12.5
    lo, hi = 1 - 1 / 12.5, 1 + 1 / 12.5
    assert math.isclose(lo, 0.92) and math.isclose(hi, 1.08)


@pytest.mark.parametrize("bound", [10.0, 1e3, 1e6])
def test_spo_weight_unbounded_at_fixed_absolute_shift(bound):
    shift, eps = 0.05, 0.2
    mus = t([10.0 ** -k for k in range(1, 9)])  # r - 1 <= 5e6 stays inside the +-20 log-ratio clamp
    w_spo = weight_at("spo", mus, mus + shift, torch.ones_like(mus), eps=eps)
    w_drpo = weight_at("drpo", mus, mus + shift, torch.ones_like(mus), delta=eps)
    assert (w_spo.abs() > bound).any()
    # closed form: r - 1 = shift / mu, so w = 1 - shift / (mu * eps)
    torch.testing.assert_close(w_spo, 1 - shift / (mus * eps), rtol=1e-9, atol=0)
    # DRPO at the same points is the same constant 1 - shift/delta for every mu
    torch.testing.assert_close(w_drpo, torch.full_like(mus, 1 - shift / eps), rtol=1e-9, atol=0)


def test_dppo_tv_masks_exactly_the_harmful_side():
    delta_low, delta_high = 0.05, 0.2
    mu = torch.full((9,), 0.5, dtype=F64)
    d = t([-0.4, -0.1, -0.06, -0.04, 0.0, 0.1, 0.19, 0.21, 0.4])
    pi = mu + d
    for sign in (1.0, -1.0):
        adv = torch.full_like(mu, sign)
        w = weight_at("dppo_tv", mu, pi, adv, delta_low=delta_low, delta_high=delta_high)
        if sign > 0:  # only pushes increasing pi past +delta_high are cut
            expected = t([1, 1, 1, 1, 1, 1, 1, 0, 0])
        else:  # only pushes decreasing pi past -delta_low are cut
            expected = t([0, 0, 0, 1, 1, 1, 1, 1, 1])
        assert torch.equal(w, expected)
        # and the autograd gradient really vanishes there
        x = torch.log(pi).requires_grad_(True)
        j, _ = per_token_objective("dppo_tv", x, torch.log(mu), adv, delta_low=delta_low, delta_high=delta_high)
        (g,) = torch.autograd.grad(j.sum(), x)
        assert torch.equal(g == 0, expected == 0)


def test_dppo_kl_uses_binary_kl_threshold():
    mu, delta = 0.5, 0.05
    # binary KL(0.5 || pi) = 0.5 log(0.5/pi) + 0.5 log(0.5/(1-pi)); crosses 0.05 at pi = 0.5 +- 0.15552...
    def bkl(p):
        return 0.5 * math.log(0.5 / p) + 0.5 * math.log(0.5 / (1 - p))

    lo, hi = 0.5, 0.99
    for _ in range(80):  # bisection for the crossing point, independent of the library
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if bkl(mid) < delta else (lo, mid)
    crossing = (lo + hi) / 2
    pis = t([crossing - 1e-6, crossing + 1e-6, 1 - crossing + 1e-6, 1 - crossing - 1e-6])
    mus = torch.full_like(pis, mu)
    w_pos = weight_at("dppo_kl", mus, pis, torch.ones_like(pis), delta_low=delta, delta_high=delta)
    w_neg = weight_at("dppo_kl", mus, pis, -torch.ones_like(pis), delta_low=delta, delta_high=delta)
    assert w_pos.tolist() == [1.0, 0.0, 1.0, 1.0]
    assert w_neg.tolist() == [1.0, 1.0, 1.0, 0.0]


def test_mask_drpo_is_dppo_inside_and_drpo_outside():
    delta = 0.15
    g = torch.Generator().manual_seed(3)
    mu = torch.rand(5000, generator=g, dtype=F64) * 0.98 + 0.01
    pi = (mu + (torch.rand(5000, generator=g, dtype=F64) - 0.5) * 0.8).clamp(1e-4, 1.0)
    adv = torch.randn(5000, generator=g, dtype=F64)
    lp, lm = torch.log(pi), torch.log(mu)
    w_mask = gradient_weight("mask_drpo", lp, lm, adv, delta=delta)
    w_dppo = gradient_weight("dppo_tv", lp, lm, adv, delta_low=delta, delta_high=delta)
    w_drpo = gradient_weight("drpo", lp, lm, adv, delta=delta)
    outside = torch.sign(adv) * (pi - mu) > delta
    assert outside.sum() > 100 and (~outside).sum() > 100
    torch.testing.assert_close(w_mask[~outside], w_dppo[~outside], rtol=0, atol=0)
    torch.testing.assert_close(w_mask[outside], w_drpo[outside], rtol=0, atol=0)
    assert (w_mask[outside] < 0).all()


def _full_vocab(k=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.softmax(torch.randn(k, generator=g, dtype=F64) * 2, 0)
    pi = torch.softmax(torch.randn(k, generator=g, dtype=F64) * 2, 0)
    adv = torch.randn(k, generator=g, dtype=F64)
    return mu, pi, adv


@pytest.mark.parametrize("seed", range(5))
def test_drpo_penalty_expectation_is_weighted_squared_l2(seed):
    mu, pi, adv = _full_vocab(seed=seed)
    delta = 0.3
    # every vocabulary entry as the sampled token; expectation under mu
    _, penalty = per_token_objective("drpo", torch.log(pi), torch.log(mu), adv, delta=delta)
    expected = (adv.abs() * (pi - mu) ** 2).sum() / (2 * delta)
    torch.testing.assert_close((mu * penalty).sum(), expected, rtol=1e-12, atol=0)
    _, pen_unw = per_token_objective("drpo", torch.log(pi), torch.log(mu), adv, delta=delta, advantage_weighted=False)
    torch.testing.assert_close((mu * pen_unw).sum(), ((pi - mu) ** 2).sum() / (2 * delta), rtol=1e-12, atol=0)


@pytest.mark.parametrize("seed", range(5))
def test_spo_penalty_expectation_is_pearson_chi_square(seed):
    mu, pi, adv = _full_vocab(seed=seed)
    eps = 0.3
    _, penalty = per_token_objective("spo", torch.log(pi), torch.log(mu), adv, eps=eps)
    expected = (adv.abs() * (pi - mu) ** 2 / mu).sum() / (2 * eps)
    torch.testing.assert_close((mu * penalty).sum(), expected, rtol=1e-12, atol=0)


def test_drpo_objective_two_forms_agree():
    mu, pi, adv = _full_vocab(seed=9)
    delta = 0.2
    j, _ = per_token_objective("drpo", torch.log(pi), torch.log(mu), adv, delta=delta)
    r = pi / mu
    torch.testing.assert_close(j, r * adv - adv.abs() * (pi - mu) ** 2 / (2 * delta * mu), rtol=1e-12, atol=1e-15)


def test_grpo_clip_weight_and_cispo_weight_closed_forms():
    mu = t([0.5, 0.5, 0.5, 0.5])
    pi = t([0.7, 0.55, 0.3, 0.45])  # r = 1.4, 1.1, 0.6, 0.9
    adv = t([1.0, 1.0, -1.0, -1.0])
    assert weight_at("grpo", mu, pi, adv).tolist() == [0.0, 1.0, 0.0, 1.0]
    assert weight_at("grpo", mu, pi, -adv).tolist() == [1.0, 1.0, 1.0, 1.0]
    torch.testing.assert_close(weight_at("cispo", mu, pi, adv), t([1.2 / 1.4, 1.0, 1.0, 1.0]), rtol=1e-12, atol=0)


def test_registered_defaults():
    p = {name: dict(m.params) for name, m in METHODS.items()}
    assert p["drpo"] == {"delta": 12.5, "advantage_weighted": True}
    assert p["spo"] == {"eps": 12.5, "advantage_weighted": True}
    # The verl-baseline options default to off: dual clip and ratio cap inf, no lower CISPO clip.
    assert p["dppo_tv"] == {"delta_low": 0.15, "delta_high": 0.15, "ratio_cap": math.inf}
    assert p["dppo_kl"] == {"delta_low": 0.05, "delta_high": 0.05, "ratio_cap": math.inf}
    assert p["grpo"] == {"eps_low": 0.2, "eps_high": 0.2, "dual_clip": math.inf}
    assert p["cispo"] == {"eps_low": 1.0, "eps_high": 0.2}
    assert p["pg_is"] == {}


# ----------------------------------------------------------------- verl-baseline options
def test_grpo_dual_clip_by_hand():
    # A<0, eps 0.2, dual_clip 3: r=5 -> J = max(min(5A, 1.2A), 3A) = 3A (held, w=0); r=2 -> 2A (w=1)
    adv = t([-1.0, -1.0, 1.0])
    lp, lm = torch.log(t([0.5, 0.2, 0.5])), torch.log(t([0.1, 0.1, 0.1]))
    j, _ = per_token_objective("grpo", lp, lm, adv, eps_low=0.2, eps_high=0.2, dual_clip=3.0)
    torch.testing.assert_close(j, t([-3.0, -2.0, 1.2]), rtol=1e-12, atol=0)
    assert gradient_weight("grpo", lp, lm, adv, dual_clip=3.0).tolist() == [0.0, 1.0, 0.0]
    assert gradient_weight("grpo", lp, lm, adv).tolist() == [1.0, 1.0, 0.0]  # off by default
    with pytest.raises(ValueError, match="'dual_clip' must be > 1"):
        gradient_weight("grpo", lp, lm, adv, dual_clip=0.5)


def test_dppo_ratio_cap_truncates_the_gradient_not_the_mask():
    # r = 4 inside the TV boundary (pi - mu = 0.3 < 0.5): gradient A*min(r, cap), value M*min(r, cap)*A
    lp, lm = torch.log(t([0.4, 0.4])), torch.log(t([0.1, 0.1]))
    adv = t([2.0, -2.0])
    for method in ("dppo_tv", "dppo_kl"):
        x = lp.clone().requires_grad_(True)
        j, _ = per_token_objective(method, x, lm, adv, delta_low=0.5, delta_high=5.0, ratio_cap=3.0)
        (g,) = torch.autograd.grad(j.sum(), x)
        torch.testing.assert_close(j, t([6.0, -6.0]), rtol=1e-12, atol=0)
        torch.testing.assert_close(g, t([6.0, -6.0]), rtol=1e-12, atol=0)
        w = gradient_weight(method, lp, lm, adv, delta_low=0.5, delta_high=5.0, ratio_cap=3.0)
        torch.testing.assert_close(w, t([0.75, 0.75]), rtol=1e-12, atol=0)


def test_cispo_lower_clip():
    lp, lm = torch.log(t([0.05, 0.5])), torch.log(t([0.1, 0.1]))  # r = 0.5 and 5
    adv = t([1.0, 1.0])
    torch.testing.assert_close(gradient_weight("cispo", lp, lm, adv), t([1.0, 1.2 / 5]), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        gradient_weight("cispo", lp, lm, adv, eps_low=0.2), t([0.8 / 0.5, 1.2 / 5]), rtol=1e-12, atol=0
    )


# ----------------------------------------------------------------- Binary-KL numerics
def _exact_binary_kl(lp: float, lm: float):
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    lp, lm = mpmath.mpf(lp), mpmath.mpf(lm)
    pi, mu = mpmath.exp(lp), mpmath.exp(lm)
    kl = mu * (lm - lp)
    if mu == 1:
        return float(kl)
    if pi == 1:
        return math.inf
    return float(kl + (1 - mu) * (mpmath.log(1 - mu) - mpmath.log(1 - pi)))


def test_binary_kl_matches_exact_value_in_fp32():
    """fp32 inputs from saturated (pi ~ 1 - 1e-8) to long-tail tokens, near and far from mu:
    within 1e-6 relative of the exact value of those same fp32 inputs wherever it is finite
    (and above fp32's smallest normal number), inf exactly where it is inf."""
    from drpo.objectives import binary_kl

    g = torch.Generator().manual_seed(0)
    n = 3000
    scales = torch.tensor([1e-9, 3e-8, 1e-6, 1e-4, 1e-2, 0.3, 1.0, 5.0, 20.0, 80.0])
    pick = lambda: scales[torch.randint(0, len(scales), (n,), generator=g)]  # noqa: E731
    lm = -torch.rand(n, generator=g) * pick()
    near = lm * (1 + torch.randn(n, generator=g) * 10.0 ** -torch.randint(0, 7, (n,), generator=g).float())
    far = -torch.rand(n, generator=g) * pick()
    lp = torch.where(torch.rand(n, generator=g) < 0.5, near, far).clamp(max=0)
    # saturated tokens (pi rounds to 1 in fp32), mu = 1, pi = 1 exactly
    lp = torch.cat([lp, torch.tensor([-1e-8, -2e-8, -3e-8, -3e-8, 0.0, -1e-30, -5e-8, 0.0])])
    lm = torch.cat([lm, torch.tensor([-2e-8, -1e-8, -0.5, -3e-8, -0.5, -0.1, 0.0, 0.0])])
    got = binary_kl(lp, lm)
    assert got.dtype == torch.float32
    checked = 0
    for a, b, k in zip(lp.tolist(), lm.tolist(), got.tolist()):
        exact = _exact_binary_kl(a, b)
        if math.isinf(exact):
            assert k == math.inf, (a, b, k)
        elif exact < 1.2e-38:
            assert 0 <= k < 1e-37, (a, b, k)
        else:
            assert abs(k - exact) <= 1e-6 * exact, (a, b, k, exact)
            checked += 1
    assert checked > 2500
    # A saturated token: pi = exp(-1e-8) rounds to 1 in fp32, mu = 1 - 1e-6. Its KL is ~3.6e-6,
    # far inside DPPO-KL's 0.05 (the pi-based formula gave inf: 1 - pi == 0), so it keeps w = 1.
    lp, lm = torch.tensor([-1e-8]), torch.tensor([-1e-6])
    assert float(binary_kl(lp, lm)) == pytest.approx(_exact_binary_kl(-1e-8, float(lm)), rel=1e-6)
    assert float(gradient_weight("dppo_kl", lp, lm, torch.tensor([1.0]))) == 1.0
