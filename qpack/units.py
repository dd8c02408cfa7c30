"""Byte sizes as people write them: "16MB" is 16,000,000 bytes; binary units are spelled "MiB"."""
from __future__ import annotations

import re
from fractions import Fraction

from .errors import QpackInputError

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Parse "16MB", "15.5MiB", "16000000" or an int into bytes (rounded down to a whole byte)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise QpackInputError(f"size must not be negative: {text}")
        return text
    m = _RE.match(str(text))
    if not m:
        raise QpackInputError(f"cannot read size {text!r}: write e.g. 16MB, 15.5MiB or 16000000")
    number, unit = m.group(1), m.group(2).upper()
    if unit not in _UNITS:
        raise QpackInputError(
            f"unknown unit {m.group(2)!r} in {text!r}: use B, KB, MB, GB (powers of 10) or KiB, MiB, GiB (powers of 2)"
        )
    # Fraction keeps "15.5MiB" exact instead of going through a binary float.
    return int(Fraction(number) * _UNITS[unit])


def format_size(n: int) -> str:
    """Bytes with thousands separators, e.g. 15,999,812 B."""
    return f"{n:,} B"
