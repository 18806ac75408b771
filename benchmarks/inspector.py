"""Time and peak memory of `drpo inspect` on a large dump (default 1M response tokens).

    .venv/bin/python benchmarks/inspector.py [--tokens 1000000] [--dir /tmp/drpo-inspect-bench]

Writes a synthetic dump (1024-token responses, 8 steps, log-probs spread over the buckets)
with drpo's writer, then runs `drpo inspect` on it at its defaults (every registered method)
plus a 4-value DRPO delta sweep, in a fresh subprocess, and prints its wall time and peak
resident memory (the child's ru_maxrss) against the targets: <= 30 s and <= 2 GB.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TARGET_S, TARGET_GB = 30.0, 2.0
SEQ, STEPS = 1024, 8


def write_dump(directory: Path, tokens: int, seed: int = 0) -> Path:
    from drpo.dumps import DumpWriter

    rng = np.random.default_rng(seed)
    rows = max(1, -(-tokens // SEQ))  # at least `tokens`
    per_step = -(-rows // STEPS)
    w = DumpWriter(directory, metadata={"source": "benchmark", "method": "drpo", "model": "synthetic"})
    done = 0
    for step in range(1, STEPS + 1):
        n = min(per_step, rows - done)
        if n <= 0:
            break
        for start in range(0, n, 64):  # row groups of 64 responses (64K tokens)
            m = min(64, n - start)
            rollout = np.log(rng.beta(0.5, 0.3, (m, SEQ)).clip(1e-6, 1 - 1e-6))
            before = np.minimum(rollout + rng.normal(0, 0.03, (m, SEQ)), 0)
            after = np.minimum(before + rng.normal(0, 0.1, (m, SEQ)), 0)
            w.write(step=step, response_mask=np.ones((m, SEQ), bool), logp_rollout=rollout, logp_before=before,
                    logp_after=after, advantage=rng.normal(0, 1, (m, 1)), token_ids=rng.integers(0, 50000, (m, SEQ)),
                    sample_id=np.arange(start, start + m) + done, group_id=(np.arange(start, start + m) + done) // 8)
        done += n
    w.close()
    return w.path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--dir", default="/tmp/drpo-inspect-bench")
    args = p.parse_args(argv)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    path = write_dump(root / "dump", args.tokens)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s")
    drpo = str(Path(sys.executable).with_name("drpo"))
    cmd = [drpo, "inspect", str(root / "dump"), "--out", str(root / "report"), "--param", "drpo.delta=0.05,0.15,1,12.5"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
    if proc.returncode:
        print(proc.stderr, file=sys.stderr)
        return proc.returncode
    print(proc.stdout.strip().splitlines()[0])
    load = os.getloadavg()
    print(f"drpo inspect: {wall:.1f} s (target <= {TARGET_S:g} s), peak RSS {peak_gb:.2f} GB (target <= {TARGET_GB:g} GB); "
          f"{os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} (1 / 5 min)")
    ok = wall <= TARGET_S and peak_gb <= TARGET_GB
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
