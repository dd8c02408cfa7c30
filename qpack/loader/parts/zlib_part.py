"""Loader part: the `zlib` codec, decoded with an output cap of one byte past the promised size."""
import zlib

from .base import _CODECS, _err

# PART


def _zlib(items):
    out = []
    for d, n, p in items:
        z = zlib.decompressobj(p.get("wbits", 15))
        b = z.decompress(bytes(d), n + 1)
        if len(b) != n or not z.eof or z.unused_data or z.unconsumed_tail:
            _err("zlib: data does not decode to the promised size")
        out.append(b)
    return out


_CODECS["zlib"] = (_zlib, {"level": range(10), "wbits": range(9, 16)})
