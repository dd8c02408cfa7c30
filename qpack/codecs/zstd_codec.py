"""Zstandard at levels 1..22 (20-22 are "ultra"), optionally with a long window and long-distance matching."""
from __future__ import annotations

import zstandard

from ._validate import check_bool, check_int
from .base import Codec, CodecError, register_codec

# The decoder refuses frames whose window exceeds this unless the codec's own window_log asks for more;
# zstd's default decoder limit is the same 2**27 bytes.
_DEFAULT_MAX_WINDOW_LOG = 27


@register_codec("zstd")
class Zstd(Codec):
    """Single-threaded zstd; the same input and params give the same bytes (content size is recorded)."""

    defaults = {"level": 19, "window_log": 0, "long": False}

    def label(self) -> str:
        """zstd-19, with +long and /wN (window_log) when set."""
        p = self.params
        return f"zstd-{p['level']}" + ("+long" if p["long"] else "") + (f"/w{p['window_log']}" if p["window_log"] else "")

    def validate(self) -> None:
        check_int(self.name, "level", self.params["level"], 1, 22)
        wl = self.params["window_log"]
        if wl != 0:
            check_int(self.name, "window_log", wl, zstandard.WINDOWLOG_MIN, 31)
        check_bool(self.name, "long", self.params["long"])

    def _compressor(self) -> zstandard.ZstdCompressor:
        kwargs = {"threads": 0, "write_content_size": True, "write_checksum": False, "write_dict_id": False}
        if self.params["window_log"]:
            kwargs["window_log"] = self.params["window_log"]
        if self.params["long"]:
            kwargs["enable_ldm"] = True
        params = zstandard.ZstdCompressionParameters.from_level(self.params["level"], **kwargs)
        return zstandard.ZstdCompressor(compression_params=params)

    def encode(self, data: bytes) -> bytes:
        return self._compressor().compress(bytes(data))

    def decode(self, data: bytes, size: int) -> bytes:
        data = bytes(data)
        max_log = max(_DEFAULT_MAX_WINDOW_LOG, self.params["window_log"])
        try:
            header = zstandard.get_frame_parameters(data)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd: bad frame header ({exc})") from None
        # Checked before decoding: decompress() trusts the header's content size over max_output_size.
        if header.content_size != zstandard.CONTENTSIZE_UNKNOWN and header.content_size != size:
            raise CodecError(f"zstd: frame declares {header.content_size} bytes, {size} promised")
        if header.window_size > (1 << max_log):
            raise CodecError(f"zstd: frame window {header.window_size} bytes exceeds the limit {1 << max_log}")
        try:
            dctx = zstandard.ZstdDecompressor(max_window_size=1 << max_log)
            # max_output_size=0 would mean "unlimited", so an empty promise still caps at one byte.
            out = dctx.decompress(data, max_output_size=max(size, 1), allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd: corrupt data ({exc})") from None
        if len(out) != size:
            raise CodecError(f"zstd: data decodes to {len(out)} bytes, {size} promised")
        return out
