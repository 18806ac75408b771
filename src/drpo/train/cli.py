"""`drpo train`: one RLVR training run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from drpo.files import LOCK_FILE, LockHeldError, dir_lock
from drpo.tasks.jsonl import DatasetError
from drpo.train.checkpoint import CheckpointError
from drpo.train.config import ConfigError, load_config

DIVERGED_EXIT = 3  # exit code of a run whose loss, gradients, weights or activations went non-finite


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="run one RLVR training run",
        description="Train a policy with RL on verifiable rewards. Config: YAML file, then --set overrides "
        "(e.g. --set objective.params.delta=0.15). See docs/trainer.md for every key.",
    )
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (dotted path); repeatable")
    p.add_argument("--model", help="shorthand for --set model.name=NAME ('tiny', 'smollm2' or a local HF directory)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory of the run")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest good checkpoint")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"model.name={args.model}"] if args.model else [])
    try:
        cfg = load_config(args.config, overrides)
    except (ConfigError, ValueError) as err:
        print(f"drpo train: {err}", file=sys.stderr)
        return 2
    try:  # refuse a second writer before the heavy imports (train() then holds the lock for the run)
        if (Path(args.out) / LOCK_FILE).is_file():  # never creates anything in --out
            with dir_lock(args.out):
                pass
    except LockHeldError as err:
        print(f"drpo train: {err}", file=sys.stderr)
        return 2
    from drpo.train.loop import train  # heavy imports only once the config is valid
    from drpo.train.setup import RunError

    try:
        summary = train(cfg, args.out, resume=args.resume, progress=not args.no_progress,
                        log=lambda msg: print(msg, file=sys.stderr))
    except FloatingPointError as err:  # the run diverged: an outcome (`drpo compare` counts it as a collapse)
        print(f"drpo train: diverged: {err}", file=sys.stderr)
        return DIVERGED_EXIT
    except (DatasetError, CheckpointError, RunError, ValueError) as err:  # bad input: message, no traceback
        print(f"drpo train: {err}", file=sys.stderr)
        return 2
    print(
        f"done: {summary['steps']} steps, eval accuracy {summary['warmstart_accuracy']} (warm start) -> "
        f"{summary['final_accuracy']} (final), best {summary['best_accuracy']}; "
        f"{summary['wall_clock_s']:.0f} s; outputs in {args.out}"
    )
    return 0
