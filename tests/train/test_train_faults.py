"""Fault injection across every write a run makes: `drpo train` killed (SIGKILL) at each
point, including inside every write, then resumed, must end with exactly the metrics (and, when
dumping, the rollout dump) of an uninterrupted run; a full disk at each write must stop the run with a clear error and lose
nothing; a second writer on a run directory is refused; `drpo compare` killed mid-way and
restarted finishes the study; a policy whose numbers overflow ends the run as diverged (exit 3,
a collapse in the study), a config error stays a failure (exit 2).

Faults are injected through DRPO_FAULT_AT (drpo.files): the process SIGKILLs itself at
the named point, or lowers RLIMIT_FSIZE so the kernel refuses that write (EFBIG). Each run is
a real `drpo train` (drpo.cli.main) in its own process, forked from a server that imported
drpo once (a fresh interpreter costs ~10 s on the shared 2-core box).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from drpo.files import LOCK_FILE
from drpo.train.checkpoint import list_checkpoints, load_checkpoint
from drpo.train.metrics import TIMING_KEYS, read_metrics

pytestmark = pytest.mark.slow

STEPS = 6
# A very small model warm-started on 1-digit sums (~0.3 accuracy, ~125 SFT steps, cached once),
# so rewards vary within groups and the updates move the weights. 6 steps, checkpoints at 2,
# 4, 6 (keep 2: the step-6 save prunes step 2), evals at 0, 3, 6; stale engine weights, two
# updates per rollout and a warmup: all of it must survive a kill.
SETTINGS = (
    "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
    "warmstart.steps=400", "warmstart.batch_size=32", "warmstart.check_size=32", "warmstart.check_every=25",
    "warmstart.target_accuracy=0.3", "warmstart.lr=3e-3", "warmstart.on_miss=continue",
    "task.digits=1", "task.eval_size=16", "rollout.prompts_per_step=8", "rollout.n_samples=4",
    "rollout.max_new_tokens=3", "rollout.sync_every=2", "optim.lr=1e-3", "optim.updates_per_rollout=2",
    "optim.warmup_steps=3", "train.steps=6", "train.save_every=2", "train.eval_every=3",
    "train.keep_checkpoints=2", "train.threads=1",
)

# (scenario, faults of successive attempts): each attempt but the last is killed at its fault.
# Points: <kind>.write = inside the write (half the bytes on disk), .rename = complete temp
# file not yet renamed, .done = just after. metrics.write:N is the N-th metrics line (step N-1).
KILLS = [
    ("config.write:1",), ("config.rename:1",),
    ("warmstart.write:1",), ("warmstart.rename:1",),
    ("metrics.write:1",), ("metrics.write:4",), ("metrics.done:3",), ("metrics.write:7",),
    ("checkpoint.write:1",), ("checkpoint.rename:1",), ("checkpoint.done:1",), ("checkpoint.write:3",),
    ("sidecar.write:2",), ("sidecar.rename:2",), ("sidecar.done:2",),
    ("prune.between:1",),
    ("curves.write:1",), ("curves.rename:1",),
    ("summary.write:1",), ("summary.rename:1",),
    # a resume killed while it truncates metrics.jsonl (rows 5 logged after checkpoint 4)
    ("metrics.done:6", "truncate.write:1"), ("metrics.done:6", "truncate.rename:1"),
    # killed twice: inside a checkpoint, then the resume inside its first metrics line
    ("checkpoint.write:2", "metrics.write:1"),
]
# A full disk at each write: the run stops with a clear error and loses nothing.
FULL = ["config.write:1", "warmstart.write:1", "metrics.write:1", "metrics.write:5", "checkpoint.write:1",
        "checkpoint.write:3", "sidecar.write:2", "curves.write:1", "summary.write:1", "truncate.write:1"]

_results: dict[str, list] = {"kill": [], "full": []}


def _child(argv: list[str], fault: str | None, cache: str, log: str) -> None:
    """A `drpo train` process: output to the FIFO `log` (a full-disk fault limits the size of
    regular files, not of pipes), fault armed, shared warm-start cache."""
    fd = os.open(log, os.O_WRONLY)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ["DRPO_CACHE"] = cache
    os.environ.pop("DRPO_FAULT_AT", None)
    if fault:
        os.environ["DRPO_FAULT_AT"] = fault
    from drpo.cli import main

    try:
        rc = main(argv)
    except SystemExit as err:
        rc = err.code if isinstance(err.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


@pytest.fixture(scope="module")
def ctx():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["drpo.cli", "drpo.train.cli", "drpo.train.loop"])
    return ctx


class Runner:
    def __init__(self, ctx, root: Path):
        self.ctx, self.root = ctx, root
        self.cache = root / "cache"  # the warm start, trained once and shared
        self.n = 0

    def start(self, out: Path, fault: str | None = None, *, resume: bool = False, cache: Path | None = None,
              sets: tuple[str, ...] = ()):
        self.n += 1
        fifo = self.root / f"attempt{self.n}.fifo"
        os.mkfifo(fifo)
        # the cache comes from $DRPO_CACHE, not a config key, so a scenario with its own cache
        # has the same config as the reference
        argv = ["train", "--no-progress", "--out", str(out)]
        for item in (*SETTINGS, *sets):
            argv += ["--set", item]
        if resume:
            argv.append("--resume")
        proc = self.ctx.Process(target=_child, args=(argv, fault, str(cache or self.cache), str(fifo)))
        proc.fifo = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # before the child opens it for writing
        proc.start()
        return proc

    @staticmethod
    def output(proc) -> str:
        """Everything the process wrote, once it has exited."""
        chunks = []
        while True:
            try:
                data = os.read(proc.fifo, 1 << 16)
            except BlockingIOError:
                data = None
            if data:
                chunks.append(data)
                continue
            if not proc.is_alive():
                if data == b"" or data is None:
                    break
            time.sleep(0.05)
        os.close(proc.fifo)
        return b"".join(chunks).decode(errors="replace")

    def run(self, *args, **kwargs):
        proc = self.start(*args, **kwargs)
        log = self.output(proc)
        proc.join(600)
        assert proc.exitcode is not None, "drpo train hung"
        return proc.exitcode, log


def _comparable(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.fixture(scope="module")
def harness(ctx, tmp_path_factory, pytestconfig):
    root = tmp_path_factory.mktemp("faults")
    runner = Runner(ctx, root)
    rc, log = runner.run(root / "reference")
    assert rc == 0, log
    ref = _comparable(read_metrics(root / "reference" / "metrics.jsonl"))
    assert [r["step"] for r in ref] == list(range(STEPS + 1))
    yield runner, ref
    kills, full = _results["kill"], _results["full"]
    if kills:
        _say(pytestconfig, f"fault injection: {len(kills)} kill points, {sum(kills)} survived with identical metrics")
    if full:
        _say(pytestconfig, f"fault injection: {len(full)} full-disk points, {sum(full)} clear errors, nothing lost")


def _say(pytestconfig, line: str) -> None:
    """Print past pytest's output capture (the harness's result belongs in every CI log)."""
    with pytestconfig.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print("\n" + line, flush=True)


@pytest.mark.parametrize("faults", KILLS, ids=["+".join(f) for f in KILLS])
def test_killed_at_each_point_then_resumed_gives_identical_metrics(harness, faults, tmp_path):
    runner, ref = harness
    out = tmp_path / "run"
    # the warm-start faults need a cache that does not hold it yet
    cache = tmp_path / "cache" if faults[0].startswith("warmstart") else None
    survived = False
    try:
        for i, fault in enumerate(faults):
            rc, log = runner.run(out, fault, resume=i > 0, cache=cache)
            assert rc == -signal.SIGKILL, f"fault {fault} never fired (exit {rc}):\n{log}"
        rc, log = runner.run(out, resume=True, cache=cache)
        assert rc == 0, log
        assert _comparable(read_metrics(out / "metrics.jsonl")) == ref
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == STEPS and summary["final_accuracy"] == ref[-1]["eval/accuracy"]
        assert not [p.name for p in out.rglob(".*.tmp.*")], "temp files left behind"
        survived = True
    finally:
        _results["kill"].append(survived)


# Rollout dumps (dump.every=1: one shard per step, each a temp file renamed into place when the
# step's batch is written): killed inside a shard's write, before its rename, just after it (a
# redone step already dumped), and where the resume redoes steps already dumped.
DUMP = ("dump.every=1",)
DUMP_KILLS = [("dump.write:2",), ("dump.rename:3",), ("dump.done:3",), ("metrics.done:6",),
              ("checkpoint.write:2",), ("dump.done:5", "dump.write:1")]


def _dump_rows(directory: Path) -> list[dict]:
    import pyarrow.parquet as pq

    rows = [r for f in sorted(directory.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    return sorted(rows, key=lambda r: (r["step"], r["sample_id"]))


@pytest.fixture(scope="module")
def dumped_reference(harness, tmp_path_factory):
    runner, ref = harness
    out = tmp_path_factory.mktemp("dumped") / "reference"
    rc, log = runner.run(out, sets=DUMP)
    assert rc == 0, log
    assert _comparable(read_metrics(out / "metrics.jsonl")) == ref  # dumping only observes
    rows = _dump_rows(out / "dumps")
    assert [r["step"] for r in rows] == sorted(list(range(1, STEPS + 1)) * 32)  # 8 prompts x 4 samples a step
    return rows


@pytest.mark.parametrize("faults", DUMP_KILLS, ids=["+".join(f) for f in DUMP_KILLS])
def test_killed_while_dumping_then_resumed_dumps_each_step_once(harness, dumped_reference, faults, tmp_path):
    """A resumed run's dump holds every step once, with the uninterrupted run's values, and
    `drpo inspect` reads the folder after each kill."""
    runner, ref = harness
    out = tmp_path / "run"
    survived = False
    try:
        for i, fault in enumerate(faults):
            rc, log = runner.run(out, fault, resume=i > 0, sets=DUMP)
            assert rc == -signal.SIGKILL, f"fault {fault} never fired (exit {rc}):\n{log}"
            if list((out / "dumps").glob("*.parquet")):  # what a kill leaves is readable
                res = subprocess.run([sys.executable, "-m", "drpo.cli", "inspect", str(out / "dumps"), "--out",
                                      str(tmp_path / f"inspect{i}"), "--method", "drpo"], capture_output=True, text=True)
                assert res.returncode == 0, res.stderr
                assert ("unfinished shard" in res.stdout) == bool(list((out / "dumps").glob(".*.tmp.*"))), res.stdout
        rc, log = runner.run(out, resume=True, sets=DUMP)
        assert rc == 0, log
        assert _comparable(read_metrics(out / "metrics.jsonl")) == ref
        assert _dump_rows(out / "dumps") == dumped_reference
        assert not [p.name for p in out.rglob(".*.tmp.*")], "temp files left behind"
        survived = True
    finally:
        _results["kill"].append(survived)


@pytest.mark.parametrize("point", FULL)
def test_full_disk_at_each_write_is_a_clear_error_and_loses_nothing(harness, point, tmp_path):
    runner, ref = harness
    out = tmp_path / "run"
    cache = tmp_path / "cache" if point.startswith("warmstart") else None
    ok = False
    try:
        if point.startswith("truncate"):  # a resume truncates: kill a run after step 5's line first
            assert runner.run(out, "metrics.done:6", cache=cache)[0] == -signal.SIGKILL
        before_ckpts = {p.name for p in list_checkpoints(out / "checkpoints")}
        before_rows = read_metrics(out / "metrics.jsonl")
        rc, log = runner.run(out, point + ":full", resume=point.startswith("truncate"), cache=cache)
        # a clear error: exit 2, one line naming the file and what is intact, no traceback
        assert rc == 2, log
        assert "Traceback" not in log, log
        message = [line for line in log.splitlines() if line.startswith("drpo train: ")]
        assert len(message) == 1 and "disk full while writing" in message[0] and "File too large" in message[0], log
        assert "continue with --resume" in message[0]
        # nothing lost: every metrics line complete and equal to the reference's, every earlier
        # checkpoint still there and verifying, no temp file left
        rows = read_metrics(out / "metrics.jsonl")
        assert _comparable(rows) == ref[: len(rows)] and len(rows) >= len(before_rows)
        kept = list_checkpoints(out / "checkpoints")
        assert before_ckpts <= {p.name for p in kept}
        for path in kept:
            load_checkpoint(path)
        assert not [p.name for p in out.rglob(".*.tmp.*")], "temp files left behind"
        if (out / "config.yaml").exists():
            yaml.safe_load((out / "config.yaml").read_text())
        # and the space freed, the run continues to the uninterrupted run's metrics
        rc, log = runner.run(out, resume=(out / "config.yaml").exists(), cache=cache)
        assert rc == 0, log
        assert _comparable(read_metrics(out / "metrics.jsonl")) == ref
        ok = True
    finally:
        _results["full"].append(ok)


def test_second_writer_on_a_run_directory_is_refused_naming_the_lock(harness, tmp_path, pytestconfig):
    runner, _ = harness
    out = tmp_path / "run"
    assert runner.run(out, "metrics.done:3")[0] == -signal.SIGKILL
    first = runner.start(out, resume=True)
    lock = out / LOCK_FILE
    deadline = time.time() + 120
    while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
        assert first.is_alive() and time.time() < deadline
        time.sleep(0.01)
    t0 = time.time()
    rc, log = runner.run(out, resume=True)
    elapsed = time.time() - t0
    first_log = Runner.output(first)
    first.join(600)
    assert first.exitcode == 0, first_log
    assert rc == 2 and elapsed < 10, (rc, elapsed, log)
    assert f"is in use by another drpo process (pid {first.pid}, lock file {lock})" in log, log
    _say(pytestconfig, f"second --resume refused after {elapsed:.1f} s: {log.strip().splitlines()[-1]}")


def test_killed_compare_restarts_and_finishes_with_uninterrupted_metrics(harness, tmp_path):
    runner, ref = harness
    base = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in SETTINGS)}
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"name": "faults", "base": base, "settings": {"fp32": {}},
                                    "methods": ["drpo", "grpo"], "seeds": [0]}))
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "drpo.cli", "compare", "--grid", str(grid), "--out", str(out), "--workers", "1",
           "--quiet", "--no-report"]
    env = {**os.environ, "DRPO_CACHE": str(runner.cache)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while not list((out / "runs").glob("*/checkpoints/step_00000002.pt.json")):  # mid-way through the first run
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    time.sleep(1)  # its `drpo train` child gets SIGTERM from the kernel when compare dies
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 2 and all((d / "summary.json").is_file() for d in runs)
    drpo_run = next(d for d in runs if "drpo" in d.name)
    # the killed and resumed run is the drpo one, the reference's method: its metrics are the
    # uninterrupted run's
    records = {d.name: json.loads((d / "study_run.json").read_text()) for d in runs}
    assert {name: r["attempts"] for name, r in records.items()} == {d.name: 2 if d == drpo_run else 1 for d in runs}
    assert _comparable(read_metrics(drpo_run / "metrics.jsonl")) == ref


# ------------------------------------------------------------------ overflowing policies
# lr 1e10 moves every trained weight by ~1e10 in the first optimizer step: the weights stay
# finite, but the next forward's attention scores (~1e40) overflow to NaN hidden states.
OVERFLOW_LR = "optim.lr=1e10"


def _overflowing_warm_start(cache: Path, tmp_path: Path) -> Path:
    """A copy of the shared warm-start cache whose final norm weight is inf: the engine's
    logits are NaN, so the first sampled rollout cannot be drawn."""
    target = tmp_path / "cache" / "warmstart"
    target.mkdir(parents=True)
    entries = list((cache / "warmstart").glob("*.pt"))
    assert len(entries) == 1, entries
    blob = torch.load(entries[0], map_location="cpu", weights_only=True)
    blob["model"]["model.norm.weight"][0] = float("inf")
    torch.save(blob, target / entries[0].name)
    return tmp_path / "cache"


# (case, extra settings, exit code, message): an overflowing policy diverges wherever its numbers
# first go non-finite; a config error, refused at load or once the run has started, stays exit 2.
OVERFLOW_CASES = [
    ("trainer forward", (OVERFLOW_LR,), 3,
     "drpo train: diverged: the policy's forward overflowed: `hidden` has a non-finite value"),
    ("rollout sampling", (), 3,  # with the inf warm start
     "drpo train: diverged: non-finite logits at response position 0 from the engine's weights"),
    ("config error at load", ("optim.lr=-1",), 2, "config key 'optim.lr' = -1: Input should be greater than 0"),
    ("config error in the run", ("rollout.max_new_tokens=200",), 2,
     "drpo train: arithmetic train example 0: prompt '8+6=' is 5 tokens; with rollout.max_new_tokens=200"),
]


@pytest.mark.parametrize("case,sets,code,message", OVERFLOW_CASES, ids=[c[0] for c in OVERFLOW_CASES])
def test_overflowing_policy_exits_diverged_and_a_config_error_still_fails(harness, case, sets, code, message,
                                                                          tmp_path):
    runner, _ = harness
    out = tmp_path / "run"
    cache = _overflowing_warm_start(runner.cache, tmp_path) if case == "rollout sampling" else None
    rc, log = runner.run(out, cache=cache, sets=sets)
    assert (rc, message in log) == (code, True), log
    assert "Traceback" not in log and ("diverged" in log) == (code == 3), log
    assert not (out / "summary.json").exists()  # not a finished run
    if code == 3:  # the steps before the divergence are kept as results
        assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0]


def test_study_counts_an_overflowing_run_as_diverged(harness, tmp_path, monkeypatch):
    from drpo.study.grid import expand, parse_grid
    from drpo.study.report import load_study
    from drpo.study.runner import is_finished, read_record, run_grid

    runner, _ = harness
    base = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in (*SETTINGS, OVERFLOW_LR))}
    grid = parse_grid({"name": "overflow", "base": base, "settings": {"fp32": {}}, "methods": ["drpo"], "seeds": [0]})
    runs = expand(grid)
    out = tmp_path / "study"
    monkeypatch.setenv("DRPO_CACHE", str(runner.cache))
    outcome = run_grid(grid, runs, out, workers=1, progress=False)
    run_id = runs[0].run_id
    assert (outcome.diverged, outcome.failed) == ([run_id], []), (out / "runs" / run_id / "train.log").read_text()
    d = out / "runs" / run_id
    assert read_record(d)["status"] == "diverged" and read_record(d)["rc"] == 3
    assert is_finished(d)  # a result: a restarted study does not rerun it
    study = load_study(out)
    assert [r.diverged for r in study.runs] == [True]
    assert study.runs[0].rows[-1]["eval/accuracy"] == 0.0  # counted as a collapse to the planned end


def test_bad_input_to_the_policy_forward_stays_a_value_error(tmp_path):
    """Only a non-finite forward is turned into a divergence: a bad input is still refused as one."""
    from train_helpers import fast_config

    from drpo.tasks import make_task
    from drpo.train.setup import load_model, make_policy

    cfg = fast_config(tmp_path, "warmstart.enabled=false")
    model, _, _ = load_model(cfg, make_task(cfg.task, cfg.seed), torch.device("cpu"), log=lambda _: None)
    policy = make_policy(model, cfg)
    ids = torch.ones((2, 6), dtype=torch.long)
    assert policy.logprobs(ids, torch.ones_like(ids), 3).shape == (2, 3)
    with pytest.raises(ValueError, match=r"`response_start` must be an int in \[1, 5\], got 0"):
        policy.logprobs(ids, torch.ones_like(ids), 0)
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"overflowed: `hidden` has a non-finite value .* weights are non-finite"):
        policy.logprobs(ids, torch.ones_like(ids), 3)
