"""Study statistics against hand computations and independent references (tabulated t
quantiles, numpy's Student-t sampler, a brute-force binomial)."""

import math
from itertools import product

import numpy as np
import pytest

from drpo.study import stats


def test_auc_trapezoid_by_hand():
    # (0.2+0.4)/2*5 + (0.4+0.3)/2*5 = 1.5 + 1.75 = 3.25 over a span of 10
    assert stats.auc([0, 5, 10], [0.2, 0.4, 0.3]) == pytest.approx(0.325)
    # uneven spacing: (0+1)/2*2 + 1*8 = 9 over 10
    assert stats.auc([0, 2, 10], [0.0, 1.0, 1.0]) == pytest.approx(0.9)
    assert stats.auc([3, 7, 20], [0.4, 0.4, 0.4]) == pytest.approx(0.4)
    assert stats.auc([4], [0.7]) == 0.7


@pytest.mark.parametrize(
    "steps, values, match",
    [([0, 1], [0.5], "2 steps but 1 values"), ([], [], "empty"), ([5, 5], [0.1, 0.2], "increase")],
)
def test_auc_rejects_bad_curves(steps, values, match):
    with pytest.raises(ValueError, match=match):
        stats.auc(steps, values)


def test_collapse_is_judged_on_a_window_of_evals():
    # warm start 0.5: threshold 0.25 on the mean of the last two evals after step 0
    assert stats.is_collapsed(0.5, [0.5, 0.4, 0.1, 0.3])  # (0.1 + 0.3) / 2 = 0.2
    assert not stats.is_collapsed(0.5, [0.5, 0.1, 0.4, 0.1])  # (0.4 + 0.1) / 2 = 0.25: not below
    assert not stats.is_collapsed(0.5, [0.5, 0.4, 0.45, 0.1])  # one bad last eval does not decide
    assert stats.is_collapsed(0.5, [0.5, 0.1])  # a single eval after the warm start
    assert stats.is_collapsed(0.5, [0.5, 0.9, 0.9], diverged=True)
    assert stats.is_collapsed(0.5, [0.5, 0.35, 0.35], collapse_frac=0.8)  # 0.35 < 0.4


def test_series_sorts_and_last_row_wins():
    rows = [{"step": 5, "eval/accuracy": 0.3}, {"step": 0, "eval/accuracy": 0.1}, {"step": 3, "reward/mean": 1.0},
            {"step": 5, "eval/accuracy": 0.4}, {"step": 7, "eval/accuracy": "nan"}]
    assert stats.series(rows, stats.ACC) == ([0, 5], [0.1, 0.4])


def _rows(accs, mismatch, tokens=100, long_tail=0.1):
    return [{"step": 5 * i, "eval/accuracy": a, "mismatch/abs_log_ratio": mismatch[i], "tokens/generated": tokens,
             "response/long_tail_frac": long_tail, "response/length": 40.0} for i, a in enumerate(accs)]


def test_run_stats_read_the_runs_summary_and_cell_by_hand():
    summary = {"warmstart_accuracy": 0.4, "final_accuracy": 0.8, "best_accuracy": 0.8, "mean_mismatch": 0.5,
               "tokens_generated": 1000, "mean_long_tail_share": 0.2}
    r0 = stats.run_stats("a", "fp32", "drpo", 0, _rows([0.4, 0.6, 0.8], [0.01, 0.02, 0.03]), summary, wall_s=10.0)
    assert (r0.initial, r0.final, r0.best) == (0.4, 0.8, 0.8)
    # from summary.json, not recomputed
    assert (r0.mean_mismatch, r0.tokens, r0.long_tail) == (0.5, 1000, 0.2)
    assert r0.auc == pytest.approx(((0.4 + 0.6) / 2 * 5 + (0.6 + 0.8) / 2 * 5) / 10)
    assert r0.response_length == 40.0
    # a diverged run has no summary: the rows give its numbers
    r1 = stats.run_stats("b", "fp32", "drpo", 1, _rows([0.4, 0.2, 0.1], [0.03, 0.03, 0.03]), None, wall_s=30.0,
                         diverged=True)
    assert (r1.final, r1.best, r1.tokens, r1.collapsed) == (0.1, 0.4, 300, True)
    assert r1.mean_mismatch == pytest.approx(0.03) and r1.long_tail == pytest.approx(0.1)
    c = stats.cell_stats([r0, r1])
    assert c.n == 2 and c.collapsed == 1
    m, s = c.mean_sd("final")
    assert m == pytest.approx(0.45) and s == pytest.approx(math.sqrt(2 * 0.35**2))
    assert c.per_seed[1]["gain"] == pytest.approx(-0.3)
    assert c.wall_s == pytest.approx(20.0) and c.tokens_per_s == pytest.approx(1300 / 40)
    with pytest.raises(ValueError, match="several cells"):
        stats.cell_stats([r0, stats.run_stats("c", "bf16", "drpo", 0, _rows([0.4], [0.0]), None, 1.0)])
    with pytest.raises(ValueError, match="eval/accuracy"):
        stats.run_stats("x", "s", "v", 0, [{"step": 1, "reward/mean": 0.5}], None, 1.0)


def at_t(t: float, n: int) -> np.ndarray:
    """n per-seed values whose one-sample t-statistic is exactly t (and standard error 1)."""
    z = np.arange(n) - (n - 1) / 2
    return t + z / (z.std(ddof=1) / math.sqrt(n))


@pytest.mark.parametrize("df, q, ref", [(1, 0.975, 12.7062047), (2, 0.975, 4.3026527), (4, 0.975, 2.7764451),
                                        (4, 0.95, 2.1318468), (5, 0.99, 3.3649300), (9, 0.975, 2.2621572),
                                        (4, 0.8, 0.9409646)])
def test_confidence_intervals_use_the_tabulated_t_quantiles(df, q, ref):
    res = stats.paired_t(at_t(0.0, df + 1))
    lo, hi = res.ci(2 * q - 1)
    assert float(res.se) == pytest.approx(1.0)
    assert float(hi) == pytest.approx(ref, abs=1e-6) and float(lo) == pytest.approx(-ref, abs=1e-6)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 10])
def test_p_values_match_numpys_t_sampler(df):
    draws = np.abs(np.random.default_rng(df).standard_t(df, 400_000))
    for t in (0.5, 1.0, 2.0, 3.0):
        assert float(stats.paired_t(at_t(t, df + 1)).p) == pytest.approx((draws >= t).mean(), abs=3e-3)


def test_paired_t_by_hand():
    x = [0.1, 0.2, 0.3, 0.1, 0.05]
    mean, sd = np.mean(x), np.std(x, ddof=1)
    t = mean / (sd / math.sqrt(5))
    res = stats.paired_t(x)
    assert float(res.mean) == pytest.approx(mean) and float(res.se) == pytest.approx(sd / math.sqrt(5))
    theta = math.atan(t / 2)  # df = 4 in closed form: P(|T| >= t) = 1 - sin(theta) (1 + cos^2(theta) / 2)
    assert float(res.p) == pytest.approx(1 - math.sin(theta) * (1 + math.cos(theta) ** 2 / 2))
    assert float(res.p_greater) == pytest.approx(float(res.p) / 2)
    assert float(res.p_less) == pytest.approx(1 - float(res.p) / 2)
    lo, hi = res.ci()
    assert float(lo) == pytest.approx(mean - 2.7764451 * sd / math.sqrt(5), abs=1e-6)
    # zero spread: an exact tie is no evidence, an exact difference is decisive
    assert float(stats.paired_t([0.0, 0.0, 0.0]).p) == 1.0
    assert float(stats.paired_t([0.1, 0.1, 0.1]).p) == 0.0
    with pytest.raises(ValueError, match=">= 2 seeds"):
        stats.paired_t([0.1])


def test_tost_is_the_90_percent_interval_inside_the_margin():
    rng = np.random.default_rng(0)
    x = rng.normal(0.01, 0.03, size=(2000, 5))
    res = stats.paired_t(x)
    lo, hi = res.ci(0.90)
    inside = (lo > -0.05) & (hi < 0.05)
    assert np.array_equal(stats.tost(x, 0.05) <= 0.05, inside)


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> x3, x2, x1 = 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06
    assert stats.holm([0.01, 0.04, 0.03]).tolist() == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([[0.5, 0.001]])[0].tolist() == pytest.approx([0.5, 0.002])
    assert stats.holm([0.9, 0.3]).tolist() == pytest.approx([0.9, 0.6])  # capped by running max, then 1


def test_sign_test_against_brute_force():
    a = [1, 1, 1, 0, 1, 0, 0]
    b = [0, 0, 1, 0, 0, 0, 1]
    only_a, only_b, p = stats.sign_test(a, b)
    assert (only_a, only_b) == (3, 1)
    # P(at least 3 heads of 4 fair coins), counted over all 16 outcomes
    assert p == pytest.approx(sum(sum(o) >= 3 for o in product([0, 1], repeat=4)) / 16)
    assert stats.sign_test([0, 0], [0, 0])[2] == 1.0


def test_mde_has_the_stated_power_by_simulation():
    rng = np.random.default_rng(1)
    for n, k in ((5, 1), (5, 4), (8, 2)):
        effect = stats.mde(n, 1.0, k)
        power = (stats.paired_t(rng.standard_normal((40_000, n)) + effect).p <= stats.ALPHA / k).mean()
        assert power == pytest.approx(stats.POWER, abs=0.015)
    assert stats.mde(5, 0.03) == pytest.approx(0.03 * stats.mde(5, 1.0))
    assert stats.mde(1, 1.0) == math.inf


def test_log_slope_recovers_a_known_trend():
    deltas = [0.05, 0.15, 1.0, 12.5]
    y = 0.3 + 0.02 * np.log(deltas)
    assert float(stats.log_slope(deltas, y)) == pytest.approx(0.02)
