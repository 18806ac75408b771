"""Claim verdicts on hand-built cells (5 seeds each): every rule can support, contradict and stay
undecided, and its evidence carries the numbers it decided on. Error rates: test_study_power.py."""

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
