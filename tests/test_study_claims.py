"""Claim verdicts from hand-built cells: each rule must be able to support, contradict and
stay undecided."""

import math

import pytest

from drpo.study.claims import MIN_MARGIN, check_claims, compare, margin
from drpo.study.stats import CellStats

GRID = {
    "methods": [{"name": m, "method": m, "params": {}} for m in ("pg_is", "grpo", "spo", "dppo_tv", "mask_drpo")]
    + [{"name": "drpo", "method": "drpo", "params": {"delta": 0.15}}],
    "settings": {"fp32": {"rollout.precision": "fp32"}, "bf16": {"rollout.precision": "bf16"},
                 "fp8": {"rollout.precision": "fp8_e4m3"},
                 "stress": {"rollout.precision": "bf16", "optim.lr": 0.01}},
    "sweeps": [{"settings": ["fp32"], "variants": [
        {"name": "drpo-d1", "method": "drpo", "params": {"delta": 1.0}},
        {"name": "drpo-noadv", "method": "drpo", "params": {"delta": 0.15, "advantage_weighted": False}}]}],
}


def cell(setting, variant, final, auc=None, *, collapsed=0, n=3, std=0.0, initial=0.5):
    auc = final if auc is None else auc
    return CellStats(setting, variant, n, (initial, 0.0), (final, std), (max(final, initial), std), (auc, std),
                     n, 5.0, collapsed, 1e-3, 10.0, 100.0, gain=(final - initial, std))


def table(spec):
    cells = {}
    for (setting, variant), kw in spec.items():
        cells.setdefault(setting, []).append(cell(setting, variant, **kw))
    return cells


def verdicts(spec):
    return {c.key: c.verdict for c in check_claims(table(spec), GRID)}


def test_margin_and_compare_by_hand():
    a, b = cell("s", "a", 0.60, std=0.05), cell("s", "b", 0.50, std=0.05)
    se = math.sqrt(0.05**2 / 3 + 0.05**2 / 3)  # 0.0408
    assert margin(a.final, b.final, 3, 3) == pytest.approx(se)
    assert compare(a, b, "final") == "better" and compare(b, a, "final") == "worse"
    c = cell("s", "c", 0.55, std=0.05)  # 0.05 difference vs margin 0.0408 -> better
    assert compare(c, b, "final") == "better"
    d = cell("s", "d", 0.53, std=0.05)  # 0.03 < 0.0408 -> tie
    assert compare(d, b, "final") == "tie"
    # with no seed spread the floor MIN_MARGIN applies
    assert compare(cell("s", "e", 0.5 + MIN_MARGIN / 2), cell("s", "f", 0.5), "final") == "tie"


def test_paired_comparison_removes_shared_seed_spread():
    from drpo.study.claims import difference

    def seeded(variant, finals):
        c = cell("s", variant, sum(finals) / len(finals), std=0.3)  # large spread across seeds
        c.per_seed.update({i: {"final": f, "auc": f} for i, f in enumerate(finals)})
        return c

    # seeds differ a lot (warm starts 0.2 / 0.5 / 0.8) but a beats b by 0.05 on every seed
    a, b = seeded("a", [0.25, 0.55, 0.85]), seeded("b", [0.20, 0.50, 0.80])
    diff, m = difference(a, b, "final")
    assert diff == pytest.approx(0.05) and m == pytest.approx(MIN_MARGIN)  # per-seed diffs have no spread
    assert compare(a, b, "final") == "better"
    # unpaired, the same means are a tie: margin sqrt(2 * 0.3^2 / 3) = 0.245
    a.per_seed.clear(), b.per_seed.clear()
    assert compare(a, b, "final") == "tie"
    # paired differences with spread: diffs 0.1, 0.0, -0.04 -> mean 0.02, se = stdev/sqrt(3)
    a, b = seeded("a", [0.3, 0.5, 0.76]), seeded("b", [0.2, 0.5, 0.8])
    diff, m = difference(a, b, "final")
    diffs = [0.1, 0.0, -0.04]
    mean = sum(diffs) / 3
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2) / math.sqrt(3)
    assert diff == pytest.approx(mean) and m == pytest.approx(max(MIN_MARGIN, se))
    assert compare(a, b, "final") == "tie"


def base(**over):
    spec = {}
    for s in ("fp32", "bf16", "fp8", "stress"):
        for v in ("pg_is", "grpo", "spo", "dppo_tv", "mask_drpo", "drpo"):
            spec[(s, v)] = {"final": 0.6}
    spec[("fp32", "drpo-d1")] = {"final": 0.6}
    spec[("fp32", "drpo-noadv")] = {"final": 0.6}
    for k, v in over.items():
        spec[tuple(k.split("__"))] = v
    return spec


def test_all_equal_cells_give_honest_verdicts():
    v = verdicts(base())
    assert v["ratio_collapse"] == "contradicts"  # no ratio method collapsed under low precision
    assert v["dppo_slower"] == "cannot tell"  # all ties
    assert v["pg_is_drops"] == "contradicts"  # 0.6 final vs 0.5 warm start: no drop anywhere
    assert v["mask_matches"] == "supports"
    assert v["abs_adv"] == "cannot tell"
    assert v["threshold"] == "cannot tell"


def test_ratio_collapse_supported_only_in_pure_precision_settings():
    v = verdicts(base(bf16__grpo={"final": 0.1, "collapsed": 2}))
    assert v["ratio_collapse"] == "supports"
    # a collapse only in the stress setting (which also changes the lr) is not evidence
    assert verdicts(base(stress__grpo={"final": 0.1, "collapsed": 3}))["ratio_collapse"] == "contradicts"
    # DRPO collapsing too: cannot tell
    v = verdicts(base(bf16__grpo={"final": 0.1, "collapsed": 2}, fp8__drpo={"final": 0.1, "collapsed": 2}))
    assert v["ratio_collapse"] == "cannot tell"
    # a minority of seeds collapsing: not contradicted, not supported
    assert verdicts(base(fp8__spo={"final": 0.55, "collapsed": 1}))["ratio_collapse"] == "cannot tell"


def test_dppo_slower():
    better = {f"{s}__drpo": {"final": 0.7, "auc": 0.65} for s in ("fp32", "bf16", "fp8", "stress")}
    assert verdicts(base(**better))["dppo_slower"] == "supports"
    worse = {f"{s}__dppo_tv": {"final": 0.7, "auc": 0.68} for s in ("fp32", "bf16", "fp8")}
    assert verdicts(base(**worse))["dppo_slower"] == "contradicts"
    assert verdicts(base(fp8__dppo_tv={"final": 0.1, "collapsed": 3}))["dppo_slower"] == "contradicts"


def test_pg_is_drops_counts_settings():
    assert verdicts(base(fp8__pg_is={"final": 0.3}))["pg_is_drops"] == "cannot tell"
    assert verdicts(base(fp8__pg_is={"final": 0.3}, stress__pg_is={"final": 0.45}))["pg_is_drops"] == "supports"
    # a drop that DRPO shares is the setting's, not the surrogate's
    shared = base(fp8__pg_is={"final": 0.3}, fp8__drpo={"final": 0.3},
                  stress__pg_is={"final": 0.45}, stress__drpo={"final": 0.45})
    assert verdicts(shared)["pg_is_drops"] == "contradicts"


def test_settings_where_everything_collapsed_are_left_out():
    spec = base(**{f"stress__{v}": {"final": 0.0, "collapsed": 3}
                   for v in ("pg_is", "grpo", "spo", "dppo_tv", "mask_drpo", "drpo")})
    claims = check_claims(table(spec), GRID)
    v = {c.key: c.verdict for c in claims}
    assert v["dppo_slower"] == "cannot tell" and v["pg_is_drops"] == "contradicts"
    assert all(any("left out: setting(s) stress" in e for e in c.evidence) for c in claims)


def test_mask_matches():
    differs = {f"{s}__mask_drpo": {"final": 0.4} for s in ("fp32", "bf16", "fp8")}
    assert verdicts(base(**differs))["mask_matches"] == "contradicts"
    assert verdicts(base(fp8__mask_drpo={"final": 0.4}))["mask_matches"] == "cannot tell"


def test_abs_adv_and_threshold():
    assert verdicts(base(**{"fp32__drpo-noadv": {"final": 0.5}}))["abs_adv"] == "supports"
    assert verdicts(base(**{"fp32__drpo-noadv": {"final": 0.7}}))["abs_adv"] == "contradicts"
    assert verdicts(base(**{"fp32__drpo-d1": {"final": 0.45}}))["threshold"] == "supports"


def test_missing_cells_are_not_tested():
    v = {c.key: c.verdict for c in check_claims({"fp32": [cell("fp32", "grpo", 0.5)]}, GRID)}
    assert set(v.values()) == {"not tested"}
