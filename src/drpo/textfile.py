"""Text users give us. Files (datasets, configs, grids) decoded as UTF-8, or an error naming
the file, the line, the column and the byte: Python's own UnicodeDecodeError names none of
them. And the command lines' KEY=VALUE arguments (`--set`, `--param`), split in one way."""

from __future__ import annotations

import os


class NotUTF8Error(ValueError):
    """A text file (or one line of it) is not valid UTF-8."""


def decode_utf8(data: bytes, path: str | os.PathLike, first_line: int = 1) -> str:
    """`data` (a whole file, or one line of it starting at line `first_line`) as text."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + data.count(b"\n", 0, err.start)
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise NotUTF8Error(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); "
                           "save the file as UTF-8") from None


def read_utf8(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return decode_utf8(f.read(), path)


def split_assignment(item: str, expects: str, *, ok=lambda key, value: bool(key),
                     error: type[Exception] = ValueError) -> tuple[str, str]:
    """'KEY=VALUE' -> (KEY without surrounding spaces, VALUE as given), or `error` naming what
    the argument `expects` and the argument itself when there is no '=' or `ok(KEY, VALUE)` is
    false. Each caller converts VALUE its own way."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not ok(key, value):
        raise error(f"{expects}, got {item!r}")
    return key, value
