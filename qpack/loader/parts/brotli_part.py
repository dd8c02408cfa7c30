"""Loader part: the `brotli` codec (needs the brotli package), decoded incrementally with an output cap."""
from .base import _CODECS, _err

# PART
import brotli


def _brotli(items):
    out = []
    for d, n, p in items:
        z, parts, got = brotli.Decompressor(), [], 0
        c = z.process(bytes(d), output_buffer_limit=n + 1)
        while True:
            parts.append(c)
            got += len(c)
            if got > n or z.is_finished() or z.can_accept_more_data():
                break
            c = z.process(b"", output_buffer_limit=n - got + 1)
        if got != n or not z.is_finished():
            _err("brotli: data does not decode to the promised size")
        out.append(b"".join(parts))
    return out


_CODECS["brotli"] = (_brotli, {"quality": range(12), "lgwin": range(10, 25)})
