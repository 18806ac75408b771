"""`drpo report RESULTS_DIR`: summary tables (Markdown, CSV, JSON), figures (PNG) and a
self-contained HTML page for a `drpo compare` results directory.

    drpo report results/quick                       # -> results/quick/report/
    drpo report results/paper-mini --out docs/results
"""

from __future__ import annotations

import argparse
import sys

from drpo.study.stats import COLLAPSE_FRAC


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report",
        help="summarize a `drpo compare` results directory: tables, figures, HTML",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("results", metavar="RESULTS_DIR", help="directory written by `drpo compare`")
    p.add_argument("--out", metavar="DIR", help="where to write the report (default: RESULTS_DIR/report)")
    p.add_argument("--collapse-frac", type=float, default=COLLAPSE_FRAC,
                   help=f"a run collapsed if the mean of its last evals < this x its warm-start accuracy "
                        f"(default {COLLAPSE_FRAC})")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from drpo.study.report import write_report

    try:
        paths = write_report(args.results, args.out, collapse_frac=args.collapse_frac)
    except ValueError as err:
        print(f"drpo report: {err}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name:24s} {path}")
    return 0
