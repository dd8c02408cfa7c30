"""The lossless codec interface and its registry.

A codec turns bytes into bytes. Symbol streams (one quantized value per byte, see qpack.pack) are bytes too,
so an entropy coder and a generic compressor share one interface. Every decode is told the exact size the
manifest promises and must never produce (or allocate for) more than that: that is the bomb guard.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from ..errors import QpackError, QpackInputError
from ..registry import Registry

ENTRY_POINT_GROUP = "qpack.codecs"


class CodecError(QpackError):
    """A codec could not decode its input, or its input breaks the size the manifest promised."""


def check_stream_end(name: str, out: bytes, size: int, finished: bool, trailing: int = 0) -> bytes:
    """The checks a streaming decoder ends with: not past `size`, stream finished, nothing after it, exactly `size`."""
    if len(out) > size:
        raise CodecError(f"{name}: data decodes to more than the {size} bytes promised")
    if not finished:
        raise CodecError(f"{name}: truncated data ({len(out)} of {size} bytes decoded)")
    if trailing:
        raise CodecError(f"{name}: {trailing} bytes of trailing data after the stream")
    if len(out) != size:
        raise CodecError(f"{name}: data decodes to {len(out)} bytes, {size} promised")
    return out


class Codec(ABC):
    """One lossless codec configured with parameters; instances are reusable and stateless between calls."""

    name: ClassVar[str]
    #: parameter name -> default; unknown parameters are rejected.
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any):
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise QpackInputError(
                f"codec {self.name!r} has no parameter(s) {sorted(unknown)}; known: {sorted(self.defaults)}"
            )
        self.params: dict[str, Any] = {**self.defaults, **params}
        self.validate()

    def validate(self) -> None:
        """Check self.params; raise QpackInputError naming the bad parameter."""

    @abstractmethod
    def encode(self, data: bytes) -> bytes:
        """Compress `data`; the same input and params always give the same bytes."""

    @abstractmethod
    def decode(self, data: bytes, size: int) -> bytes:
        """Decompress to exactly `size` bytes; raise CodecError on anything else, never allocate past `size`."""

    def spec(self) -> dict[str, Any]:
        """JSON-able description stored in the container: {"name": ..., "params": {...}}."""
        return {"name": self.name, "params": dict(sorted(self.params.items()))}

    def label(self) -> str:
        """Short label for tables: the name, then only the parameters that differ from the defaults, e.g. ans(group=5).

        Codecs with a customary short form override it (zstd-19, lzma-9e, brotli-11); spec() keeps the full record.
        """
        inner = ",".join(f"{k}={v}" for k, v in sorted(self._changed().items()))
        return f"{self.name}({inner})" if inner else self.name

    def _changed(self, *shown: str) -> dict[str, Any]:
        """Parameters that differ from the defaults, less those a short label already shows."""
        return {k: v for k, v in self.params.items() if k not in shown and v != self.defaults.get(k)}

    def __repr__(self) -> str:
        return f"<Codec {self.label()}>"


CODECS: Registry[type[Codec]] = Registry("codec", QpackInputError)
_plugins_loaded = False


def register_codec(name: str):
    """Class decorator: register a Codec subclass under `name` (sets cls.name)."""
    return CODECS.register(name, set_name=True)


def load_plugins() -> list[str]:
    """Register codecs installed under the `qpack.codecs` entry-point group; returns the names added.

    A plugin class is registered here under its entry-point name: it must not also use @register_codec.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return []
    _plugins_loaded = True
    from importlib.metadata import entry_points

    added = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name in CODECS:
            continue
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not break qpack itself
            import warnings

            warnings.warn(f"qpack: codec plugin {ep.name!r} failed to load: {exc}")
            continue
        if not (isinstance(cls, type) and issubclass(cls, Codec)):
            import warnings

            warnings.warn(f"qpack: codec plugin {ep.name!r} is not a qpack.codecs.Codec subclass; ignored")
            continue
        if not getattr(cls, "name", None):
            cls.name = ep.name
        CODECS.add(ep.name, cls)
        added.append(ep.name)
    return added


def codec_names() -> list[str]:
    """All registered codec names, plugins included."""
    load_plugins()
    return CODECS.names()


def make_codec(name: str, params: dict[str, Any] | None = None) -> Codec:
    """Build a codec from its registered name and parameters (as stored in a manifest)."""
    load_plugins()
    cls = CODECS.get(name)
    if params is not None and not isinstance(params, dict):
        raise QpackInputError(f"codec {name!r} parameters must be an object, got {type(params).__name__}")
    return cls(**(params or {}))


def parse_codec(text: str) -> Codec:
    """Parse a CLI codec spec such as "zstd", "zstd:level=22" or "lzma:preset=9,extreme=true"."""
    name, _, rest = text.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, _split_top_level(rest)):
        key, eq, value = item.partition("=")
        if not eq:
            raise QpackInputError(f"codec spec {text!r}: expected key=value, got {item!r}")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    return make_codec(name.strip(), params)


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets or braces (JSON values may hold commas)."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts
