"""The `drpo` command line. Each subcommand lives next to the stage it drives and
exposes `add_parser(subparsers)`; modules are imported lazily so `drpo --help` is fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module defining add_parser(subparsers) and run(args) -> int
SUBCOMMANDS = {
    "weights": "drpo.objectives.figure",
    "train": "drpo.train.cli",
    "mismatch": "drpo.train.mismatch",
    "compare": "drpo.study.cli_compare",
    "report": "drpo.study.cli_report",
    "inspect": "drpo.inspect.cli",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drpo",
        description="DRPO and the trust-region objectives it is compared with: train, measure the mismatch, compare, report, inspect rollouts, plot weights.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv or () if not a.startswith("-")), None)
    for name, module_name in SUBCOMMANDS.items():
        if wanted in SUBCOMMANDS and name != wanted:
            sub.add_parser(name)  # keep the name listed without importing its module
        else:
            importlib.import_module(module_name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
