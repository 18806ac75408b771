"""Checkpoints: written atomically (drpo.files) with a SHA-256 sidecar, so a truncated
or corrupt file is detected on load and the previous good one is used instead."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import torch

from drpo.files import atomic_write, atomic_writer, die, fault, sweep_temp_files

_NAME = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or corrupt."""


class IncompleteCheckpoint(CheckpointError):
    """A checkpoint whose sidecar was never written: its writer died between the two renames.
    Not damage, an unfinished save, so a resume ignores it."""


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}.pt"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any], *, keep: int = 2) -> Path:
    """Save `state` (model, optimizer, RNG states, step, data position...) as step_<step>.pt
    plus step_<step>.pt.json holding its size and SHA-256; prune to the newest `keep`."""
    path = checkpoint_path(ckpt_dir, step)
    # Streamed into the temp file (no second in-memory copy of a large model).
    with atomic_writer(path, "checkpoint") as f:
        torch.save(state, f)
    meta = {"step": step, "bytes": path.stat().st_size, "sha256": _sha256_file(path)}
    # The sidecar is written last: a checkpoint without one is incomplete, so one whose
    # sidecar cannot be written (full disk) is removed rather than left half-saved.
    try:
        atomic_write(path.with_name(path.name + ".json"), json.dumps(meta), "sidecar")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        old.unlink(missing_ok=True)
        if fault("prune.between") == "kill":
            die()
        old.with_name(old.name + ".json").unlink(missing_ok=True)
    sweep_temp_files(ckpt_dir)  # left by a writer killed mid-write
    return path


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoint files, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load and verify one checkpoint; CheckpointError says what is wrong with it."""
    path = Path(path)
    meta_path = path.with_name(path.name + ".json")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not meta_path.is_file():
        raise IncompleteCheckpoint(f"checkpoint {path} is incomplete: its checksum file {meta_path.name} is missing")
    try:
        meta = json.loads(meta_path.read_text())
        expected_size, expected_sha = int(meta["bytes"]), str(meta["sha256"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path}: checksum file {meta_path.name} is unreadable ({err})") from None
    data = path.read_bytes()
    if len(data) != expected_size:
        raise CheckpointError(f"checkpoint {path} is truncated: {len(data)} bytes, expected {expected_size}")
    actual_sha = hashlib.sha256(data).hexdigest()
    if actual_sha != expected_sha:
        raise CheckpointError(f"checkpoint {path} is corrupt: sha256 {actual_sha[:16]}... != recorded {expected_sha[:16]}...")
    try:
        # weights_only=False: the RNG states include numpy/python objects; the file is our own
        # and its checksum was just verified.
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as err:  # a valid checksum of a bad payload (written by something else)
        raise CheckpointError(f"checkpoint {path} cannot be unpickled: {err}") from None


def load_latest_checkpoint(ckpt_dir: Path, warn=print) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies, skipping (and reporting through `warn`) corrupt and
    incomplete ones; None when there is none. Raises CheckpointError if complete checkpoints
    exist but all are bad."""
    errors = []
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return path, load_checkpoint(path)
        except IncompleteCheckpoint as err:  # an unfinished save, not a loss
            warn(f"warning: {err}; ignoring it")
        except CheckpointError as err:
            errors.append(str(err))
            warn(f"warning: {err}; falling back to the previous checkpoint")
    if errors:
        raise CheckpointError("no usable checkpoint in " + str(ckpt_dir) + ":\n  " + "\n  ".join(errors))
    return None
