"""`drpo report RESULTS_DIR`: read every run of a comparison study and write a summary table
per setting (Markdown, JSON, CSV), the figures (PNG) and one self-contained HTML page.

Every run of the grid appears: finished runs in the tables, unfinished or failed ones in a
list of their own, so nothing is silently dropped.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from drpo.study import figures
from drpo.study.claims import MIN_MARGIN, Claim, check_claims
from drpo.study.runner import LOG, RECORD, SUMMARY
from drpo.study.stats import (
    COLLAPSE_FRAC,
    CellStats,
    RunStats,
    cell_stats,
    default_gain_target,
    is_collapsed,
    run_stats,
)


@dataclass
class Run:
    run_id: str
    setting: str
    variant: str
    method: str
    seed: int
    record: dict
    rows: list[dict]
    finished: bool  # summary.json written
    summary: dict | None
    diverged: bool = False  # stopped on a non-finite loss: a result, counted as a collapse

    @property
    def has_result(self) -> bool:
        return self.finished or self.diverged


@dataclass
class Study:
    root: Path
    grid: dict
    runs: list[Run]
    settings: list[str] = field(default_factory=list)  # in grid order
    variants: list[str] = field(default_factory=list)


def read_metrics(path: Path) -> list[dict]:
    """Parse metrics.jsonl; a malformed line is an error naming the file and line number,
    except a truncated last line of an unfinished run (the process was killed mid-write)."""
    rows: list[dict] = []
    if not path.is_file():
        return rows
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines) and not (path.parent / SUMMARY).is_file():
                break  # half-written tail of a killed run; the rerun rewrites it
            raise ValueError(f"{path}:{i}: malformed metrics line ({err.msg}): {line[:80]!r}") from None
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{path}:{i}: a metrics line must be an object with a 'step' field, got {line[:80]!r}")
        rows.append(row)
    return rows


def diverged_rows(rows: list[dict], record: dict) -> list[dict]:
    """A run that stopped on a non-finite loss has no usable policy from the step it diverged
    on: its accuracy counts as 0 from that step to the planned last step (so final accuracy,
    AUC and the curves show the collapse instead of the last accuracy before it)."""
    last = max((int(r["step"]) for r in rows), default=0)
    planned = record.get("overrides", {}).get("train.steps")
    out = list(rows) + [{"step": last + 1, "eval/accuracy": 0.0, "diverged": True}]
    if isinstance(planned, int) and planned > last + 1:
        out.append({"step": planned, "eval/accuracy": 0.0, "diverged": True})
    return out


def load_study(root: str | Path) -> Study:
    root = Path(root)
    runs_dir = root / "runs"
    if not runs_dir.is_dir():
        raise ValueError(f"{root}: not a study results directory (no runs/ folder; make one with `drpo compare`)")
    grid_file = root / "grid.yaml"
    grid = yaml.safe_load(grid_file.read_text()) if grid_file.is_file() else {}
    runs = []
    for d in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        rec_path = d / RECORD
        if not rec_path.is_file():
            raise ValueError(f"{d}: run directory without {RECORD}; was it made by `drpo compare`?")
        rec = json.loads(rec_path.read_text())
        for key in ("run_id", "setting", "variant", "method", "seed"):
            if key not in rec:
                raise ValueError(f"{rec_path}: missing field {key!r}")
        finished = (d / SUMMARY).is_file()
        summary = json.loads((d / SUMMARY).read_text()) if finished else None
        diverged = not finished and rec.get("status") == "diverged"
        rows = read_metrics(d / "metrics.jsonl")
        if diverged:
            rows = diverged_rows(rows, rec)
        runs.append(Run(rec["run_id"], rec["setting"], rec["variant"], rec["method"], int(rec["seed"]), rec,
                        rows, finished, summary, diverged))
    if not runs:
        raise ValueError(f"{root}: no runs under runs/")
    settings = [s for s in grid.get("settings", {}) if any(r.setting == s for r in runs)]
    settings += sorted({r.setting for r in runs} - set(settings))
    order = [v["name"] for v in grid.get("methods", [])]
    order += [v["name"] for sw in grid.get("sweeps", []) for v in sw.get("variants", [])]
    variants = list(dict.fromkeys(v for v in order if any(r.variant == v for r in runs)))
    variants += sorted({r.variant for r in runs} - set(variants))
    return Study(root, grid, runs, settings, variants)


def _wall(run: Run) -> float:
    if run.record.get("wall_s"):
        return float(run.record["wall_s"])
    for key in ("wall_s", "time_s", "elapsed_s"):
        if run.summary and isinstance(run.summary.get(key), (int, float)):
            return float(run.summary[key])
    return float("nan")


@dataclass
class Tables:
    cells: dict[str, list[CellStats]]  # setting -> cells in variant order
    targets: dict[str, str]  # setting -> the target used, in words
    runs: list[RunStats]
    unfinished: list[Run]


def compute_tables(study: Study, target: float | None = None, collapse_frac: float = COLLAPSE_FRAC) -> Tables:
    stats = [run_stats(r.run_id, r.setting, r.variant, r.seed, r.rows, _wall(r), stopped_diverged=r.diverged)
             for r in study.runs if r.has_result]
    unfinished = [r for r in study.runs if not r.has_result]
    cells: dict[str, list[CellStats]] = {}
    targets: dict[str, str] = {}
    for setting in study.settings:
        in_setting = [s for s in stats if s.setting == setting]
        if not in_setting:
            continue
        by_variant = {v: [s for s in in_setting if s.variant == v] for v in study.variants}
        by_variant = {v: rs for v, rs in by_variant.items() if rs}
        if target is not None:
            value, relative, targets[setting] = target, False, f"accuracy {target:.3f}"
        else:
            gains = [sum(r.final_acc - r.initial_acc for r in rs) / len(rs) for rs in by_variant.values()]
            value, relative = default_gain_target(gains), True
            targets[setting] = (f"warm start + {value:.3f} (half the best mean gain)" if value is not None else
                                "none: no variant gained over its warm start on average")
        cells[setting] = [cell_stats(rs, value, collapse_frac, relative=relative) for rs in by_variant.values()]
    return Tables(cells, targets, stats, unfinished)


def _pm(ms: tuple[float, float], digits: int = 3) -> str:
    m, s = ms
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _num(x: float | None, fmt: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return format(x, fmt)


TABLE_HEADER = ("method", "seeds", "final acc", "best acc", "gain vs warm start", "AUC", "steps to target",
                "collapsed", "mean abs log-ratio", "wall s/run", "tokens/s")
COLLAPSED_COL = TABLE_HEADER.index("collapsed")


def cell_row(c: CellStats, target_set: bool = True) -> list[str]:
    steps = "never" if c.steps_to_target is None else f"{c.steps_to_target:g}"
    steps = f"{steps} ({c.reached}/{c.n})" if target_set else "n/a"
    return [
        c.variant,
        str(c.n),
        _pm(c.final),
        _pm(c.best),
        _pm(c.gain),
        _pm(c.auc),
        steps,
        f"{'yes' if c.collapsed else 'no'} ({c.collapsed}/{c.n})",
        _num(c.mean_mismatch, ".2e"),
        _num(c.wall_s, ".1f"),
        _num(c.tokens_per_s, ".0f"),
    ]


def _setting_title(study: Study, setting: str) -> str:
    ov = study.grid.get("settings", {}).get(setting, {})
    note = study.grid.get("setting_notes", {}).get(setting, "")
    desc = ", ".join(f"{k}={v}" for k, v in ov.items())
    return f"{setting}: {note}" if note else (f"{setting} ({desc})" if desc else setting)


def definitions(collapse_frac: float, target: float | None) -> list[str]:
    tgt = (f"a fixed target accuracy of {target:g}" if target is not None else
           "a per-setting target gain over each run's own warm start = half of the best variant's mean gain in "
           "that setting (n/a when no variant gained on average)")
    return [
        "final / best acc: last / highest eval accuracy of a run (step 0 is the warm start); "
        "mean ± sample std over seeds. The warm start is trained per seed, so part of this spread is the warm "
        "start's; 'gain vs warm start' (final minus step-0 accuracy, per run) and the claims' seed-by-seed "
        "comparisons remove it.",
        "AUC: area under the eval-accuracy curve divided by the step span (time-averaged accuracy, 0..1).",
        f"steps to target: median over seeds of the first eval step with accuracy >= target, using {tgt}; "
        "(k/n) seeds reached it.",
        f"collapsed: a run collapsed if its final accuracy is below {collapse_frac:g} x its warm-start accuracy, "
        "or it diverged (logged a non-finite loss, grad norm or accuracy, or training stopped on a non-finite "
        "loss; such a run counts as accuracy 0 from that step on); (k/n) seeds collapsed.",
        "mean abs log-ratio: mean over steps of the mean |log(pi/mu)| over response tokens "
        "(the training-inference mismatch the objective saw).",
        "wall s/run: median over seeds of the wall-clock of a run's process(es), on a machine shared with other "
        "work (the first run of each seed also trains the cached warm start); tokens/s: median of generated "
        "tokens / wall-clock.",
    ]


def _fig_paths(out: Path) -> dict[str, Path]:
    fig_dir = out / "figures"
    return {name: fig_dir / f"{name}.png"
            for name in ("accuracy_gain", "accuracy", "mismatch", "beyond_boundary", "weights")}


def make_figures(study: Study, out: Path) -> tuple[dict[str, Path], dict[str, dict[str, list[str]]]]:
    """Write the figures; returns their paths and, per figure, setting -> variants drawn."""
    paths = _fig_paths(out)
    paths["accuracy"].parent.mkdir(parents=True, exist_ok=True)
    groups: dict[str, dict[str, list]] = {}
    for setting in study.settings:
        by_variant = {}
        for v in study.variants:
            rows = [r.rows for r in study.runs if r.setting == setting and r.variant == v and r.has_result]
            if rows:
                by_variant[v] = rows
        if by_variant:
            groups[setting] = by_variant
    if not groups:
        return {}, {}
    colors = figures.variant_colors(study.variants)
    dashes = figures.variant_dashes(study.variants, [v["name"] for v in study.grid.get("methods", [])])
    titles = {s: s for s in groups}
    drawn = {
        "accuracy_gain": figures.accuracy_gain_figure(groups, colors, paths["accuracy_gain"], titles, dashes),
        "accuracy": figures.accuracy_figure(groups, colors, paths["accuracy"], titles, dashes),
        "mismatch": figures.mismatch_figure(groups, colors, paths["mismatch"], titles, dashes),
        "beyond_boundary": figures.beyond_boundary_figure(groups, colors, paths["beyond_boundary"], titles,
                                                          dashes),
        "weights": figures.weights_figure(groups, paths["weights"], titles),
    }
    return paths, drawn


FIGURE_CAPTIONS = {
    "accuracy_gain": "Eval accuracy minus each seed's own warm-start accuracy (mean over seeds, band = min..max); "
                     "dashed lines: sweep variants.",
    "accuracy": "Eval accuracy over training steps per setting (mean over seeds, band = min..max over seeds).",
    "mismatch": "Training-inference mismatch mean |log(pi/mu)| over steps (mean over seeds).",
    "beyond_boundary": "Fraction of tokens beyond each method's trust-region boundary in the harmful direction.",
    "weights": "Gradient-weight categories per method (fractions of tokens with A != 0, mean over steps and seeds).",
}


def render_markdown(study: Study, tables: Tables, figs: Mapping[str, Path], out: Path, *,
                    collapse_frac: float, target: float | None, command: str | None,
                    claims: Sequence[Claim] = ()) -> str:
    n_total = len(study.runs)
    lines = [f"# Comparison study: {study.grid.get('name', study.root.name)}", ""]
    if study.grid.get("description"):
        lines += [study.grid["description"], ""]
    if command:
        lines += ["Produced by:", "", "```", command, "```", ""]
    for prov in read_provenance(study.root):
        lines += [f"Code: {provenance_line(prov)}", ""]
    lines += [f"Runs: {n_total - len(tables.unfinished)} finished of {n_total} "
              f"({len(study.settings)} settings, {len(study.variants)} objective variants).", ""]
    lines += ["## Definitions", ""] + [f"- {d}" for d in definitions(collapse_frac, target)] + [""]
    lines += ["## Objective variants", "", "| variant | method | parameters (registered defaults filled in) |",
              "|---|---|---|"]
    lines += [f"| {name} | {method} | {params} |" for name, method, params in variant_table(study)]
    lines += ["", "## Summary per setting", ""]
    for setting, cells in tables.cells.items():
        lines += [f"### {_setting_title(study, setting)}", "",
                  f"Target: {tables.targets[setting]}; warm-start accuracy "
                  f"{_pm(_initial(cells))}.", ""]
        lines.append("| " + " | ".join(TABLE_HEADER) + " |")
        lines.append("|" + "|".join("---" for _ in TABLE_HEADER) + "|")
        lines += ["| " + " | ".join(cell_row(c, not tables.targets[setting].startswith("none"))) + " |"
                  for c in cells]
        lines.append("")
    lines += ["## The paper's claims, checked mechanically", "",
              f"Each verdict follows the stated rule on the tables above; a difference counts only beyond "
              f"max({MIN_MARGIN}, standard error of the difference). See the discussion that accompanies the "
              f"study for what the verdicts do and do not show.", ""]
    for c in claims:
        lines += [f"### {c.statement}", "", f"**Verdict: {c.verdict}.** Rule: {c.rule}", ""]
        lines += [f"- {e}" for e in c.evidence] + [""]
    if figs:
        lines += ["## Figures", ""]
        for name, path in figs.items():
            lines += [f"**{FIGURE_CAPTIONS[name]}**", "", f"![{name}]({path.relative_to(out).as_posix()})", ""]
    lines += ["## Per-run results", "",
              "| run | final acc | best acc | AUC | collapsed | mean abs log-ratio | wall s |",
              "|---|---|---|---|---|---|---|"]
    for r in tables.runs:
        col = is_collapsed(r.initial_acc, r.final_acc, diverged=r.diverged, collapse_frac=collapse_frac)
        lines.append(f"| {r.run_id} | {r.final_acc:.3f} | {r.best_acc:.3f} | {r.auc:.3f} | "
                     f"{'yes' if col else 'no'} | {_num(r.mean_mismatch, '.2e')} | {_num(r.wall_s, '.1f')} |")
    lines.append("")
    if tables.unfinished:
        lines += ["## Unfinished or failed runs", "",
                  "These runs have no summary.json and are left out of the tables above; "
                  "`drpo compare` with the same arguments reruns them.", ""]
        for r in tables.unfinished:
            err = r.record.get("error") or r.record.get("status", "pending")
            lines.append(f"- {r.run_id}: {err} (log: runs/{r.run_id}/{LOG})")
        lines.append("")
    return "\n".join(lines)


def variant_table(study: Study) -> list[tuple[str, str, str]]:
    """(variant, method, resolved parameters) for every variant that has runs."""
    from drpo.objectives import get_method

    out = []
    for v in study.variants:
        run = next(r for r in study.runs if r.variant == v)
        given = run.record.get("params", {})
        try:
            params = get_method(run.method).resolve_params(given)
        except ValueError:
            params = given
        out.append((v, run.method, ", ".join(f"{k}={p}" for k, p in params.items()) or "(none)"))
    return out


def read_provenance(root: Path) -> list[dict]:
    """Distinct code versions the study ran with (OUT/provenance.jsonl; empty for older studies)."""
    path = Path(root) / "provenance.jsonl"
    if not path.is_file():
        return []
    seen, out = set(), []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        p = json.loads(line)
        key = (p.get("drpo"), p.get("git_commit"), p.get("git_dirty"), p.get("torch"))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def provenance_line(p: dict) -> str:
    commit = p.get("git_commit")
    where = (f"git {commit[:10]}{' + uncommitted changes' if p.get('git_dirty') else ''}" if commit
             else "not a git checkout")
    return (f"drpo {p.get('drpo')} ({where}), torch {p.get('torch')}, Python {p.get('python')}, "
            f"started {p.get('time')}")


def _initial(cells: Sequence[CellStats]) -> tuple[float, float]:
    # every cell starts from the same warm start; report the mean of the cell means
    ms = [c.initial[0] for c in cells]
    m = sum(ms) / len(ms)
    return m, max(c.initial[1] for c in cells)


def render_html(markdown_title: str, study: Study, tables: Tables, figs: Mapping[str, Path], *,
                collapse_frac: float, target: float | None, command: str | None,
                claims: Sequence[Claim] = ()) -> str:
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             f"<title>{esc(markdown_title)}</title><style>",
             "body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}",
             "table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.9em}",
             "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}",
             "td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}",
             "pre{background:#f6f6f6;padding:0.6em;overflow-x:auto}.yes{color:#b00;font-weight:600}",
             "</style></head><body>", f"<h1>{esc(markdown_title)}</h1>"]
    if study.grid.get("description"):
        parts.append(f"<p>{esc(study.grid['description'])}</p>")
    if command:
        parts.append(f"<p>Produced by:</p><pre>{esc(command)}</pre>")
    for prov in read_provenance(study.root):
        parts.append(f"<p>Code: {esc(provenance_line(prov))}</p>")
    parts.append(f"<p>Runs: {len(study.runs) - len(tables.unfinished)} finished of {len(study.runs)}.</p>")
    parts.append("<h2>Definitions</h2><ul>" + "".join(f"<li>{esc(d)}</li>" for d in
                                                       definitions(collapse_frac, target)) + "</ul>")
    parts.append("<h2>Objective variants</h2><table><tr><th>variant</th><th>method</th><th>parameters</th></tr>")
    parts += [f"<tr><td>{esc(a)}</td><td>{esc(b)}</td><td>{esc(c)}</td></tr>" for a, b, c in variant_table(study)]
    parts.append("</table><h2>Summary per setting</h2>")
    for setting, cells in tables.cells.items():
        parts.append(f"<h3>{esc(_setting_title(study, setting))}</h3>")
        parts.append(f"<p>Target: {esc(tables.targets[setting])}; warm-start accuracy "
                     f"{esc(_pm(_initial(cells)))}.</p>")
        parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in TABLE_HEADER) + "</tr>")
        for c in cells:
            row = cell_row(c, not tables.targets[setting].startswith("none"))
            cls = [" class='yes'" if i == COLLAPSED_COL and c.collapsed else "" for i in range(len(row))]
            parts.append("<tr>" + "".join(f"<td{k}>{esc(v)}</td>" for v, k in zip(row, cls)) + "</tr>")
        parts.append("</table>")
    parts.append("<h2>The paper's claims, checked mechanically</h2>")
    for c in claims:
        parts.append(f"<h3>{esc(c.statement)}</h3><p><b>Verdict: {esc(c.verdict)}.</b> Rule: {esc(c.rule)}</p>")
        parts.append("<ul>" + "".join(f"<li>{esc(e)}</li>" for e in c.evidence) + "</ul>")
    if figs:
        parts.append("<h2>Figures</h2>")
        for name, path in figs.items():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            parts.append(f"<h3>{esc(FIGURE_CAPTIONS[name])}</h3><img alt='{name}' src='data:image/png;base64,{data}'>")
    if tables.unfinished:
        parts.append("<h2>Unfinished or failed runs</h2><ul>")
        for r in tables.unfinished:
            err = r.record.get("error") or r.record.get("status", "pending")
            parts.append(f"<li>{esc(r.run_id)}: {esc(str(err))}</li>")
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _cell_json(c: CellStats) -> dict[str, Any]:
    d = asdict(c)
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def write_report(root: str | Path, out: str | Path | None = None, *, target: float | None = None,
                 collapse_frac: float = COLLAPSE_FRAC, command: str | None = None) -> dict[str, Path]:
    """Write report.md, report.html, summary.json, summary.csv and figures/*.png under `out`
    (default RESULTS_DIR/report). Returns the written paths by name."""
    if not 0 < collapse_frac <= 1:
        raise ValueError(f"collapse_frac must be in (0, 1], got {collapse_frac}")
    if target is not None and not 0 <= target <= 1:
        raise ValueError(f"target must be an accuracy in [0, 1], got {target}")
    study = load_study(root)
    out = Path(out) if out is not None else study.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    if command is None:
        cmd_file = study.root / "command.txt"
        command = cmd_file.read_text().strip().splitlines()[-1] if cmd_file.is_file() else None
    tables = compute_tables(study, target, collapse_frac)
    figs, drawn = make_figures(study, out)
    title = f"Comparison study: {study.grid.get('name', study.root.name)}"
    claims = check_claims(tables.cells, study.grid)
    md = render_markdown(study, tables, figs, out, collapse_frac=collapse_frac, target=target, command=command,
                         claims=claims)
    page = render_html(title, study, tables, figs, collapse_frac=collapse_frac, target=target, command=command,
                       claims=claims)
    paths = {"markdown": out / "report.md", "html": out / "report.html", "json": out / "summary.json",
             "csv": out / "summary.csv", **{f"figure:{k}": v for k, v in figs.items()}}
    paths["markdown"].write_text(md)
    paths["html"].write_text(page)
    paths["json"].write_text(json.dumps({
        "grid": study.grid.get("name"),
        "collapse_frac": collapse_frac,
        "targets": tables.targets,
        "cells": [_cell_json(c) for cells in tables.cells.values() for c in cells],
        "runs": [{"run_id": r.run_id, "setting": r.setting, "variant": r.variant, "seed": r.seed,
                  "initial_acc": r.initial_acc, "final_acc": r.final_acc, "best_acc": r.best_acc, "auc": r.auc,
                  "diverged": r.diverged,
                  "collapsed": is_collapsed(r.initial_acc, r.final_acc, diverged=r.diverged,
                                            collapse_frac=collapse_frac)} for r in tables.runs],
        "unfinished": [r.run_id for r in tables.unfinished],
        "figures_drawn": drawn,
        "claims": [asdict(c) for c in claims],
    }, indent=2) + "\n")
    with paths["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", *TABLE_HEADER])
        for setting, cells in tables.cells.items():
            for c in cells:
                w.writerow([setting, *cell_row(c, not tables.targets[setting].startswith("none"))])
    return paths
