"""Error rates of the claim rules on simulated studies: the paper-mini design (7 methods x 2
precision settings x 5 seeds, DRPO's delta sweep and the no-|A| ablation under bf16) with
per-seed results drawn from a model with known effects. Each rule must call a claim on
no-effect data no more often than its nominal 5% allows: the count over the replications must
not be significantly above 5% (exact binomial tail, FALSE_CLAIM_P; at NULL_REPS = 1000 a true
rate of 10% fails it with probability > 0.99), and detect the effect docs/study.md states with
its 80% power (asserted >= 75% over the replications here)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from drpo.study import claims
from drpo.study.claims import MARGIN, _Index
from drpo.study.presets import PAPER_MINI
from drpo.study.stats import ALPHA, CellStats, mde

REPS = 300
NULL_REPS = 1000  # for the false-claim rates: enough to tell 5% from 10%
FALSE_CLAIM_P = 1e-3  # a count this unlikely under a 5% rate fails
SIGMA = 0.03  # per-run noise of final accuracy and AUC around the seed's expected value
GRID = {k: PAPER_MINI[k] for k in ("methods", "settings", "sweeps")}
GRID["methods"] = [m if isinstance(m, dict) else {"name": m, "method": m, "params": {}} for m in GRID["methods"]]
MAIN = [m["name"] for m in GRID["methods"]]
SWEPT = {v["name"]: v["params"].get("delta", 12.5) for v in PAPER_MINI["sweeps"][0]["variants"]}
SEEDS = PAPER_MINI["seeds"]
N = len(SEEDS)
# the per-seed spread of the quantity each rule tests, from SIGMA
POOLED_SD = SIGMA * math.sqrt(2) / math.sqrt(len(GRID["settings"]))  # a difference averaged over settings
PAIR_SD = SIGMA * math.sqrt(2)  # a difference in one setting


def simulate(rng, *, shift=None, collapse=None, trend=0.0):
    """One study: cells by setting. shift(setting, variant) -> expected accuracy change of that
    variant's final accuracy and AUC; collapse(setting, variant) -> probability a run collapses;
    trend: the expected change of DRPO's accuracy across the delta sweep (linear in log delta)."""
    deltas = {"drpo": 0.15, **{k: d for k, d in SWEPT.items() if k != "drpo-noadv"}}
    logs = {k: math.log(d) for k, d in deltas.items()}
    lo, hi = min(logs.values()), max(logs.values())
    cells = {}
    for s in GRID["settings"]:
        warm = rng.uniform(0.3, 0.5, N)  # each seed's warm start, shared across the setting
        gain = 0.1
        variants = MAIN + (list(SWEPT) if s in PAPER_MINI["sweeps"][0]["settings"] else [])
        cells[s] = []
        for v in variants:
            mu = (shift(s, v) if shift else 0.0) + (trend * (logs[v] - (lo + hi) / 2) / (hi - lo) if v in logs else 0)
            final = warm + gain + mu + rng.normal(0, SIGMA, N)
            auc = warm + gain / 2 + mu + rng.normal(0, SIGMA, N)
            col = rng.random(N) < (collapse(s, v) if collapse else 0.0)
            cells[s].append(CellStats(s, v, {seed: {"initial": warm[i], "final": final[i], "auc": auc[i],
                                                    "gain": final[i] - warm[i], "collapsed": float(col[i])}
                                             for i, seed in enumerate(SEEDS)}))
    return cells


def rate(claim_fn, verdicts, seed=0, reps=REPS, **scenario):
    rng = np.random.default_rng(seed)
    hits = sum(claim_fn(_Index(simulate(rng, **scenario), GRID)).verdict in verdicts for _ in range(reps))
    return hits / reps


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k), X ~ Binomial(n, p), summed from the log-pmf."""
    log_pmf = lambda i: (math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)  # noqa: E731
                         + i * math.log(p) + (n - i) * math.log1p(-p))
    return sum(math.exp(log_pmf(i)) for i in range(k, n + 1))


def false_claims_within_alpha(claim_fn, verdicts, **scenario) -> bool:
    """The rule's false-claim count over NULL_REPS studies is consistent with a rate <= ALPHA."""
    k = round(rate(claim_fn, verdicts, reps=NULL_REPS, **scenario) * NULL_REPS)
    return binomial_tail(k, NULL_REPS, ALPHA) > FALSE_CLAIM_P


def test_the_bound_tells_5_from_10_percent():
    # the largest count that passes: just above 7% of the repetitions
    k_max = next(k for k in range(NULL_REPS + 1) if binomial_tail(k + 1, NULL_REPS, ALPHA) <= FALSE_CLAIM_P)
    assert binomial_tail(0, NULL_REPS, ALPHA) == pytest.approx(1.0)
    assert 0.06 < k_max / NULL_REPS < 0.075
    assert 1 - binomial_tail(k_max + 1, NULL_REPS, 2 * ALPHA) < 0.01  # a 10% rule passes < 1% of the time


LOW = ("bf16", "fp8", "fp8_e2e")


@pytest.mark.parametrize("p", [0.0, 0.3, 0.7])
def test_ratio_collapse_rule(p):
    # every method collapses equally often: no claim either way from the sign tests
    assert false_claims_within_alpha(claims.claim_ratio_collapse, {"supports"}, collapse=lambda s, v: p)
    if p == 0.0:  # nothing collapses: 15 clean runs per ratio method show a rate below 1/2
        assert rate(claims.claim_ratio_collapse, {"contradicts"}, collapse=lambda s, v: p) >= 0.75


def test_ratio_collapse_power_and_contradiction_error():
    # GRPO alone collapses in 70% of its low-precision runs, DRPO never: the stated detectable effect
    grpo_most = dict(collapse=lambda s, v: 0.7 if (v == "grpo" and s in LOW) else 0.0)
    assert rate(claims.claim_ratio_collapse, {"supports"}, **grpo_most) >= 0.75
    # both ratio methods at exactly half: the claim holds at its boundary, "contradicts" is the error
    both_half = dict(collapse=lambda s, v: 0.5 if (v in ("grpo", "spo") and s in LOW) else 0.0)
    assert false_claims_within_alpha(claims.claim_ratio_collapse, {"contradicts"}, **both_half)


def test_dppo_slower_rule():
    assert false_claims_within_alpha(claims.claim_dppo_slower, {"supports", "contradicts"})
    effect = mde(N, POOLED_SD, k=6)  # the family holds 2 DPPO variants x 2 metrics + 2 collapse tests
    assert effect == pytest.approx(0.083, abs=0.001)  # the number docs/study.md states
    ahead = dict(shift=lambda s, v: effect if v == "drpo" else 0.0)
    assert rate(claims.claim_dppo_slower, {"supports"}, **ahead) >= 0.75


# the least favourable null for "pg_is drops": it neither gains nor loses (gain exactly 0) while
# DRPO is far ahead, so only the gain test stands between the data and a call
PG_IS_FLAT = dict(shift=lambda s, v: -0.1 if v == "pg_is" else 0.1 if v == "drpo" else 0.0)


def test_pg_is_drops_rule():
    assert false_claims_within_alpha(claims.claim_pg_is_drops, {"supports"}, **PG_IS_FLAT)
    effect = mde(N, PAIR_SD, k=len(GRID["settings"]))  # per setting, Holm across the settings
    assert effect == pytest.approx(0.087, abs=0.001)
    drop = dict(shift=lambda s, v: -0.1 - effect if v == "pg_is" else 0.0)  # gain - 0.1 - effect < 0
    assert rate(claims.claim_pg_is_drops, {"supports"}, **drop) >= 0.75
    # pg_is loses exactly the margin everywhere: "it does not drop" would be the error
    at_margin = dict(shift=lambda s, v: -0.1 - MARGIN if v == "pg_is" else 0.0)
    assert false_claims_within_alpha(claims.claim_pg_is_drops, {"contradicts"}, **at_margin)
    assert rate(claims.claim_pg_is_drops, {"contradicts"}) >= 0.75  # no drop at all: shown


def test_mask_matches_rule():
    # a true difference of exactly the margin: "matches" is the error
    at_margin = dict(shift=lambda s, v: MARGIN if v == "mask_drpo" else 0.0)
    assert false_claims_within_alpha(claims.claim_mask_matches, {"supports"}, **at_margin)
    # identical methods: no "contradicts"
    assert false_claims_within_alpha(claims.claim_mask_matches, {"contradicts"})
    # identical methods: equivalence within the margin is shown about 70% of the time over two
    # settings (docs/study.md states it), so the rule is not a lack-of-power "matches"
    assert rate(claims.claim_mask_matches, {"supports"}) >= 0.65
    effect = mde(N, POOLED_SD, k=2)
    worse = dict(shift=lambda s, v: -2 * MARGIN if v == "mask_drpo" else 0.0)
    assert 2 * MARGIN > effect and rate(claims.claim_mask_matches, {"contradicts"}, **worse) >= 0.75


def test_abs_adv_rule():
    assert false_claims_within_alpha(claims.claim_abs_adv, {"supports"})
    effect = mde(N, PAIR_SD, k=2)  # one setting, two metrics
    assert effect == pytest.approx(0.087, abs=0.001)
    hurts = dict(shift=lambda s, v: -effect if v == "drpo-noadv" else 0.0)
    assert rate(claims.claim_abs_adv, {"supports"}, **hurts) >= 0.75
    at_margin = dict(shift=lambda s, v: -MARGIN if v == "drpo-noadv" else 0.0)
    assert false_claims_within_alpha(claims.claim_abs_adv, {"contradicts"}, **at_margin)


def test_threshold_rule():
    assert false_claims_within_alpha(claims.claim_threshold, {"supports"})
    # the fitted change across the sweep has per-seed sd SIGMA * sqrt(range^2 / sum of centred log^2)
    x = np.log([0.05, 0.15, 1.0, 12.5])
    sd = SIGMA * (x.max() - x.min()) / math.sqrt(((x - x.mean()) ** 2).sum())
    effect = mde(N, sd, k=2)
    assert effect == pytest.approx(0.081, abs=0.001)
    assert rate(claims.claim_threshold, {"supports"}, trend=effect) >= 0.75
    assert false_claims_within_alpha(claims.claim_threshold, {"contradicts"}, trend=MARGIN)


if __name__ == "__main__":  # the table in docs/study.md: python tests/study/test_study_power.py [REPS]
    import sys

    REPS = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    K = len(GRID["settings"])
    x = np.log([0.05, 0.15, 1.0, 12.5])
    trend_sd = SIGMA * (x.max() - x.min()) / math.sqrt(((x - x.mean()) ** 2).sum())
    rows = [
        ("ratio_collapse", "supports", "all collapse at rate 0.3", claims.claim_ratio_collapse,
         dict(collapse=lambda s, v: 0.3)),
        ("ratio_collapse", "supports", "GRPO collapses in 70% of low-precision runs, DRPO never",
         claims.claim_ratio_collapse, dict(collapse=lambda s, v: 0.7 if (v == "grpo" and s in LOW) else 0.0)),
        ("dppo_slower", "supports or contradicts", "no effect", claims.claim_dppo_slower, {}),
        ("dppo_slower", "supports", f"DRPO +{mde(N, POOLED_SD, 6):.3f} everywhere", claims.claim_dppo_slower,
         dict(shift=lambda s, v: mde(N, POOLED_SD, 6) if v == "drpo" else 0.0)),
        ("pg_is_drops", "supports", "pg_is gain 0 everywhere, DRPO 0.2 ahead", claims.claim_pg_is_drops,
         PG_IS_FLAT),
        ("pg_is_drops", "supports", f"pg_is gain -{mde(N, PAIR_SD, K):.3f} in every setting",
         claims.claim_pg_is_drops, dict(shift=lambda s, v: -0.1 - mde(N, PAIR_SD, K) if v == "pg_is" else 0.0)),
        ("mask_matches", "supports", f"Mask-DRPO off by the margin {MARGIN}", claims.claim_mask_matches,
         dict(shift=lambda s, v: MARGIN if v == "mask_drpo" else 0.0)),
        ("mask_matches", "contradicts", "no effect", claims.claim_mask_matches, {}),
        ("mask_matches", "supports", "no effect", claims.claim_mask_matches, {}),
        ("abs_adv", "supports", "no effect", claims.claim_abs_adv, {}),
        ("abs_adv", "supports", f"drpo-noadv -{mde(N, PAIR_SD, 2):.3f}", claims.claim_abs_adv,
         dict(shift=lambda s, v: -mde(N, PAIR_SD, 2) if v == "drpo-noadv" else 0.0)),
        ("threshold", "supports", "no trend", claims.claim_threshold, {}),
        ("threshold", "supports", f"change {mde(N, trend_sd, 2):.3f} across the sweep", claims.claim_threshold,
         dict(trend=mde(N, trend_sd, 2))),
    ]
    print(f"| claim | verdict counted | simulated truth | rate ({REPS} studies) |\n|---|---|---|---|")
    for key, counted, truth, fn, scenario in rows:
        r = rate(fn, set(counted.split(" or ")), seed=1, **scenario)
        print(f"| {key} | {counted} | {truth} | {r:.3f} |")
