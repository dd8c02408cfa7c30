"""Brotli at quality 0..11 with a chosen window (lgwin)."""
from __future__ import annotations

import brotli

from ._validate import check_int
from .base import Codec, CodecError, check_stream_end, register_codec


@register_codec("brotli")
class Brotli(Codec):
    """Brotli in generic mode; decoding is incremental with an output cap."""

    defaults = {"quality": 11, "lgwin": 22}

    def label(self) -> str:
        """brotli-11 (quality), with /wN when lgwin is not the default 22."""
        lgwin = self.params["lgwin"]
        return f"brotli-{self.params['quality']}" + (f"/w{lgwin}" if lgwin != self.defaults["lgwin"] else "")

    def validate(self) -> None:
        check_int(self.name, "quality", self.params["quality"], 0, 11)
        check_int(self.name, "lgwin", self.params["lgwin"], 10, 24)

    def encode(self, data: bytes) -> bytes:
        return brotli.compress(bytes(data), mode=brotli.MODE_GENERIC, quality=self.params["quality"],
                               lgwin=self.params["lgwin"])

    def decode(self, data: bytes, size: int) -> bytes:
        d = brotli.Decompressor()
        parts: list[bytes] = []
        got = 0
        try:
            # The cap stops the output buffer growing once it reaches it (it may overshoot by one internal
            # block), so a bomb is noticed after about `size` bytes, not after all of it.
            chunk = d.process(bytes(data), output_buffer_limit=size + 1)
            while True:
                parts.append(chunk)
                got += len(chunk)
                if got > size:
                    raise CodecError(f"brotli: data decodes to more than the {size} bytes promised")
                if d.is_finished() or d.can_accept_more_data():
                    break
                chunk = d.process(b"", output_buffer_limit=size - got + 1)
        except brotli.error as exc:
            raise CodecError(f"brotli: corrupt data ({exc})") from None
        return check_stream_end("brotli", b"".join(parts), size, d.is_finished())
