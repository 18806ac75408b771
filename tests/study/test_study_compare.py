"""End to end: `drpo compare` runs real (tiny, short) `drpo train` processes, `drpo report`
summarizes them, and a killed study resumes with only its unfinished runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from drpo.cli import main

pytestmark = pytest.mark.slow

# small enough for seconds per run; warm start kept tiny and cached per test session
TINY_BASE = {
    "train.steps": 4,
    "train.eval_every": 2,
    "train.save_every": 1,
    "rollout.prompts_per_step": 4,
    "rollout.n_samples": 4,
    "task.eval_size": 16,
    "warmstart.steps": 10,
    "warmstart.on_miss": "continue",  # 10 SFT steps never reach the target
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("drpo-cache")


def write_grid(path: Path, cache: Path, **extra) -> Path:
    grid = {
        "name": "tiny",
        "base": {**TINY_BASE, "warmstart.cache_dir": str(cache)},
        "settings": {"fp32": {"rollout.precision": "fp32"}, "fp8_e2e": {"rollout.precision": "fp8_e2e"}},
        "methods": ["grpo", {"name": "drpo", "method": "drpo", "params": {"delta": 0.15}}],
        "seeds": [0],
        **extra,
    }
    path.write_text(yaml.safe_dump(grid))
    return path


def test_compare_exits_1_when_a_run_fails(tmp_path, cache_dir, capsys):
    # 200 new tokens do not fit the tiny model's positions: each run stops with exit 2 at start
    grid = write_grid(tmp_path / "grid.yaml", cache_dir, settings={"fp32": {"rollout.max_new_tokens": 200}},
                      methods=["grpo"])
    rc = main(["compare", "--grid", str(grid), "--out", str(tmp_path / "results"), "--workers", "1", "--quiet",
               "--no-report"])
    assert rc == 1
    assert "1 failed" in capsys.readouterr().err


def test_compare_and_report_hold_every_run(tmp_path, cache_dir):
    # a third setting whose weights overflow at once (lr 1e30, weight decay 1): diverged runs
    blowup = {"rollout.precision": "fp32", "optim.lr": 1e30, "optim.weight_decay": 1.0}
    settings = {"fp32": {"rollout.precision": "fp32"}, "fp8_e2e": {"rollout.precision": "fp8_e2e"},
                "blowup": blowup}
    grid = write_grid(tmp_path / "grid.yaml", cache_dir, settings=settings)
    out = tmp_path / "results"
    rc = main(["compare", "--grid", str(grid), "--out", str(out), "--workers", "2", "--quiet"])
    assert rc == 0  # a divergence is a result, not a failure
    finished = {f"{s}__{m}__s0" for s in ("fp32", "fp8_e2e") for m in ("grpo", "drpo")}
    diverged = {f"blowup__{m}__s0" for m in ("grpo", "drpo")}
    assert {p.name for p in (out / "runs").iterdir()} == finished | diverged
    for rid in finished:
        d = out / "runs" / rid
        assert (d / "summary.json").is_file() and (d / "metrics.jsonl").is_file()
        rec = json.loads((d / "study_run.json").read_text())
        assert rec["status"] == "finished" and rec["attempts"] == 1 and rec["wall_s"] > 0
        cfg = yaml.safe_load((d / "config.yaml").read_text())  # the trainer got the grid's overrides
        assert cfg["objective"]["method"] == rec["method"]
        assert cfg["rollout"]["precision"] == rid.split("__")[0]
        assert cfg["train"]["threads"] == 1
    for rid in diverged:  # read from the exit code: no summary, not retried
        rec = json.loads((out / "runs" / rid / "study_run.json").read_text())
        assert rec["status"] == "diverged" and rec["rc"] == 3 and rec["attempts"] == 1
        assert not (out / "runs" / rid / "summary.json").exists()

    prov = [json.loads(x) for x in (out / "provenance.jsonl").read_text().splitlines()]
    import drpo
    import torch

    assert len(prov) == 1 and prov[0]["drpo"] == drpo.__version__ and prov[0]["torch"] == torch.__version__
    report = out / "report"
    md = (report / "report.md").read_text()
    assert f"Code: drpo {drpo.__version__}" in md
    assert "`drpo compare` wall-clock: " in md and "over 1 invocation(s) with 2 worker(s)" in md
    for rid in finished | diverged:
        assert f"| {rid} |" in md  # per-run table holds every run
    summary = json.loads((report / "summary.json").read_text())
    assert {(c["setting"], c["variant"]) for c in summary["cells"]} == {
        (s, m) for s in settings for m in ("grpo", "drpo")}
    assert all(c["n"] == 1 for c in summary["cells"]) and summary["unfinished"] == []
    assert all(c["collapsed"] == (c["setting"] == "blowup") for c in summary["cells"])
    for r in summary["runs"]:
        if r["diverged"]:
            assert r["collapsed"] and r["final"] == 0.0
            continue
        # the table's numbers are the runs' own summary and eval accuracies
        rows = [json.loads(x) for x in (out / "runs" / r["run_id"] / "metrics.jsonl").read_text().splitlines()]
        accs = [row["eval/accuracy"] for row in rows if "eval/accuracy" in row]
        run_summary = json.loads((out / "runs" / r["run_id"] / "summary.json").read_text())
        assert [row["step"] for row in rows if "eval/accuracy" in row] == [0, 2, 4]
        assert r["initial"] == accs[0] and r["final"] == accs[-1] == run_summary["final_accuracy"]
        assert r["mean_mismatch"] == run_summary["mean_mismatch"]
        assert r["long_tail"] == run_summary["mean_long_tail_share"] and 0.0 <= r["long_tail"] <= 1.0
    for name in ("accuracy_gain", "mismatch", "beyond_boundary"):
        png = report / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        drawn = summary["figures_drawn"][name]
        assert {(s, v) for s, vs in drawn.items() for v in vs} >= {
            (s, m) for s in ("fp32", "fp8_e2e") for m in ("grpo", "drpo")}, name
    page = (report / "report.html").read_text()  # rendered from report.md, figures inlined
    assert page.count("data:image/png;base64,") == 3 and "<table>" in page and 'src="figures' not in page

    # `drpo report` on its own, into another directory
    assert main(["report", str(out), "--out", str(tmp_path / "rep2"), "--collapse-frac", "1.0"]) == 0
    assert json.loads((tmp_path / "rep2" / "summary.json").read_text())["collapse_frac"] == 1.0

    # a second compare finds everything done and launches nothing
    before = {rid: (out / "runs" / rid / "summary.json").stat().st_mtime_ns for rid in finished}
    assert main(["compare", "--grid", str(grid), "--out", str(out), "--quiet", "--no-report"]) == 0
    assert before == {rid: (out / "runs" / rid / "summary.json").stat().st_mtime_ns for rid in finished}
    assert all(json.loads((out / "runs" / rid / "study_run.json").read_text())["attempts"] == 1 for rid in diverged)
    timing = [json.loads(x) for x in (out / "timing.jsonl").read_text().splitlines()]
    assert [t["runs_ended"] for t in timing] == [6, 0] and all(t["elapsed_s"] > 0 for t in timing)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); look at its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_killed_compare_reruns_only_unfinished_runs(tmp_path, cache_dir):
    grid = write_grid(tmp_path / "grid.yaml", cache_dir, settings={"fp32": {"rollout.precision": "fp32"}},
                      methods=["grpo", "dppo_tv", "pg_is"])
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "drpo.cli", "compare", "--grid", str(grid), "--out", str(out),
           "--workers", "1", "--quiet", "--no-report"]
    first, second, third = (out / "runs" / f"fp32__{m}__s0" for m in ("grpo", "dppo_tv", "pg_is"))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        # kill the study while the second run is underway (it has logged at least its step-0 eval)
        while not ((first / "summary.json").is_file() and (second / "metrics.jsonl").is_file()):
            assert proc.poll() is None, "compare exited before it could be killed"
            assert time.monotonic() < deadline, "runs did not progress"
            time.sleep(0.1)
        child = json.loads((second / "study_run.json").read_text())["pid"]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    # the running `drpo train` dies with the study instead of writing on as an orphan
    deadline = time.monotonic() + 20
    while _pid_alive(child):
        assert time.monotonic() < deadline, f"orphaned train process {child} still running"
        time.sleep(0.1)
    assert not (second / "summary.json").is_file() and not (third / "summary.json").is_file()
    first_done = (first / "summary.json").stat().st_mtime_ns

    rc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr
    assert "2 run(s) finished now" in rc.stderr and "1 already done" in rc.stderr
    assert (first / "summary.json").stat().st_mtime_ns == first_done  # not rerun
    records = {d.name: json.loads((d / "study_run.json").read_text()) for d in (first, second, third)}
    assert records[first.name]["attempts"] == 1
    assert records[second.name]["attempts"] == 2 and records[second.name]["resumed"] is True
    assert records[third.name]["attempts"] == 1
    assert all(r["status"] == "finished" for r in records.values())
    # the resumed run's log holds one row per step, no duplicates from the killed attempt
    steps = [json.loads(x)["step"] for x in (second / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 4


def test_run_dir_of_another_run_is_refused(tmp_path, cache_dir):
    grid = write_grid(tmp_path / "grid.yaml", cache_dir, settings={"fp32": {"rollout.precision": "fp32"}},
                      methods=["grpo"])
    out = tmp_path / "results"
    d = out / "runs" / "fp32__grpo__s0"
    d.mkdir(parents=True)
    (d / "study_run.json").write_text(json.dumps({
        "run_id": "fp32__grpo__s0", "setting": "fp32", "variant": "grpo", "method": "grpo", "params": {},
        "seed": 0, "overrides": {"train.steps": 999}}))
    assert main(["compare", "--grid", str(grid), "--out", str(out), "--quiet"]) == 2
    assert not (d / "metrics.jsonl").exists()


def test_report_errors(tmp_path):
    assert main(["report", str(tmp_path)]) == 2  # no runs/ folder
    (tmp_path / "runs" / "x").mkdir(parents=True)
    assert main(["report", str(tmp_path)]) == 2  # a run directory without a record
