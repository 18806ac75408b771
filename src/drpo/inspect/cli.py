"""`drpo inspect DUMP... --out DIR`: what each trust region would do to the dumped rollouts."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect",
        help="what each trust region would do to your own rollouts (reads rollout dumps)",
        description="Read rollout dumps (Parquet files or directories of them, written by `drpo train` with "
        "dump.every, the verl plugin or the TRL trainer) and report, per step and for every registered method: "
        "tokens beyond the boundary, weight categories and kept gradient mass, by behaviour-probability bucket; "
        "the long tail and the train/inference mismatch. Writes report.md (+ PNGs), report.html and report.json. "
        "See docs/inspect.md.",
    )
    p.add_argument("dumps", nargs="+", metavar="DUMP", help="dump file(s) or directories holding *.parquet shards")
    p.add_argument("--out", required=True, metavar="DIR", help="report directory")
    p.add_argument("--method", dest="methods", action="append", metavar="NAME",
                   help="method to include (repeatable; default: every registered method)")
    p.add_argument("--param", dest="params", action="append", default=[], metavar="METHOD.NAME=V1,V2",
                   help="sweep a parameter, e.g. --param drpo.delta=0.05,0.15,1,12.5 (repeatable)")
    p.add_argument("--policy", choices=("auto", "before", "after"), default="auto",
                   help="pi = the train-side log-prob before or after the update (auto: after where dumped)")
    p.add_argument("--tokenizer", metavar="NAME_OR_DIR",
                   help="decode tokens in context ('smollm2' or a local Hugging Face directory; default: the "
                   "dump's own when it names one)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import a module that registers your own methods (drpo.objectives.register_method) first")
    p.add_argument("--batch-rows", type=int, default=512,
                   help="responses read at a time (memory ~ this x response length)")
    p.set_defaults(run=run)
    return p


def dump_files(items: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.rglob("*.parquet"))
            if not found:
                raise FileNotFoundError(f"{p}: directory holds no *.parquet dump")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such dump file or directory")
    return files


def unfinished_shards(items: list[str]) -> list[Path]:
    """Temp files of dump writers not closed (still running, or killed mid-shard): skipped."""
    return sorted(t for item in items if Path(item).is_dir() for t in Path(item).rglob(".*.parquet.tmp.*"))


def load_tokenizer(name: str | None):
    if not name:
        return None
    from transformers import AutoTokenizer

    if name == "smollm2":
        from drpo.models.loading import smollm2_gguf_path

        path = smollm2_gguf_path()
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(name, local_files_only=True)


def run(args: argparse.Namespace) -> int:
    from drpo.inspect.analysis import analyze, make_variants
    from drpo.dumps import DumpError
    from drpo.inspect.report import write_report

    try:
        for module in args.imports:
            importlib.import_module(module)
        variants = make_variants(args.methods, args.params)
        files = dump_files(args.dumps)
        result, analysis = analyze(files, variants, policy=args.policy, batch_rows=args.batch_rows)
    except (DumpError, ValueError, FileNotFoundError, ImportError) as err:
        print(f"drpo inspect: {err}", file=sys.stderr)
        return 2
    name = args.tokenizer or result["files"][0]["metadata"].get("tokenizer")
    try:
        tokenizer = load_tokenizer(name)
    except Exception as err:  # the report is still useful with token ids
        print(f"drpo inspect: tokenizer {name!r} not loaded ({err}); showing token ids", file=sys.stderr)
        tokenizer = None
    paths = write_report(result, analysis, Path(args.out), tokenizer=tokenizer)
    t = result["total"]
    print(f"{t['tokens']} tokens, {t['responses']} responses, {len(result['steps'])} step(s), {len(variants)} method "
          f"setting(s); long-tail share {100 * t['long_tail_share']:.2f}%"
          + "".join(f"\nwarning: {f}" for f in result["sanity"]["flags"])
          + "".join(f"\nwarning: skipped {t}: an unfinished shard (its writer is still running or was killed before "
                    "closing it)" for t in unfinished_shards(args.dumps))
          + f"\nreport: {paths['markdown']} ({paths['html'].name}, {paths['json'].name})")
    return 0
