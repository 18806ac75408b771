"""Run a grid of `drpo train` processes into one results directory, resumably. What it writes
under OUT (grid.yaml, provenance.jsonl, timing.jsonl, runs/<run_id>/ with study_run.json and
train.log beside the run's own outputs): docs/study.md.

A run is finished iff its summary.json exists (the trainer writes it last) or it ended in a
recorded divergence, so a restart skips finished runs and reruns the others. Each run is its
own process (one torch thread each by default) so a crash or a NaN in one run cannot take the
study down, and `workers` of them run at once.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml
from tqdm.auto import tqdm

from drpo.files import append_to, atomic_write
from drpo.study.grid import Grid, RunSpec, format_value

SUMMARY = "summary.json"
RECORD = "study_run.json"
LOG = "train.log"
TIMING = "timing.jsonl"


def default_workers(threads_per_run: int = 1) -> int:
    """As many concurrent runs as there are usable cores for their threads (at least one)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, threads_per_run))


def run_dir(out: Path, spec: RunSpec) -> Path:
    return Path(out) / "runs" / spec.run_id


# `drpo train` exits with 3 when the loss, a gradient or the weights go non-finite; that is the
# method's outcome (a divergence), not a crash to retry: deterministic given the seed, so
# rerunning it would only diverge again.
DIVERGED_EXIT = 3


def is_finished(path: Path) -> bool:
    """Finished: summary.json written, or the run ended in a recorded divergence."""
    path = Path(path)
    if (path / SUMMARY).is_file():
        return True
    record = read_record(path)
    return bool(record and record.get("status") == "diverged")


def train_command(spec: RunSpec, out: Path, *, config: str | None = None, resume: bool = False,
                  threads: int | None = None, python: str = sys.executable) -> list[str]:
    cmd = [python, "-m", "drpo.cli", "train", "--no-progress"]
    if config:
        cmd += ["--config", str(config)]
    for key, value in spec.overrides.items():
        cmd += ["--set", f"{key}={format_value(value)}"]
    if threads is not None and "train.threads" not in spec.overrides:
        cmd += ["--set", f"train.threads={threads}"]
    cmd += ["--out", str(run_dir(out, spec))]
    if resume:
        cmd.append("--resume")
    return cmd


def base_config(grid: Grid, config: str | None) -> str | None:
    """The `drpo train` config file every run starts from (--config, else the grid's), checked."""
    config = config or grid.config
    if config and not Path(config).is_file():
        raise ValueError(f"config file {str(config)!r} not found (a relative path is read from the working "
                         f"directory, {os.getcwd()}; presets expect the repository root)")
    return config


def _write_json(path: Path, data: dict) -> None:
    # atomic, so a kill never leaves a half-written record
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n", "record")


def read_record(path: Path) -> dict | None:
    p = Path(path) / RECORD
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{p}: corrupt run record ({err})") from None


def provenance() -> dict:
    """What code ran the study: versions, and the git commit of the drpo sources when they live
    in a git checkout ('dirty' when they differ from it). Appended to OUT/provenance.jsonl on
    every start, so a resumed study shows if the code changed in between."""
    import platform

    import torch

    import drpo

    src = Path(drpo.__file__).resolve().parent
    info = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "drpo": drpo.__version__, "drpo_path": str(src),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "git_commit": None, "git_dirty": None}
    try:
        git = ["git", "-C", str(src)]
        info["git_commit"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                                            check=True, timeout=10).stdout.strip()
        status = subprocess.run(git + ["status", "--porcelain", "--", "."], capture_output=True, text=True,
                                check=True, timeout=10).stdout
        info["git_dirty"] = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout (an installed package): versions only
    return info


def prepare(grid: Grid, runs: Sequence[RunSpec], out: Path, config: str | None = None) -> None:
    """Create OUT, save the grid, and write/check each run's record. A run directory that holds
    a different run (other overrides) is an error, not something to silently overwrite."""
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    data = grid.model_dump(mode="json")
    data["config"] = str(config) if config else grid.config
    atomic_write(out / "grid.yaml", yaml.safe_dump(data, sort_keys=False), "grid")
    append_to(out / "provenance.jsonl", json.dumps(provenance()), "provenance")
    for spec in runs:
        d = run_dir(out, spec)
        d.mkdir(parents=True, exist_ok=True)
        record, want = read_record(d), spec.as_record()
        if record is None:
            _write_json(d / RECORD, {**want, "status": "pending", "attempts": 0, "wall_s": 0.0})
        elif diff := sorted(k for k in want if record.get(k) != want[k]):
            raise ValueError(f"{d}: this run directory was made for a different run (differs in {', '.join(diff)}); "
                             f"use another --out or delete it")


def _die_with_parent() -> None:
    # Linux: the child gets SIGTERM when the compare process dies, even by SIGKILL, so a
    # killed study leaves no orphan runs writing into directories the next start will reuse.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class _Active:
    spec: RunSpec
    proc: subprocess.Popen
    log: object
    started: float


@dataclass
class Outcome:
    finished: list[str] = field(default_factory=list)  # finished in this invocation
    skipped: list[str] = field(default_factory=list)  # already finished before
    diverged: list[str] = field(default_factory=list)  # exit code 3: non-finite loss/weights (a result)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (run_id, reason)


def _launch(spec: RunSpec, out: Path, config: str | None, threads: int, python: str) -> _Active:
    d = run_dir(out, spec)
    # An earlier attempt left a run behind: `drpo train` refuses to overwrite one, so the rerun
    # passes --resume (it continues from the last good checkpoint, or starts over when there is none).
    resume = (d / "metrics.jsonl").exists() or (d / "checkpoints").exists()
    cmd = train_command(spec, out, config=config, resume=resume, threads=threads, python=python)
    env = {"TOKENIZERS_PARALLELISM": "false", **os.environ,
           **dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"), str(threads))}
    record = read_record(d) or spec.as_record()
    record.update(status="running", attempts=int(record.get("attempts", 0)) + 1, command=cmd, resumed=resume)
    _write_json(d / RECORD, record)
    log = open(d / LOG, "a")
    log.write(f"\n=== attempt {record['attempts']} {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    record["pid"] = proc.pid
    _write_json(d / RECORD, record)
    return _Active(spec, proc, log, time.monotonic())


def _settle(active: _Active, out: Path, rc: int, interrupted: bool = False) -> tuple[str, str | None]:
    """Record how a finished process went; returns (status, failure reason or None)."""
    active.log.close()
    d = run_dir(out, active.spec)
    record = read_record(d) or active.spec.as_record()
    elapsed = time.monotonic() - active.started
    record["wall_s"] = float(record.get("wall_s", 0.0)) + elapsed
    record["rc"] = rc
    reason, status = None, "finished"
    if rc == DIVERGED_EXIT and not interrupted:
        status = "diverged"
    elif rc != 0:
        reason, status = f"exit code {rc}; see {d / LOG}", "failed"
    elif not (d / SUMMARY).is_file():
        reason, status = f"exited 0 without writing {SUMMARY}; see {d / LOG}", "failed"
    record["status"] = "interrupted" if interrupted else status
    record.pop("error", None)
    if reason:
        record["error"] = reason
    _write_json(d / RECORD, record)
    return status, reason


def _reap(active: list[_Active], out: Path, outcome: Outcome, bar) -> None:
    """Settle the runs whose process has ended, removing them from `active`, into the outcome;
    a divergence or failure is said at once."""
    for a in list(active):
        rc = a.proc.poll()
        if rc is None:
            continue
        active.remove(a)
        status, reason = _settle(a, out, rc)
        run_id = a.spec.run_id
        if status == "finished":
            outcome.finished.append(run_id)
        elif status == "diverged":
            outcome.diverged.append(run_id)
            tqdm.write(f"run {run_id} diverged (non-finite loss or weights); kept as a result", file=sys.stderr)
        else:
            outcome.failed.append((run_id, reason))
            tqdm.write(f"run {run_id} failed: {reason}", file=sys.stderr)
        bar.update(1)
        bar.set_postfix(failed=len(outcome.failed), refresh=False)


def _stop(active: list[_Active], out: Path) -> None:
    """Interrupted: stop the children, leave their records resumable."""
    for a in active:
        a.proc.terminate()
    for a in active:
        try:
            a.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            a.proc.kill()
            a.proc.wait()
        _settle(a, out, a.proc.returncode, interrupted=True)


def run_grid(grid: Grid, runs: Sequence[RunSpec], out: str | Path, *, workers: int | None = None,
             threads_per_run: int = 1, config: str | None = None, python: str = sys.executable,
             poll_s: float = 0.2, progress: bool = True) -> Outcome:
    """Run every unfinished run of `runs`, `workers` at a time. Finished runs are skipped."""
    out = Path(out)
    if threads_per_run < 1:
        raise ValueError(f"threads_per_run must be >= 1, got {threads_per_run}")
    config = base_config(grid, config)
    workers = default_workers(threads_per_run) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    prepare(grid, runs, out, config)
    t0, started = time.monotonic(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    pending = [spec for spec in runs if not is_finished(run_dir(out, spec))]
    outcome = Outcome(skipped=[spec.run_id for spec in runs if spec not in pending])
    bar = tqdm(total=len(runs), initial=len(outcome.skipped), desc=f"drpo compare {grid.name}",
               unit="run", disable=not progress, dynamic_ncols=True)
    active: list[_Active] = []
    # SIGTERM ends the study like Ctrl-C does: children are stopped, records stay consistent
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if main_thread else None
    try:
        while pending or active:
            while pending and len(active) < workers:
                active.append(_launch(pending.pop(0), out, config, threads_per_run, python))
            time.sleep(poll_s)
            _reap(active, out, outcome, bar)
    finally:
        _stop(active, out)
        bar.close()
        append_to(out / TIMING, json.dumps({  # the study's own wall-clock, one line per invocation
            "started": started, "elapsed_s": time.monotonic() - t0, "workers": workers,
            "runs_ended": len(outcome.finished) + len(outcome.diverged) + len(outcome.failed),
        }), "timing")
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return outcome


def _raise_interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt(f"signal {signum}")
