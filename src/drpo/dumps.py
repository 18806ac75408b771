"""The rollout dump: one Parquet file per process, one row per response, per-token lists.
The format (each column's meaning, which are required, the metadata under the schema key
`drpo.dump`) is docs/inspect.md#format; `schema()` holds the column types. Writers never
communicate: each process writes its own shards, each written as a hidden temp file and renamed
into place, fsynced, on `close()` (drpo.files.atomic_writer), so a process killed mid-shard
leaves only a temp file, which readers skip, never a shard without its footer
(docs/inspect.md#writing-dumps)."""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from drpo.files import atomic_writer, jsonable, sweep_temp_files

FORMAT_VERSION = 1
META_KEY = b"drpo.dump"
REQUIRED = ("step", "sample_id", "group_id", "response_mask", "logp_before", "advantage")
OPTIONAL = ("logp_rollout", "logp_after", "token_ids", "entropy")
COLUMNS = REQUIRED + OPTIONAL
LIST_COLUMNS = ("response_mask", "logp_rollout", "logp_before", "logp_after", "advantage", "token_ids", "entropy")
FLOAT_COLUMNS = ("logp_rollout", "logp_before", "logp_after", "advantage", "entropy")
NAN_ALLOWED = ("logp_rollout", "entropy")  # engine could not score the token / host has no entropy


class DumpError(ValueError):
    """A dump that cannot be read; the message names the file, row and column."""


def _pa():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow ships with verl, TRL (datasets) and drpo[inspect]
        raise ImportError("rollout dumps need pyarrow: pip install 'drpo[inspect]'") from None
    return pa, pq


def schema():
    pa, _ = _pa()
    f32 = pa.list_(pa.float32())
    return pa.schema([
        ("step", pa.int64()),
        ("sample_id", pa.int64()),
        ("group_id", pa.int64()),
        ("response_mask", pa.list_(pa.bool_())),
        ("logp_rollout", f32),
        ("logp_before", f32),
        ("logp_after", f32),
        ("advantage", f32),
        ("token_ids", pa.list_(pa.int64())),
        ("entropy", f32),
    ])


def process_rank() -> int:
    """This process's rank (torch.distributed, else RANK, else 0), read locally: no collective."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", 0))


def _rows_of(x: Any, n: int, name: str, dtype) -> list | None:
    """A [n, T] tensor/array (or None) as a list of n numpy rows."""
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy() if dtype is np.float32 else x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] != n:
        raise ValueError(f"dump column {name!r}: expected [{n}, seq] values, got shape {tuple(a.shape)}")
    return list(a.astype(dtype, copy=False))


class DumpWriter:
    """Appends batches to this process's shard in `directory` every `every` steps.

    `metadata` holds what the report shows as is: source, model, method, params, sampling,
    columns (meaning of each log-prob column). Writes are local (no collectives); `write` opens
    a shard lazily, `close()` completes it and renames it into place."""

    def __init__(self, directory: str | os.PathLike, *, every: int = 1, metadata: Mapping[str, Any] | None = None):
        if int(every) < 1:
            raise ValueError(f"dump every must be >= 1, got {every!r}")
        self.directory = Path(directory)
        self.every = int(every)
        rank = process_rank()
        self.metadata = {"format_version": FORMAT_VERSION, "rank": rank, **(metadata or {})}
        self._stem = f"dump-{str(self.metadata.get('source', 'drpo')).replace(' ', '_')}-rank{rank}-pid{os.getpid()}"
        self.path: Path | None = None  # chosen when the shard is opened
        self._writer = None
        self._shard: ExitStack | None = None  # holds the shard's atomic_writer open between writes

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def write(self, *, step: int, response_mask, logp_before, advantage, logp_rollout=None, logp_after=None,
              token_ids=None, entropy=None, sample_id=None, group_id=None) -> None:
        """One row per response; tensors are [batch, seq] (advantage may be [batch])."""
        pa, pq = _pa()
        mask = _rows_of(response_mask, len(response_mask), "response_mask", np.bool_)
        n = len(mask)
        seq = mask[0].shape[0] if n else 0
        cols: dict[str, Any] = {"response_mask": mask}
        for name, value, dtype in (
            ("logp_rollout", logp_rollout, np.float32), ("logp_before", logp_before, np.float32),
            ("logp_after", logp_after, np.float32), ("token_ids", token_ids, np.int64), ("entropy", entropy, np.float32),
        ):
            cols[name] = _rows_of(value, n, name, dtype)
        adv = _rows_of(advantage, n, "advantage", np.float32)
        cols["advantage"] = [np.broadcast_to(a, (seq,)) for a in adv] if adv and adv[0].shape[0] == 1 else adv
        ids = np.arange(n) if sample_id is None else np.asarray(sample_id).reshape(-1)
        groups = ids if group_id is None else np.asarray(group_id).reshape(-1)
        sch = schema()
        lists = {name: pa.nulls(n, sch.field(name).type) if cols[name] is None
                 else _list_array(pa, cols[name], sch.field(name).type) for name in LIST_COLUMNS}
        table = pa.table({"step": pa.array(np.full(n, int(step), dtype=np.int64)),
                          "sample_id": pa.array(ids.astype(np.int64)), "group_id": pa.array(groups.astype(np.int64)),
                          **lists}, schema=sch)
        if self._writer is None:  # a new shard; one closed before is never overwritten
            self.directory.mkdir(parents=True, exist_ok=True)
            k = 1
            while (self.directory / f"{self._stem}-{k:04d}.parquet").exists():
                k += 1
            self.path = self.directory / f"{self._stem}-{k:04d}.parquet"
            meta = {META_KEY: json.dumps(jsonable(self.metadata, nonfinite=str), default=str).encode()}
            self._shard = ExitStack()
            f = self._shard.enter_context(atomic_writer(self.path, "dump"))
            self._writer = pq.ParquetWriter(f, sch.with_metadata(meta))
        self._writer.write_table(table)  # one row group per write: the reader streams by row group

    def close(self) -> None:
        """Completes the shard (footer, fsync) and renames it into place."""
        if self._writer is not None:
            writer, shard, self._writer, self._shard = self._writer, self._shard, None, None
            writer.close()
            shard.close()

    def __del__(self):  # a writer dropped without close() still leaves a readable file
        try:
            self.close()
        except Exception:
            pass


def drop_steps_after(directory: str | os.PathLike, step: int) -> list[Path]:
    """A resumed `drpo train` redoes the steps after its checkpoint: remove their shards (and
    temp files of killed writers), so each step is dumped once, by the attempt whose metrics the
    run keeps. Returns the shards removed. drpo train writes one step per shard; a shard with
    steps on both sides is an error naming it (rewriting someone else's file is not ours to do)."""
    _, pq = _pa()
    directory = Path(directory)
    sweep_temp_files(directory)
    removed = []
    for path in sorted(directory.glob("*.parquet")):
        steps = pq.read_table(path, columns=["step"]).column("step").to_numpy()
        if steps.size and steps.min() > step:
            path.unlink()
            removed.append(path)
        elif steps.size and steps.max() > step:
            raise DumpError(f"{path}: holds steps {int(steps.min())}-{int(steps.max())}, across the checkpoint the run "
                            f"resumes from (step {step}); move it out of the dump directory")
    return removed


def _list_array(pa, rows: list, type_):
    """Equal-length numpy rows as one Arrow list column, without Python lists."""
    flat = np.concatenate(rows) if rows else np.zeros(0)
    offsets = np.arange(len(rows) + 1, dtype=np.int32) * (rows[0].shape[0] if rows else 0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=type_.value_type)).cast(type_)


# ------------------------------------------------------------------ reading


@dataclass
class TokenBatch:
    """One row group of one file, flattened to response tokens (numpy, float64)."""

    path: str
    step: np.ndarray  # int64 per token
    row: np.ndarray  # row index within the file, per token
    pos: np.ndarray  # position within the response
    logp_rollout: np.ndarray | None  # NaN where the engine did not score the token
    logp_before: np.ndarray
    logp_after: np.ndarray | None
    advantage: np.ndarray
    seq_tokens: list | None  # per row: token ids, -1 outside the response (for context), when present
    row_offset: int


def read_metadata(path: str | os.PathLike) -> dict:
    _, pq = _pa()
    path = str(path)
    try:
        sch = pq.read_schema(path)
    except Exception as err:
        raise DumpError(f"{path}: not a readable Parquet dump ({err})") from None
    raw = (sch.metadata or {}).get(META_KEY)
    if raw is None:
        raise DumpError(f"{path}: no drpo dump metadata (schema key {META_KEY.decode()!r}); not written by drpo")
    meta = json.loads(raw)
    missing = [c for c in REQUIRED if c not in sch.names]
    if missing:
        raise DumpError(f"{path}: missing required column(s) {', '.join(missing)} (all rows, column {missing[0]!r})")
    return meta


def iter_tokens(path: str | os.PathLike, *, batch_rows: int = 512, context: bool = False) -> Iterator[TokenBatch]:
    """Stream `path` one row group at a time (at most `batch_rows` rows of it at once, so
    memory is bounded by batch_rows x response length), validated, as flattened tokens."""
    _, pq = _pa()
    path = str(path)
    read_metadata(path)
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows!r}")
    pf = pq.ParquetFile(path)
    present = [c for c in COLUMNS if c in pf.schema_arrow.names]
    offset = 0
    for group in range(pf.num_row_groups):
        for rb in pf.iter_batches(batch_size=batch_rows, columns=present, row_groups=[group]):
            yield _flatten(path, rb, offset, present, context)
            offset += rb.num_rows


def _list_arrays(path: str, rb, name: str, lengths: np.ndarray, offset: int, dtype):
    """(flat values, valid-rows mask) of a list column, checked against the mask lengths."""
    import pyarrow.compute as pc

    col = rb.column(name)
    valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    lens = np.asarray(pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False), dtype=np.int64)
    bad = np.nonzero(valid & (lens != lengths))[0]
    if bad.size:
        r = int(bad[0])
        raise DumpError(f"{path}: row {offset + r}, column {name!r}: {lens[r]} values but response_mask has {lengths[r]} "
                        "(ragged lengths)")
    flat = col.flatten().to_numpy(zero_copy_only=False)
    if flat.dtype == object:  # nulls inside a list
        raise DumpError(f"{path}: column {name!r} holds null elements inside a list (row {offset}+)")
    return flat.astype(dtype, copy=False), valid


def _check_required(path: str, rb, offset: int) -> None:
    for name in REQUIRED:
        nulls = np.nonzero(rb.column(name).is_null().to_numpy(zero_copy_only=False))[0]
        if nulls.size:
            raise DumpError(f"{path}: row {offset + int(nulls[0])}, column {name!r}: null in a required column")


def _check_floats(path: str, name: str, flat: np.ndarray, mask: np.ndarray, row_of, pos, offset: int) -> None:
    """Response positions hold finite values (NaN where NAN_ALLOWED) and log-probs <= 0."""
    v = flat[mask]
    bad = ~np.isfinite(v) if name not in NAN_ALLOWED else np.isinf(v)
    if name.startswith("logp_"):
        bad |= v > 1e-4  # a log-probability above 0
    if bad.any():
        i = int(np.nonzero(mask)[0][np.nonzero(bad)[0][0]])
        what = "NaN/inf where not allowed" if not np.isfinite(flat[i]) else "a log-prob > 0"
        raise DumpError(f"{path}: row {offset + int(row_of[i])}, column {name!r}, position {int(pos[i])}: "
                        f"{float(flat[i])!r} ({what})")


def _column_values(path: str, rb, name: str, lengths, offset: int, mask, row_of, pos) -> np.ndarray | None:
    """One list column flattened over all positions (validated), or None when it is all null."""
    flat, valid = _list_arrays(path, rb, name, lengths, offset, np.int64 if name == "token_ids" else np.float64)
    if not valid.any():
        return None
    if not valid.all():  # partly null optional column: treat per row like "absent"
        if name not in NAN_ALLOWED:
            r = int(np.nonzero(~valid)[0][0])
            raise DumpError(f"{path}: row {offset + r}, column {name!r}: null in some rows but not others")
        full = np.full(mask.size, np.nan)
        full[valid[row_of]] = flat
        flat = full
    if name in FLOAT_COLUMNS:
        _check_floats(path, name, flat, mask, row_of, pos, offset)
    return flat


def _flatten(path: str, rb, offset: int, present: Sequence[str], context: bool) -> TokenBatch:
    import pyarrow.compute as pc

    _check_required(path, rb, offset)
    mask_col = rb.column("response_mask")
    lengths = np.asarray(pc.list_value_length(mask_col).to_numpy(zero_copy_only=False), dtype=np.int64)
    mask = mask_col.flatten().to_numpy(zero_copy_only=False).astype(bool)
    row_of = np.repeat(np.arange(rb.num_rows), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pos = np.arange(mask.size) - np.repeat(starts, lengths)
    values = {name: _column_values(path, rb, name, lengths, offset, mask, row_of, pos) if name in present else None
              for name in ("logp_rollout", "logp_before", "logp_after", "advantage", "entropy", "token_ids")}
    # per row, the token ids with non-response positions as -1 (context stays in the response)
    seq_tokens = (np.split(np.where(mask, values["token_ids"], -1), np.cumsum(lengths)[:-1])
                  if context and values["token_ids"] is not None else None)
    pick = lambda a: None if a is None else a[mask]  # noqa: E731
    return TokenBatch(
        path=path,
        step=np.asarray(rb.column("step").to_numpy(zero_copy_only=False), dtype=np.int64)[row_of][mask],
        row=(row_of + offset)[mask],
        pos=pos[mask],
        logp_rollout=pick(values["logp_rollout"]),
        logp_before=values["logp_before"][mask],
        logp_after=pick(values["logp_after"]),
        advantage=values["advantage"][mask],
        seq_tokens=seq_tokens,
        row_offset=offset,
    )
