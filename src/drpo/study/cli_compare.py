"""`drpo compare`: run a grid of `drpo train` runs (a preset or a YAML grid file) into one
results directory, resumably, then write its report.

    drpo compare --preset quick                      # minutes; results/quick/report/report.md
    drpo compare --preset paper-mini --workers 2     # the full study, from the repository root
    drpo compare --grid my_grid.yaml --out results/mine --set model.name=smollm2
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from drpo.files import dir_lock
from drpo.study.grid import Grid, expand, load_grid, parse_grid, variant_entries
from drpo.study.presets import PRESETS, get_preset
from drpo.study.runner import base_config, default_workers, is_finished, run_dir, run_grid
from drpo.textfile import split_assignment
from drpo.train.config import override_value


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare",
        help="run a comparison grid of `drpo train` runs (methods x settings x seeds), resumably",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), help="a built-in grid (default: quick)")
    src.add_argument("--grid", metavar="FILE.yaml", help="a grid file (fields: see drpo.study.grid)")
    p.add_argument("--out", metavar="DIR", help="results directory (default: results/<grid name>)")
    p.add_argument("--workers", type=int, default=None,
                   help="runs at once (default: usable cores / --threads-per-run)")
    p.add_argument("--threads-per-run", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--config", metavar="FILE.yaml", help="base `drpo train` config for every run (default: the grid's `config`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra `drpo train` override for every run (repeatable)")
    p.add_argument("--seeds", type=int, default=None, metavar="N", help="use seeds 0..N-1 instead of the grid's")
    p.add_argument("--methods", default=None, metavar="A,B", help="keep only these objective variants")
    p.add_argument("--settings", default=None, metavar="A,B", help="keep only these settings")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state, run nothing")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
    return p


def _split(arg: str | None, what: str, known: list[str]) -> list[str] | None:
    if arg is None:
        return None
    names = [s.strip() for s in arg.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise ValueError(f"--{what}: unknown name(s) {unknown or arg!r}; this grid has: {', '.join(known)}")
    return names


def select(grid: Grid, *, overrides: list[str], seeds: int | None, methods: str | None,
           settings: str | None) -> Grid:
    """The grid narrowed/extended by the command-line options, re-validated."""
    data = grid.model_dump(mode="json")
    for item in overrides:
        key, raw = split_assignment(item, "--set expects KEY=VALUE")
        data["base"][key] = override_value(key, raw)  # as `drpo train --set` parses it
    if seeds is not None:
        if seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {seeds}")
        data["seeds"] = list(range(seeds))
    keep_v = _split(methods, "methods", list(dict.fromkeys(v["name"] for v in variant_entries(data))))
    keep_s = _split(settings, "settings", list(data["settings"]))
    if keep_s is not None:
        data["settings"] = {k: v for k, v in data["settings"].items() if k in keep_s}
        data["setting_notes"] = {k: v for k, v in data["setting_notes"].items() if k in keep_s}
        for sw in data["sweeps"]:
            sw["settings"] = [s for s in sw["settings"] if s in keep_s]
    if keep_v is not None:
        data["methods"] = [v for v in data["methods"] if v["name"] in keep_v]
        for sw in data["sweeps"]:
            sw["variants"] = [v for v in sw["variants"] if v["name"] in keep_v]
    data["sweeps"] = [sw for sw in data["sweeps"] if sw["settings"] and sw["variants"]]
    if not data["methods"]:
        # a selection of sweep variants only: run them as the main methods of the kept settings
        data["methods"] = [v for sw in data["sweeps"] for v in sw["variants"]]
        data["sweeps"] = []
    return parse_grid(data, source="command-line selection")


def canonical_command(args: argparse.Namespace, out: Path) -> str:
    parts = ["drpo", "compare"]
    parts += ["--grid", args.grid] if args.grid else ["--preset", args.preset or "quick"]
    parts += ["--out", str(out)]
    for flag, value in (("--workers", args.workers), ("--config", args.config), ("--seeds", args.seeds),
                        ("--methods", args.methods), ("--settings", args.settings)):
        if value is not None:
            parts += [flag, str(value)]
    if args.threads_per_run != 1:
        parts += ["--threads-per-run", str(args.threads_per_run)]
    for item in args.overrides:
        parts += ["--set", item]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    try:
        grid = load_grid(args.grid) if args.grid else get_preset(args.preset or "quick")
        grid = select(grid, overrides=args.overrides, seeds=args.seeds, methods=args.methods,
                      settings=args.settings)
        base_config(grid, args.config)
        if args.threads_per_run < 1 or (args.workers is not None and args.workers < 1):
            raise ValueError(f"--workers and --threads-per-run must be >= 1, got {args.workers} and "
                             f"{args.threads_per_run}")
    except ValueError as err:
        print(f"drpo compare: {err}", file=sys.stderr)
        return 2
    runs = expand(grid)
    out = Path(args.out) if args.out else Path("results") / grid.name
    workers = args.workers if args.workers is not None else default_workers(args.threads_per_run)
    if args.dry_run:
        for spec in runs:
            state = "finished" if is_finished(run_dir(out, spec)) else "to run"
            print(f"{spec.run_id:48s} {state}")
        print(f"{len(runs)} runs, {workers} at a time, into {out}")
        return 0
    command = canonical_command(args, out)
    print(f"drpo compare: {len(runs)} runs of grid {grid.name!r}, {workers} at a time, into {out}", file=sys.stderr)
    try:
        with dir_lock(out, "study directory"):  # a second study on OUT is refused, naming the holder
            with (out / "command.txt").open("a") as f:
                f.write(command + "\n")
            outcome = run_grid(grid, runs, out, workers=workers, threads_per_run=args.threads_per_run,
                               config=args.config, progress=not args.quiet)
    except ValueError as err:
        print(f"drpo compare: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("drpo compare: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"drpo compare: {len(outcome.finished)} run(s) finished now, {len(outcome.diverged)} diverged, "
          f"{len(outcome.skipped)} already done, {len(outcome.failed)} failed", file=sys.stderr)
    for rid, reason in outcome.failed:
        print(f"  failed: {rid}: {reason}", file=sys.stderr)
    if not args.no_report:
        from drpo.study.report import write_report

        paths = write_report(out, command=command)
        print(f"drpo compare: report written to {paths['markdown']} and {paths['html']}", file=sys.stderr)
    return 1 if outcome.failed else 0
