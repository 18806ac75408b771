"""Checkpoints: atomic writes, corruption detection, fall-back to the previous good one,
and exact resumption (SIGKILL mid-run, then --resume)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from drpo.train.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)
from drpo.train.loop import train
from drpo.train.metrics import TIMING_KEYS, read_metrics
from train_helpers import fast_args, fast_config


def _state(step):
    return {"step": step, "w": torch.full((64,), float(step)), "rng": torch.get_rng_state()}


def test_save_load_roundtrip_and_pruning(tmp_path):
    (tmp_path / ".step_00000001.pt.tmp.999").write_bytes(b"partial write of a killed process")
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, _state(step), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002.pt", "step_00000003.pt"]
    assert not list(tmp_path.glob(".*.tmp.*"))  # no temp files left behind
    ckpt = load_checkpoint(tmp_path / "step_00000003.pt")
    assert ckpt["step"] == 3 and torch.equal(ckpt["w"], torch.full((64,), 3.0))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "is truncated"),
        (lambda p: p.write_bytes(p.read_bytes()[:100] + bytes([p.read_bytes()[100] ^ 0xFF]) + p.read_bytes()[101:]), "is corrupt: sha256"),
        (lambda p: p.with_name(p.name + ".json").unlink(), "checksum file step_00000002.pt.json is missing"),
        (lambda p: p.with_name(p.name + ".json").write_text("{oops"), "is unreadable"),
    ],
)
def test_damaged_checkpoint_is_detected_and_previous_used(tmp_path, damage, message):
    save_checkpoint(tmp_path, 1, _state(1), keep=3)
    save_checkpoint(tmp_path, 2, _state(2), keep=3)
    damage(tmp_path / "step_00000002.pt")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "step_00000002.pt")
    warnings = []
    path, ckpt = load_latest_checkpoint(tmp_path, warn=warnings.append)
    assert path.name == "step_00000001.pt" and ckpt["step"] == 1
    assert len(warnings) == 1 and message.split(":")[0] in warnings[0] and "step_00000002.pt" in warnings[0]


def test_all_checkpoints_bad_is_an_error(tmp_path):
    save_checkpoint(tmp_path, 1, _state(1))
    (tmp_path / "step_00000001.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_latest_checkpoint(tmp_path, warn=lambda *_: None)
    assert load_latest_checkpoint(tmp_path / "empty") is None


def _comparable(rows):
    """metrics rows without the wall-clock keys (time/*, tokens/per_second), which differ
    between any two runs."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.mark.slow
def test_corrupt_latest_checkpoint_resume_uses_previous_and_matches(tmp_path):
    cfg = fast_config(tmp_path, "train.steps=4", "train.save_every=1", "train.keep_checkpoints=2",
                      "rollout.sync_every=2", "optim.updates_per_rollout=2")
    ref = train(cfg, tmp_path / "ref", progress=False, log=lambda *_: None)
    run = tmp_path / "run"
    train(cfg, run, progress=False, log=lambda *_: None)
    newest = run / "checkpoints" / "step_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:-10])  # truncate the newest checkpoint
    (run / "summary.json").unlink()
    logs = []
    summary = train(cfg, run, resume=True, progress=False, log=logs.append)
    assert any("step_00000004.pt is truncated" in m for m in logs)
    assert any("resumed from" in m and "step_00000003.pt" in m for m in logs)
    assert summary["resumed"] is True
    assert _comparable(read_metrics(run / "metrics.jsonl")) == _comparable(read_metrics(tmp_path / "ref" / "metrics.jsonl"))
    assert summary["final_accuracy"] == ref["final_accuracy"]


def _drpo_train(*args):
    return [sys.executable, "-m", "drpo.cli", "train", "--no-progress", *args]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_identical_metrics(tmp_path):
    # Staleness (sync_every=2), several updates per rollout and a stochastic sampler: the
    # checkpoint must carry the engine's stale weights, optimizer, scheduler and RNG states.
    settings = fast_args(tmp_path, "train.steps=10", "train.save_every=2", "train.eval_every=3",
                         "rollout.sync_every=2", "optim.updates_per_rollout=2", "optim.warmup_steps=3")
    ref = subprocess.run(_drpo_train("--out", str(tmp_path / "ref"), *settings), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr

    run = tmp_path / "run"
    proc = subprocess.Popen(_drpo_train("--out", str(run), *settings), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step_00000004.pt.json").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "summary.json").exists(), "the run finished before the kill; nothing was tested"
    killed_at = max(r["step"] for r in read_metrics(run / "metrics.jsonl"))
    assert killed_at < 10

    res = subprocess.run(_drpo_train("--out", str(run), "--resume", *settings), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stderr
    got, want = read_metrics(run / "metrics.jsonl"), read_metrics(tmp_path / "ref" / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(11))
    assert _comparable(got) == _comparable(want)
    assert json.loads((run / "summary.json").read_text())["final_accuracy"] == json.loads(
        (tmp_path / "ref" / "summary.json").read_text()
    )["final_accuracy"]


def test_save_sweeps_temp_files_of_this_or_dead_writers_only(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine, gone, other = (tmp_path / f".step_00000001.pt.tmp.{pid}" for pid in (os.getpid(), dead.stdout.strip(), live.pid))
        for p in (mine, gone, other):
            p.write_bytes(b"partial")
        save_checkpoint(tmp_path, 1, _state(1))
        assert not mine.exists() and not gone.exists()
        assert other.exists()  # a live writer's temp file is never touched
    finally:
        live.kill()
        live.wait()


def test_checkpoint_without_sidecar_is_an_unfinished_save_and_ignored(tmp_path):
    # killed between the checkpoint's rename and its sidecar's: nothing usable, nothing damaged
    save_checkpoint(tmp_path, 2, _state(2))
    (tmp_path / "step_00000002.pt.json").unlink()
    warnings = []
    assert load_latest_checkpoint(tmp_path, warn=warnings.append) is None
    assert len(warnings) == 1 and "is incomplete" in warnings[0] and "ignoring it" in warnings[0]


def test_second_writer_on_a_run_directory_gets_the_lock_holder(tmp_path):
    from drpo.files import LOCK_FILE, dir_lock
    from drpo.train.setup import RunError

    cfg = fast_config(tmp_path, "train.steps=1")
    with dir_lock(tmp_path / "run"):
        t0 = time.time()
        with pytest.raises(RunError) as err:
            train(cfg, tmp_path / "run", resume=True, progress=False, log=lambda *_: None)
        assert time.time() - t0 < 5
    lock = tmp_path / "run" / LOCK_FILE
    assert str(err.value) == (f"run directory {tmp_path / 'run'} is in use by another drpo process "
                              f"(pid {os.getpid()}, lock file {lock}); wait for it to finish or stop it")
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before writing anything


@pytest.mark.slow
def test_resume_compares_only_the_keys_set_and_keeps_the_saved_config(tmp_path):
    from drpo.train.setup import RunError

    cfg = fast_config(tmp_path, "train.steps=2", "train.save_every=1")
    run = tmp_path / "run"
    train(cfg, run, progress=False, log=lambda *_: None)
    saved = run / "config.yaml"
    # a run made by a drpo whose default beta2 was 0.99: nobody set it, so resuming is fine and
    # the run keeps the value it started with
    assert "beta2: 0.999\n" in saved.read_text()
    saved.write_text(saved.read_text().replace("beta2: 0.999\n", "beta2: 0.99\n"))
    before = saved.read_text()
    summary = train(cfg, run, resume=True, progress=False, log=lambda *_: None)
    assert summary["resumed"] is True and saved.read_text() == before
    # a key set now to another value than the saved one is refused, naming it and both values
    other = fast_config(tmp_path, "train.steps=2", "train.save_every=1", "optim.beta2=0.999")
    with pytest.raises(RunError, match=r"config different .*: optim.beta2 = 0.999 now, 0.99 saved"):
        train(other, run, resume=True, progress=False, log=lambda *_: None)


@pytest.mark.slow
def test_resumed_steps_appear_once_in_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = fast_config(tmp_path, "train.steps=3", "train.save_every=2", "train.save_final=false", "train.eval_every=1")
    run = tmp_path / "run"
    train(cfg, run, progress=False, log=lambda *_: None)
    train(cfg, run, resume=True, progress=False, log=lambda *_: None)  # redoes step 3 from checkpoint 2
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    rows = read_metrics(run / "metrics.jsonl")
    assert [e.step for e in acc.Scalars("reward/mean")] == [1, 2, 3]
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [0, 1, 2, 3]
    assert [e.value for e in acc.Scalars("reward/mean")] == pytest.approx([r["reward/mean"] for r in rows[1:]])


def test_append_to_a_full_disk_keeps_the_log_whole(tmp_path):
    # A study's provenance/timing logs: the second append hits a full disk; the error names
    # the file and the log keeps exactly its first line (the failed append is cut back off).
    log = tmp_path / "timing.jsonl"
    code = ("import sys; from drpo.files import append_to\n"
            "append_to(sys.argv[1], '{\"a\": 1}', 'timing')\n"
            "append_to(sys.argv[1], '{\"b\": \"' + 'x' * 4000 + '\"}', 'timing')\n")
    env = {**os.environ, "DRPO_FAULT_AT": "timing.write:2:full"}
    proc = subprocess.run([sys.executable, "-c", code, str(log)], env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "DiskFullError" in proc.stderr and str(log) in proc.stderr
    assert log.read_text() == '{"a": 1}\n'
