"""Per-run and per-cell statistics of a comparison study: pure functions over the metrics a
`drpo train` run logs, so every number in the report can be checked by hand.

Definitions (also printed in the report):
- final / best accuracy: the last / highest eval accuracy of a run (step 0 = warm start).
- AUC: area under the eval-accuracy curve over training steps (trapezoid rule) divided by
  the step span, i.e. the time-averaged accuracy, in [0, 1]; comparable across grids.
- steps to target: the first eval step whose accuracy is >= the target (by default a gain
  over the run's own warm start); None if never.
- collapse: a run collapsed if it diverged (a non-finite loss, grad norm or accuracy was
  logged, or training stopped on a non-finite loss) or its final accuracy is below `collapse_frac` (default 0.5) times
  its warm-start accuracy.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

ACC = "eval/accuracy"
MISMATCH = "mismatch/abs_log_ratio"
KL = "mismatch/k3_kl"
TOKENS = "tokens/generated"
DIVERGENCE_KEYS = ("objective/loss", "loss", "grad_norm", ACC)
COLLAPSE_FRAC = 0.5


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def accuracy_curve(rows: Iterable[Mapping]) -> tuple[list[int], list[float]]:
    """(steps, accuracies) of the eval rows, sorted by step; the last row wins on duplicates
    (a resumed run may log a step twice)."""
    by_step: dict[int, float] = {}
    for row in rows:
        if ACC in row and row[ACC] is not None:
            by_step[int(row["step"])] = float(row[ACC])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def series(rows: Iterable[Mapping], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one per-step metric (finite values only), last row wins per step."""
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


def steps_to_target(steps: Sequence[int], values: Sequence[float], target: float) -> int | None:
    for s, v in zip(steps, values):
        if v >= target:
            return int(s)
    return None


def diverged(rows: Iterable[Mapping]) -> bool:
    """A non-finite loss, grad norm or accuracy anywhere in the log."""
    for row in rows:
        for key in DIVERGENCE_KEYS:
            v = row.get(key)
            if isinstance(v, float) and not math.isfinite(v):
                return True
            if isinstance(v, str) and v.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
                return True
    return False


def is_collapsed(initial: float, final: float, *, diverged: bool = False,
                 collapse_frac: float = COLLAPSE_FRAC) -> bool:
    return bool(diverged or final < collapse_frac * initial)


@dataclass(frozen=True)
class RunStats:
    run_id: str
    setting: str
    variant: str
    seed: int
    initial_acc: float
    final_acc: float
    best_acc: float
    auc: float
    steps: list[int]
    accs: list[float]
    mean_mismatch: float  # mean over steps of mean |log(pi/mu)|
    mean_kl: float
    diverged: bool
    tokens: float
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else float("nan")


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if _finite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _median(xs: Sequence[float]) -> float:
    xs = [x for x in xs if _finite(x)]
    return statistics.median(xs) if xs else float("nan")


def run_stats(run_id: str, setting: str, variant: str, seed: int, rows: Sequence[Mapping],
              wall_s: float, *, stopped_diverged: bool = False) -> RunStats:
    steps, accs = accuracy_curve(rows)
    if not steps:
        raise ValueError(f"run {run_id}: metrics.jsonl has no '{ACC}' rows")
    finite = [a for a in accs if math.isfinite(a)]
    return RunStats(
        run_id=run_id,
        setting=setting,
        variant=variant,
        seed=seed,
        initial_acc=accs[0],
        final_acc=accs[-1],
        best_acc=max(finite) if finite else float("nan"),
        auc=auc(steps, accs),
        steps=steps,
        accs=accs,
        mean_mismatch=_mean(series(rows, MISMATCH)[1]),
        mean_kl=_mean(series(rows, KL)[1]),
        diverged=stopped_diverged or diverged(rows),
        tokens=sum(series(rows, TOKENS)[1]),
        wall_s=float(wall_s),
    )


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n-1; 0 for a single value)."""
    if not xs:
        raise ValueError("mean_std: no values")
    m = sum(xs) / len(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return m, s


@dataclass(frozen=True)
class CellStats:
    """One (setting, variant) cell aggregated over its seeds."""

    setting: str
    variant: str
    n: int
    initial: tuple[float, float]
    final: tuple[float, float]
    best: tuple[float, float]
    auc: tuple[float, float]
    reached: int  # seeds that reached the target
    steps_to_target: float | None  # median over the seeds that reached it
    collapsed: int  # seeds that collapsed
    mean_mismatch: float
    # medians over runs: the first run of each seed also trains (and caches) the warm start
    wall_s: float
    tokens_per_s: float
    gain: tuple[float, float] = (float("nan"), 0.0)  # final - warm-start accuracy, per run
    # seed -> {initial, final, best, auc, gain}: cells of the same setting share each seed's
    # warm start and eval set, so methods are compared seed by seed (paired)
    per_seed: dict = field(default_factory=dict)


def cell_stats(runs: Sequence[RunStats], target: float | None, collapse_frac: float = COLLAPSE_FRAC, *,
               relative: bool = False) -> CellStats:
    """Aggregate one cell's runs. `target` is an accuracy, or with relative=True a gain over
    each run's own warm start (runs of different seeds start from different warm starts);
    None: no target (steps to target not reported)."""
    if not runs:
        raise ValueError("cell_stats: no runs")
    keys = {(r.setting, r.variant) for r in runs}
    if len(keys) != 1:
        raise ValueError(f"cell_stats: runs from several cells {sorted(keys)}")
    hits = []
    if target is not None:
        hits = [steps_to_target(r.steps, r.accs, r.initial_acc + target if relative else target) for r in runs]
        hits = [h for h in hits if h is not None]
    return CellStats(
        setting=runs[0].setting,
        variant=runs[0].variant,
        n=len(runs),
        initial=mean_std([r.initial_acc for r in runs]),
        final=mean_std([r.final_acc for r in runs]),
        best=mean_std([r.best_acc for r in runs]),
        auc=mean_std([r.auc for r in runs]),
        reached=len(hits),
        steps_to_target=statistics.median(hits) if hits else None,
        collapsed=sum(is_collapsed(r.initial_acc, r.final_acc, diverged=r.diverged, collapse_frac=collapse_frac)
                      for r in runs),
        mean_mismatch=_mean([r.mean_mismatch for r in runs]),
        wall_s=_median([r.wall_s for r in runs]),
        tokens_per_s=_median([r.tokens_per_s for r in runs]),
        gain=mean_std([r.final_acc - r.initial_acc for r in runs]),
        per_seed={r.seed: {"initial": r.initial_acc, "final": r.final_acc, "best": r.best_acc, "auc": r.auc,
                           "gain": r.final_acc - r.initial_acc} for r in runs},
    )


def default_gain_target(mean_gains: Sequence[float]) -> float | None:
    """Per-setting target, as a gain over each run's warm start: half of the best cell's mean
    gain. None when no cell gained on average (then there is nothing to reach)."""
    finite = [g for g in mean_gains if _finite(g)]
    best = max(finite) if finite else 0.0
    return best / 2 if best > 0 else None
