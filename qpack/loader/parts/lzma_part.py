"""Loader part: the `lzma` codec (xz, or raw LZMA2 behind an optional delta filter), with an output cap."""
from .base import _CODECS, _err

# PART
import lzma

_LZ2 = ("dict_size", "lc", "lp", "pb", "nice_len", "depth")


def _lzma_chain(p, n):
    # The filter chain qpack/codecs/lzma_codec.py builds, its dictionary fitted to n bytes for raw frames.
    pre = p.get("preset", 6) | (lzma.PRESET_EXTREME if p.get("extreme") else 0)
    chain = []
    for f in p.get("filters") or [{"id": "lzma2"}]:
        if f["id"] == "delta":
            chain.append({"id": lzma.FILTER_DELTA, "dist": f.get("dist", 1)})
            continue
        x = pre
        if "preset" in f or "extreme" in f:
            x = f.get("preset", 6) | (lzma.PRESET_EXTREME if f.get("extreme") else 0)
        g = {"id": lzma.FILTER_LZMA2, "preset": x, **{k: f[k] for k in _LZ2 if k in f}}
        for k, m in (("mf", "MF_"), ("mode", "MODE_")):
            if k in f:
                g[k] = getattr(lzma, m + f[k].upper())
        chain.append(g)
    d = chain[-1].get("dict_size", [1 << 18, 1 << 20, 1 << 21, 1 << 22, 1 << 22, 1 << 23, 1 << 23, 1 << 24, 1 << 25,
                                    1 << 26][chain[-1]["preset"] & 31])
    return chain, d


def _lzma(items):
    out = []
    for data, n, p in items:
        chain, d = _lzma_chain(p, n)
        if p.get("format", "xz") == "raw":
            chain[-1]["dict_size"] = max(4096, min(d, n))
            z = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=chain)
        else:
            z = lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=2 * d + (1 << 24))
        b = z.decompress(bytes(data), n + 1)
        if len(b) <= n and not z.eof and not z.needs_input:
            b += z.decompress(b"", n + 1 - len(b))
        if len(b) != n or not z.eof or z.unused_data:
            _err("lzma: data does not decode to the promised size")
        out.append(b)
    return out


_CODECS["lzma"] = (_lzma, {"preset": range(10), "extreme": bool, "format": ("xz", "raw"),
                   "filters": None})
