"""Loader part: the `zstd` codec (needs the zstandard package), with the frame's size and window checked first."""
from .base import _CODECS, _err

# PART
import zstandard


def _zstd(items):
    out = []
    for d, n, p in items:
        d = bytes(d)
        w = 1 << max(27, p.get("window_log", 0))
        h = zstandard.get_frame_parameters(d)
        if h.content_size not in (zstandard.CONTENTSIZE_UNKNOWN, n) or h.window_size > w:
            _err("zstd: frame size or window disagrees with the manifest")
        out.append(zstandard.ZstdDecompressor(max_window_size=w).decompress(d, max_output_size=max(n, 1),
                                                                            allow_extra_data=False))
    return out


_CODECS["zstd"] = (_zstd, {"level": range(1, 23), "window_log": (0, *range(10, 32)), "long": bool})
