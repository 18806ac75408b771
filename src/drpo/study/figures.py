"""Figures of a comparison study (matplotlib, Agg backend): one panel per setting, one colour
per objective variant, kept the same in every figure.

- accuracy_gain.png: eval accuracy relative to each seed's own warm start (the warm start is
  trained per seed, so this removes its seed-to-seed spread), mean over seeds, band =
  min..max over seeds
- mismatch.png: training-inference mismatch mean |log(pi/mu)| over steps
- beyond_boundary.png: fraction of tokens beyond the method's trust-region boundary
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
from matplotlib.figure import Figure

from drpo.files import save_figure
from drpo.study.stats import ACC, BEYOND_NEG, BEYOND_POS, MISMATCH, series


def _panels(n: int, width: float = 4.6, height: float = 3.3):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows + 0.9))
    axes = fig.subplots(rows, cols, squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _mean_curve(curves: Sequence[tuple[list[int], list[float]]]):
    """Mean, min and max over seeds at the steps every seed logged."""
    steps = sorted(set.intersection(*(set(s) for s, _ in curves)))
    lookup = [dict(zip(s, v)) for s, v in curves]
    vals = [[d[s] for d in lookup] for s in steps]
    return steps, [sum(v) / len(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def _curve_figure(groups: Mapping[str, Mapping[str, list]], keys: tuple[str, ...], ylabel: str, title: str,
                  colors: Mapping[str, tuple], dashes: Mapping[str, str], path: Path, *, band: bool,
                  logy: bool = False, relative: bool = False) -> dict[str, list[str]]:
    """Draws the figure; returns what it drew: setting -> variants with a line."""
    fig, axes = _panels(len(groups))
    legend = {}
    drawn: dict[str, list[str]] = {s: [] for s in groups}
    for ax, (setting, by_variant) in zip(axes, groups.items()):
        for variant, rows_per_seed in by_variant.items():
            curves = [_metric_curve(rows, keys) for rows in rows_per_seed]
            curves = [c for c in curves if c[0]]
            if relative:  # each seed against its own warm start
                curves = [(steps, [v - vals[0] for v in vals]) for steps, vals in curves]
            if not curves:
                continue
            steps, mean, lo, hi = _mean_curve(curves)
            if not steps:
                continue
            (line,) = ax.plot(steps, mean, color=colors[variant], lw=1.6, ls=dashes[variant],
                              marker="." if len(steps) < 12 else None)
            if band and len(curves) > 1:
                ax.fill_between(steps, lo, hi, color=colors[variant], alpha=0.10, lw=0)
            legend.setdefault(variant, line)
            drawn[setting].append(variant)
        ax.set_title(setting, fontsize=10)
        ax.set_xlabel("training step (rollout batches)")
        ax.set_ylabel(ylabel)
        if relative:
            ax.axhline(0.0, color="black", lw=0.8, alpha=0.6)
        if logy:
            ys = [y for line in ax.get_lines() for y in line.get_ydata()]
            if ys and min(ys) > 0:
                ax.set_yscale("log")
            else:  # zeros (an exactly on-policy step) need a linear part around 0
                ax.set_yscale("symlog", linthresh=1e-7)
        ax.grid(alpha=0.3)
    title = textwrap.fill(title, width=int(fig.get_figwidth() * 9))  # ~9 characters an inch at 12 pt
    fig.suptitle(title, fontsize=12)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(len(legend), 6),
               frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(legend) > 6), 1, 0.97 - 0.05 * title.count("\n")))
    save_figure(fig, path, "figure", dpi=110)
    return drawn


def _metric_curve(rows, keys: tuple[str, ...]):
    """Per step where all are logged, the mean of the `keys` metrics (e.g. both beyond-boundary fractions)."""
    parts = [dict(zip(*series(rows, k))) for k in keys]
    steps = sorted(set.intersection(*(set(p) for p in parts)))
    return steps, [sum(p[s] for p in parts) / len(parts) for s in steps]


# name: (metric keys, y label, title, options)
FIGURES = {
    "accuracy_gain": ((ACC,), "eval accuracy - warm-start accuracy",
                      "Accuracy gain over each seed's own warm start (mean over seeds; band = min..max)",
                      dict(band=True, relative=True)),
    "mismatch": ((MISMATCH,), "mean |log(pi/mu)| (nats)",
                 "Training-inference mismatch per step (mean over seeds)", dict(band=False, logy=True)),
    "beyond_boundary": ((BEYOND_POS, BEYOND_NEG), "fraction of tokens beyond boundary",
                        "Tokens beyond the trust-region boundary in the harmful direction "
                        "(mean of A>0 and A<0 fractions; pg_is has no boundary)", dict(band=False)),
}


def make_figures(groups: Mapping[str, Mapping[str, list]], variants: Sequence[str], main: Sequence[str],
                 fig_dir: Path) -> tuple[dict[str, Path], dict[str, dict[str, list[str]]]]:
    """Write every figure of `groups` (setting -> variant -> per-seed metric rows) into fig_dir;
    returns their paths and, per figure, setting -> variants drawn."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: fig_dir / f"{name}.png" for name in FIGURES}
    # ten clearly distinct colours (repeating past ten); solid lines for the grid's main methods (or
    # the first ten), dashed for sweep variants
    colors = {v: matplotlib.colormaps["tab10"](i % 10) for i, v in enumerate(variants)}
    dashes = {v: "-" if v in (set(main) or set(variants[:10])) else "--" for v in variants}
    drawn = {name: _curve_figure(groups, keys, ylabel, title, colors, dashes, paths[name], **opts)
             for name, (keys, ylabel, title, opts) in FIGURES.items()}
    return paths, drawn
