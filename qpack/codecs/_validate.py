"""Parameter checks shared by the built-in codecs; every error names the codec and the parameter."""
from __future__ import annotations

from typing import Any

from ..errors import QpackInputError


def check_int(codec: str, name: str, value: Any, lo: int, hi: int) -> int:
    """`value` as an int in [lo, hi], or QpackInputError naming `codec` and `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise QpackInputError(f"codec {codec!r}: parameter {name!r} must be an integer in {lo}..{hi}, got {value!r}")
    return value


def check_bool(codec: str, name: str, value: Any) -> bool:
    """`value` as a bool, or QpackInputError naming `codec` and `name`."""
    if not isinstance(value, bool):
        raise QpackInputError(f"codec {codec!r}: parameter {name!r} must be true or false, got {value!r}")
    return value


def check_choice(codec: str, name: str, value: Any, choices: tuple[str, ...]) -> str:
    """`value` as one of `choices`, or QpackInputError naming `codec` and `name`."""
    if value not in choices:
        raise QpackInputError(f"codec {codec!r}: parameter {name!r} must be one of {', '.join(choices)}; got {value!r}")
    return value
