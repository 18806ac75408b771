"""The `drpo inspect` report: report.md with PNG figures, report.html (self-contained, made
from the Markdown) and report.json (every number in the Markdown, and more)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from drpo.files import atomic_write, jsonable, save_figure
from drpo.inspect.analysis import ALL, BUCKETS, CATEGORIES, Analysis, Variant
from drpo.objectives import METHODS, loose_threshold_note
from drpo.pages import table, write_page

def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _num(x, digits=4) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.3e}"


def method_table(stats: dict, bucket: str = ALL) -> list[str]:
    rows = []
    for label, per in stats["methods"].items():
        s = per[bucket]
        rows.append([f"`{label}`", str(s["tokens"]), _pct(s["beyond_boundary_pos_frac"]), _pct(s["beyond_boundary_neg_frac"]),
                     *(_pct(s[c]) for c in CATEGORIES), f"{s['kept_grad_mass']:.4f}"])
    return table(["method", "tokens", "beyond, A>0", "beyond, A<0", "zeroed", "attenuated", "corrective", "amplified",
                  "kept grad mass"], rows)


def batch_table(stats: dict) -> list[str]:
    rows = []
    for name in (ALL, *BUCKETS):
        m = stats["mismatch"][name]
        share = 1.0 if name == ALL else stats["bucket_share"][name]
        rows.append([name, str(m["tokens"]), _pct(share), _num(m.get("mean_log_ratio")), _num(m.get("std_err"), 2),
                     _num(m.get("mean_abs_log_ratio")), _num(m.get("k3_kl")), str(m["unscored_tokens"])])
    return table(["mu bucket", "tokens", "share", "mean log r", "std err", "mean abs log r", "k3 KL", "unscored"], rows)


# ------------------------------------------------------------------ figures


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    save_figure(fig, path, "figure", dpi=90)


def _boundary_curves(variant: Variant, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The method's boundary in the (mu, D = pi - mu) plane, found from its registered
    `boundary` on a grid of D: the smallest D > 0 beyond it for A > 0, the largest D < 0 for A < 0
    (NaN where none)."""
    m = METHODS[variant.method]
    frac = np.geomspace(1e-7, 1.0, 600)
    out = []
    for sign in (1.0, -1.0):
        room = (1 - mu) if sign > 0 else mu  # D ranges over (0, 1-mu] or [-mu, 0)
        d = sign * frac[None, :] * room[:, None]
        pi = np.clip(mu[:, None] + d, 1e-300, 1.0)
        logp = torch.from_numpy(np.log(pi))
        old = torch.from_numpy(np.broadcast_to(np.log(mu)[:, None], pi.shape).copy())
        adv = torch.full(pi.shape, sign, dtype=torch.float64)
        beyond = m.boundary(logp, old, adv, **variant.params).numpy()
        first = np.argmax(beyond, axis=1)
        out.append(np.where(beyond.any(axis=1), d[np.arange(len(mu)), first], np.nan))
    return out[0], out[1]


def token_figure(sample: np.ndarray, variants: Sequence[Variant], step: int, policy: str, anchor: str, path: Path) -> None:
    methods = [m for m in dict.fromkeys(v.method for v in variants) if METHODS[m].boundary is not None]
    n = max(len(methods), 1)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols, 3.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    mu_grid = np.geomspace(max(1e-6, sample[:, 0].min() if sample.size else 1e-6), 1.0, 120)
    # linear below a round power of ten near the median shift, logarithmic beyond
    med = float(np.quantile(np.abs(sample[:, 1]), 0.5)) if sample.size else 1e-4
    lin = 10.0 ** math.floor(math.log10(max(med, 1e-6)))
    for ax, method in zip(axes.flat, methods):
        for sign, color, lab in ((1, "tab:green", "A > 0"), (-1, "tab:red", "A < 0"), (0, "0.6", "A = 0")):
            s = sample[sample[:, 2] == sign]
            ax.scatter(s[:, 0], s[:, 1], s=4, alpha=0.5, color=color, label=f"tokens, {lab}", rasterized=True)
        for k, v in enumerate(x for x in variants if x.method == method):
            up, down = _boundary_curves(v, mu_grid)
            style = dict(color=f"C{k % 10}", lw=1.4, ls=("-", "--", ":", "-.")[k % 4])
            unreachable = np.isnan(up).all() and np.isnan(down).all()
            ax.plot(mu_grid, up, label=v.label + (" (no boundary: |D| <= 1)" if unreachable else ""), **style)
            ax.plot(mu_grid, down, **style)
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=lin)
        ax.set_title(method, fontsize=10)
        ax.axhline(0, color="k", lw=0.5)
        ax.legend(fontsize=6, loc="lower left")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("behaviour probability mu (anchor)")
    for ax in axes[:, 0]:
        ax.set_ylabel("D = pi - mu (probability, symlog)")
    fig.suptitle(f"step {step}: tokens (pi = {policy}, mu = {anchor}) and each method's boundary "
                 "(upper curve: A > 0, lower: A < 0; beyond = outside the curves)", fontsize=10)
    _save(fig, path)


def bucket_figure(stats: dict, path: Path) -> None:
    fig = Figure(figsize=(13, 3.8))
    a1, a2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.25]})
    x = np.arange(len(BUCKETS))
    share = [stats["bucket_share"][b] for b in BUCKETS]
    a1.bar(x, [100 * s for s in share], color="tab:blue")
    a1.set_xticks(x, BUCKETS)
    a1.set_xlabel("behaviour probability bucket (mu)")
    a1.set_ylabel("share of response tokens (%)")
    a1.set_title("long tail: share of tokens per bucket")
    ax2 = a1.twinx()
    mm = [stats["mismatch"][b].get("mean_abs_log_ratio", np.nan) for b in BUCKETS]
    ax2.plot(x, mm, "o-", color="tab:orange", label="mean |log pi_train/mu_rollout|")
    ax2.set_ylabel("mismatch, mean |log r| (nats)")
    ax2.legend(fontsize=8, loc="upper right")
    labels = list(stats["methods"])
    width = 0.8 / max(len(labels), 1)
    colors = matplotlib.colormaps["tab20"].colors
    low = 1.0
    for k, label in enumerate(labels):
        vals = [stats["methods"][label][b]["kept_grad_mass"] for b in BUCKETS]
        low = min(low, *vals)
        a2.bar(x + (k - len(labels) / 2 + 0.5) * width, vals, width, label=label, color=colors[k % 20])
    a2.set_ylim(max(0.0, low - 0.05 * (1.0 - low) - 0.01), 1.0 + 0.01 * (1.0 - low) + 0.002)
    a2.set_xticks(x, BUCKETS)
    a2.set_xlabel("behaviour probability bucket (mu)")
    a2.set_ylabel("kept gradient mass sum|A r w| / sum|A r|")
    a2.set_title("kept gradient mass by bucket")
    a2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method", title_fontsize=7)
    _save(fig, path)


def trend_figure(result: dict, path: Path) -> None:
    steps = sorted(int(s) for s in result["steps"])
    per = [result["steps"][str(s)] for s in steps]
    fig = Figure(figsize=(15, 3.8))
    axes = fig.subplots(1, 3)
    colors = matplotlib.colormaps["tab20"].colors
    for k, label in enumerate(result["total"]["methods"]):
        style = dict(color=colors[k % 20], ls=("-", "--")[k // 20 % 2], marker="o", ms=3, label=label)
        ms = [p["methods"][label][ALL] for p in per]
        axes[0].plot(steps, [m["kept_grad_mass"] for m in ms], **style)
        axes[1].plot(steps, [100 * (m["beyond_boundary_pos_frac"] * m["tokens_pos"] + m["beyond_boundary_neg_frac"]
                                    * m["tokens_neg"]) / max(1, m["tokens_pos"] + m["tokens_neg"]) for m in ms], **style)
    axes[0].set_ylabel("kept gradient mass")
    axes[1].set_ylabel("tokens with A != 0 beyond the boundary (%)")
    axes[2].plot(steps, [100 * p["long_tail_share"] for p in per], "o-", color="tab:blue", label="long-tail share, %")
    mm = [p["mismatch"][ALL].get("mean_abs_log_ratio", np.nan) for p in per]
    ax = axes[2].twinx()
    ax.plot(steps, mm, "s--", color="tab:orange", label="mean |log r| (nats)")
    ax.set_ylabel("mismatch, mean |log r| (nats)")
    axes[2].set_ylabel("long-tail share (%)")
    lines = axes[2].get_legend_handles_labels()
    more = ax.get_legend_handles_labels()
    axes[2].legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="best")
    for a, t in zip(axes, ("kept gradient mass per step", "beyond the boundary per step",
                           "long tail (mu <= 0.01) and mismatch per step")):
        a.set_xlabel("training step")
        a.set_title(t, fontsize=10)
        a.grid(alpha=0.3)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=6, ncol=2)
    _save(fig, path)


# ------------------------------------------------------------------ the report


def disagreement_rows(result: dict, tokenizer) -> list[list[str]]:
    rows = []
    for d in result["disagreements"]:
        ctx = "-"
        if d["context_ids"] is not None:
            toks = [str(i) if tokenizer is None else tokenizer.decode([i]) for i in d["context_ids"]]
            k = d["context_index"]
            toks = [repr(t)[1:-1].replace("|", "\\|") for t in toks]
            toks[k] = f"**[{toks[k]}]**"
            ctx = " ".join(toks) if tokenizer is None else "".join(toks)
        ws = sorted(d["weights"].items(), key=lambda kv: kv[1])
        rows.append([str(d["step"]), str(d["row"]), str(d["position"]), f"{d['mu']:.3g}", f"{d['pi']:.3g}",
                     f"{d['advantage']:+.3g}", f"{ws[0][0]} {ws[0][1]:.3g}", f"{ws[-1][0]} {ws[-1][1]:.3g}", ctx])
    return rows


def _figures(result: dict, analysis: Analysis, out: Path) -> dict[str, str]:
    """The figures drawn into `out`, by name: file name."""
    samples = analysis.samples()
    figs = {}
    if samples:
        last = max(samples)
        token_figure(samples[last], analysis.variants, last, "/".join(result["policy"]), "/".join(result["anchor"]),
                     out / "tokens_vs_boundaries.png")
        figs["tokens"] = "tokens_vs_boundaries.png"
    bucket_figure(result["total"], out / "buckets.png")
    figs["buckets"] = "buckets.png"
    if len(result["steps"]) > 1:
        trend_figure(result, out / "trends.png")
        figs["trends"] = "trends.png"
    return figs


def _sanity_lines(result: dict, title: str) -> list[str]:
    """The title and the sanity header: what was dumped, what is analysed, the sampling check."""
    total = result["total"]
    md = [f"# {title}", "", "## Sanity header", ""]
    for f in result["files"]:
        m = f["metadata"]
        md.append(f"- `{f['path']}`: source {m.get('source')}, model {m.get('model')}, trained with "
                  f"`{m.get('method')}` {json.dumps(m.get('params'))}, sampling {json.dumps(m.get('sampling'))}")
    cols = result["files"][0]["metadata"].get("columns", {}) if result["files"] else {}
    md += [f"- `{name}`: {meaning}" for name, meaning in cols.items()]
    md += [
        f"- analysed: pi = train-side log-prob **{'/'.join(result['policy'])}** the update, mu (anchor) = "
        f"**{'/'.join(result['anchor'])}** log-prob; {total['tokens']} response tokens, {total['responses']} responses, "
        f"{len(result['steps'])} step(s)",
    ]
    san = result["sanity"]
    if san["has_rollout_logprobs"]:
        fit = san["log_ratio_slope"] or {"slope": None, "std_err": None}
        md.append(f"- sampling-settings check (log r = train-side log-prob before the update - rollout log-prob): "
                  f"mean r = {_num(san['mean_ratio'], 6)} +- {_num(san['mean_ratio_std_err'], 2)} (1 when trainer and "
                  f"engine sample from the same support; flagged below 1 - {san['ratio_mass_tol']:g}), slope of log r "
                  f"on the rollout log-prob = {_num(fit['slope'])} +- {_num(fit['std_err'], 2)} (0 when the "
                  f"temperatures match; flagged beyond {san['slope_tol']:g}); flags need {san['sigmas']:g} standard "
                  f"errors: {'see the warnings' if san['flags'] else 'none raised'}")
    if san["flags"]:
        md += ["", "**Warnings:**", ""] + [f"- {x}" for x in san["flags"]]
    return md


def _batch_lines(result: dict, variants: Sequence[Variant], figs: dict[str, str]) -> list[str]:
    """All steps together: the long tail and mismatch, then each method's categories per bucket."""
    total = result["total"]
    md = ["", "## The batch: long tail and train/inference mismatch (all steps)", "",
          f"Long-tail share (mu <= 0.01): **{_pct(total['long_tail_share'])}** of response tokens. "
          "Mismatch: log r = train-side log-prob before the update minus the rollout log-prob.", "",
          *batch_table(total), "", f"![long tail and mismatch by bucket]({figs['buckets']})", "",
          "## What each trust region would do (all steps)", "",
          "Fractions beyond the boundary are of the tokens with that advantage sign; the weight categories (w = 0 "
          "zeroed, 0 < w < 1 attenuated, w < 0 corrective, w > 1 amplified) are of tokens with A != 0; kept "
          "gradient mass = sum|A r w| / sum|A r|.", "", *method_table(total), ""]
    loose = [f"- `{v.label}`: {note}" for v in variants if (note := loose_threshold_note(v.method, v.params))]
    if loose:
        md += ["**Thresholds that bind no token:**", "", *loose, ""]
    for b in BUCKETS:
        md += [f"### mu bucket {b} ({_pct(total['bucket_share'][b])} of tokens)", "", *method_table(total, b), ""]
    return md


def _token_lines(result: dict, analysis: Analysis, figs: dict[str, str], tokenizer) -> list[str]:
    """Single tokens: the sample against the boundaries, then where the methods disagree most."""
    md = []
    if "tokens" in figs:
        samples = analysis.samples()
        last = max(samples)
        md += ["## Tokens against each boundary", "", f"Step {last}, up to {len(samples[last])} tokens sampled uniformly.",
               "", f"![tokens against each method's boundary]({figs['tokens']})", ""]
    md += ["## Where the methods disagree most", "",
           "Tokens with the largest spread of gradient weight w across the methods (context: the response around it, "
           "the token in brackets).", ""]
    rows = disagreement_rows(result, tokenizer)
    md += table(["step", "row", "pos", "mu", "pi", "A", "lowest w", "highest w", "context"], rows) if rows else ["(one method: none)"]
    return md


def _steps_lines(result: dict, figs: dict[str, str]) -> list[str]:
    """Per step: tokens, the long tail, the mismatch and each method's kept gradient mass."""
    md = ["", "## Across steps", ""]
    if "trends" in figs:
        md += [f"![trends across steps]({figs['trends']})", ""]
    labels = list(result["total"]["methods"])
    md += table(["step", "tokens", "long tail", "mean abs log r", *[f"kept `{x}`" for x in labels]], [
        [s, str(p["tokens"]), _pct(p["long_tail_share"]), _num(p["mismatch"][ALL].get("mean_abs_log_ratio")),
         *[f"{p['methods'][x][ALL]['kept_grad_mass']:.4f}" for x in labels]] for s, p in result["steps"].items()])
    return md


def write_report(result: dict, analysis: Analysis, out: Path, *, tokenizer=None, title: str = "drpo inspect") -> dict:
    """Writes report.md, report.html, report.json and the figures into `out`; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    figs = _figures(result, analysis, out)
    md = [*_sanity_lines(result, title), *_batch_lines(result, analysis.variants, figs),
          *_token_lines(result, analysis, figs, tokenizer), *_steps_lines(result, figs)]
    paths = write_page(out, "\n".join(md) + "\n", title)
    atomic_write(out / "report.json", json.dumps(jsonable(result), indent=1), "report")
    return {**paths, "json": out / "report.json", **{k: out / v for k, v in figs.items()}}
