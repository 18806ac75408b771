"""policy_loss: aggregation by hand, edge cases, dtype handling, input errors, diagnostics."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drpo.objectives import (
    METHODS,
    METRIC_NAMES,
    aggregate,
    gradient_weight,
    logp_gradient,
    policy_loss,
    register_method,
)

F64 = torch.float64

# -------------------------------------------------------------------- aggregation by hand
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 0.0, 0.0], [7.0, 0.0, 0.0, 0.0]], dtype=F64)
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
# row sums over the mask: 6, 30, (no tokens); counts 3, 2, 0


@pytest.mark.parametrize(
    "agg,expected",
    [
        ("token-mean", (6 + 30) / 5),
        ("seq-mean-token-sum", (6 + 30) / 2),
        ("seq-mean-token-mean", (6 / 3 + 30 / 2) / 2),
        ("seq-mean-token-sum-norm", (6 / 4 + 30 / 4) / 2),
    ],
)
def test_aggregation_matches_hand_computation(agg, expected):
    assert math.isclose(float(aggregate(PER_TOKEN, MASK, agg)), expected, rel_tol=1e-12)


def test_seq_mean_token_sum_norm_uses_given_horizon():
    assert math.isclose(float(aggregate(PER_TOKEN, MASK, "seq-mean-token-sum-norm", horizon=10)), (0.6 + 3.0) / 2)


def test_policy_loss_token_mean_pg_is_by_hand():
    # pg_is loss = -mean(r * A) over response tokens
    logp = torch.log(torch.tensor([[0.2, 0.5], [0.3, 0.9]], dtype=F64))
    old = torch.log(torch.tensor([[0.4, 0.5], [0.1, 0.9]], dtype=F64))
    adv = torch.tensor([1.0, -2.0], dtype=F64)
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, m = policy_loss("pg_is", logp, old, adv, mask)
    expected = -(0.5 * 1.0 + 1.0 * 1.0 + 3.0 * -2.0) / 3
    assert math.isclose(loss.item(), expected, rel_tol=1e-12)
    assert m["tokens"] == 3 and math.isclose(m["ratio_max"], 3.0) and math.isclose(m["ratio_min"], 0.5)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_fully_masked_rows_and_zero_advantages_give_finite_zero(method, agg):
    logp = torch.full((3, 5), -1.0, requires_grad=True)
    old = torch.full((3, 5), -1.3)
    garbage = torch.tensor(float("nan"))
    with torch.no_grad():
        logp_pad = logp.clone()
    mask = torch.zeros(3, 5, dtype=torch.bool)
    # all padding, with NaN garbage at padded positions that must not leak
    old_pad = old.clone()
    old_pad[0, 0] = garbage
    loss, metrics = policy_loss(method, logp, old_pad, torch.ones(3), mask, agg=agg)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logp.grad).all() and (logp.grad == 0).all()
    assert all(math.isfinite(v) for v in metrics.values())
    # all-zero advantages with real tokens
    loss, metrics = policy_loss(method, logp_pad, old, torch.zeros(3), torch.ones(3, 5), agg=agg)
    assert abs(loss.item()) < 1e-12
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_computed_in_fp32(dtype):
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 6, generator=g) * 3
    logp = (old + torch.randn(4, 6, generator=g) * 0.1).clamp(max=0)
    adv = torch.randn(4, generator=g)
    lp = logp.to(dtype).requires_grad_(True)
    loss, m = policy_loss("drpo", lp, old.to(dtype), adv.to(dtype), None, delta=0.1)
    assert loss.dtype == torch.float32
    ref, m_ref = policy_loss("drpo", lp.detach().float(), old.to(dtype).float(), adv.to(dtype).float(), None, delta=0.1)
    assert loss.item() == ref.item()
    assert m == m_ref
    loss.backward()
    assert lp.grad.dtype == dtype


# -------------------------------------------------------------------- bad input
def _ok():
    return torch.full((2, 3), -0.5), torch.full((2, 3), -0.7), torch.ones(2), torch.ones(2, 3)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.__setitem__(1, torch.full((2, 4), -0.7)), ValueError, "old_logp"),
        (lambda a: a.__setitem__(3, torch.ones(2, 4)), ValueError, "mask"),
        (lambda a: a.__setitem__(2, torch.ones(3)), ValueError, "advantages"),
        (lambda a: a.__setitem__(0, torch.full((3,), -0.5)), ValueError, "logp"),
        (lambda a: a[0].__setitem__((0, 1), float("nan")), ValueError, "`logp` has a non-finite"),
        (lambda a: a[1].__setitem__((1, 1), float("-inf")), ValueError, "`old_logp` has a non-finite"),
        (lambda a: a[2].__setitem__(0, float("inf")), ValueError, "`advantages` has a non-finite"),
        (lambda a: a[0].__setitem__((0, 0), 0.5), ValueError, "`logp` must be log-probabilities"),
        (lambda a: a[1].__setitem__((0, 0), 0.01), ValueError, "`old_logp` must be log-probabilities"),
        (lambda a: a.__setitem__(0, torch.empty(0, 3)), ValueError, "empty batch"),
        (lambda a: a.__setitem__(0, torch.full((2, 3), -1, dtype=torch.long)), TypeError, "`logp` must be a floating"),
        (lambda a: a.__setitem__(3, torch.full((2, 3), 2.0)), ValueError, "mask"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(mutate, exc, match):
    args = list(_ok())
    mutate(args)
    with pytest.raises(exc, match=match):
        policy_loss("drpo", *args)


def test_unknown_method_and_parameters():
    with pytest.raises(ValueError, match="unknown method 'drpoo'.*drpo"):
        policy_loss("drpoo", *_ok())
    with pytest.raises(ValueError, match="unknown parameter.*'eps'.*advantage_weighted, delta"):
        policy_loss("drpo", *_ok(), eps=0.2)
    with pytest.raises(ValueError, match="'delta' must be > 0"):
        policy_loss("drpo", *_ok(), delta=0.0)
    with pytest.raises(ValueError, match="'delta' must be > 0"):
        gradient_weight("drpo", *_ok()[:3], delta=-1.0)
    with pytest.raises(ValueError, match="'advantage_weighted' must be a bool"):
        policy_loss("spo", *_ok(), advantage_weighted=1)
    with pytest.raises(ValueError, match="unknown `agg`"):
        policy_loss("drpo", *_ok(), agg="mean")


def test_nan_in_padding_is_ignored():
    logp, old, adv, mask = _ok()
    mask[1, 2] = 0
    logp[1, 2] = float("nan")
    old[1, 2] = 3.0  # even invalid values at padding
    loss, _ = policy_loss("drpo", logp, old, adv, mask)
    assert torch.isfinite(loss)


# -------------------------------------------------------------------- user registration
def test_user_can_register_a_method():
    @register_method("test_scaled_pg", params={"scale": 2.0}, overwrite=True)
    class ScaledPg:
        @staticmethod
        def objective(logp, old_logp, adv, *, scale):
            r = torch.exp(logp - old_logp)
            return scale * r * adv, torch.zeros_like(r)

        @staticmethod
        def weight(logp, old_logp, adv, *, scale):
            return torch.full_like(logp, scale)

        boundary = None

    logp, old, adv, mask = _ok()
    loss, m = policy_loss("test_scaled_pg", logp, old, adv, mask, scale=3.0)
    assert math.isclose(loss.item(), -3.0 * math.exp(0.2), rel_tol=1e-6)
    assert m["weight_mean"] == 3.0 and m["weight_amplified_frac"] == 1.0
    with pytest.raises(ValueError, match="already registered"):
        register_method("drpo", params={})(ScaledPg)


# -------------------------------------------------------------------- diagnostics by hand
def test_diagnostics_by_hand():
    # two tokens, A = +1 and -1, mu = 0.5; pi = 0.8 (D=+0.3) and 0.1 (D=-0.4); third token padded
    logp = torch.log(torch.tensor([[0.8, 0.1, 0.5]], dtype=F64))
    old = torch.log(torch.tensor([[0.5, 0.5, 0.005]], dtype=F64))
    adv = torch.tensor([[1.0, -1.0, 5.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0]])
    delta = 0.2
    _, m = policy_loss("drpo", logp, old, adv, mask, delta=delta)
    r = [1.6, 0.2]
    w = [1 - 0.3 / 0.2, 1 - 0.4 / 0.2]  # both beyond the boundary: -0.5, -1.0
    assert m["tokens"] == 2
    assert math.isclose(m["ratio_mean"], 0.9) and math.isclose(m["ratio_max"], 1.6)
    assert math.isclose(m["abs_log_ratio"], (math.log(1.6) + abs(math.log(0.2))) / 2)
    assert math.isclose(m["k3_kl"], ((1.6 - 1 - math.log(1.6)) + (0.2 - 1 - math.log(0.2))) / 2)
    assert math.isclose(m["tv_mean"], 0.35) and math.isclose(m["tv_max"], 0.4)
    assert m["beyond_boundary_pos_frac"] == 1.0 and m["beyond_boundary_neg_frac"] == 1.0
    assert math.isclose(m["weight_mean"], sum(w) / 2) and math.isclose(m["weight_min"], -1.0)
    assert m["weight_corrective_frac"] == 1.0 and m["weight_zero_frac"] == 0.0
    assert math.isclose(m["surrogate"], (1.6 - 0.2) / 2)
    pen = [0.5 * (0.6**2) / (2 * delta), 0.5 * (0.8**2) / (2 * delta)]
    assert math.isclose(m["regularizer"], sum(pen) / 2)
    assert m["long_tail_frac"] == 0.0  # the mu=0.005 token is padding
    kept = (abs(r[0] * w[0]) + abs(r[1] * w[1])) / (r[0] + r[1])
    assert math.isclose(m["kept_grad_mass"], kept)
    assert set(m) == set(METRIC_NAMES) | {"loss"}


def test_kept_grad_mass_is_zero_when_everything_is_masked():
    logp = torch.log(torch.tensor([[0.9, 0.01]], dtype=F64))
    old = torch.log(torch.tensor([[0.5, 0.5]], dtype=F64))
    adv = torch.tensor([[1.0, -1.0]], dtype=F64)
    _, m = policy_loss("dppo_tv", logp, old, adv, None)
    assert m["kept_grad_mass"] == 0.0 and m["weight_zero_frac"] == 1.0


# -------------------------------------------------------------------- property-based
@st.composite
def batches(draw):
    b = draw(st.integers(1, 5))
    t = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=F64) * draw(st.floats(0.01, 14.0))
    logp = (old + torch.randn(b, t, generator=g, dtype=F64) * draw(st.floats(0.0, 3.0))).clamp(max=0.0)
    adv = torch.randn(b, 1, generator=g, dtype=F64) * draw(st.floats(0.0, 10.0))
    mask = torch.rand(b, t, generator=g) < draw(st.floats(0.0, 1.0))
    return logp, old, adv, mask


@settings(max_examples=60, deadline=None)
@given(batch=batches(), method=st.sampled_from(sorted(m for m in METHODS if not m.startswith("test_"))),
       delta=st.floats(0.01, 20.0))
def test_token_mean_gradient_is_masked_closed_form(batch, method, delta):
    logp, old, adv, mask = batch
    params = {}
    if "delta" in METHODS[method].params:
        params["delta"] = delta
    x = logp.clone().requires_grad_(True)
    loss, metrics = policy_loss(method, x, old, adv, mask, **params)
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in metrics.values())
    (g,) = torch.autograd.grad(loss, x)
    n = max(int(mask.sum()), 1)
    expected = -logp_gradient(method, logp, old, adv.expand_as(logp), **params) * mask / n
    torch.testing.assert_close(g, expected, rtol=1e-9, atol=1e-12)
    if method == "drpo":
        w = gradient_weight(method, logp, old, adv, **params)
        assert (w >= 1 - 1 / delta - 1e-9).all() and (w <= 1 + 1 / delta + 1e-9).all()
    assert 0.0 <= metrics["weight_zero_frac"] <= 1.0
    assert metrics["ratio_min"] <= metrics["ratio_mean"] + 1e-12 <= metrics["ratio_max"] + 2e-12


def test_token_weights_multiply_the_per_token_loss_by_hand():
    logp = torch.log(torch.tensor([[0.2, 0.5], [0.3, 0.9]], dtype=F64))
    old = torch.log(torch.tensor([[0.4, 0.5], [0.1, 0.9]], dtype=F64))
    adv = torch.tensor([1.0, -2.0], dtype=F64)
    mask = torch.tensor([[1, 1], [1, 0]])
    w = torch.tensor([[2.0, 0.5], [1.5, float("nan")]], dtype=F64)  # NaN at padding is ignored
    loss, _ = policy_loss("pg_is", logp, old, adv, mask, token_weights=w, agg="seq-mean-token-sum")
    expected = -((0.5 * 1.0 * 2.0 + 1.0 * 1.0 * 0.5) + (3.0 * -2.0 * 1.5)) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-12)
    with pytest.raises(ValueError, match="`token_weights` must be finite and >= 0"):
        policy_loss("pg_is", logp, old, adv, mask, token_weights=-w.nan_to_num())
    with pytest.raises(ValueError, match="`token_weights` shape"):
        policy_loss("pg_is", logp, old, adv, mask, token_weights=torch.ones(3))


# -------------------------------------------------------------------- non-finite inputs
@pytest.mark.parametrize("method", sorted(m for m in METHODS if not m.startswith("test_")))
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("where", ["logp", "old_logp", "advantages", "token_weights"])
def test_nonfinite_drop_equals_masking_the_token_out(method, agg, where):
    """nonfinite="drop" is exactly padding: the loss, its gradient and the diagnostics equal
    those of the same batch with the bad tokens masked out, and they are counted."""
    g = torch.Generator().manual_seed(7)
    old = -torch.rand(3, 5, generator=g, dtype=F64) * 3
    logp = (old + torch.randn(3, 5, generator=g, dtype=F64) * 0.3).clamp(max=0)
    adv = torch.randn(3, 5, generator=g, dtype=F64)
    weights = torch.rand(3, 5, generator=g, dtype=F64)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3:] = False
    bad = {"logp": logp, "old_logp": old, "advantages": adv, "token_weights": weights}[where]
    bad[0, 1] = float("-inf")
    bad[2, 0] = float("nan")
    bad[2, 4] = float("nan")  # padding: neither dropped nor counted
    x = logp.clone().requires_grad_(True)
    loss, m = policy_loss(method, x, old, adv, mask, agg=agg, token_weights=weights, nonfinite="drop")
    (grad,) = torch.autograd.grad(loss, x)
    kept = mask.clone()
    kept[0, 1] = kept[2, 0] = False
    clean = lambda t: torch.where(kept, t, torch.full_like(t, -0.5))  # noqa: E731
    y = clean(logp).requires_grad_(True)
    ref, m_ref = policy_loss(method, y, clean(old), clean(adv), kept, agg=agg, token_weights=clean(weights))
    (ref_grad,) = torch.autograd.grad(ref, y)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    assert grad[0, 1] == 0 and grad[2, 0] == 0
    assert m["nonfinite_tokens"] == 2 and m_ref["nonfinite_tokens"] == 0
    assert {k: v for k, v in m.items() if k != "nonfinite_tokens"} == pytest.approx(
        {k: v for k, v in m_ref.items() if k != "nonfinite_tokens"}, rel=1e-12, abs=1e-12
    )
    with pytest.raises(ValueError, match=f"`{where}` has a non-finite value -inf at response position \\(0, 1\\)"):
        policy_loss(method, logp, old, adv, mask, agg=agg, token_weights=weights)


def test_nonfinite_mode_is_checked_and_strict_checks_survive_metrics_off():
    logp, old, adv, mask = _ok()
    with pytest.raises(ValueError, match="unknown `nonfinite` 'skip'"):
        policy_loss("drpo", logp, old, adv, mask, nonfinite="skip")
    logp[0, 0] = float("nan")
    with pytest.raises(ValueError, match="`logp` has a non-finite"):
        policy_loss("drpo", logp, old, adv, mask, with_metrics=False)
    loss, m = policy_loss("drpo", logp, old, adv, mask, with_metrics=False, nonfinite="drop")
    assert torch.isfinite(loss) and m == {}
    # a log-prob > 0 is dropped and counted as the non-finite ones are (verl/TRL carry on); strict raises
    logp[0, 1] = 0.5
    old[1, 0] = 0.01
    loss, m = policy_loss("drpo", logp, old, adv, mask, nonfinite="drop")
    padded = mask.clone().bool()
    padded[0, :2] = padded[1, 0] = False
    want, _ = policy_loss("drpo", logp.nan_to_num(0.0).clamp(max=0), old.clamp(max=0), adv, padded)
    assert m["nonfinite_tokens"] == int((mask.bool() & ~padded).sum()) and loss == pytest.approx(float(want), rel=1e-6)
    logp[0, 0] = -1.0
    with pytest.raises(ValueError, match="`logp` must be log-probabilities"):
        policy_loss("drpo", logp, old, adv, mask)


def test_a_weight_of_exactly_one_is_neither_amplified_nor_attenuated():
    """pg_is's weight is 1 on every token: the categories are strict (w > 1 amplified, 0 < w < 1
    attenuated), so none of its tokens counts in either."""
    logp, old, adv, mask = _ok()
    _, m = policy_loss("pg_is", logp, old, adv, mask)
    assert (m["weight_amplified_frac"], m["weight_attenuated_frac"]) == (0.0, 0.0)
