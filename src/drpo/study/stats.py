"""Statistics of a comparison study: per-run numbers, per-cell aggregates and the seed-paired
tests the claims use (definitions and rules: docs/study.md). Pure functions over plain numbers,
so every value in the report can be checked by hand; the tests work over leading axes so whole
studies can be simulated (tests/study/test_study_power.py)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import scipy.stats

from drpo.train.metrics import declared

# The per-step metrics the study reads, checked against the trainer's metrics contract.
# LONG_TAIL: share of sampled response tokens with mu <= 0.01.
# BEYOND_POS / BEYOND_NEG: fractions of A>0 (A<0) tokens beyond the method's trust-region boundary
# in the harmful direction (0 for a method without one).
ACC, MISMATCH, LONG_TAIL, RESPONSE_LENGTH, TOKENS, BEYOND_POS, BEYOND_NEG = declared(
    "eval/accuracy", "mismatch/abs_log_ratio", "response/long_tail_frac", "response/length", "tokens/generated",
    "objective/beyond_boundary_pos_frac", "objective/beyond_boundary_neg_frac",
)
COLLAPSE_FRAC = 0.5
COLLAPSE_WINDOW = 2
ALPHA = 0.05
POWER = 0.8


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def series(rows: Iterable[Mapping], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one per-step metric (finite values only), sorted by step; the last
    row wins per step (a resumed run may log a step twice)."""
    by_step: dict[int, float] = {}
    for row in rows:
        v = row.get(key)
        if _finite(v):
            by_step[int(row["step"])] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def auc(steps: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area under (steps, values) divided by the step span; a single point is its value."""
    if len(steps) != len(values):
        raise ValueError(f"auc: {len(steps)} steps but {len(values)} values")
    if not steps:
        raise ValueError("auc: empty curve")
    if len(steps) == 1:
        return float(values[0])
    span = steps[-1] - steps[0]
    if span <= 0:
        raise ValueError(f"auc: steps must increase, got {list(steps)}")
    area = sum((steps[i + 1] - steps[i]) * (values[i] + values[i + 1]) / 2 for i in range(len(steps) - 1))
    return area / span


def is_collapsed(initial: float, accs: Sequence[float], *, diverged: bool = False,
                 collapse_frac: float = COLLAPSE_FRAC, window: int = COLLAPSE_WINDOW) -> bool:
    """Diverged, or the mean of the last `window` evals after the warm start below
    collapse_frac x the warm-start accuracy."""
    tail = list(accs[1:])[-window:] or list(accs[-1:])
    return bool(diverged or sum(tail) / len(tail) < collapse_frac * initial)


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if _finite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


@dataclass(frozen=True)
class RunStats:
    run_id: str
    setting: str
    variant: str
    seed: int
    initial: float
    final: float
    best: float
    auc: float
    collapsed: bool
    diverged: bool
    mean_mismatch: float  # mean over steps of the mean |log(pi/mu)| over response tokens
    long_tail: float  # mean over steps of the fraction of response tokens with mu <= 0.01
    response_length: float  # mean sampled response length (tokens)
    tokens: float  # generated tokens
    wall_s: float
    beyond_pos: float = float("nan")  # mean over steps of the A>0 tokens' beyond-boundary fraction
    beyond_neg: float = float("nan")  # and of the A<0 tokens'


def run_stats(run_id: str, setting: str, variant: str, seed: int, rows: Sequence[Mapping], summary: Mapping | None,
              wall_s: float, *, diverged: bool = False, collapse_frac: float = COLLAPSE_FRAC) -> RunStats:
    """One run's numbers. A finished run's own summary.json gives final/best accuracy, mean
    mismatch and tokens; the eval rows give the curve (AUC, collapse window). A diverged run
    has no summary: its rows (with accuracy 0 appended from the divergence on) give them."""
    steps, accs = series(rows, ACC)
    if not steps:
        raise ValueError(f"run {run_id}: metrics.jsonl has no '{ACC}' rows")
    s = summary or {}

    def pick(key, fallback):
        return float(s[key]) if _finite(s.get(key)) else fallback

    return RunStats(
        run_id=run_id, setting=setting, variant=variant, seed=seed,
        initial=pick("warmstart_accuracy", accs[0]),
        final=pick("final_accuracy", accs[-1]),
        best=pick("best_accuracy", max(accs)),
        auc=auc(steps, accs),
        collapsed=is_collapsed(accs[0], accs, diverged=diverged, collapse_frac=collapse_frac),
        diverged=diverged,
        mean_mismatch=pick("mean_mismatch", _mean(series(rows, MISMATCH)[1])),
        long_tail=pick("mean_long_tail_share", _mean(series(rows, LONG_TAIL)[1])),
        response_length=_mean(series(rows, RESPONSE_LENGTH)[1]),
        tokens=pick("tokens_generated", sum(series(rows, TOKENS)[1])),
        wall_s=float(wall_s),
        beyond_pos=_mean(series(rows, BEYOND_POS)[1]),
        beyond_neg=_mean(series(rows, BEYOND_NEG)[1]),
    )


@dataclass(frozen=True)
class CellStats:
    """One (setting, variant) cell over its seeds. `per_seed[seed][metric]` for metric in
    initial, final, best, auc, gain, collapsed; cells of one setting share each seed's warm start and eval set, so claims
    compare them seed by seed."""

    setting: str
    variant: str
    per_seed: dict[int, dict[str, float]]
    mean_mismatch: float = float("nan")
    long_tail: float = float("nan")
    response_length: float = float("nan")
    wall_s: float = float("nan")  # mean over runs (the first run of a seed also trains its warm start)
    tokens_per_s: float = float("nan")  # all generated tokens / all wall-clock
    beyond_pos: float = float("nan")  # mean over runs of RunStats.beyond_pos
    beyond_neg: float = float("nan")

    @property
    def beyond(self) -> float:
        """Share of tokens beyond the boundary in the harmful direction: the mean of the A>0 and
        A<0 fractions (the two signs weigh equally, as in the study's figure)."""
        return (self.beyond_pos + self.beyond_neg) / 2

    @property
    def n(self) -> int:
        return len(self.per_seed)

    @property
    def collapsed(self) -> int:
        return int(sum(v["collapsed"] for v in self.per_seed.values()))

    def values(self, metric: str, seeds: Sequence[int] | None = None) -> np.ndarray:
        seeds = sorted(self.per_seed) if seeds is None else seeds
        return np.array([self.per_seed[s][metric] for s in seeds], dtype=float)

    def mean_sd(self, metric: str) -> tuple[float, float]:
        v = self.values(metric)
        return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def cell_stats(runs: Sequence[RunStats]) -> CellStats:
    if not runs:
        raise ValueError("cell_stats: no runs")
    keys = {(r.setting, r.variant) for r in runs}
    if len(keys) != 1:
        raise ValueError(f"cell_stats: runs from several cells {sorted(keys)}")
    wall = sum(r.wall_s for r in runs)
    return CellStats(
        setting=runs[0].setting, variant=runs[0].variant,
        per_seed={r.seed: {"initial": r.initial, "final": r.final, "best": r.best, "auc": r.auc,
                           "gain": r.final - r.initial, "collapsed": float(r.collapsed)} for r in runs},
        mean_mismatch=_mean([r.mean_mismatch for r in runs]),
        long_tail=_mean([r.long_tail for r in runs]),
        response_length=_mean([r.response_length for r in runs]),
        wall_s=wall / len(runs),
        tokens_per_s=sum(r.tokens for r in runs) / wall if wall > 0 else float("nan"),
        beyond_pos=_mean([r.beyond_pos for r in runs]),
        beyond_neg=_mean([r.beyond_neg for r in runs]),
    )


# ---------------------------------------------------------------- tests


@dataclass(frozen=True)
class TTest:
    """A one-sample t-test on per-seed values (differences, gains or slopes); arrays when the
    input had leading axes."""

    mean: np.ndarray
    se: np.ndarray
    n: int
    p: np.ndarray  # two-sided, H0: mean == 0
    p_greater: np.ndarray  # one-sided, H0: mean <= 0
    p_less: np.ndarray  # one-sided, H0: mean >= 0

    def ci(self, level: float = 1 - ALPHA) -> tuple[np.ndarray, np.ndarray]:
        h = scipy.stats.t.ppf(1 - (1 - level) / 2, self.n - 1) * self.se
        return self.mean - h, self.mean + h


def paired_t(x, shift: float = 0.0) -> TTest:
    """t-test of mean(x) - shift over the last axis (the seeds). Identical values (zero spread)
    give p = 1 when their mean equals the shift and 0 otherwise."""
    x = np.asarray(x, dtype=float)
    n = x.shape[-1]
    if n < 2:
        raise ValueError(f"paired_t: needs >= 2 seeds, got {n}")
    mean = x.mean(-1)
    se = x.std(-1, ddof=1) / math.sqrt(n)
    d = mean - shift
    # zero spread (to 12 decimals: float rounding is no spread): an exact difference is decisive
    # (t = +-inf), an exact tie is not (t = 0)
    spread, tie = np.round(se, 12) > 0, np.sign(np.round(d, 12))
    t = np.where(spread, d / np.where(spread, se, 1.0), np.where(tie == 0, 0.0, np.copysign(np.inf, tie)))
    greater, less = scipy.stats.t.sf(t, n - 1), scipy.stats.t.cdf(t, n - 1)
    return TTest(mean, se, n, np.minimum(1.0, 2 * np.minimum(greater, less)), greater, less)


def tost(x, margin: float) -> np.ndarray:
    """p-value of equivalence: both one-sided tests mean > -margin and mean < +margin; p <= alpha
    iff the (1 - 2 alpha) interval lies inside (-margin, margin)."""
    return np.maximum(paired_t(x, -margin).p_greater, paired_t(x, margin).p_less)


def holm(p) -> np.ndarray:
    """Holm-adjusted p-values over the last axis (reject where adjusted p <= alpha); controls the
    family-wise error rate of one claim's tests."""
    p = np.asarray(p, dtype=float)
    k = p.shape[-1]
    order = np.argsort(p, axis=-1)
    ranked = np.take_along_axis(p, order, -1) * (k - np.arange(k))
    ranked = np.minimum(np.maximum.accumulate(ranked, axis=-1), 1.0)
    out = np.empty_like(ranked)
    np.put_along_axis(out, order, ranked, -1)
    return out


def sign_test(a_collapsed: Sequence[float], b_collapsed: Sequence[float]) -> tuple[int, int, float]:
    """(a-only, b-only, p): exact one-sided test that A's runs collapse more often than B's
    seed-paired runs. Only discordant pairs count; each is a fair coin under the null."""
    a, b = np.asarray(a_collapsed, bool), np.asarray(b_collapsed, bool)
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    return only_a, only_b, float(scipy.stats.binom.sf(only_a - 1, only_a + only_b, 0.5))


def mde(n: int, sd: float, k: int = 1, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest true mean that a two-sided t-test on n per-seed values with spread `sd` detects
    with probability `power`, at the strictest Holm level alpha / k (exact noncentral-t power,
    by bisection)."""
    return _mde_unit(n, k, alpha, power) * sd


@functools.lru_cache(maxsize=None)
def _mde_unit(n: int, k: int, alpha: float, power: float) -> float:
    if n < 2:
        return float("inf")
    df = n - 1
    c = scipy.stats.t.ppf(1 - alpha / k / 2, df)
    lo, hi = 0.0, 50.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lam = mid * math.sqrt(n)  # the power at a true mean of `mid` sds: P(|T'| > c), T' noncentral t
        weak = scipy.stats.nct.sf(c, df, lam) + scipy.stats.nct.cdf(-c, df, lam) < power
        lo, hi = (mid, hi) if weak else (lo, mid)
    return hi


def log_slope(deltas: Sequence[float], y) -> np.ndarray:
    """Least-squares slope of y (last axis: one value per delta) on log(delta): the accuracy
    change per e-fold of the threshold."""
    x = np.log(np.asarray(deltas, dtype=float))
    x = x - x.mean()
    y = np.asarray(y, dtype=float)
    return (y * x).sum(-1) / (x * x).sum()
