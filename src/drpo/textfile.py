"""Users' text files (datasets, configs, grids) decoded as UTF-8, or an error naming the file,
the line, the column and the byte: Python's own UnicodeDecodeError names none of them."""

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
