"""The stress grid's claims and numbers on hand-built cells: the collapse rule over the settings
that take training off-policy, DRPO at its registered threshold against pg_is, the
beyond-boundary shares, and the warning that a threshold >= 1 binds no token."""

import math
import zlib

import numpy as np
import pytest
import torch

from drpo.objectives import get_method, loose_threshold_note
from drpo.study.claims import check_claims
from drpo.study.presets import get_preset
from drpo.study.stats import CellStats, cell_stats, run_stats

SEEDS = [5, 6, 7, 8, 9]
WARM = np.array([0.35, 0.45, 0.40, 0.50, 0.30])
GRID = {
    "methods": [{"name": m, "method": m, "params": {}} for m in ("pg_is", "grpo", "spo", "dppo_tv")]
    + [{"name": "mask_drpo", "method": "mask_drpo", "params": {"delta": 0.15}},
       {"name": "drpo", "method": "drpo", "params": {"delta": 0.15}}],
    "settings": {"fp8": {"rollout.precision": "fp8_e5m2"},
                 "stale": {"rollout.sync_every": 8},
                 "lr": {"optim.lr": 5e-4}},
    "sweeps": [{"settings": ["fp8", "stale", "lr"],
                "variants": [{"name": "drpo-d12.5", "method": "drpo", "params": {"delta": 12.5}}]}],
}
VARIANTS = [m["name"] for m in GRID["methods"]] + ["drpo-d12.5"]


def cell(setting, variant, shift=0.0, collapsed=0, sd=0.01):
    jitter = np.random.default_rng(zlib.crc32(f"{setting}/{variant}".encode())).normal(0, sd, len(SEEDS))
    final = WARM + 0.1 + shift + jitter
    return CellStats(setting, variant, {s: {"initial": WARM[i], "final": final[i], "auc": final[i] - 0.05,
                                            "gain": final[i] - WARM[i], "collapsed": float(i < collapsed)}
                                        for i, s in enumerate(SEEDS)})


def claims(**over):
    cells = {s: [cell(s, v, *over.get(f"{s}__{v}", ())) for v in VARIANTS] for s in GRID["settings"]}
    return {c.key: c for c in check_claims(cells, GRID)}


def test_stress_collapse_reads_only_the_stress_settings():
    # GRPO collapses on every seed of both stress settings, DRPO never: 10 discordant pairs
    c = claims(stale__grpo=(-0.3, 5), lr__grpo=(-0.3, 5))["stress_collapse"]
    assert c.verdict == "supports"
    grpo = next(t for t in c.tests if t.name.startswith("grpo"))
    assert grpo.p == pytest.approx(0.5 ** 10)  # exact sign test: all 10 discordant pairs one way
    assert grpo.p_holm == pytest.approx(2 * 0.5 ** 10)  # the smaller of two Holm p-values, times 2
    # the same collapses under fp8 only are the precision claim's evidence, not this one's
    by_precision = claims(fp8__grpo=(-0.3, 5), fp8__spo=(-0.3, 5))
    assert [t.p for t in by_precision["ratio_collapse"].tests] == pytest.approx([1 / 32, 1 / 32])
    assert by_precision["stress_collapse"].verdict == "contradicts"  # 0 of 10 stress runs collapse, each
    # DRPO collapsing on the same seeds: concordant pairs, no evidence either way
    both = {f"{s}__{v}": (-0.3, 5) for s in ("stale", "lr") for v in ("grpo", "spo", "drpo")}
    assert claims(**both)["stress_collapse"].verdict == "cannot tell"


def test_stress_collapse_at_the_edge_of_significance():
    # 5 discordant pairs one way: one-sided p = 1/32 = 0.031 alone, Holm 0.0625 against SPO's 1: not called
    c = claims(stale__grpo=(-0.3, 5))["stress_collapse"]
    assert [t.p for t in c.tests] == pytest.approx([1 / 32, 1.0])
    assert c.verdict == "cannot tell"
    # 6 pairs (5 under staleness, 1 under the large learning rate): p = 1/64, Holm 1/32 <= 0.05
    assert claims(stale__grpo=(-0.3, 5), lr__grpo=(-0.3, 1))["stress_collapse"].verdict == "supports"


def test_loose_drpo_against_pg_is():
    c = claims()["loose_is_pg_is"]
    assert c.verdict == "supports"  # differences of ~0.01 sd: inside +-0.05 on both metrics
    final = c.tests[0]
    by_hand = np.mean([cell(s, "drpo-d12.5").values("final") - cell(s, "pg_is").values("final")
                       for s in GRID["settings"]], 0)
    assert final.estimate == pytest.approx(by_hand.mean())
    assert final.sd == pytest.approx(by_hand.std(ddof=1))
    # 0.06 ahead everywhere: outside the margin, significant
    ahead = {f"{s}__drpo-d12.5": (0.06,) for s in GRID["settings"]}
    assert claims(**ahead)["loose_is_pg_is"].verdict == "contradicts"
    # 0.045 ahead with a spread of 0.01: inside the margin, but not shown inside it, and significant
    near = {f"{s}__drpo-d12.5": (0.045,) for s in GRID["settings"]}
    assert claims(**near)["loose_is_pg_is"].verdict == "contradicts"
    # a tie with a spread of 0.2 per seed: neither shown equal nor different
    noisy = {f"{s}__drpo-d12.5": (0.0, 0, 0.2) for s in GRID["settings"]}
    assert claims(**noisy)["loose_is_pg_is"].verdict == "cannot tell"


def test_loose_claim_needs_the_registered_delta():
    grid = {**GRID, "sweeps": [{"settings": ["fp8"], "variants": [
        {"name": "drpo-d1", "method": "drpo", "params": {"delta": 1.0}}]}]}
    cells = {s: [cell(s, v) for v in [m["name"] for m in grid["methods"]] + (["drpo-d1"] if s == "fp8" else [])]
             for s in grid["settings"]}
    c = {c.key: c for c in check_claims(cells, grid)}["loose_is_pg_is"]
    assert c.verdict == "not tested"


def test_beyond_boundary_shares_per_run_and_cell():
    rows = [{"step": 0, "eval/accuracy": 0.4},
            {"step": 1, "objective/beyond_boundary_pos_frac": 0.02, "objective/beyond_boundary_neg_frac": 0.04},
            {"step": 2, "objective/beyond_boundary_pos_frac": 0.06, "objective/beyond_boundary_neg_frac": 0.00,
             "eval/accuracy": 0.5}]
    a = run_stats("a", "stale", "grpo", 5, rows, None, 10.0)
    assert (a.beyond_pos, a.beyond_neg) == pytest.approx((0.04, 0.02))
    rows_b = [{**r, "objective/beyond_boundary_pos_frac": 0.0} if "objective/beyond_boundary_pos_frac" in r else r
              for r in rows]
    b = run_stats("b", "stale", "grpo", 6, rows_b, None, 10.0)
    c = cell_stats([a, b])
    assert c.beyond_pos == pytest.approx(0.02) and c.beyond_neg == pytest.approx(0.02)
    assert c.beyond == pytest.approx(0.02)


@pytest.mark.parametrize("delta", [1.0, 2.0, 12.5])
def test_loose_threshold_note_states_the_weights_range(delta):
    """The note's claims, checked on the registered weight and boundary over a dense grid of
    (pi, mu) and both advantage signs."""
    m = get_method("drpo")
    note = loose_threshold_note("drpo", {"delta": delta})
    assert note is not None and f"delta={delta:g}" in note
    lo, hi = (float(x) for x in note.split("= [")[1].split("]")[0].split(", "))
    p = torch.linspace(1e-4, 1 - 1e-4, 400, dtype=torch.float64)
    pi, mu = torch.meshgrid(p, p, indexing="ij")
    logp, old = pi.log().flatten(), mu.log().flatten()
    for sign in (1.0, -1.0):
        adv = torch.full_like(logp, sign)
        w = m.weight(logp, old, adv, delta=delta, advantage_weighted=True)
        assert not m.boundary(logp, old, adv, delta=delta, advantage_weighted=True).any()
        assert lo - 1e-3 <= float(w.min()) and float(w.max()) <= hi + 1e-3
    assert lo == pytest.approx(1 - 1 / delta, abs=1e-3) and hi == pytest.approx(1 + 1 / delta, abs=1e-3)


def test_loose_threshold_note_only_where_no_token_binds():
    assert loose_threshold_note("drpo", {"delta": 0.15}) is None
    assert loose_threshold_note("drpo", {"delta": 0.999}) is None
    assert loose_threshold_note("grpo", {}) is None
    assert "12.5" in loose_threshold_note("drpo", {})  # the registered default
    mask = loose_threshold_note("mask_drpo", {"delta": 1.0})
    assert "pg_is" in mask
    # Mask-DRPO at delta >= 1: weight 1 everywhere, as the note says
    m = get_method("mask_drpo")
    logp = torch.log(torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64))
    old = torch.log(torch.tensor([0.99, 0.01, 0.5], dtype=torch.float64))
    for sign in (1.0, -1.0):
        w = m.weight(logp, old, torch.full_like(logp, sign), delta=1.0, advantage_weighted=True)
        assert torch.equal(w, torch.ones_like(w))


def test_stress_presets_fixed_before_the_run():
    stress, threshold = get_preset("stress"), get_preset("fp8-threshold")

    def variants(grid):
        return grid.methods + [v for sw in grid.sweeps for v in sw.variants]

    names = [v.name for v in variants(stress)]
    assert {"pg_is", "grpo", "spo", "dppo_tv", "drpo", "drpo-d12.5", "mask_drpo"} <= set(names)
    assert len(stress.seeds) >= 5 and len(threshold.seeds) >= 10
    assert math.isclose(min(v.params.get("delta", 1) for v in variants(stress) if v.method == "drpo"), 0.15)
    deltas = sorted(v.params["delta"] for v in variants(threshold) if v.method == "drpo")
    assert deltas == [0.05, 0.15, 1.0, 12.5]
