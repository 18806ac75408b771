"""The paper's comparative claims, each decided by a rule fixed before the study runs: a family
of seed-paired tests at level ALPHA, Holm-corrected where a claim is called on "some" of its
tests, each at ALPHA where it needs "every" one (an intersection-union test), equivalence within
+-MARGIN by TOST, collapse by an exact sign test. Verdicts: "supports", "contradicts", "cannot
tell" (no decision at this power) and "not tested" (the grid lacks the cells). docs/study.md
states the rules, the detectable effects and the simulated error rates."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import scipy.stats

from drpo.objectives import get_method
from drpo.precisions import PRECISIONS
from drpo.study.grid import variant_entries
from drpo.study.stats import ALPHA, CellStats, holm, log_slope, mde, paired_t, sign_test, tost

MARGIN = 0.05  # equivalence margin, accuracy points (fraction correct)
METRICS = ("final", "auc")
LOW_PRECISION = tuple(p for p in PRECISIONS if p != "fp32")  # every precision that rounds
# Overrides that take training off-policy by the policy's own updates: stale rollout weights,
# more optimizer steps per rollout batch, a larger step size.
STRESS_KEYS = ("rollout.sync_every", "optim.updates_per_rollout", "optim.lr")


@dataclass
class Test:
    """One test of a claim's family; `p_holm` filled in once the family is complete."""

    name: str
    p: float
    estimate: float = float("nan")
    ci: tuple[float, float] = (float("nan"), float("nan"))
    n: int = 0
    sd: float = float("nan")  # per-seed spread of what was tested
    detail: str = ""
    p_holm: float = float("nan")

    def line(self, k: int) -> str:
        p = f"p = {self.p:.3f}" + (f", Holm p = {self.p_holm:.3f}" if k > 1 else "")
        if self.detail:
            return f"{self.name}: {self.detail}, {p}"
        return (f"{self.name}: {self.estimate:+.3f} (95% CI {self.ci[0]:+.3f} .. {self.ci[1]:+.3f}, {self.n} seeds), "
                f"{p}; detectable with 80% power: {mde(self.n, self.sd, k):.3f}")


@dataclass
class Claim:
    key: str
    statement: str
    rule: str
    verdict: str = "not tested"
    evidence: list[str] = field(default_factory=list)
    tests: list[Test] = field(default_factory=list)


def t_test(name: str, x: np.ndarray) -> Test:
    t = paired_t(x)
    lo, hi = t.ci()
    return Test(name, float(t.p), float(t.mean), (float(lo), float(hi)), len(x), float(np.std(x, ddof=1)))


def finish(c: Claim, tests: list[Test], eq: Sequence[float] | None = None) -> list[bool]:
    """`tests` become the claim's family: Holm across it, each test's line (with its equivalence
    p-value, where given) into the evidence. Returns which tests reject at ALPHA."""
    adj = holm([t.p for t in tests])
    for t, a in zip(tests, adj):
        t.p_holm = float(a)
    c.tests = tests
    c.evidence += [t.line(len(tests)) + ("" if eq is None else f"; equivalence p = {eq[i]:.3f}")
                   for i, t in enumerate(tests)]
    return [bool(a <= ALPHA) for a in adj]


def equivalent(eq: Sequence[float]) -> bool:
    """Every metric's difference equivalent to 0 within +-MARGIN (TOST)."""
    return len(eq) == len(METRICS) and all(q <= ALPHA for q in eq)


def pooled_diff(pairs: Sequence[tuple[CellStats, CellStats]], metric: str) -> np.ndarray:
    """Per seed, a - b on `metric` averaged over `pairs`, on the seeds every cell holds."""
    seeds = sorted(set.intersection(*(set(a.per_seed) & set(b.per_seed) for a, b in pairs))) if pairs else []
    return np.mean([a.values(metric, seeds) - b.values(metric, seeds) for a, b in pairs], 0) if seeds else np.zeros(0)


def _fmt(c: CellStats, metric: str) -> str:
    m, s = c.mean_sd(metric)
    return f"{m:.3f}±{s:.3f}"


class _Index:
    """Cells by (setting, variant) and the grid's main variant name for each method."""

    def __init__(self, cells: Mapping[str, Sequence[CellStats]], grid: Mapping):
        self.cells = {(c.setting, c.variant): c for cs in cells.values() for c in cs}
        self.settings = list(cells)
        self.main = {v["method"]: v["name"] for v in grid.get("methods", [])}
        self.grid_settings = grid.get("settings", {})
        self.variant_defs = {v["name"]: v for v in variant_entries(grid)}

    def get(self, setting: str, method: str) -> CellStats | None:
        name = self.main.get(method)
        return self.cells.get((setting, name)) if name else None

    def pairs(self, a: str, b: str, settings: Sequence[str] | None = None) -> list[tuple[CellStats, CellStats]]:
        out = [(self.get(s, a), self.get(s, b)) for s in (self.settings if settings is None else settings)]
        return [(x, y) for x, y in out if x is not None and y is not None]

    def low_precision_settings(self) -> list[str]:
        # settings that change only the rollout precision: mismatch from rounding alone
        return [s for s in self.settings if set(self.grid_settings.get(s, {})) == {"rollout.precision"}
                and self.grid_settings[s]["rollout.precision"] in LOW_PRECISION]

    def stress_settings(self) -> list[str]:
        # settings that change staleness, updates per batch or the learning rate
        return [s for s in self.settings if set(self.grid_settings.get(s, {})) & set(STRESS_KEYS)]

    def drpo_variants(self, setting: str) -> list[tuple[str, dict]]:
        """DRPO variants with results in `setting`, parameters resolved (defaults filled)."""
        method = get_method("drpo")
        return [(name, method.resolve_params(v.get("params", {}))) for name, v in self.variant_defs.items()
                if v["method"] == "drpo" and (setting, name) in self.cells]


def _difference_tests(pairs, label: str) -> tuple[list[Test], list[float]]:
    """Per metric: the t-test of the pooled per-seed difference and its equivalence p-value."""
    tests, eq = [], []
    for metric in METRICS:
        x = pooled_diff(pairs, metric)
        if len(x) >= 2:
            tests.append(t_test(f"{label}, {metric}", x))
            eq.append(float(tost(x, MARGIN)))
    return tests, eq


def collapse_test(pairs, a_name: str, b_name: str) -> tuple[Test, np.ndarray]:
    """Sign test that the first cells' runs collapse more often than the seed-paired runs of the
    second, pooled over `pairs`; also returns the first cells' collapse indicators."""
    seeds = [sorted(set(a.per_seed) & set(b.per_seed)) for a, b in pairs]
    a = np.concatenate([x.values("collapsed", s) for (x, _), s in zip(pairs, seeds)])
    b = np.concatenate([y.values("collapsed", s) for (_, y), s in zip(pairs, seeds)])
    only_a, only_b, p = sign_test(a, b)
    return Test(f"{a_name} collapses more often than {b_name}", p,
                detail=f"{a_name} collapsed {int(a.sum())}/{len(a)}, {b_name} {int(b.sum())}/{len(b)}; discordant "
                       f"pairs {only_a} {a_name}-only vs {only_b} {b_name}-only"), a


def _describe(c: Claim, pairs, a_name: str, b_name: str) -> None:
    for a, b in pairs:
        c.evidence.append(f"{a.setting}: {a_name} final {_fmt(a, 'final')}, AUC {_fmt(a, 'auc')}, collapsed "
                          f"{a.collapsed}/{a.n}; {b_name} final {_fmt(b, 'final')}, AUC {_fmt(b, 'auc')}, "
                          f"collapsed {b.collapsed}/{b.n}")


COLLAPSE_RULE = ("an exact one-sided sign test that its runs collapse more often than DRPO's runs of the same "
                 "seed and setting; Holm across the two. Supports: either is significant. Contradicts: for both, "
                 "fewer than half of their runs collapse, significantly (exact binomial test against 1/2 at 0.05). "
                 "Otherwise cannot tell.")


def _collapse_claim(c: Claim, ix: _Index, settings: Sequence[str]) -> Claim:
    """GRPO and SPO against DRPO on seed-paired collapses over `settings` (COLLAPSE_RULE)."""
    tests, rates = [], []
    for m in ("grpo", "spo"):
        pairs = ix.pairs(m, "drpo", settings)
        if not pairs:
            continue
        _describe(c, pairs, m, "drpo")
        test, a = collapse_test(pairs, m, "drpo")
        tests.append(test)
        rates.append(float(scipy.stats.binom.cdf(int(a.sum()), len(a), 0.5)))  # P(X <= k) at collapse rate 1/2
    if tests:
        reject = finish(c, tests)
        c.evidence.append("P(so few collapses | half collapse): " + ", ".join(f"{r:.3f}" for r in rates))
        c.verdict = ("supports" if any(reject) else
                     "contradicts" if len(rates) == 2 and all(r <= ALPHA for r in rates) else "cannot tell")
    return c


def claim_ratio_collapse(ix: _Index) -> Claim:
    c = Claim("ratio_collapse", "Ratio methods (GRPO, SPO) collapse under low-precision rollouts; DRPO does not.",
              "Over the settings that only lower the rollout precision, for GRPO and for SPO: " + COLLAPSE_RULE)
    return _collapse_claim(c, ix, ix.low_precision_settings())


def claim_stress_collapse(ix: _Index) -> Claim:
    c = Claim("stress_collapse", "Under stale rollouts, many updates per batch or a large learning rate, ratio "
              "methods (GRPO, SPO) collapse more often than DRPO.",
              f"Over the settings that change {', '.join(STRESS_KEYS)}, for GRPO and for SPO: " + COLLAPSE_RULE)
    return _collapse_claim(c, ix, ix.stress_settings())


def claim_dppo_slower(ix: _Index) -> Claim:
    c = Claim("dppo_slower", "DPPO is stable but converges slower and lower than DRPO.",
              "For DPPO-TV and DPPO-KL: DRPO minus DPPO on AUC (speed) and on final accuracy (level), per seed, "
              "averaged over all settings, paired t-tests; and a sign test that DPPO collapses more often than "
              "DRPO; Holm across all these tests. Supports: DRPO significantly ahead on some metric, behind on "
              "none, and DPPO not collapsing more. Contradicts: DRPO significantly behind on some metric, or DPPO "
              "collapsing significantly more. Otherwise cannot tell.")
    tests, kinds = [], []
    for m in ("dppo_tv", "dppo_kl"):
        pairs = ix.pairs("drpo", m)
        if not pairs:
            continue
        _describe(c, pairs, "drpo", m)
        diffs, _ = _difference_tests(pairs, f"drpo - {m}")
        tests += diffs
        kinds += ["diff"] * len(diffs)
        tests.append(collapse_test([(p, d) for d, p in pairs], m, "drpo")[0])
        kinds.append("collapse")
    if tests:
        reject = finish(c, tests)
        ahead = any(r and k == "diff" and t.estimate > 0 for t, r, k in zip(tests, reject, kinds))
        behind = any(r and k == "diff" and t.estimate < 0 for t, r, k in zip(tests, reject, kinds))
        unstable = any(r and k == "collapse" for r, k in zip(reject, kinds))
        c.verdict = ("supports" if ahead and not behind and not unstable else
                     "contradicts" if behind or unstable else "cannot tell")
    return c


def claim_pg_is_drops(ix: _Index) -> Claim:
    c = Claim("pg_is_drops", "The unregularized surrogate (pg_is) drops in several settings (where DRPO does not).",
              "pg_is 'drops' in a setting when both its per-seed gain (final minus warm-start accuracy) is "
              "significantly below 0 and DRPO's final accuracy is significantly above pg_is's (one-sided paired "
              "t-tests; the setting's p is the larger of the two), Holm across settings. Supports: drops in >= 2 "
              "settings. Contradicts: in every setting pg_is's gain is significantly above -0.05 (it does not "
              "lose more than the margin). Otherwise cannot tell.")
    tests, noninf = [], []
    for d, p in ix.pairs("drpo", "pg_is"):
        seeds = sorted(set(d.per_seed) & set(p.per_seed))
        if len(seeds) < 2:
            continue
        gain, ahead = paired_t(p.values("gain", seeds)), paired_t(d.values("final", seeds) - p.values("final", seeds))
        tests.append(Test(f"{d.setting}: pg_is drops", float(max(gain.p_less, ahead.p_greater)),
                          detail=f"pg_is gain {float(gain.mean):+.3f} (one-sided p {float(gain.p_less):.3f}), "
                                 f"drpo - pg_is final {float(ahead.mean):+.3f} (one-sided p "
                                 f"{float(ahead.p_greater):.3f}), pg_is collapsed {p.collapsed}/{p.n}"))
        noninf.append(float(paired_t(p.values("gain", seeds), -MARGIN).p_greater))
    if tests:
        reject = finish(c, tests)
        c.verdict = ("supports" if sum(reject) >= 2 else
                     "contradicts" if all(q <= ALPHA for q in noninf) else "cannot tell")
    return c


def _equivalence_claim(c: Claim, pairs, a_name: str, b_name: str) -> Claim:
    """a - b on every metric over `pairs`: supports if equivalent within +-MARGIN on all (TOST),
    contradicts if any difference is significant (Holm), else cannot tell."""
    tests, eq = _difference_tests(pairs, f"{a_name} - {b_name}")
    if tests:
        _describe(c, pairs, a_name, b_name)
        reject = finish(c, tests, eq)
        c.verdict = "supports" if equivalent(eq) else "contradicts" if any(reject) else "cannot tell"
    return c


def claim_mask_matches(ix: _Index) -> Claim:
    c = Claim("mask_matches", "Mask-DRPO (DPPO's gradient inside the boundary, DRPO's outside) matches DRPO.",
              f"Mask-DRPO minus DRPO on final accuracy and AUC, per seed, averaged over all settings. Supports: "
              f"equivalent within +-{MARGIN} on both (TOST at 0.05 each). Contradicts: otherwise, a significant "
              f"difference on either (paired t, Holm across the two). Otherwise cannot tell.")
    return _equivalence_claim(c, ix.pairs("mask_drpo", "drpo"), "mask_drpo", "drpo")


def claim_abs_adv(ix: _Index) -> Claim:
    c = Claim("abs_adv", "Removing the |A| factor from DRPO's penalty hurts.",
              f"DRPO without the |A| factor minus DRPO with it at the same delta, on final accuracy and AUC, per "
              f"seed, averaged over the settings that have both; paired t-tests, Holm across the two. Supports: "
              f"significantly worse on some metric and better on none. Contradicts: significantly better on some "
              f"metric, or equivalent within +-{MARGIN} on both (TOST). Otherwise cannot tell.")
    pairs = []
    for s in ix.settings:
        variants = ix.drpo_variants(s)
        for name, params in variants:
            if params["advantage_weighted"]:
                continue
            ref = next((n for n, p in variants if p["advantage_weighted"] and p["delta"] == params["delta"]), None)
            if ref is not None:
                pairs.append((ix.cells[(s, name)], ix.cells[(s, ref)]))
    tests, eq = _difference_tests(pairs, "without |A| - with |A|")
    if tests:
        _describe(c, pairs, "without |A|", "with |A|")
        reject = finish(c, tests, eq)
        worse = any(r and t.estimate < 0 for t, r in zip(tests, reject))
        better = any(r and t.estimate > 0 for t, r in zip(tests, reject))
        c.verdict = ("supports" if worse and not better else
                     "contradicts" if better or equivalent(eq) else "cannot tell")
    return c


def sweep_change(deltas: Sequence[float], ys: np.ndarray) -> np.ndarray:
    """The least-squares change of ys (last axis: one value per delta) across the swept range:
    slope on log(delta) x log(max/min). A trend over all deltas, not a pick of the extremes."""
    return log_slope(deltas, ys) * math.log(max(deltas) / min(deltas))


def claim_threshold(ix: _Index) -> Claim:
    c = Claim("threshold", "DRPO's threshold delta matters (the paper leaves its sensitivity to an appendix).",
              f"In each setting with >= 3 DRPO deltas (with the |A| factor): per seed, the least-squares slope of "
              f"final accuracy (and of AUC) on log(delta), times the log-range of the sweep (the fitted change "
              f"across it); averaged over such settings; t-test against 0, Holm across the two metrics. Supports: "
              f"either trend significant. Contradicts: both changes equivalent to 0 within +-{MARGIN} (TOST). "
              f"Otherwise cannot tell.")
    sweeps = []
    for s in ix.settings:
        vs = sorted(((p["delta"], ix.cells[(s, n)]) for n, p in ix.drpo_variants(s) if p["advantage_weighted"]),
                    key=lambda t: t[0])
        if len(vs) >= 3:
            sweeps.append(vs)
            c.evidence.append(f"{s}: " + "; ".join(f"delta={d:g}: final {_fmt(x, 'final')}, AUC {_fmt(x, 'auc')}"
                                                   for d, x in vs))
    seeds = sorted(set.intersection(*(set(cell.per_seed) for vs in sweeps for _, cell in vs))) if sweeps else []
    tests, eq = [], []
    for metric in METRICS if len(seeds) >= 2 else ():
        x = np.mean([sweep_change([d for d, _ in vs], np.stack([cell.values(metric, seeds) for _, cell in vs], -1))
                     for vs in sweeps], axis=0)
        tests.append(t_test(f"fitted change across the delta sweep, {metric}", x))
        eq.append(float(tost(x, MARGIN)))
    if tests:
        reject = finish(c, tests, eq)
        c.verdict = "supports" if any(reject) else "contradicts" if equivalent(eq) else "cannot tell"
    return c


def claim_loose_is_pg_is(ix: _Index) -> Claim:
    default = float(get_method("drpo").params["delta"])
    c = Claim("loose_is_pg_is", f"DRPO at its registered (public implementations') threshold delta = {default:g} is "
              f"equivalent to the unregularized surrogate pg_is.",
              f"DRPO at delta = {default:g} (with the |A| factor) minus pg_is on final accuracy and AUC, per seed, "
              f"averaged over the settings that have both. Supports: equivalent within +-{MARGIN} on both (TOST at "
              f"0.05 each). Contradicts: a significant difference on either (paired t, Holm across the two). "
              f"Otherwise cannot tell.")
    pairs = []
    for s in ix.settings:
        name = next((n for n, p in ix.drpo_variants(s) if p["advantage_weighted"] and p["delta"] == default), None)
        pg_is = ix.get(s, "pg_is")
        if name is not None and pg_is is not None:
            pairs.append((ix.cells[(s, name)], pg_is))
    return _equivalence_claim(c, pairs, f"drpo delta={default:g}", "pg_is")


CLAIMS = (claim_ratio_collapse, claim_dppo_slower, claim_pg_is_drops, claim_mask_matches, claim_abs_adv,
          claim_threshold, claim_stress_collapse, claim_loose_is_pg_is)


def check_claims(cells: Mapping[str, Sequence[CellStats]], grid: Mapping) -> list[Claim]:
    ix = _Index(cells, grid)
    return [fn(ix) for fn in CLAIMS]


def design_note(n: int) -> str:
    """The detectable effects of a design with n seeds, for the report."""
    parts = ", ".join(f"{mde(n, 1.0, k):.2f} sd ({'one test' if k == 1 else f'Holm family of {k}'})"
                      for k in (1, 2, 4, 6))
    return (f"With {n} seeds a paired t-test detects with 80% power a true mean difference of {parts}, where sd "
            f"is the per-seed spread of the tested difference; each test below states its own.")
