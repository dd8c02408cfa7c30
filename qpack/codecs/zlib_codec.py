"""zlib (deflate) at a chosen level: the parameter-golf baseline codec."""
from __future__ import annotations

import zlib

from ._validate import check_int
from .base import Codec, CodecError, check_stream_end, register_codec


@register_codec("zlib")
class Zlib(Codec):
    """Deflate in a zlib wrapper (its Adler-32 catches most corruption)."""

    defaults = {"level": 9, "wbits": 15}

    def label(self) -> str:
        """zlib-9 (level), with /wN when wbits is not the default 15."""
        wbits = self.params["wbits"]
        return f"zlib-{self.params['level']}" + (f"/w{wbits}" if wbits != self.defaults["wbits"] else "")

    def validate(self) -> None:
        check_int(self.name, "level", self.params["level"], 0, 9)
        check_int(self.name, "wbits", self.params["wbits"], 9, 15)

    def encode(self, data: bytes) -> bytes:
        c = zlib.compressobj(self.params["level"], zlib.DEFLATED, self.params["wbits"])
        return c.compress(bytes(data)) + c.flush()

    def decode(self, data: bytes, size: int) -> bytes:
        d = zlib.decompressobj(self.params["wbits"])
        try:
            # max_length caps the output at one byte past `size`: enough to notice a frame that is too long.
            out = d.decompress(bytes(data), size + 1)
        except zlib.error as exc:
            raise CodecError(f"zlib: corrupt data ({exc})") from None
        # a non-empty unconsumed_tail means the size + 1 cap was hit: len(out) > size says so
        return check_stream_end("zlib", out, size, d.eof, len(d.unused_data))
