"""The identity codec: stores bytes as they are."""
from __future__ import annotations

from .base import Codec, CodecError, register_codec


@register_codec("raw")
class Raw(Codec):
    """No compression; the baseline every other codec is compared with."""

    def encode(self, data: bytes) -> bytes:
        return bytes(data)

    def decode(self, data: bytes, size: int) -> bytes:
        if len(data) != size:
            raise CodecError(f"raw section holds {len(data)} bytes, manifest says {size}")
        return bytes(data)
