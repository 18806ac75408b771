"""Every file a run or a study writes goes through here:

- `atomic_writer` / `atomic_write` / `save_figure`: temp file in the same directory, fsync,
  rename, so a reader (or a resumed run) sees the old file or the complete new one, never a
  partial one;
- `append_line` / `append_to`: one fsynced line appended to a log; a failed append is cut
  back off, so the log never keeps a torn line;
- `file_lock` / `dir_lock`: an flock holding the owner's pid: waited for (the shared warm-start
  cache), or refused at once (DIR/drpo.lock: two writers never share a run or study directory);
- `jsonable`: a value for JSON, which has no NaN or infinity;
- a full disk (ENOSPC, EFBIG, EDQUOT) raised as `DiskFullError` naming the file.

Fault injection (the fault tests, tests/train/test_train_faults.py): DRPO_FAULT_AT=POINT:N[:MODE]
makes the N-th pass through POINT in this process SIGKILL itself (MODE kill, the default:
after half of the bytes of the write reached the file for `.write` points) or fill the disk
(MODE full: RLIMIT_FSIZE lowered so the kernel refuses the write with EFBIG). Points are
`<kind>.write` (inside the write), `<kind>.rename` (complete temp file, not yet renamed) and
`<kind>.done` (just after), for every kind of file written.
"""

from __future__ import annotations

import errno
import fcntl
import io
import math
import os
import resource
import signal
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = "drpo.lock"
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class DiskFullError(OSError):
    """A write failed because the disk (or a quota / file-size limit) is full."""


class LockHeldError(ValueError):
    """Another live process holds the directory's lock (a ValueError: a usage error the CLIs
    report without a traceback)."""


# ---------------------------------------------------------------- fault injection

_hits: Counter = Counter()


def fault(point: str) -> str | None:
    """'kill' or 'full' when DRPO_FAULT_AT selects this pass through `point`, else None."""
    spec = os.environ.get("DRPO_FAULT_AT")
    if not spec:
        return None
    name, _, rest = spec.partition(":")
    if name != point:
        return None
    count, _, mode = rest.partition(":")
    _hits[point] += 1
    return (mode or "kill") if _hits[point] == int(count or 1) else None


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def fill_disk(limit: int) -> None:
    """From now on no file of this process may grow past `limit` bytes: the kernel refuses
    the write with EFBIG (SIGXFSZ ignored so the write fails instead of killing us)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def _disk_full(err: OSError, path: Path) -> OSError:
    if err.errno in DISK_FULL:
        return DiskFullError(err.errno, f"disk full while writing {path} ({os.strerror(err.errno)})")
    return err


# ---------------------------------------------------------------- atomic writes


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_writer(path: str | os.PathLike, kind: str):
    """`with atomic_writer(path, "checkpoint") as f: f.write(...)`: the bytes land in a temp
    file that replaces `path` only once complete and fsynced. On any error the temp file is
    removed; a full disk raises DiskFullError."""
    path = Path(path)
    tmp = temp_path(path)
    mode = fault(f"{kind}.write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if mode == "full":
            fill_disk(0)
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            if mode == "kill":  # killed mid-write: half of the bytes reached the file
                f.truncate(f.tell() // 2)
                die()
            os.fsync(f.fileno())
        if fault(f"{kind}.rename") == "kill":
            die()
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _disk_full(err, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fault(f"{kind}.done") == "kill":
        die()


def atomic_write(path: str | os.PathLike, data: bytes | str, kind: str) -> None:
    with atomic_writer(path, kind) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def save_figure(fig, path: str | os.PathLike, kind: str, **savefig_kwargs) -> None:
    """A matplotlib figure, rendered in memory (format from the file's suffix), then written
    with `atomic_write`."""
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **savefig_kwargs)
    atomic_write(path, buf.getvalue(), kind)


def append_line(fd: int, line: str, path: Path, kind: str) -> None:
    """Append `line` + newline to the O_APPEND file `fd` and fsync it; if the write fails, the
    file is cut back to its previous length so it never ends in a torn line."""
    data = (line + "\n").encode()
    size = os.fstat(fd).st_size
    mode = fault(f"{kind}.write")
    try:
        if mode == "full":
            fill_disk(size + len(data) // 2)
        elif mode == "kill":
            os.write(fd, data[: len(data) // 2])
            die()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as err:
        os.ftruncate(fd, size)
        raise _disk_full(err, path) from None
    if fault(f"{kind}.done") == "kill":
        die()


def append_to(path: str | os.PathLike, line: str, kind: str) -> None:
    """`append_line` on a log written a line at a time, rarely (opened for this line only)."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        append_line(fd, line, path, kind)
    finally:
        os.close(fd)


def sweep_temp_files(directory: Path) -> None:
    """Remove temp files (`.NAME.tmp.PID`) of this process or of dead ones, never those of a
    live writer."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for tmp in directory.glob(".*.tmp.*"):
        pid = tmp.name.rsplit(".", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- directory lock


@contextmanager
def file_lock(path: str | os.PathLike, *, busy: str | None = None):
    """Hold an exclusive flock on `path` (created, with its folder) for the block, the holder's
    pid written in it. busy=None waits for the lock; otherwise a held lock raises LockHeldError
    at once: `busy`, the holder's pid and the lock file. The kernel releases the lock when the
    holder exits, however it dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if busy is None else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise LockHeldError(f"{busy} (pid {holder}, lock file {path}); wait for it to finish or stop it") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is for the message only; a full disk must not stop the lock
        yield path
    finally:
        os.close(fd)


def dir_lock(directory: str | os.PathLike, what: str = "run directory"):
    """`with dir_lock(DIR):` holds DIR/drpo.lock; a second holder gets LockHeldError at once,
    naming the lock file and the holder's pid."""
    directory = Path(directory)
    return file_lock(directory / LOCK_FILE, busy=f"{what} {directory} is in use by another drpo process")


# ---------------------------------------------------------------- JSON


def jsonable(x, nonfinite=None):
    """`x` for json.dumps: NaN and infinities (which JSON lacks) become `nonfinite(x)`, or
    None (null) when nonfinite is None; numpy and torch scalars become Python numbers; mapping
    keys become strings."""
    if hasattr(x, "item"):  # numpy or torch scalar
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None if nonfinite is None else nonfinite(x)
    if isinstance(x, dict):
        return {str(k): jsonable(v, nonfinite) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v, nonfinite) for v in x]
    return x
