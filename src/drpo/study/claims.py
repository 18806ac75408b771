"""The paper's comparative claims, each checked against a study's table by a stated rule.

A rule compares two cells seed by seed (cells of one setting share each seed's warm start
and eval set); a difference counts only when its mean over seeds is larger than
max(MIN_MARGIN, standard error of the per-seed differences), so one lucky seed or an eval
set's sampling noise does not decide a verdict. Verdicts: "supports", "contradicts",
"cannot tell" (mixed or within noise) and "not tested" (the grid lacks the cells).
These verdicts are mechanical; docs/results/README.md discusses them.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from drpo.objectives import get_method
from drpo.study.stats import CellStats

MIN_MARGIN = 0.02  # accuracy points: below this a difference is not called
LOW_PRECISION = ("bf16", "fp8_e4m3", "fp8_e5m2", "fp8_e2e")


@dataclass
class Claim:
    key: str
    statement: str
    rule: str
    verdict: str = "not tested"
    evidence: list[str] = field(default_factory=list)


def margin(a: tuple[float, float], b: tuple[float, float], na: int, nb: int) -> float:
    se = math.sqrt(a[1] ** 2 / na + b[1] ** 2 / nb)
    return max(MIN_MARGIN, se)


def difference(a: CellStats, b: CellStats, metric: str) -> tuple[float, float]:
    """(mean difference a - b, margin) on metric final|best|auc|gain. Paired by seed when both
    cells hold the same seeds (they share each seed's warm start and eval set, so pairing
    removes the warm start's seed-to-seed spread): the margin is then max(MIN_MARGIN, standard
    error of the per-seed differences); otherwise the unpaired standard error."""
    seeds = sorted(set(a.per_seed) & set(b.per_seed))
    if seeds and len(seeds) == len(a.per_seed) == len(b.per_seed):
        diffs = [a.per_seed[s][metric] - b.per_seed[s][metric] for s in seeds]
        mean = sum(diffs) / len(diffs)
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
        return mean, max(MIN_MARGIN, se)
    ma, mb = getattr(a, metric), getattr(b, metric)
    return ma[0] - mb[0], margin(ma, mb, a.n, b.n)


def compare(a: CellStats, b: CellStats, metric: str) -> str:
    """'better' / 'worse' / 'tie' for cell a against cell b (see `difference`)."""
    diff, m = difference(a, b, metric)
    return "better" if diff > m else "worse" if diff < -m else "tie"


def _dfmt(a: CellStats, b: CellStats, metric: str) -> str:
    diff, m = difference(a, b, metric)
    return f"diff {diff:+.3f} (margin {m:.3f})"


def _majority(k: int, n: int) -> bool:
    return n > 0 and k * 2 > n


def _fmt(c: CellStats, metric: str) -> str:
    m, s = getattr(c, metric)
    return f"{m:.3f}±{s:.3f}"


class _Index:
    """Cells by (setting, variant) and the grid's main variant name for each method."""

    def __init__(self, cells: Mapping[str, Sequence[CellStats]], grid: Mapping):
        self.cells = {(c.setting, c.variant): c for cs in cells.values() for c in cs}
        self.settings = list(cells)
        self.main = {v["method"]: v["name"] for v in grid.get("methods", [])}
        self.grid_settings = grid.get("settings", {})
        self.sweeps = grid.get("sweeps", [])
        self.variant_defs = {v["name"]: v for v in grid.get("methods", [])}
        for sw in self.sweeps:
            for v in sw.get("variants", []):
                self.variant_defs[v["name"]] = v

        # a setting where every cell collapsed (e.g. a learning rate too large for any method)
        # cannot separate the methods; it is left out of every verdict and listed as such
        self.all_collapsed = [s for s, cs in cells.items() if cs and all(_majority(c.collapsed, c.n) for c in cs)]
        self.settings = [s for s in self.settings if s not in self.all_collapsed]

    def get(self, setting: str, method: str) -> CellStats | None:
        name = self.main.get(method)
        return self.cells.get((setting, name)) if name else None

    def low_precision_settings(self) -> list[str]:
        # settings that change only the precision: mismatch from rounding alone
        out = []
        for s in self.settings:
            ov = self.grid_settings.get(s, {})
            if ov.get("rollout.precision") in LOW_PRECISION and set(ov) == {"rollout.precision"}:
                out.append(s)
        return out


def claim_ratio_collapse(ix: _Index) -> Claim:
    c = Claim("ratio_collapse", "Ratio methods (GRPO, SPO) collapse under low-precision rollouts; DRPO does not.",
              "In the settings that only lower the rollout precision, a method 'collapses' in a setting when most "
              "seeds collapsed. Supports: GRPO or SPO collapses in some such setting and DRPO in none. Contradicts: "
              "no seed of GRPO or SPO collapses in any such setting. Otherwise cannot tell.")
    settings = ix.low_precision_settings()
    ratio_any, ratio_major, drpo_major, tested = False, False, False, False
    for s in settings:
        d = ix.get(s, "drpo")
        for m in ("grpo", "spo"):
            cell = ix.get(s, m)
            if cell is None or d is None:
                continue
            tested = True
            ratio_any |= cell.collapsed > 0
            ratio_major |= _majority(cell.collapsed, cell.n)
            c.evidence.append(f"{s}: {m} collapsed {cell.collapsed}/{cell.n}, final {_fmt(cell, 'final')}; "
                              f"drpo collapsed {d.collapsed}/{d.n}, final {_fmt(d, 'final')}")
        if d is not None:
            drpo_major |= _majority(d.collapsed, d.n)
    if tested:
        c.verdict = ("supports" if ratio_major and not drpo_major else
                     "contradicts" if not ratio_any else "cannot tell")
    return c


def claim_dppo_slower(ix: _Index) -> Claim:
    c = Claim("dppo_slower", "DPPO is stable but converges slower and lower than DRPO.",
              "Per setting, DRPO vs each DPPO variant on AUC (speed) and final accuracy (level), a difference "
              "counting only beyond the margin. Supports: DPPO never collapses by majority, and DRPO is better on "
              "AUC or final in most (setting, DPPO variant) pairs and worse on neither in any. Contradicts: DPPO "
              "collapses somewhere, or DRPO is worse on AUC or final in most pairs. Otherwise cannot tell.")
    pairs = better = worse_any = worse = 0
    dppo_collapse = False
    for s in ix.settings:
        d = ix.get(s, "drpo")
        for m in ("dppo_tv", "dppo_kl"):
            p = ix.get(s, m)
            if p is None or d is None:
                continue
            pairs += 1
            auc, fin = compare(d, p, "auc"), compare(d, p, "final")
            dppo_collapse |= _majority(p.collapsed, p.n)
            better += "better" in (auc, fin)
            worse_any += "worse" in (auc, fin)
            worse += "worse" in (auc, fin) and "better" not in (auc, fin)
            c.evidence.append(f"{s}: drpo vs {m}: AUC {_fmt(d, 'auc')} vs {_fmt(p, 'auc')}, {_dfmt(d, p, 'auc')} "
                              f"({auc}); final {_fmt(d, 'final')} vs {_fmt(p, 'final')}, {_dfmt(d, p, 'final')} "
                              f"({fin}); {m} collapsed {p.collapsed}/{p.n}")
    if pairs:
        if not dppo_collapse and _majority(better, pairs) and worse_any == 0:
            c.verdict = "supports"
        elif dppo_collapse or _majority(worse, pairs):
            c.verdict = "contradicts"
        else:
            c.verdict = "cannot tell"
        c.evidence.append(f"DRPO better in {better}/{pairs} pairs, worse (and not better) in {worse}/{pairs}")
    return c


def _fell(c: CellStats) -> bool:
    """Mean final accuracy below the warm start beyond max(MIN_MARGIN, SE of the per-run gains)."""
    m, sd = c.gain
    se = sd / math.sqrt(c.n) if c.n > 1 else 0.0
    return -m > max(MIN_MARGIN, se)


def claim_pg_is_drops(ix: _Index) -> Claim:
    c = Claim("pg_is_drops", "The unregularized surrogate (pg_is) drops in several settings (where DRPO does not).",
              "pg_is 'drops' in a setting when its mean gain (final minus warm-start accuracy, per run) is "
              "below -max(0.02, its standard error) (or most seeds collapsed) and DRPO's final accuracy is better than pg_is's "
              "(so the drop is the surrogate's, not the setting's). Supports: drops in >= 2 settings. "
              "Contradicts: drops in none. Cannot tell: exactly one.")
    drops = tested = 0
    for s in ix.settings:
        p, d = ix.get(s, "pg_is"), ix.get(s, "drpo")
        if p is None or d is None:
            continue
        tested += 1
        fell = _fell(p) or _majority(p.collapsed, p.n)
        drop = fell and compare(d, p, "final") == "better"
        drops += drop
        c.evidence.append(f"{s}: pg_is gain over warm start {_fmt(p, 'gain')}, final {_fmt(p, 'final')}, "
                          f"collapsed {p.collapsed}/{p.n}; drpo final {_fmt(d, 'final')}, "
                          f"drpo - pg_is final {_dfmt(d, p, 'final')}: "
                          f"{'drop' if drop else 'fell, but DRPO no better' if fell else 'no drop'}")
    if tested:
        c.verdict = "supports" if drops >= 2 else "contradicts" if drops == 0 else "cannot tell"
    return c


def claim_mask_matches(ix: _Index) -> Claim:
    c = Claim("mask_matches", "Mask-DRPO (DPPO's gradient inside the boundary, DRPO's outside) matches DRPO.",
              "Per setting, Mask-DRPO vs DRPO on final accuracy and AUC. Supports: a tie on both in every setting. "
              "Contradicts: a difference on either in most settings. Otherwise cannot tell.")
    n = differ = ties = 0
    for s in ix.settings:
        d, m = ix.get(s, "drpo"), ix.get(s, "mask_drpo")
        if d is None or m is None:
            continue
        n += 1
        fin, auc = compare(m, d, "final"), compare(m, d, "auc")
        ties += fin == auc == "tie"
        differ += fin != "tie" or auc != "tie"
        c.evidence.append(f"{s}: mask_drpo final {_fmt(m, 'final')} vs drpo {_fmt(d, 'final')}, "
                          f"{_dfmt(m, d, 'final')} ({fin}); AUC {_fmt(m, 'auc')} vs {_fmt(d, 'auc')}, "
                          f"{_dfmt(m, d, 'auc')} ({auc})")
    if n:
        c.verdict = "supports" if ties == n else "contradicts" if _majority(differ, n) else "cannot tell"
    return c


def _drpo_variants(ix: _Index, setting: str) -> list[tuple[str, dict]]:
    """DRPO variants with results in `setting`, with their parameters resolved (defaults filled)."""
    method = get_method("drpo")
    return [(name, method.resolve_params(v.get("params", {}))) for name, v in ix.variant_defs.items()
            if v["method"] == "drpo" and (setting, name) in ix.cells]


def claim_abs_adv(ix: _Index) -> Claim:
    c = Claim("abs_adv", "Removing the |A| factor from DRPO's penalty hurts.",
              "In each setting with a DRPO variant using advantage_weighted=false, compare it with the DRPO variant "
              "of the same delta and the |A| factor, on final accuracy and AUC. Supports: worse on either and "
              "better on neither, in every such setting. Contradicts: better on either and worse on neither, in "
              "every such setting. Otherwise cannot tell.")
    outcomes = []
    for s in ix.settings:
        variants = _drpo_variants(ix, s)
        for name, params in variants:
            if params["advantage_weighted"]:
                continue
            ref = next((n for n, p in variants if p["advantage_weighted"] and p["delta"] == params["delta"]), None)
            if ref is None:
                continue
            a, b = ix.cells[(s, name)], ix.cells[(s, ref)]
            fin, auc = compare(a, b, "final"), compare(a, b, "auc")
            res = ("worse" if "worse" in (fin, auc) and "better" not in (fin, auc) else
                   "better" if "better" in (fin, auc) and "worse" not in (fin, auc) else "mixed/tie")
            outcomes.append(res)
            c.evidence.append(f"{s}: {name} vs {ref}: final {_fmt(a, 'final')} vs {_fmt(b, 'final')}, "
                              f"{_dfmt(a, b, 'final')} ({fin}); AUC {_fmt(a, 'auc')} vs {_fmt(b, 'auc')}, "
                              f"{_dfmt(a, b, 'auc')} ({auc})")
    if outcomes:
        c.verdict = ("supports" if all(o == "worse" for o in outcomes) else
                     "contradicts" if all(o == "better" for o in outcomes) else "cannot tell")
    return c


def claim_threshold(ix: _Index) -> Claim:
    c = Claim("threshold", "DRPO's threshold delta matters (the paper leaves its sensitivity to an appendix).",
              "In each setting with >= 2 DRPO deltas (with the |A| factor), the spread of mean final accuracy and "
              "of AUC across deltas. Supports: in some setting the best and worst delta differ beyond the margin on "
              "final or AUC. Otherwise cannot tell (no measurable sensitivity at this scale).")
    tested = sensitive = False
    for s in ix.settings:
        vs = [(n, p) for n, p in _drpo_variants(ix, s) if p["advantage_weighted"]]
        if len(vs) < 2:
            continue
        tested = True
        cells = sorted(((p["delta"], ix.cells[(s, n)]) for n, p in vs), key=lambda t: t[0])
        parts = [f"delta={d:g}: final {_fmt(x, 'final')}, AUC {_fmt(x, 'auc')}" for d, x in cells]
        for metric in ("final", "auc"):
            hi = max(cells, key=lambda t: getattr(t[1], metric)[0])[1]
            lo = min(cells, key=lambda t: getattr(t[1], metric)[0])[1]
            sensitive |= compare(hi, lo, metric) == "better"
        c.evidence.append(f"{s}: " + "; ".join(parts))
    if tested:
        c.verdict = "supports" if sensitive else "cannot tell"
    return c


CLAIMS = (claim_ratio_collapse, claim_dppo_slower, claim_pg_is_drops, claim_mask_matches, claim_abs_adv,
          claim_threshold)


def check_claims(cells: Mapping[str, Sequence[CellStats]], grid: Mapping) -> list[Claim]:
    ix = _Index(cells, grid)
    claims = [fn(ix) for fn in CLAIMS]
    if ix.all_collapsed:
        note = (f"left out: setting(s) {', '.join(ix.all_collapsed)}, where every method collapsed "
                "(they cannot separate the methods)")
        for c in claims:
            c.evidence.append(note)
    return claims
