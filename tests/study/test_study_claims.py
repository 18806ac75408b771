"""Claim verdicts on hand-built cells (5 seeds each): every rule can support, contradict and stay
undecided, and its evidence carries the numbers it decided on; each decides the right way just
inside and just outside its threshold. Error rates: test_study_power.py."""

import zlib

import numpy as np
import pytest

from drpo.study.claims import check_claims, sweep_change
from drpo.study.stats import CellStats, paired_t

SEEDS = [0, 1, 2, 3, 4]
GRID = {
    "methods": [{"name": m, "method": m, "params": {}} for m in ("pg_is", "grpo", "spo", "dppo_tv", "dppo_kl",
                                                                 "mask_drpo")]
    + [{"name": "drpo", "method": "drpo", "params": {"delta": 0.15}}],
    "settings": {"fp32": {"rollout.precision": "fp32"}, "bf16": {"rollout.precision": "bf16"},
                 "fp8": {"rollout.precision": "fp8_e4m3"},
                 "stress": {"rollout.precision": "bf16", "optim.lr": 0.01}},
    "sweeps": [{"settings": ["bf16"], "variants": [
        {"name": "drpo-d0.05", "method": "drpo", "params": {"delta": 0.05}},
        {"name": "drpo-d1", "method": "drpo", "params": {"delta": 1.0}},
        {"name": "drpo-noadv", "method": "drpo", "params": {"delta": 0.15, "advantage_weighted": False}}]}],
}
WARM = np.array([0.35, 0.45, 0.40, 0.50, 0.30])  # per-seed warm starts, shared within a setting


def cell(setting, variant, shift=0.0, collapsed=0):
    """Final = warm start + 0.1 + shift (a number or one per seed) + a fixed per-(setting,
    variant) jitter of sd ~0.01."""
    jitter = np.random.default_rng(zlib.crc32(f"{setting}/{variant}".encode())).normal(0, 0.01, len(SEEDS))
    final = WARM + 0.1 + shift + jitter
    return CellStats(setting, variant, {s: {"initial": WARM[i], "final": final[i], "auc": final[i] - 0.05,
                                            "gain": final[i] - WARM[i], "collapsed": float(i < collapsed)}
                                        for i, s in enumerate(SEEDS)})


def table(**over):
    """Every cell of GRID at no effect; over: 'setting__variant' -> (shift, collapsed seeds)."""
    cells = {}
    for s in GRID["settings"]:
        variants = [m["name"] for m in GRID["methods"]]
        variants += [v["name"] for v in GRID["sweeps"][0]["variants"]] if s == "bf16" else []
        cells[s] = [cell(s, v, *over.get(f"{s}__{v}", (0.0, 0))) for v in variants]
    return cells


def verdicts(**over):
    return {c.key: c.verdict for c in check_claims(table(**over), GRID)}


def test_no_effect_gives_no_difference_claim():
    v = verdicts()
    assert v["ratio_collapse"] == "contradicts"  # 10 clean runs of each ratio method in bf16 and fp8
    assert v["dppo_slower"] == "cannot tell"
    assert v["pg_is_drops"] == "contradicts"  # pg_is gains 0.1 everywhere: no drop beyond the margin
    assert v["mask_matches"] == "supports"  # differences of ~0.01 sd: inside +-0.05
    assert v["abs_adv"] == "contradicts"  # equivalent within the margin: removing |A| does not hurt
    assert v["threshold"] == "contradicts"  # flat across the sweep, within the margin


def test_ratio_collapse_counts_only_pure_precision_settings():
    assert verdicts(bf16__grpo=(-0.3, 5), fp8__grpo=(-0.3, 4))["ratio_collapse"] == "supports"
    # collapses only where the learning rate also changed are not evidence: still contradicted
    assert verdicts(stress__grpo=(-0.3, 5), stress__spo=(-0.3, 5))["ratio_collapse"] == "contradicts"
    # DRPO collapsing in the same runs: the sign test sees concordant pairs, no evidence either way
    both = {f"{s}__{v}": (-0.3, 5) for s in ("bf16", "fp8") for v in ("grpo", "spo", "drpo")}
    assert verdicts(**both)["ratio_collapse"] == "cannot tell"


def test_dppo_slower():
    ahead = {f"{s}__drpo": (0.08, 0) for s in GRID["settings"]}
    assert verdicts(**ahead)["dppo_slower"] == "supports"
    behind = {f"{s}__dppo_tv": (0.08, 0) for s in GRID["settings"]}
    assert verdicts(**behind)["dppo_slower"] == "contradicts"
    unstable = {f"{s}__dppo_kl": (-0.2, 3) for s in GRID["settings"]}  # 12 of 20 runs collapse, drpo none
    assert verdicts(**unstable)["dppo_slower"] == "contradicts"


def test_pg_is_drops_needs_two_settings_and_drpo_ahead():
    assert verdicts(fp8__pg_is=(-0.3, 0))["pg_is_drops"] == "cannot tell"
    assert verdicts(fp8__pg_is=(-0.3, 0), stress__pg_is=(-0.3, 0))["pg_is_drops"] == "supports"
    # DRPO dropping alongside: the setting's drop, not the surrogate's
    shared = verdicts(fp8__pg_is=(-0.3, 0), fp8__drpo=(-0.3, 0), stress__pg_is=(-0.3, 0), stress__drpo=(-0.3, 0))
    assert shared["pg_is_drops"] == "cannot tell"


def test_settings_where_everything_collapsed_stay_in():
    stress = {f"stress__{m['name']}": (-0.5, 5) for m in GRID["methods"]}
    claims = {c.key: c for c in check_claims(table(**stress), GRID)}
    assert any(e.startswith("stress:") for e in claims["dppo_slower"].evidence)
    assert claims["pg_is_drops"].tests[-1].name.startswith("stress")


def test_mask_matches():
    far = {f"{s}__mask_drpo": (-0.15, 0) for s in GRID["settings"]}
    assert verdicts(**far)["mask_matches"] == "contradicts"
    # seeds disagree (+-0.4 in one setting): neither shown equivalent nor different
    assert verdicts(fp8__mask_drpo=(np.array([0.4, -0.4, 0.4, -0.4, 0.0]), 0))["mask_matches"] == "cannot tell"


def test_abs_adv():
    assert verdicts(**{"bf16__drpo-noadv": (-0.1, 0)})["abs_adv"] == "supports"
    assert verdicts(**{"bf16__drpo-noadv": (0.1, 0)})["abs_adv"] == "contradicts"


def test_threshold_is_a_trend_over_every_delta():
    # a monotone trend over 0.05, 0.15, 1: supported
    trend = {"bf16__drpo-d0.05": (-0.1, 0), "bf16__drpo-d1": (0.1, 0)}
    c = next(c for c in check_claims(table(**trend), GRID) if c.key == "threshold")
    assert c.verdict == "supports"
    deltas = [0.05, 0.15, 1.0]
    cells = {v.variant: v for v in table(**trend)["bf16"]}
    ys = np.stack([cells[n].values("final") for n in ("drpo-d0.05", "drpo", "drpo-d1")], -1)
    expected = paired_t(sweep_change(deltas, ys))
    assert c.tests[0].estimate == pytest.approx(float(expected.mean))
    assert c.tests[0].p == pytest.approx(float(expected.p))


def test_missing_cells_are_not_tested():
    v = {c.key: c.verdict for c in check_claims({"fp32": [cell("fp32", "grpo")]}, GRID)}
    assert set(v.values()) == {"not tested"}


# ------------------------------------------------------------------ at the decision thresholds
# Each rule on data placed just inside and just outside its threshold, so a rule off by a
# factor (a one-sided p for a two-sided one, a Holm family of the wrong size, a sign-test count
# off by one) gives the other verdict. The t-statistics are exact (no jitter): per-seed values
# c + sd * z with z a fixed pattern of mean 0 and sample sd 1, so t = c / (sd / sqrt(5)). The
# critical values come from Student's t with 4 degrees of freedom in its own closed form
# (F(t) = 1/2 + 3/8 x (1 - x^2/12), x = t / sqrt(1 + t^2/4)), not from drpo.study.stats.
Z = np.array([-2.0, -1.0, 0.0, 1.0, 2.0]) / np.std([-2.0, -1.0, 0.0, 1.0, 2.0], ddof=1)


def t4_two_sided(t: float) -> float:
    x = abs(t) / np.sqrt(1 + t * t / 4)
    return 2 * (1 - (0.5 + 3 / 8 * x * (1 - x * x / 12)))


def t4_critical(p: float) -> float:
    """|t| with two-sided p-value `p` at 4 df (bisection)."""
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t4_two_sided(mid) > p else (lo, mid)
    return lo


def test_the_t4_reference_matches_the_printed_table():
    assert t4_critical(0.05) == pytest.approx(2.776445, abs=1e-5)  # Student's t table, df = 4
    assert t4_critical(0.01) == pytest.approx(4.604095, abs=1e-5)


def at_t(t: float, sd: float = 0.1) -> np.ndarray:
    """Per-seed values whose one-sample t-statistic is exactly t."""
    return t * sd / np.sqrt(len(SEEDS)) + sd * Z


def exact_table(grid=GRID, **over):
    """Every cell final = warm start + 0.1 (no jitter) plus over['setting__variant'] (a number
    or one per seed); AUC = final - 0.05; `collapsed` from over['setting__variant__collapsed']."""
    cells = {}
    for s in grid["settings"]:
        variants = [m["name"] for m in grid["methods"]]
        variants += [v["name"] for sw in grid["sweeps"] if s in sw["settings"] for v in sw["variants"]]
        cells[s] = []
        for v in variants:
            final = WARM + 0.1 + over.get(f"{s}__{v}", 0.0)
            down = over.get(f"{s}__{v}__collapsed", 0)
            cells[s].append(CellStats(s, v, {seed: {"initial": WARM[i], "final": final[i], "auc": final[i] - 0.05,
                                                    "gain": final[i] - WARM[i], "collapsed": float(i < down)}
                                             for i, seed in enumerate(SEEDS)}))
    return cells


def verdict_of(key, grid=GRID, **over):
    return next(c.verdict for c in check_claims(exact_table(grid, **over), grid) if c.key == key)


# Two metrics with identical p-values (AUC = final - 0.05), Holm: each rejects iff 2p <= 0.05.
# The DPPO family holds 6 tests (2 methods x 2 metrics + 2 collapse tests): 6p <= 0.05.
T_HOLM2, T_HOLM6 = t4_critical(0.05 / 2), t4_critical(0.05 / 6)


@pytest.mark.parametrize("side, factor", [("inside", 1.03), ("outside", 0.97)])
def test_difference_rules_at_their_thresholds(side, factor):
    decided = side == "inside"
    everywhere = lambda v, x: {f"{s}__{v}": x for s in GRID["settings"]}  # noqa: E731
    # Mask-DRPO off from DRPO by a t at the threshold (mean 0.16 > the margin: never equivalent)
    assert verdict_of("mask_matches", **everywhere("mask_drpo", at_t(factor * T_HOLM2))) == (
        "contradicts" if decided else "cannot tell")
    # DRPO ahead of DPPO-TV in every setting
    assert verdict_of("dppo_slower", **everywhere("dppo_tv", -at_t(factor * T_HOLM6))) == (
        "supports" if decided else "cannot tell")
    # removing |A| hurts (bf16 holds the pair)
    assert verdict_of("abs_adv", **{"bf16__drpo-noadv": -at_t(factor * T_HOLM2)}) == (
        "supports" if decided else "cannot tell")
    # a trend across the sweep: -v, 0, +v at deltas 0.05, 0.15, 1 (the fitted change is a fixed
    # multiple of v, so its t is v's)
    v = at_t(factor * T_HOLM2)
    assert verdict_of("threshold", **{"bf16__drpo-d0.05": -v, "bf16__drpo-d1": v}) == (
        "supports" if decided else "cannot tell")


def test_ratio_collapse_at_its_thresholds():
    # GRPO collapses in k of its 10 pure-precision runs (bf16, fp8), DRPO in none: the sign test's
    # one-sided p is 2^-k, Holm doubles it (SPO clean): 6 supports (2/64), 5 does not (2/32)
    assert verdict_of("ratio_collapse", bf16__grpo__collapsed=3, fp8__grpo__collapsed=3) == "supports"
    assert verdict_of("ratio_collapse", bf16__grpo__collapsed=3, fp8__grpo__collapsed=2) == "cannot tell"
    # contradicts when, for both, P(>= this many clean runs of 10 | rate 1/2) <= 0.05:
    # 1 collapse: 11/1024; 2 collapses: 56/1024 = 0.055
    assert verdict_of("ratio_collapse", bf16__grpo__collapsed=1) == "contradicts"
    assert verdict_of("ratio_collapse", bf16__grpo__collapsed=2) == "cannot tell"


# DRPO without |A| at delta 1, next to the main DRPO (delta 0.15) and a delta-1 variant: the
# no-|A| claim must compare it with the delta-1 variant; a second sweep gives fp8 two deltas only.
GRID_D1 = {**GRID, "sweeps": [
    {"settings": ["bf16"], "variants": [
        {"name": "drpo-d0.05", "method": "drpo", "params": {"delta": 0.05}},
        {"name": "drpo-d1", "method": "drpo", "params": {"delta": 1.0}},
        {"name": "drpo-noadv-d1", "method": "drpo", "params": {"delta": 1.0, "advantage_weighted": False}}]},
    {"settings": ["fp8"], "variants": [{"name": "drpo-d1", "method": "drpo", "params": {"delta": 1.0}}]}]}


def test_abs_adv_compares_at_the_same_delta():
    # the main DRPO (delta 0.15) far ahead; the delta-1 pair equal: removing |A| does not hurt
    ahead = {f"{s}__drpo": 0.3 for s in GRID_D1["settings"]}
    assert verdict_of("abs_adv", GRID_D1, **ahead) == "contradicts"
    assert verdict_of("abs_adv", GRID_D1, **ahead, **{"bf16__drpo-noadv-d1": -0.3}) == "supports"


def test_threshold_needs_three_deltas_in_a_setting():
    # fp8 has two deltas (0.15, 1) with a large change between them: not a sweep, left out; bf16
    # has three, flat up to seed noise of mean 0: the change is shown to be within the margin
    over = {"fp8__drpo-d1": 0.4, "bf16__drpo-d0.05": -0.01 * Z, "bf16__drpo-d1": 0.01 * Z}
    assert verdict_of("threshold", GRID_D1, **over) == "contradicts"
    c = next(c for c in check_claims(exact_table(GRID_D1, **over), GRID_D1) if c.key == "threshold")
    assert [e.split(":")[0] for e in c.evidence if not e.startswith("fitted")] == ["bf16"]
