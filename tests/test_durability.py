"""Every file `drpo train` writes reaches the disk before it counts: the fault tests' SIGKILL
keeps the page cache, so they cannot see a missing fsync; this test watches the calls.

A real run (in-process, every writer: config, warm-start cache, metrics lines, checkpoints and
sidecars, rollout dumps, curves, summary) with os.fsync / os.replace / os.write wrapped. Each
file left in the run directory and the cache must be either renamed into place from a temp file
fsynced before the rename, its directory fsynced after, or (metrics.jsonl, an append-only log)
fsynced after its last write. Not ours, so not checked: drpo.lock (an flock whose content is
only the pid for messages), the warm start's lock file, TensorBoard's event files (a view of
metrics.jsonl, written by TensorBoard's own writer)."""

from __future__ import annotations

import os
from pathlib import Path

from train_helpers import fast_config

from drpo.train.loop import train

NOT_OURS = ("drpo.lock", ".lock")


def _path_of(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def record_calls(monkeypatch) -> list[tuple]:
    """Wraps os.fsync, os.replace and os.write; returns the log of (call, path[, path])."""
    calls: list[tuple] = []
    fsync, replace, write = os.fsync, os.replace, os.write

    def fsync_(fd):
        calls.append(("fsync", _path_of(fd if isinstance(fd, int) else fd.fileno())))
        return fsync(fd)

    def replace_(src, dst, **kw):
        calls.append(("replace", os.path.abspath(src), os.path.abspath(dst)))
        return replace(src, dst, **kw)

    def write_(fd, data):
        calls.append(("write", _path_of(fd)))
        return write(fd, data)

    monkeypatch.setattr(os, "fsync", fsync_)
    monkeypatch.setattr(os, "replace", replace_)
    monkeypatch.setattr(os, "write", write_)
    return calls


def undurable(path: Path, calls: list[tuple]) -> str | None:
    """Why `path` might not survive a power loss, or None."""
    p = str(path.resolve())
    replaced = [i for i, c in enumerate(calls) if c[0] == "replace" and c[2] == p]
    if replaced:
        i = replaced[-1]
        src = calls[i][1]
        if ("fsync", src) not in calls[:i]:
            return f"renamed from {src} without an fsync of it first"
        if ("fsync", str(path.parent.resolve())) not in calls[i + 1:]:
            return "its directory was not fsynced after the rename"
        return None
    writes = [i for i, c in enumerate(calls) if c == ("write", p)]
    if not writes:
        return "written by neither an atomic rename nor an fsynced append"
    if ("fsync", p) not in calls[writes[-1]:]:
        return "not fsynced after its last append"
    return None


def test_every_file_a_run_writes_is_fsynced(tmp_path, monkeypatch):
    cfg = fast_config(tmp_path, "train.steps=2", "train.save_every=1", "train.eval_every=1", "dump.every=1")
    calls = record_calls(monkeypatch)
    train(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    files = [p for p in [*(tmp_path / "run").rglob("*"), *(tmp_path / "cache").rglob("*")]
             if p.is_file() and "tensorboard" not in p.parts and not p.name.endswith(NOT_OURS)]
    names = {p.name for p in files}
    # every kind of file is there to be checked
    assert {"config.yaml", "metrics.jsonl", "summary.json", "curves.png", "step_00000002.pt",
            "step_00000002.pt.json"} <= names, names
    assert any(n.endswith(".parquet") for n in names) and any(p.parent.name == "warmstart" for p in files), names
    bad = {str(p.relative_to(tmp_path)): why for p in files if (why := undurable(p, calls))}
    assert not bad, bad


def test_the_check_sees_a_missing_fsync(tmp_path):
    """A file renamed into place without an fsync, and a log appended without one, are named."""
    target, log = tmp_path / "f.json", tmp_path / "log.jsonl"
    tmp = tmp_path / ".f.json.tmp.1"
    calls = [("replace", str(tmp), str(target)), ("fsync", str(tmp_path)), ("write", str(log))]
    target.write_text("{}")
    log.write_text("{}\n")
    assert "without an fsync" in undurable(target, calls)
    assert "not fsynced after its last append" in undurable(log, calls)
    calls = [("fsync", str(tmp)), ("replace", str(tmp), str(target)), ("write", str(log)), ("fsync", str(log))]
    assert "directory was not fsynced" in undurable(target, calls) and undurable(log, calls) is None
