"""Study statistics against hand computations."""

import math
import statistics

import pytest

from drpo.study import stats


def test_auc_trapezoid_by_hand():
    # (0.2+0.4)/2*5 + (0.4+0.3)/2*5 = 1.5 + 1.75 = 3.25 over a span of 10
    assert stats.auc([0, 5, 10], [0.2, 0.4, 0.3]) == pytest.approx(0.325)
    # uneven spacing: (0+1)/2*2 + 1*8 = 9 over 10
    assert stats.auc([0, 2, 10], [0.0, 1.0, 1.0]) == pytest.approx(0.9)
    # a constant curve's AUC is the constant
    assert stats.auc([3, 7, 20], [0.4, 0.4, 0.4]) == pytest.approx(0.4)
    assert stats.auc([4], [0.7]) == 0.7


@pytest.mark.parametrize(
    "steps, values, match",
    [([0, 1], [0.5], "2 steps but 1 values"), ([], [], "empty"), ([5, 5], [0.1, 0.2], "increase")],
)
def test_auc_rejects_bad_curves(steps, values, match):
    with pytest.raises(ValueError, match=match):
        stats.auc(steps, values)


def test_steps_to_target_is_first_eval_at_or_above():
    steps, accs = [0, 5, 10, 15], [0.2, 0.49, 0.5, 0.9]
    assert stats.steps_to_target(steps, accs, 0.5) == 10
    assert stats.steps_to_target(steps, accs, 0.2) == 0
    assert stats.steps_to_target(steps, accs, 0.95) is None


def test_collapse_rule():
    assert stats.is_collapsed(0.5, 0.2)  # 0.2 < 0.5 * 0.5
    assert not stats.is_collapsed(0.5, 0.25)  # equal to the threshold is not a collapse
    assert not stats.is_collapsed(0.5, 0.3)
    assert stats.is_collapsed(0.5, 0.9, diverged=True)
    assert stats.is_collapsed(0.5, 0.35, collapse_frac=0.8)  # 0.35 < 0.4


def test_diverged_detects_nonfinite_in_any_form():
    assert not stats.diverged([{"step": 1, "grad_norm": 3.0, "objective/loss": -0.1}])
    assert stats.diverged([{"step": 1, "grad_norm": float("inf")}])
    assert stats.diverged([{"step": 2, "objective/loss": "nan"}])  # the trainer writes non-finite as strings
    assert not stats.diverged([{"step": 1, "objective/weight_max": float("inf")}])  # not a divergence key


def test_accuracy_curve_sorts_and_last_row_wins():
    rows = [{"step": 5, "eval/accuracy": 0.3}, {"step": 0, "eval/accuracy": 0.1}, {"step": 3, "reward/mean": 1.0},
            {"step": 5, "eval/accuracy": 0.4}]
    assert stats.accuracy_curve(rows) == ([0, 5], [0.1, 0.4])


def test_mean_std_sample_std():
    m, s = stats.mean_std([0.1, 0.2, 0.6])
    assert m == pytest.approx(0.3)
    assert s == pytest.approx(math.sqrt((0.04 + 0.01 + 0.09) / 2))
    assert stats.mean_std([0.4]) == (0.4, 0.0)
    with pytest.raises(ValueError):
        stats.mean_std([])


def _rows(accs, mismatch, tokens=100):
    rows = []
    for i, a in enumerate(accs):
        rows.append({"step": 5 * i, "eval/accuracy": a, "mismatch/abs_log_ratio": mismatch[i],
                     "tokens/generated": tokens})
    return rows


def test_run_and_cell_stats_by_hand():
    r0 = stats.run_stats("a", "fp32", "drpo", 0, _rows([0.4, 0.6, 0.8], [0.01, 0.02, 0.03]), wall_s=10.0)
    r1 = stats.run_stats("b", "fp32", "drpo", 1, _rows([0.4, 0.2, 0.1], [0.03, 0.03, 0.03]), wall_s=30.0)
    assert (r0.initial_acc, r0.final_acc, r0.best_acc) == (0.4, 0.8, 0.8)
    assert r0.auc == pytest.approx(((0.4 + 0.6) / 2 * 5 + (0.6 + 0.8) / 2 * 5) / 10)
    assert r0.mean_mismatch == pytest.approx(0.02)
    assert r0.tokens == 300 and r0.tokens_per_s == pytest.approx(30.0)
    c = stats.cell_stats([r0, r1], target=0.6)
    assert c.n == 2
    assert c.final[0] == pytest.approx(0.45) and c.final[1] == pytest.approx(math.sqrt(2 * 0.35**2))
    assert c.best[0] == pytest.approx(0.6)  # best of r1 is its warm start 0.4
    assert c.reached == 1 and c.steps_to_target == 5
    assert c.collapsed == 1  # r1: 0.1 < 0.5 * 0.4
    assert c.gain[0] == pytest.approx(((0.8 - 0.4) + (0.1 - 0.4)) / 2)
    assert c.gain[1] == pytest.approx(math.sqrt(2 * 0.35**2))
    assert c.per_seed[1] == pytest.approx({"initial": 0.4, "final": 0.1, "best": 0.4, "gain": -0.3,
                                           "auc": ((0.4 + 0.2) / 2 * 5 + (0.2 + 0.1) / 2 * 5) / 10})
    assert c.wall_s == pytest.approx(20.0)  # median of 10 and 30
    assert c.tokens_per_s == pytest.approx((30.0 + 10.0) / 2)
    with pytest.raises(ValueError, match="several cells"):
        stats.cell_stats([r0, stats.run_stats("c", "bf16", "drpo", 0, _rows([0.4], [0.0]), 1.0)], 0.5)


def test_run_stats_needs_eval_rows():
    with pytest.raises(ValueError, match="eval/accuracy"):
        stats.run_stats("x", "s", "v", 0, [{"step": 1, "reward/mean": 0.5}], 1.0)


def test_default_gain_target_is_half_the_best_gain():
    assert stats.default_gain_target([0.1, 0.4, float("nan")]) == pytest.approx(0.2)
    assert stats.default_gain_target([-0.1, 0.0]) is None


def test_relative_target_counts_from_each_runs_warm_start():
    # warm starts 0.2 and 0.7; target gain 0.1 -> thresholds 0.3 and 0.8
    a = stats.run_stats("a", "s", "v", 0, _rows([0.2, 0.25, 0.35], [0, 0, 0]), 1.0)
    b = stats.run_stats("b", "s", "v", 1, _rows([0.7, 0.8, 0.9], [0, 0, 0]), 1.0)
    c = stats.cell_stats([a, b], 0.1, relative=True)
    assert c.reached == 2 and c.steps_to_target == statistics.median([10, 5])
    absolute = stats.cell_stats([a, b], 0.3)  # absolute: b is above 0.3 from step 0
    assert absolute.steps_to_target == statistics.median([10, 0])
    none = stats.cell_stats([a, b], None)
    assert none.reached == 0 and none.steps_to_target is None
