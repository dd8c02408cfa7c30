"""The one JSON encoding qpack writes and the one hardened parser it reads untrusted JSON with.

Writing: sorted keys, no spaces, ASCII only, no NaN/Infinity, so equal values give equal bytes (manifests and
hashes depend on that). Reading: a size cap before decoding, depth <= MAX_JSON_DEPTH, no duplicate keys, no
NaN/Infinity; every failure is QpackFormatError naming the file.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

from .errors import QpackError, QpackFormatError, Reason, read_error

MAX_JSON_DEPTH = 32
MAX_JSON_BYTES = 16 * 2**20


def canonical_json(obj: Any) -> bytes:
    """The one JSON encoding qpack writes: sorted keys, no spaces, ASCII only, no NaN/Infinity."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode(
            "ascii"
        )
    except (TypeError, ValueError) as exc:
        raise QpackError(f"value is not plain JSON: {exc}") from None


def readable_json(obj: Any) -> bytes:
    """canonical_json's value indented for people (data manifests): same keys, same order, one trailing newline."""
    try:
        return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False).encode("ascii") + b"\n"
    except (TypeError, ValueError) as exc:
        raise QpackError(f"value is not plain JSON: {exc}") from None


def json_depth(obj: Any) -> int:
    """Deepest nesting of lists/objects in a parsed JSON value, walked without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def parse_json(path: str | os.PathLike, body: bytes, what: str = "manifest", max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse untrusted JSON bytes: size <= max_bytes, depth <= 32, no duplicate keys, no NaN/Infinity."""
    if len(body) > max_bytes:
        raise QpackFormatError(path, Reason.LIMIT, f"{what} is {len(body)} bytes; at most {max_bytes} are read")
    try:
        value = json.loads(
            body.decode("utf-8"), object_pairs_hook=_unique_object, parse_constant=_no_constant,
            parse_float=_finite_float,
        )
    except RecursionError:
        raise QpackFormatError(path, Reason.LIMIT, f"{what} JSON nests deeper than {MAX_JSON_DEPTH}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise QpackFormatError(path, Reason.BAD_MANIFEST, f"{what} is not valid JSON: {exc}") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise QpackFormatError(path, Reason.LIMIT, f"{what} JSON nests deeper than {MAX_JSON_DEPTH}")
    return value


def read_json(path: str | os.PathLike, what: str = "JSON file", max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Read and parse_json a file, never reading more than max_bytes + 1 bytes of it."""
    try:
        with open(path, "rb") as fh:
            body = fh.read(max_bytes + 1)
    except OSError as exc:
        raise read_error(path, exc, what) from None
    return parse_json(path, body, what, max_bytes)
