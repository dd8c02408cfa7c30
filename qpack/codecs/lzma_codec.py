"""LZMA/xz: presets 0..9, the extreme flag, and explicit filter chains such as delta + lzma2.

`filters` is a JSON-able list, e.g. [{"id": "delta", "dist": 1}, {"id": "lzma2", "preset": 9, "extreme": true}].
It is translated to Python's lzma filter dicts here, so a manifest never names a library constant.
`format` "xz" keeps the xz container (with a CRC-32); "raw" drops it (about 60 bytes less, no check).
"""
from __future__ import annotations

import lzma
from typing import Any

from ..errors import QpackInputError
from ._validate import check_bool, check_choice, check_int
from .base import Codec, CodecError, check_stream_end, register_codec

_MF = {"hc3": lzma.MF_HC3, "hc4": lzma.MF_HC4, "bt2": lzma.MF_BT2, "bt3": lzma.MF_BT3, "bt4": lzma.MF_BT4}
_MODE = {"fast": lzma.MODE_FAST, "normal": lzma.MODE_NORMAL}
_LZMA2_INTS = {"dict_size": (4096, 1 << 30), "lc": (0, 4), "lp": (0, 4), "pb": (0, 4), "nice_len": (2, 273),
               "depth": (0, 1000)}
_MAX_FILTERS = 4
# Dictionary sizes of presets 0..9 (xz's table); used to bound decoder memory.
_PRESET_DICT = [1 << 18, 1 << 20, 1 << 21, 1 << 22, 1 << 22, 1 << 23, 1 << 23, 1 << 24, 1 << 25, 1 << 26]


@register_codec("lzma")
class Lzma(Codec):
    """xz / raw LZMA2, optionally behind a delta filter."""

    defaults = {"preset": 6, "extreme": False, "format": "xz", "filters": None}

    def label(self) -> str:
        """lzma-9e (preset, e for extreme), with -raw for the raw format and +filters for a custom chain."""
        p = self.params
        return (f"lzma-{p['preset']}{'e' if p['extreme'] else ''}" + ("-raw" if p["format"] == "raw" else "")
                + ("+filters" if p["filters"] else ""))

    def validate(self) -> None:
        check_int(self.name, "preset", self.params["preset"], 0, 9)
        check_bool(self.name, "extreme", self.params["extreme"])
        check_choice(self.name, "format", self.params["format"], ("xz", "raw"))
        self._chain = self._filter_chain()

    def _filter_chain(self) -> list[dict[str, Any]]:
        """The validated filter chain as lzma module dicts (a lone lzma2 at the preset when none is given)."""
        spec = self.params["filters"]
        preset = self.params["preset"] | (lzma.PRESET_EXTREME if self.params["extreme"] else 0)
        if spec is None:
            return [{"id": lzma.FILTER_LZMA2, "preset": preset}]
        where = f"codec {self.name!r}: parameter 'filters'"
        if not isinstance(spec, list) or not 1 <= len(spec) <= _MAX_FILTERS:
            raise QpackInputError(f"{where} must be a list of 1..{_MAX_FILTERS} filter objects, got {spec!r}")
        chain = []
        for i, f in enumerate(spec):
            if not isinstance(f, dict) or f.get("id") not in ("delta", "lzma2"):
                raise QpackInputError(f"{where}: entry {i} must be an object with id 'delta' or 'lzma2', got {f!r}")
            last = i == len(spec) - 1
            if (f["id"] == "lzma2") != last:
                raise QpackInputError(f"{where}: 'lzma2' must be the last filter and only the last, got {spec!r}")
            chain.append(self._delta(f, where) if f["id"] == "delta" else self._lzma2(f, where, preset))
        return chain

    def _delta(self, f: dict[str, Any], where: str) -> dict[str, Any]:
        unknown = set(f) - {"id", "dist"}
        if unknown:
            raise QpackInputError(f"{where}: delta filter has unknown key(s) {sorted(unknown)}")
        return {"id": lzma.FILTER_DELTA, "dist": check_int(self.name, "filters.delta.dist", f.get("dist", 1), 1, 256)}

    def _lzma2(self, f: dict[str, Any], where: str, preset: int) -> dict[str, Any]:
        unknown = set(f) - {"id", "preset", "extreme", "mf", "mode"} - set(_LZMA2_INTS)
        if unknown:
            raise QpackInputError(f"{where}: lzma2 filter has unknown key(s) {sorted(unknown)}")
        if "preset" in f or "extreme" in f:
            preset = check_int(self.name, "filters.lzma2.preset", f.get("preset", 6), 0, 9)
            if check_bool(self.name, "filters.lzma2.extreme", f.get("extreme", False)):
                preset |= lzma.PRESET_EXTREME
        out: dict[str, Any] = {"id": lzma.FILTER_LZMA2, "preset": preset}
        for key, (lo, hi) in _LZMA2_INTS.items():
            if key in f:
                out[key] = check_int(self.name, f"filters.lzma2.{key}", f[key], lo, hi)
        if out.get("lc", 0) + out.get("lp", 0) > 4:
            raise QpackInputError(f"{where}: lzma2 needs lc + lp <= 4, got {out.get('lc', 0)} + {out.get('lp', 0)}")
        if "mf" in f:
            out["mf"] = _MF[check_choice(self.name, "filters.lzma2.mf", f["mf"], tuple(_MF))]
        if "mode" in f:
            out["mode"] = _MODE[check_choice(self.name, "filters.lzma2.mode", f["mode"], tuple(_MODE))]
        return out

    def _dict_size(self) -> int:
        lz = self._chain[-1]
        return lz.get("dict_size", _PRESET_DICT[lz["preset"] & 0x1F])

    def encode(self, data: bytes) -> bytes:
        if self.params["format"] == "raw":
            return lzma.compress(bytes(data), format=lzma.FORMAT_RAW, filters=self._chain)
        # The xz stream keeps the preset's dictionary size: artifacts stay byte-identical across qpack versions.
        return lzma.compress(bytes(data), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=self._chain)

    def _fitted(self, n: int) -> list[dict[str, Any]]:
        """The filter chain with the dictionary no larger than `n` bytes (what a raw decoder of n bytes needs)."""
        chain = [dict(f) for f in self._chain]
        chain[-1]["dict_size"] = max(4096, min(self._dict_size(), n))
        return chain

    def decode(self, data: bytes, size: int) -> bytes:
        try:
            if self.params["format"] == "raw":
                # The raw decoder allocates the dictionary the filter names; matches never reach back further
                # than the output, so a dictionary of `size` bytes decodes the same stream without the bomb.
                d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=self._fitted(size))
            else:
                # A hostile header may ask for a huge dictionary; allow only what this codec's params need.
                d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=2 * self._dict_size() + (1 << 24))
            out = d.decompress(bytes(data), max_length=size + 1)
            if len(out) <= size and not d.eof and not d.needs_input:
                out += d.decompress(b"", max_length=size + 1 - len(out))
        except lzma.LZMAError as exc:
            raise CodecError(f"lzma: corrupt data ({exc})") from None
        return check_stream_end("lzma", out, size, d.eof, len(d.unused_data))
