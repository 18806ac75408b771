"""`drpo report RESULTS_DIR`: read every run of a comparison study and write one report
(`write_report`). Each run's numbers come from its own summary.json (final/best accuracy,
mismatch, tokens) and eval rows; whether it diverged comes from the runner's record of its exit
code. Every run of the grid appears: finished and diverged runs in the tables, the others
listed as unfinished."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import yaml

from drpo.files import atomic_write, jsonable
from drpo.objectives import get_method
from drpo.pages import table, write_page
from drpo.study import figures
from drpo.study.claims import MARGIN, Claim, check_claims, design_note
from drpo.study.grid import variant_entries
from drpo.study.runner import LOG, RECORD, SUMMARY, TIMING
from drpo.study.stats import ALPHA, COLLAPSE_FRAC, COLLAPSE_WINDOW, CellStats, RunStats, cell_stats, run_stats
from drpo.train.metrics import read_metrics


@dataclass
class Run:
    run_id: str
    setting: str
    variant: str
    method: str
    seed: int
    record: dict
    rows: list[dict]
    summary: dict | None  # the run's summary.json: it finished
    diverged: bool = False  # the runner recorded exit code 3: a result, counted as a collapse

    @property
    def has_result(self) -> bool:
        return self.summary is not None or self.diverged


@dataclass
class Study:
    root: Path
    grid: dict
    runs: list[Run]
    settings: list[str]  # in grid order
    variants: list[str]


def diverged_rows(rows: list[dict], record: dict) -> list[dict]:
    """A diverged run has no usable policy from the step it diverged on: its accuracy counts
    as 0 from that step to the planned last step."""
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
        summary = json.loads((d / SUMMARY).read_text()) if (d / SUMMARY).is_file() else None
        diverged = summary is None and rec.get("status") == "diverged"
        # only runs with a result are read: their process ended, so their metrics file is whole
        rows = read_metrics(d / "metrics.jsonl") if summary is not None or diverged else []
        runs.append(Run(rec["run_id"], rec["setting"], rec["variant"], rec["method"], int(rec["seed"]), rec,
                        diverged_rows(rows, rec) if diverged else rows, summary, diverged))
    if not runs:
        raise ValueError(f"{root}: no runs under runs/")
    return Study(root, grid, runs, _in_order(grid.get("settings", {}), {r.setting for r in runs}),
                 _in_order([v["name"] for v in variant_entries(grid)], {r.variant for r in runs}))


def _in_order(grid_order, have: set[str]) -> list[str]:
    """`have` in the grid's order, then any the grid does not name, sorted."""
    return [x for x in dict.fromkeys(grid_order) if x in have] + sorted(have - set(grid_order))


@dataclass
class Tables:
    cells: dict[str, list[CellStats]]  # setting -> cells in variant order
    runs: list[RunStats]
    unfinished: list[Run]


def compute_tables(study: Study, collapse_frac: float = COLLAPSE_FRAC) -> Tables:
    # the runner's wall-clock covers every attempt of a run; the summary only the last one
    stats = [run_stats(r.run_id, r.setting, r.variant, r.seed, r.rows, r.summary,
                       float(r.record.get("wall_s") or (r.summary or {}).get("wall_clock_s") or math.nan),
                       diverged=r.diverged, collapse_frac=collapse_frac)
             for r in study.runs if r.has_result]
    cells: dict[str, list[CellStats]] = {}
    for setting in study.settings:
        for v in study.variants:
            rs = [s for s in stats if s.setting == setting and s.variant == v]
            if rs:
                cells.setdefault(setting, []).append(cell_stats(rs))
    return Tables(cells, stats, [r for r in study.runs if not r.has_result])


def _pm(c: CellStats, metric: str) -> str:
    m, s = c.mean_sd(metric)
    return f"{m:.3f} ± {s:.3f}"


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


TABLE_HEADER = ("variant", "seeds", "final acc", "gain vs warm start", "AUC", "collapsed", "beyond boundary",
                "long-tail share", "mean abs log-ratio", "response tokens", "wall s/run", "tokens/s")


def _share(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.2f}%"


def cell_row(c: CellStats) -> list[str]:
    return [c.variant, str(c.n), _pm(c, "final"), _pm(c, "gain"), _pm(c, "auc"), f"{c.collapsed}/{c.n}",
            f"{_share(c.beyond)} ({_share(c.beyond_pos)} / {_share(c.beyond_neg)})",
            _num(c.long_tail, ".3f"), _num(c.mean_mismatch, ".2e"), _num(c.response_length, ".1f"),
            _num(c.wall_s, ".1f"), _num(c.tokens_per_s, ".0f")]


def definitions(collapse_frac: float) -> list[str]:
    return [
        "final acc: eval accuracy at the last eval (step 0 is the warm start, trained per seed); gain: final minus "
        "warm-start accuracy, per run; AUC: area under the eval-accuracy curve over the step span (time-averaged "
        "accuracy). Mean ± sample std over seeds.",
        f"collapsed: the run diverged (non-finite loss, gradient or weights: exit code 3, accuracy 0 from then on) "
        f"or the mean of its last {COLLAPSE_WINDOW} evals is below {collapse_frac:g} x its warm-start accuracy.",
        "beyond boundary: share of tokens beyond the method's trust-region boundary in the harmful direction (the "
        "mean of the A>0 and A<0 tokens' fractions, which follow in brackets), averaged over steps and runs; 0 for "
        "a method without a boundary (pg_is) or one no token can reach (DRPO and Mask-DRPO with delta >= 1).",
        "long-tail share: fraction of sampled response tokens whose rollout probability mu <= 0.01; mean abs "
        "log-ratio: mean |log(pi/mu)| over response tokens (the training-inference mismatch), both averaged over "
        "steps; response tokens: mean sampled response length.",
        "wall s/run: mean wall-clock of a run's process(es) (the first run of each seed also trains the cached warm "
        "start), on a machine that may be shared; tokens/s: generated tokens / wall-clock, over the cell's runs.",
    ]


def _setting_title(study: Study, setting: str) -> str:
    note = study.grid.get("setting_notes", {}).get(setting, "")
    desc = ", ".join(f"{k}={v}" for k, v in study.grid.get("settings", {}).get(setting, {}).items())
    return f"{setting}: {note}" if note else f"{setting} ({desc})" if desc else setting


def variant_table(study: Study) -> list[tuple[str, str, str]]:
    """(variant, method, resolved parameters) for every variant that has runs."""
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


def read_provenance(root: Path) -> list[str]:
    """Distinct code versions the study ran with, one line each (OUT/provenance.jsonl)."""
    lines: dict[str, None] = {}  # distinct, in first-seen order
    for p in read_metrics(Path(root) / "provenance.jsonl"):  # the one JSON-lines reader
        commit = p.get("git_commit")
        where = (f"git {commit[:10]}{' + uncommitted changes' if p.get('git_dirty') else ''}" if commit
                 else "not a git checkout")
        lines[f"drpo {p.get('drpo')} ({where}), torch {p.get('torch')}, Python {p.get('python')}"] = None
    return list(lines)


def study_time(root: Path, tables: Tables) -> str:
    """The study's wall-clock and the runs' summed wall-clock, in words."""
    spans = read_metrics(root / TIMING)  # one line per `drpo compare` invocation
    runs = f"run wall-clock summed over runs: {sum(r.wall_s for r in tables.runs) / 60:.1f} min"
    if not spans:
        return runs.capitalize() + "."
    workers = sorted({s["workers"] for s in spans})
    return (f"`drpo compare` wall-clock: {sum(s['elapsed_s'] for s in spans) / 60:.1f} min over {len(spans)} "
            f"invocation(s) with {'/'.join(map(str, workers))} worker(s); {runs}.")


def compute_rows(study: Study, tables: Tables) -> list[list[str]]:
    """Per variant over all settings: runs, wall-clock and throughput (the compute the paper omits)."""
    out = []
    for v in study.variants:
        rs = [r for r in tables.runs if r.variant == v]
        wall, tokens = sum(r.wall_s for r in rs), sum(r.tokens for r in rs)
        if rs:
            out.append([v, str(len(rs)), f"{wall / 60:.1f}", f"{wall / len(rs):.1f}",
                        _num(tokens / wall if wall > 0 else math.nan, ".0f")])
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [*table(header, rows), ""]  # each of this page's tables ends its section


def render_markdown(study: Study, tables: Tables, figs: dict[str, Path], out: Path, *, collapse_frac: float,
                    command: str | None, claims: Sequence[Claim]) -> str:
    n_seeds = max((c.n for cs in tables.cells.values() for c in cs), default=0)
    lines = [f"# Comparison study: {study.grid.get('name', study.root.name)}", ""]
    if study.grid.get("description"):
        lines += [study.grid["description"], ""]
    if command:
        lines += ["Produced by:", "", "```", command, "```", ""]
    lines += [f"Code: {p}" + "  " for p in read_provenance(study.root)] + [""]
    lines += [f"Runs: {len(tables.runs)} with a result of {len(study.runs)} ({len(study.settings)} settings, "
              f"{len(study.variants)} objective variants). {study_time(study.root, tables)}", ""]
    lines += ["## Definitions", ""] + [f"- {d}" for d in definitions(collapse_frac)] + [""]
    lines += ["## Objective variants", ""] + _table(("variant", "method", "parameters (defaults filled in)"),
                                                    variant_table(study))
    lines += ["## Summary per setting", ""]
    for setting, cells in tables.cells.items():
        lines += [f"### {_setting_title(study, setting)}", ""] + _table(TABLE_HEADER, [cell_row(c) for c in cells])
    lines += ["## Compute per variant", ""] + _table(
        ("variant", "runs", "wall-clock min (sum)", "wall s/run", "tokens/s"), compute_rows(study, tables))
    lines += ["## The paper's claims, decided by rules fixed before the run", "",
              f"Seed-paired tests at level {ALPHA}, Holm-corrected across the tests of one claim; equivalence "
              f"margin ±{MARGIN} accuracy. {design_note(n_seeds)}", ""]
    for c in claims:
        lines += [f"### {c.statement}", "", f"**Verdict: {c.verdict}.** Rule: {c.rule}", ""]
        lines += [f"- {e}" for e in c.evidence] + [""]
    if figs:
        lines += ["## Figures", ""]
        for name, path in figs.items():
            lines += [f"**{figures.FIGURES[name][2]}.**", "", f"![{name}]({path.relative_to(out).as_posix()})", ""]
    lines += ["## Per-run results", ""] + _table(
        ("run", "final acc", "AUC", "collapsed", "long-tail share", "mean abs log-ratio", "wall s"),
        [[r.run_id, f"{r.final:.3f}", f"{r.auc:.3f}", "diverged" if r.diverged else "yes" if r.collapsed else "no",
          _num(r.long_tail, ".3f"), _num(r.mean_mismatch, ".2e"), _num(r.wall_s, ".1f")] for r in tables.runs])
    if tables.unfinished:
        lines += ["## Unfinished or failed runs", "",
                  "No result yet (left out of the tables); `drpo compare` with the same arguments reruns them.", ""]
        lines += [f"- {r.run_id}: {r.record.get('error') or r.record.get('status', 'pending')} "
                  f"(log: runs/{r.run_id}/{LOG})" for r in tables.unfinished] + [""]
    return "\n".join(lines)


def _cell_json(c: CellStats) -> dict:
    return {"setting": c.setting, "variant": c.variant, "n": c.n, "collapsed": c.collapsed,
            **{m: c.mean_sd(m) for m in ("initial", "final", "best", "auc", "gain")},
            "long_tail": c.long_tail, "mean_mismatch": c.mean_mismatch, "response_length": c.response_length,
            "beyond_boundary": c.beyond, "beyond_boundary_pos": c.beyond_pos, "beyond_boundary_neg": c.beyond_neg,
            "wall_s": c.wall_s, "tokens_per_s": c.tokens_per_s, "per_seed": c.per_seed}


def write_report(root: str | Path, out: str | Path | None = None, *, collapse_frac: float = COLLAPSE_FRAC,
                 command: str | None = None) -> dict[str, Path]:
    """Write report.md, report.html, summary.json, summary.csv and figures/*.png under `out`
    (default RESULTS_DIR/report). Returns the written paths by name."""
    if not 0 < collapse_frac <= 1:
        raise ValueError(f"collapse_frac must be in (0, 1], got {collapse_frac}")
    study = load_study(root)
    out = Path(out) if out is not None else study.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    if command is None:
        cmd_file = study.root / "command.txt"
        command = cmd_file.read_text().strip().splitlines()[-1] if cmd_file.is_file() else None
    tables = compute_tables(study, collapse_frac)
    done = [r for r in study.runs if r.has_result]  # per cell with a result, each run's metric rows:
    groups = {s: {c.variant: [r.rows for r in done if (r.setting, r.variant) == (s, c.variant)] for c in cells}
              for s, cells in tables.cells.items()}
    figs, drawn = figures.make_figures(groups, study.variants, [v["name"] for v in study.grid.get("methods", [])],
                                       out / "figures") if groups else ({}, {})
    claims = check_claims(tables.cells, study.grid)
    md = render_markdown(study, tables, figs, out, collapse_frac=collapse_frac, command=command, claims=claims)
    paths = {**write_page(out, md, f"Comparison study: {study.grid.get('name', study.root.name)}"),
             "json": out / "summary.json", "csv": out / "summary.csv", **{f"figure:{k}": v for k, v in figs.items()}}
    atomic_write(paths["json"], json.dumps(jsonable({
        "grid": study.grid.get("name"),
        "collapse_frac": collapse_frac,
        "collapse_window": COLLAPSE_WINDOW,
        "alpha": ALPHA,
        "equivalence_margin": MARGIN,
        "cells": [_cell_json(c) for cells in tables.cells.values() for c in cells],
        "runs": [asdict(r) for r in tables.runs],
        "unfinished": [r.run_id for r in tables.unfinished],
        "compare_invocations": read_metrics(study.root / TIMING),
        "figures_drawn": drawn,
        "claims": [asdict(c) for c in claims],
    }), indent=2) + "\n", "report")
    rows = io.StringIO(newline="")
    w = csv.writer(rows)
    w.writerow(["setting", *TABLE_HEADER])
    w.writerows([setting, *cell_row(c)] for setting, cells in tables.cells.items() for c in cells)
    atomic_write(paths["csv"], rows.getvalue(), "report")
    return paths
