"""Every test draws the same data on every run: no seed from hash(), which Python salts per
process for strings (PYTHONHASHSEED), so a failure would not reproduce."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
HASH_CALL = re.compile(r"(?<![\w.])hash\(")  # the builtin, not hashlib's or a method's


def hash_calls(text: str) -> list[int]:
    """Line numbers of builtin hash() calls outside comments."""
    return [i for i, line in enumerate(text.splitlines(), 1) if HASH_CALL.search(line.split("#", 1)[0])]


def test_no_test_seeds_from_the_builtin_hash():
    found = {str(p.relative_to(TESTS)): lines for p in sorted(TESTS.rglob("*.py"))
             if p != Path(__file__).resolve() and (lines := hash_calls(p.read_text()))}
    assert not found, f"builtin hash() in tests (salted per process; use zlib.crc32 of the bytes): {found}"


def test_the_check_sees_a_hash_seed():
    assert hash_calls("x = 1\nseed = hash((method, agg)) % 1000\n# hash(x) in a comment\nhashlib.sha256(b)\n") == [2]
