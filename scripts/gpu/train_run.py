"""One `drpo train` run, in this process so that the CUDA allocator's peak can be read after
it; then its speed from the run's own metrics.jsonl. Writes a JSON summary.

    python scripts/gpu/train_run.py --label tiny --json R.json --out RUN_DIR [drpo train options]

steps/s is over the RL steps after the first (rollout + reward + update time of each, as the
trainer logs them; the first step pays CUDA's warm-up; eval and checkpoints excluded); wall_s
is the whole command, warm start included.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from drpo.cli import main as drpo_main
from drpo.train.metrics import read_metrics

STEP_KEYS = ("time/rollout", "time/reward", "time/update")


def step_times(rows: list[dict]) -> list[float]:
    """Seconds of each RL step (step 0 is the initial eval), in step order."""
    return [sum(r[k] for k in STEP_KEYS) for r in sorted(rows, key=lambda r: r["step"])
            if r["step"] >= 1 and all(k in r for k in STEP_KEYS)]


def speed(times: list[float]) -> dict:
    timed = times[1:] or times
    return {"rl_steps": len(times), "timed_steps": len(timed),
            "steps_per_s": len(timed) / sum(timed) if timed else None,
            "median_step_s": statistics.median(timed) if timed else None}


def peak_memory_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS (KiB on Linux)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", required=True)
    p.add_argument("--json", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="the run's directory (drpo train --out)")
    args, train_args = p.parse_known_args(argv)
    device = "cuda" if torch.cuda.is_available() and "train.device=cuda" in train_args else "cpu"
    start = time.perf_counter()
    rc = drpo_main(["train", "--out", str(args.out), "--no-progress", *train_args])
    wall = time.perf_counter() - start
    rows = read_metrics(args.out / "metrics.jsonl")
    last = max(rows, key=lambda r: r["step"]) if rows else {}
    summary = json.loads((args.out / "summary.json").read_text()) if (args.out / "summary.json").is_file() else {}
    result = {
        "label": args.label, "exit_code": rc, "device": device, "wall_s": wall,
        **speed(step_times(rows)),
        "peak_memory_mib": peak_memory_mib(device),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device == "cuda" else "process peak RSS",
        "final_loss": last.get("objective/loss"),
        "nonfinite_tokens": last.get("objective/nonfinite_tokens"),
        "warmstart_accuracy": summary.get("warmstart_accuracy"),
        "final_accuracy": summary.get("final_accuracy"),
        "args": train_args,
    }
    ok = rc == 0 and result["final_loss"] is not None and math.isfinite(result["final_loss"])
    result["ok"] = ok
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
