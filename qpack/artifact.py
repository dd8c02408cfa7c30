"""Tensors <-> container: quantized codes, fp16 scales and passthrough tensors as codec-encoded sections.

Each tensor becomes one manifest entry plus its sections: "NAME:codes" and "NAME:scales" for a quantized
tensor (and "NAME:lowrank.a.codes" ... for LQER factors), "NAME:data" for a passthrough tensor. The reader
validates every entry against its sections (shape product vs decoded length for the layout, scale shape, bit
range, dtype allowlist) before decoding anything. Field meanings are specified in docs/FORMAT.md.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .codecs import Codec, make_codec
from .container import (
    Container,
    Section,
    build_container,
    check_name,
    check_uint,
    encode_section,
    is_int,
    parse_container,
    read_container,
    write_container,
)
from .errors import QpackError, QpackFormatError, QpackInputError, Reason
from .pack import LAYOUTS, decode_codes, encode_codes, layout_size
from .provenance import complete_meta
from .quant.base import MAX_CODE_BITS, MIN_BITS, Quantized, n_groups

#: dtype name -> (torch dtype, little-endian numpy dtype used on disk). bfloat16 travels as its raw 16 bits.
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float64": (torch.float64, "<f8"),
    "float32": (torch.float32, "<f4"),
    "float16": (torch.float16, "<f2"),
    "bfloat16": (torch.bfloat16, "<u2"),
    "int64": (torch.int64, "<i8"),
    "int32": (torch.int32, "<i4"),
    "int16": (torch.int16, "<i2"),
    "int8": (torch.int8, "i1"),
    "uint8": (torch.uint8, "u1"),
    "bool": (torch.bool, "u1"),
}
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
SCALE_LAYOUTS = ("plain", "shuffled")
MAX_NDIM = 16
MAX_DIM = 2**40
MAX_NUMEL = 2**32  # one section holds at most 4 GiB decoded
_SCHEME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_QUANT_KEYS = frozenset({"name", "kind", "shape", "dtype", "scheme", "bits", "group_size", "params", "layout",
                         "codes", "scales", "lowrank"})
_FACTOR_KEYS = frozenset({"shape", "scheme", "bits", "group_size", "params", "layout", "codes", "scales"})
# a quantized tensor with column multipliers (Quantized.col_scale) has one more key; readers that predate it refuse it
_COL_KEY = "col_scale"
_RAW_KEYS = frozenset({"name", "kind", "shape", "dtype", "data"})


def dtype_name(dtype: torch.dtype) -> str:
    """The manifest name of a torch dtype; dtypes outside the allowlist raise QpackInputError."""
    for name, (td, _) in DTYPES.items():
        if td == dtype:
            return name
    raise QpackInputError(f"dtype {dtype} cannot be stored; supported: {', '.join(DTYPES)}")


def matrix_shape(shape: tuple[int, ...] | list[int]) -> tuple[int, int]:
    """(rows, cols) of the 2-D view quantizers use (see qpack.quant.base.as_matrix)."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, int(shape[0])
    return int(shape[0]), math.prod(int(d) for d in shape[1:])


# ----------------------------------------------------------------------------------------------- encoding


CodecChoice = Codec | Sequence[Codec] | None  # one codec, or several: each section takes the smallest
# One code layout, several (each tried with the entry's codecs), "auto" (every layout that holds the width), or
# layout -> codecs (each layout tried with its own codecs only): the codes take the smallest (layout, codec).
LayoutChoice = str | Sequence[str] | Mapping[str, CodecChoice]


@dataclass
class TensorEntry:
    """One tensor to store: a Quantized (codes + scales) or a torch.Tensor that passes through as it is."""

    name: str
    payload: Quantized | torch.Tensor
    layout: LayoutChoice = "byte"  # code layout (qpack.pack): "byte", "packed", "trit", several, or "auto"
    codec: CodecChoice = None  # codec(s) of the codes (or of a passthrough tensor); None means raw
    scale_codec: CodecChoice = None  # codec(s) of the fp16 scales; None means raw
    lowrank: tuple[Quantized, Quantized] | None = None  # LQER factors A (rows, r), B (r, cols)
    dtype: str | None = None  # original dtype of a quantized tensor (compress records it); default float32
    scale_layout: str = "auto"  # "plain", "shuffled" (high bytes, then low bytes) or "auto" (the smaller)
    lowrank_layout: LayoutChoice | None = None  # code layout(s) of the LQER factors; None: as `layout`


@dataclass(frozen=True)
class EncodedEntry:
    """One tensor encoded: its manifest entry and its sections, ready to assemble into an artifact."""

    manifest: dict
    sections: tuple[Section, ...]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def nbytes(self) -> int:
        """Payload bytes this entry adds to the file (its sections, encoded)."""
        return sum(len(sec.data) for sec in self.sections)

    def codec_label(self) -> str:
        """Label of the codec of the entry's main section (codes, or a passthrough tensor's data)."""
        spec = self.sections[0].codec
        return make_codec(spec["name"], spec["params"]).label()


def _raw() -> Codec:
    return make_codec("raw", {})


def _codecs(choice: CodecChoice) -> list[Codec]:
    if choice is None:
        return [_raw()]
    if isinstance(choice, Codec):
        return [choice]
    out = list(choice)
    if not out or not all(isinstance(c, Codec) for c in out):
        raise QpackInputError("a codec choice must be a Codec or a non-empty sequence of Codecs")
    return out


def encode_smallest(name: str, codecs: Sequence[Codec], raws: Sequence[bytes], verify: bool = False
                    ) -> tuple[Section, int]:
    """The smallest encoding of any of `raws` (alternative layouts of one section) with any of `codecs`;
    returns the section and the index of the layout used. Ties keep the first codec, then the first layout."""
    return _smallest(name, [(codec, i) for codec in codecs for i in range(len(raws))], raws, verify)


def _smallest(name: str, trials: Sequence[tuple[Codec, int]], raws: Sequence[bytes], verify: bool
              ) -> tuple[Section, int]:
    """The smallest of the (codec, index into raws) trials, as (section, index); ties keep the earlier trial."""
    best: tuple[Section, int] | None = None
    for codec, i in trials:
        sec = encode_section(name, codec, raws[i], verify)
        if best is None or len(sec.data) < len(best[0].data):
            best = (sec, i)
    assert best is not None
    return best


def usable_layouts(bits: int) -> tuple[str, ...]:
    """The code layouts that hold `bits`-bit codes and differ as bytes ("packed" at 8 bits is "byte" again)."""
    if bits > 8:
        return ("planes",)
    return ("byte",) + (("packed",) if bits < 8 else ()) + (("trit",) if bits == 2 else ())


def per_plane(codecs: Sequence[Codec], count: int) -> list[Codec]:
    """`codecs` for a "planes" section of `count` codes: an order-0 `ans` with one table for the whole stream gets
    one table per plane instead (group = count), since the high plane and the low plane differ in distribution."""
    return [make_codec("ans", {**c.params, "group": count}) if c.name == "ans" and not c.params.get("group") else c
            for c in codecs]


def with_width(codecs: Sequence[Codec], width: int) -> list[Codec]:
    """`codecs` for a "byte" section of codes `width` symbols a row: a codec that codes rows (`ans_cols`) and was
    not given a width gets this one."""
    return [make_codec(c.name, {**c.params, "width": width}) if c.name == "ans_cols" and not c.params["width"]
            else c for c in codecs]


def section_codecs(codecs: Sequence[Codec], layout: str, count: int, width: int) -> list[Codec]:
    """The codecs a codes section of `count` symbols, `width` a row, is tried with in `layout`."""
    if layout == "planes":
        return per_plane(codecs, count)
    return with_width(codecs, width) if layout == "byte" else list(codecs)


def code_layouts(choice: LayoutChoice, bits: int, codecs: list[Codec], where: str) -> list[tuple[str, list[Codec]]]:
    """The (layout, codecs) trials for `bits`-bit codes. A single named layout is used as it is (a width it
    cannot hold is an error later); of several, those that cannot hold the width are skipped. Codes wider than
    8 bits have one layout, "planes", whatever was chosen for narrow ones (a mapping's "planes" or else "byte"
    codecs go with it)."""
    if bits > 8:
        picked = choice.get("planes", choice.get("byte")) if isinstance(choice, Mapping) else None
        return [("planes", codecs if picked is None else _codecs(picked))]
    if isinstance(choice, str):
        if choice == "auto":
            return [(lay, codecs) for lay in usable_layouts(bits)]
        pairs, single = [(choice, codecs)], True
    elif isinstance(choice, Mapping):
        pairs, single = [(lay, _codecs(c)) for lay, c in choice.items()], False
    elif isinstance(choice, Sequence):
        pairs, single = [(lay, codecs) for lay in choice], False
    else:
        raise QpackInputError(f"tensor {where!r}: a code layout must be a name, a sequence or a mapping of names")
    for lay, _ in pairs:
        if not isinstance(lay, str) or lay not in LAYOUTS:
            raise QpackInputError(f"tensor {where!r}: unknown code layout {lay!r}; known: {', '.join(LAYOUTS)}, auto")
    if single:
        return pairs
    fits = [(lay, cs) for lay, cs in pairs if (lay != "trit" or bits == 2) and lay != "planes"]
    if not fits:
        raise QpackInputError(f"tensor {where!r}: none of the code layouts {[lay for lay, _ in pairs]} holds "
                              f"{bits}-bit codes")
    return fits


def scales_to_bytes(scales: np.ndarray, layout: str) -> bytes:
    """fp16 scales as bytes: "plain" little-endian, or "shuffled" (all high bytes, then all low bytes)."""
    u16 = np.ascontiguousarray(scales, dtype="<f2").reshape(-1).view("<u2")
    if layout == "plain":
        return u16.tobytes()
    if layout == "shuffled":
        return (u16 >> 8).astype(np.uint8).tobytes() + (u16 & 0xFF).astype(np.uint8).tobytes()
    raise QpackInputError(f"unknown scale layout {layout!r}; known: {', '.join(SCALE_LAYOUTS)}")


def scales_from_bytes(data: bytes, layout: str, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of scales_to_bytes."""
    n = math.prod(shape)
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size != 2 * n:
        raise ValueError(f"scales hold {buf.size} bytes, {shape} fp16 scales need {2 * n}")
    if layout == "plain":
        u16 = buf.view("<u2")
    else:
        u16 = (buf[:n].astype(np.uint16) << 8) | buf[n:].astype(np.uint16)
    return u16.astype("<u2").view("<f2").astype(np.float16).reshape(shape)


def _check_quantized(name: str, q: Any) -> Quantized:
    if not isinstance(q, Quantized):
        raise QpackInputError(f"tensor {name!r}: expected a Quantized, got {type(q).__name__}")
    q.__post_init__()  # re-validate: fields may have been replaced since construction
    if not _SCHEME_RE.match(q.scheme if isinstance(q.scheme, str) else ""):
        raise QpackInputError(f"tensor {name!r}: scheme name {q.scheme!r} must match {_SCHEME_RE.pattern}")
    if q.group_size is not None and (not is_int(q.group_size) or q.group_size < 1):
        raise QpackInputError(f"tensor {name!r}: group_size must be a positive int or None")
    if not bool(torch.isfinite(q.scales).all()):
        raise QpackInputError(f"tensor {name!r}: scales must be finite")
    if tuple(q.q.shape) != matrix_shape(q.shape):
        raise QpackInputError(f"tensor {name!r}: codes {q.q.shape} are not the matrix view of shape {q.shape}")
    return q


def _plain(value: Any, where: str) -> Any:
    """Scheme params as plain JSON values (numpy scalars and tuples converted); anything else is refused."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise QpackInputError(f"tensor {where!r}: parameter value {value} is not finite")
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, where) for k, v in value.items()}
    raise QpackInputError(f"tensor {where!r}: parameter of type {type(value).__name__} cannot be stored as JSON")


def _encode_quant(
    prefix: str, q: Quantized, layout: LayoutChoice, codecs: list[Codec], scale_codecs: list[Codec],
    scale_layout: str, verify: bool
) -> tuple[dict, list[Section]]:
    q = q.cpu()  # bytes are made from numpy arrays on the CPU
    trials = code_layouts(layout, q.bits, codecs, prefix.rstrip(":"))
    try:
        raws = [encode_codes(q.q.numpy(), q.bits, lay) for lay, _ in trials]
    except ValueError as exc:
        raise QpackInputError(f"tensor {prefix!r}: {exc}") from None
    # Layout first, then codec: a tie keeps the earlier layout (byte before packed).
    width = int(q.q.shape[1])
    code_sec, which_code = _smallest(f"{prefix}codes", [(c, i) for i, (lay, cs) in enumerate(trials)
                                                        for c in section_codecs(cs, lay, q.numel, width)],
                                     raws, verify)
    layouts = SCALE_LAYOUTS if scale_layout == "auto" else (scale_layout,)
    scale_sec, which = encode_smallest(f"{prefix}scales", scale_codecs,
                                       [scales_to_bytes(q.scales.numpy(), lay) for lay in layouts], verify)
    entry = {
        "shape": [int(d) for d in q.shape],
        "scheme": q.scheme,
        "bits": int(q.bits),
        "group_size": None if q.group_size is None else int(q.group_size),
        "params": _plain(q.params, prefix),
        "layout": trials[which_code][0],
        "codes": {"section": code_sec.name, "codec": code_sec.codec},
        "scales": {"section": scale_sec.name, "codec": scale_sec.codec, "layout": layouts[which]},
    }
    sections = [code_sec, scale_sec]
    if q.col_scale is not None:
        col_sec, _ = encode_smallest(f"{prefix}col_scale", scale_codecs, [q.col_scale.numpy().astype("<f2").tobytes()],
                                     verify)
        entry[_COL_KEY] = {"section": col_sec.name, "codec": col_sec.codec}
        sections.append(col_sec)
    return entry, sections


def encode_entry(entry: TensorEntry, verify: bool = False) -> EncodedEntry:
    """One tensor's manifest entry and encoded sections: its exact payload bytes, without writing a file."""
    name = entry.name
    if not isinstance(name, str) or not name or len(name) > 1024 or not name.isprintable():
        raise QpackInputError(f"tensor name {name!r:.80} must be a printable string of 1 to 1024 characters")
    codec = _codecs(entry.codec)
    scale_codec = _codecs(entry.scale_codec)
    if entry.scale_layout not in (*SCALE_LAYOUTS, "auto"):
        raise QpackInputError(f"tensor {name!r}: unknown scale layout {entry.scale_layout!r}")
    payload = entry.payload
    if isinstance(payload, torch.Tensor):
        if entry.lowrank is not None:
            raise QpackInputError(f"tensor {name!r}: low-rank factors need a quantized tensor")
        dname = dtype_name(payload.dtype)
        t = payload.detach().to("cpu").contiguous()
        if dname == "bfloat16":
            t = t.view(torch.int16)
        raw = t.numpy().astype(DTYPES[dname][1], copy=False).tobytes()
        sec, _ = encode_smallest(f"{name}:data", codec, [raw], verify)
        manifest = {"name": name, "kind": "raw", "shape": [int(d) for d in payload.shape], "dtype": dname,
                    "data": {"section": sec.name, "codec": sec.codec}}
        return EncodedEntry(manifest, (sec,))
    q = _check_quantized(name, payload)
    dtype = entry.dtype or "float32"
    if dtype not in FLOAT_DTYPES:
        raise QpackInputError(f"tensor {name!r}: original dtype {dtype!r} must be one of {', '.join(FLOAT_DTYPES)}")
    body, sections = _encode_quant(f"{name}:", q, entry.layout, codec, scale_codec, entry.scale_layout, verify)
    lowrank = None
    if entry.lowrank is not None:
        a, b = (_check_quantized(name, f) for f in entry.lowrank)
        if a.col_scale is not None or b.col_scale is not None:
            raise QpackInputError(f"tensor {name!r}: low-rank factors take no column scales")
        rows, cols = q.q.shape
        rank = a.q.shape[1]
        if a.q.shape != (rows, rank) or b.q.shape != (rank, cols) or tuple(a.shape) != (rows, rank) \
                or tuple(b.shape) != (rank, cols) or not 1 <= rank <= min(rows, cols):
            raise QpackInputError(f"tensor {name!r}: low-rank factors {a.shape} @ {b.shape} do not make {rows}x{cols}")
        lowrank = {"rank": int(rank)}
        for key, f in (("a", a), ("b", b)):
            factor_layout = entry.layout if entry.lowrank_layout is None else entry.lowrank_layout
            fb, fs = _encode_quant(f"{name}:lowrank.{key}.", f, factor_layout, codec, scale_codec,
                                   entry.scale_layout, verify)
            lowrank[key] = fb
            sections += fs
    manifest = {"name": name, "kind": "quant", "dtype": dtype, "lowrank": lowrank, **body}
    return EncodedEntry(manifest, tuple(sections))


def _assemble(entries: Sequence[TensorEntry | EncodedEntry], meta: dict | None, verify: bool
              ) -> tuple[dict, list, list[Section]]:
    encoded = [e if isinstance(e, EncodedEntry) else encode_entry(e, verify) for e in entries]
    names = [e.name for e in encoded]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise QpackInputError(f"duplicate tensor names: {dupes[:5]}")
    return complete_meta(meta), [e.manifest for e in encoded], [s for e in encoded for s in e.sections]


def build_artifact(entries: Sequence[TensorEntry | EncodedEntry], meta: dict | None = None,
                   verify: bool = True) -> bytes:
    """The artifact as bytes, from entries (encoded here) or entries already encoded by encode_entry (what
    the budget priced); `meta` adds to or overrides qpack.provenance.complete_meta(). Same inputs, same bytes."""
    return build_container(*_assemble(entries, meta, verify))


def write_artifact(path: str | os.PathLike, entries: Sequence[TensorEntry | EncodedEntry], meta: dict | None = None,
                   verify: bool = True, _on_step=None) -> int:
    """Atomically write the artifact to `path`; returns the number of bytes written."""
    return write_container(path, *_assemble(entries, meta, verify), _on_step=_on_step)


# ----------------------------------------------------------------------------------------------- reading


class Artifact:
    """A verified artifact: manifest entries checked against their sections; tensors decoded on demand."""

    def __init__(self, container: Container):
        self.container = container
        self.path = container.path
        self.meta = container.meta
        self._check_meta()
        self.entries: list[dict] = container.tensors
        self._by_name: dict[str, dict] = {}
        used: set[str] = set()
        for i, e in enumerate(self.entries):
            self._check_entry(i, e, used)
        unused = [s.name for s in container.sections if s.name not in used]
        if unused:
            self._fail(Reason.BAD_MANIFEST, f"section {unused[0]!r} belongs to no tensor")

    # -- validation
    def _fail(self, reason: Reason, detail: str):
        raise QpackFormatError(self.path, reason, detail)

    def _check_meta(self) -> None:
        cfg = self.meta.get("model_config")
        if cfg is not None and not isinstance(cfg, dict):
            self._fail(Reason.BAD_MANIFEST, "meta.model_config must be an object or null")

    def _check_shape(self, value: Any, where: str) -> tuple[int, ...]:
        if not isinstance(value, list) or len(value) > MAX_NDIM:
            self._fail(Reason.BAD_MANIFEST, f"{where}: shape must be a list of at most {MAX_NDIM} integers")
        shape = tuple(check_uint(self.path, d, f"{where}: shape dimension", MAX_DIM) for d in value)
        if math.prod(shape) > MAX_NUMEL:
            self._fail(Reason.LIMIT, f"{where}: shape {list(shape)} has more than {MAX_NUMEL} elements")
        return shape

    def _use_section(self, ref: Any, where: str, used: set[str], keys: frozenset) -> int:
        if not isinstance(ref, dict) or set(ref) != keys:
            self._fail(Reason.BAD_MANIFEST, f"{where} must have exactly the keys {sorted(keys)}")
        name = ref["section"]
        info = self.container.section_info(check_name(self.path, name, f"{where}.section"))
        if name in used:
            self._fail(Reason.BAD_MANIFEST, f"{where}: section {name!r} is used twice")
        used.add(name)
        if ref["codec"] != info.codec:
            self._fail(Reason.BAD_MANIFEST, f"{where}: codec {ref['codec']!r:.80} disagrees with section {name!r}")
        return info.raw_length

    def _check_quant(self, e: dict, where: str, used: set[str], keys: frozenset) -> tuple[int, int]:
        if set(e) != keys and not (keys is _QUANT_KEYS and set(e) == keys | {_COL_KEY}):
            self._fail(Reason.BAD_MANIFEST, f"{where} must have exactly the keys {sorted(keys)}")
        shape = self._check_shape(e["shape"], where)
        rows, cols = matrix_shape(shape)
        bits = e["bits"]
        if not is_int(bits) or not MIN_BITS <= bits <= MAX_CODE_BITS:
            self._fail(Reason.BAD_MANIFEST, f"{where}: bits must be an integer in {MIN_BITS}..{MAX_CODE_BITS}, "
                                            f"got {bits!r:.40}")
        if not isinstance(e["scheme"], str) or not _SCHEME_RE.match(e["scheme"]):
            self._fail(Reason.UNKNOWN_SCHEME, f"{where}: scheme {e['scheme']!r:.80} is not a plain scheme name")
        if not isinstance(e["params"], dict):
            self._fail(Reason.BAD_MANIFEST, f"{where}: params must be an object")
        gs = e["group_size"]
        if gs is not None:
            check_uint(self.path, gs, f"{where}: group_size", MAX_DIM)  # may exceed cols: one group
            if gs == 0:
                self._fail(Reason.BAD_MANIFEST, f"{where}: group_size must be positive or null")
        layout = e["layout"]
        try:
            want_codes = layout_size(rows * cols, bits, layout if isinstance(layout, str) else "")
        except ValueError as exc:
            self._fail(Reason.LAYOUT, f"{where}: {exc}")
        have = self._use_section(e["codes"], f"{where}.codes", used, frozenset({"section", "codec"}))
        if have != want_codes:
            self._fail(Reason.LAYOUT, f"{where}: shape {list(shape)} at {bits} bits in layout {layout!r} needs "
                                      f"{want_codes} code bytes, section holds {have}")
        have = self._use_section(e["scales"], f"{where}.scales", used, frozenset({"section", "codec", "layout"}))
        if e["scales"]["layout"] not in SCALE_LAYOUTS:
            self._fail(Reason.LAYOUT, f"{where}: scale layout {e['scales']['layout']!r:.40} is not one of "
                                      f"{', '.join(SCALE_LAYOUTS)}")
        want = 2 * rows * n_groups(cols, gs)
        if have != want:
            self._fail(Reason.LAYOUT, f"{where}: {rows} rows x {n_groups(cols, gs)} groups need {want} scale bytes, "
                                      f"section holds {have}")
        if _COL_KEY in e:
            have = self._use_section(e[_COL_KEY], f"{where}.{_COL_KEY}", used, frozenset({"section", "codec"}))
            if have != 2 * cols:
                self._fail(Reason.LAYOUT, f"{where}: {cols} columns need {2 * cols} column-scale bytes, section holds "
                                          f"{have}")
        return rows, cols

    def _check_entry(self, i: int, e: dict, used: set[str]) -> None:
        name = check_name(self.path, e.get("name"), f"tensor {i} name")
        where = f"tensor {name!r}"
        if name in self._by_name:
            self._fail(Reason.BAD_MANIFEST, f"duplicate tensor name {name!r}")
        self._by_name[name] = e
        kind = e.get("kind")
        if kind == "raw":
            if set(e) != _RAW_KEYS:
                self._fail(Reason.BAD_MANIFEST, f"{where} must have exactly the keys {sorted(_RAW_KEYS)}")
            shape = self._check_shape(e["shape"], where)
            if not isinstance(e["dtype"], str) or e["dtype"] not in DTYPES:
                self._fail(Reason.BAD_MANIFEST, f"{where}: dtype {e['dtype']!r:.40} is not one of {', '.join(DTYPES)}")
            have = self._use_section(e["data"], f"{where}.data", used, frozenset({"section", "codec"}))
            want = math.prod(shape) * np.dtype(DTYPES[e["dtype"]][1]).itemsize
            if have != want:
                self._fail(Reason.LAYOUT, f"{where}: {e['dtype']} {list(shape)} needs {want} bytes, section holds "
                                          f"{have}")
        elif kind == "quant":
            rows, cols = self._check_quant(e, where, used, _QUANT_KEYS)
            if e["dtype"] not in FLOAT_DTYPES:
                self._fail(Reason.BAD_MANIFEST, f"{where}: dtype {e['dtype']!r:.40} is not one of "
                                                f"{', '.join(FLOAT_DTYPES)}")
            lr = e["lowrank"]
            if lr is not None:
                if not isinstance(lr, dict) or set(lr) != {"rank", "a", "b"}:
                    self._fail(Reason.BAD_MANIFEST, f"{where}: lowrank must be null or {{rank, a, b}}")
                rank = check_uint(self.path, lr["rank"], f"{where}: lowrank rank", max(1, min(rows, cols)))
                for key, want in (("a", (rows, rank)), ("b", (rank, cols))):
                    if not isinstance(lr[key], dict):
                        self._fail(Reason.BAD_MANIFEST, f"{where}: lowrank.{key} must be an object")
                    self._check_quant(lr[key], f"{where}.lowrank.{key}", used, _FACTOR_KEYS)
                    if tuple(lr[key]["shape"]) != want or rank < 1:
                        self._fail(Reason.LAYOUT, f"{where}: lowrank.{key} shape {lr[key]['shape']} should be "
                                                  f"{list(want)}")
        else:
            self._fail(Reason.BAD_MANIFEST, f"{where}: kind {kind!r:.40} is not 'quant' or 'raw'")

    # -- access
    def names(self) -> list[str]:
        """Tensor names in file order."""
        return [e["name"] for e in self.entries]

    def entry(self, name: str) -> dict:
        """The (validated) manifest entry of tensor `name`."""
        try:
            return self._by_name[name]
        except KeyError:
            raise QpackError(f"{self.path}: no tensor named {name!r}") from None

    @property
    def model_config(self) -> dict | None:
        """The model config recorded at compression time, or None."""
        return self.meta.get("model_config")

    def _decode_quant(self, e: dict, where: str) -> Quantized:
        shape = tuple(e["shape"])
        rows, cols = matrix_shape(shape)
        try:
            q = decode_codes(self.container.section(e["codes"]["section"]), e["bits"], e["layout"], rows * cols)
            scales = scales_from_bytes(self.container.section(e["scales"]["section"]), e["scales"]["layout"],
                                       (rows, n_groups(cols, e["group_size"])))
        except ValueError as exc:
            self._fail(Reason.LAYOUT, f"{where}: {exc}")
        if not np.isfinite(scales).all():
            self._fail(Reason.BAD_MANIFEST, f"{where}: scales hold NaN or infinity")
        col = None
        if _COL_KEY in e:
            col = np.frombuffer(self.container.section(e[_COL_KEY]["section"]), dtype="<f2").astype(np.float16)
            if not (np.isfinite(col) & (col > 0)).all():
                self._fail(Reason.BAD_MANIFEST, f"{where}: column scales must be finite and positive")
        try:
            return Quantized(q.reshape(rows, cols), scales, shape, e["bits"], e["scheme"], e["group_size"],
                             dict(e["params"]), col)
        except QpackError as exc:
            self._fail(Reason.LAYOUT, f"{where}: {exc}")

    def quantized(self, name: str) -> Quantized | torch.Tensor:
        """Tensor `name` as stored: a Quantized (codes and scales) or the passthrough torch.Tensor."""
        e = self.entry(name)
        where = f"tensor {name!r}"
        if e["kind"] == "quant":
            return self._decode_quant(e, where)
        torch_dtype, np_dtype = DTYPES[e["dtype"]]
        arr = np.frombuffer(self.container.section(e["data"]["section"]), dtype=np_dtype).copy()
        if e["dtype"] == "bool" and arr.size and int(arr.max()) > 1:
            self._fail(Reason.BAD_MANIFEST, f"{where}: bool data holds values other than 0 and 1")
        t = torch.from_numpy(arr.astype(np_dtype.replace("<", "="), copy=False))
        t = t.view(torch.bfloat16) if e["dtype"] == "bfloat16" else t.to(torch_dtype)
        return t.reshape(tuple(e["shape"]))

    def lowrank(self, name: str) -> tuple[Quantized, Quantized] | None:
        """The LQER factors (A, B) of tensor `name`, or None."""
        lr = self.entry(name).get("lowrank")
        if not lr:
            return None
        return (self._decode_quant(lr["a"], f"tensor {name!r}.lowrank.a"),
                self._decode_quant(lr["b"], f"tensor {name!r}.lowrank.b"))

    def tensor(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Tensor `name` dequantized (float32; q * scale, plus A @ B for LQER) or passed through."""
        stored = self.quantized(name)
        if isinstance(stored, torch.Tensor):
            return stored.to(device)
        w = stored.dequantize()
        factors = self.lowrank(name)
        if factors is not None:
            a, b = factors
            w = w + (a.dequantize() @ b.dequantize()).reshape(w.shape)
        return w.to(device)

    def tensors(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Every tensor, dequantized, in file order."""
        return {name: self.tensor(name, device) for name in self.names()}

    def section_bytes(self, name: str) -> dict[str, int]:
        """Encoded bytes of tensor `name` by part: codes, scales (with column scales), lowrank (quant) or data
        (raw)."""
        e = self.entry(name)
        size = lambda ref: self.container.section_info(ref["section"]).length  # noqa: E731
        if e["kind"] == "raw":
            return {"data": size(e["data"])}
        out = {"codes": size(e["codes"]), "scales": size(e["scales"]) + (size(e[_COL_KEY]) if _COL_KEY in e else 0),
               "lowrank": 0}
        if e["lowrank"]:
            out["lowrank"] = sum(size(e["lowrank"][k][p]) for k in ("a", "b") for p in ("codes", "scales"))
        return out


def loads_artifact(data: bytes, path: str | os.PathLike = "<bytes>") -> Artifact:
    """Verify an artifact held in memory."""
    return Artifact(parse_container(data, path))


def read_artifact(path: str | os.PathLike) -> Artifact:
    """Open and verify the artifact at `path` (sections are decoded on demand)."""
    return Artifact(read_container(path))
