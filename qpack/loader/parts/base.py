"""The core of the exported loader: read and verify a .qpk, decode its sections, rebuild the state dict.

Everything below the PART marker is pasted into the exported qpack_load.py, after which the codec parts
chosen at export time register their decoders in _CODECS. It uses only the standard library, numpy and
torch, refuses what qpack/container.py and qpack/artifact.py refuse (same limits, same checks, all before
any section is decoded) and computes exactly what qpack.load computes (docs/FORMAT.md, qpack/statedict.py).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import zlib

import numpy as np
import torch

# PART


class QpkLoadError(ValueError):
    """A .qpk file the loader refuses: corrupt, truncated, hostile, or using a codec it was exported without."""


# codec name -> (decode(list of (encoded bytes, raw_length, params)) -> list of bytes, {param: allowed}), where
# allowed is a range of ints, a tuple of values, bool, or None (checked by the decoder itself)
_CODECS = {}
_DT = {"float64": "<f8", "float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "int64": "<i8", "int32": "<i4",
       "int16": "<i2", "int8": "i1", "uint8": "u1", "bool": "u1"}
_SEC = {"name", "codec", "offset", "length", "raw_length", "crc32"}
_QK = {"shape", "scheme", "bits", "group_size", "params", "layout", "codes", "scales"}


def _err(msg):
    raise QpkLoadError(msg)


def _int(v, hi, what):
    if type(v) is not int or not 0 <= v <= hi:
        _err(f"{what} must be an integer in 0..{hi}, got {v!r:.40}")
    return v


def _name(v, what):
    if not isinstance(v, str) or not v or len(v) > 1024 or not v.isprintable():
        _err(f"{what} must be a printable name")
    return v


def _json(body):
    def pairs(kv):
        d = {}
        for k, v in kv:
            if k in d:
                raise ValueError(f"duplicate key {k!r}")
            d[k] = v
        return d

    def num(x):
        v = float(x)
        if not math.isfinite(v):
            raise ValueError(x)
        return v

    def const(x):
        raise ValueError(x)

    try:
        m = json.loads(body.decode("utf-8"), object_pairs_hook=pairs, parse_constant=const, parse_float=num)
    except (RecursionError, ValueError) as e:
        _err(f"manifest is not valid JSON: {e}")
    todo = [(m, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            if d > 32:
                _err("manifest JSON nests deeper than 32")
            todo += [(x, d + 1) for x in (v.values() if isinstance(v, dict) else v)]
    return m


def _open(data):
    """Verify the whole container (header, manifest, tiling, CRCs, SHA-256); returns (meta, tensors, sections)."""
    n = len(data)
    if n > 64 << 30:
        _err("file is larger than 64 GiB")
    if data[:8] != b"QPACK\0\r\n" or n < 32:
        _err("not a qpack artifact (bad magic or truncated)")
    _, ver, flags, ml, mcrc, hcrc = struct.unpack_from("<8sIIQII", data)
    ok = zlib.crc32(data[:28]) == hcrc
    if ver != 1:
        _err(f"format version {ver} is not supported" if ok else "header CRC-32 does not match")
    if not ok:
        _err("header CRC-32 does not match")
    if flags & ~1:
        _err("unknown header flags")
    if not 2 <= ml <= 1 << 24:
        _err(f"manifest length {ml} is impossible")
    if 64 + ml > n:
        _err("truncated inside the manifest")
    body = data[32 : 32 + ml]
    if zlib.crc32(body) != mcrc:
        _err("manifest CRC-32 does not match")
    if flags & 1:
        z = zlib.decompressobj()
        try:
            body = z.decompress(body, (1 << 24) + 1)
        except zlib.error as e:
            _err(f"compressed manifest is corrupt: {e}")
        if len(body) > 1 << 24 or not z.eof or z.unused_data or z.unconsumed_tail:
            _err("compressed manifest is malformed")
    m = _json(body)
    if not isinstance(m, dict) or set(m) != {"format", "version", "meta", "sections", "tensors"}:
        _err("manifest has the wrong keys")
    if m["format"] != "qpack" or type(m["version"]) is not int or m["version"] != 1:
        _err("manifest is not qpack version 1")
    ts, ss = m["tensors"], m["sections"]
    if not isinstance(m["meta"], dict) or not isinstance(ts, list) or not all(isinstance(t, dict) for t in ts):
        _err("manifest meta or tensors malformed")
    if not isinstance(ss, list) or len(ss) > 10**6:
        _err("manifest sections malformed or too many")
    secs, at, raw, base = {}, 0, 0, 32 + ml
    for r in ss:
        if not isinstance(r, dict) or set(r) != _SEC:
            _err("a section has the wrong keys")
        nm = _name(r["name"], "section name")
        if nm in secs:
            _err(f"duplicate section {nm!r}")
        if _int(r["offset"], 64 << 30, "offset") != at:
            _err(f"section {nm!r} does not tile the payload")
        ln = _int(r["length"], 64 << 30, "length")
        rl = _int(r["raw_length"], 4 << 30, "raw_length")
        at += ln
        raw += rl
        if raw > 64 << 30:
            _err("sections decode to more than 64 GiB")
        c = r["codec"]
        if not isinstance(c, dict) or set(c) != {"name", "params"} or not isinstance(c["params"], dict):
            _err(f"section {nm!r}: malformed codec")
        if c["name"] not in _CODECS:
            _err(f"codec {c['name']!r:.40} is not in this loader (export it with --codecs)")
        spec = _CODECS[c["name"]][1]
        for k, x in c["params"].items():
            t = spec.get(k, ())
            if t is not None and not (type(x) is bool if t is bool else type(x) in (int, str) and x in t):
                _err(f"section {nm!r}: bad codec parameter {k!r:.40}")
        secs[nm] = [c, base + at - ln, ln, rl, _int(r["crc32"], 2**32 - 1, "crc32")]
    if n != base + at + 32:
        _err("truncated" if n < base + at + 32 else "trailing bytes")
    v = memoryview(data)
    for nm, s in secs.items():
        s[1] = v[s[1] : s[1] + s[2]]
        if zlib.crc32(s[1]) != s[4]:
            _err(f"section {nm!r} CRC-32 does not match")
    if hashlib.sha256(v[: n - 32]).digest() != data[n - 32 :]:
        _err("SHA-256 trailer does not match")
    return m["meta"], ts, secs


def _shape(v):
    if not isinstance(v, list) or len(v) > 16:
        _err("shape must be a list of at most 16 integers")
    s = [_int(d, 1 << 40, "shape dimension") for d in v]
    if math.prod(s) > 1 << 32:
        _err("shape has more than 2^32 elements")
    return s


def _mat(s):
    return (1, 1) if not s else (1, s[0]) if len(s) == 1 else (s[0], math.prod(s[1:]))


def _ref(r, keys, secs, used):
    if not isinstance(r, dict) or set(r) != keys or not isinstance(r["section"], str) or r["section"] not in secs:
        _err("a tensor names a missing or malformed section")
    if r["section"] in used:
        _err(f"section {r['section']!r} is used twice")
    used.add(r["section"])
    if r["codec"] != secs[r["section"]][0]:
        _err("a section's codec disagrees with its tensor")
    return secs[r["section"]][3]


def _check_quant(e, keys, secs, used, col=False):
    if set(e) != keys and not (col and set(e) == keys | {"col_scale"}):
        _err("a quantized tensor has the wrong keys")
    s = _shape(e["shape"])
    r, c = _mat(s)
    b, g, lay = e["bits"], e["group_size"], e["layout"]
    if type(b) is not int or not 2 <= b <= 12:
        _err("bits must be an integer in 2..12")
    if not isinstance(e["scheme"], str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", e["scheme"]):
        _err("scheme is not a plain name")
    if not isinstance(e["params"], dict):
        _err("params must be an object")
    if g is not None and _int(g, 1 << 40, "group_size") == 0:
        _err("group_size must be positive or null")
    sizes = {"planes": 2 * r * c} if b > 8 else {"byte": r * c, "packed": -(-r * c * b // 8)}
    if b == 2:
        sizes["trit"] = -(-r * c // 5)
    if lay not in sizes or _ref(e["codes"], {"section", "codec"}, secs, used) != sizes[lay]:
        _err("codes section does not match the tensor")
    if _ref(e["scales"], {"section", "codec", "layout"}, secs, used) != 2 * r * (1 if not g else -(-c // g)) \
            or e["scales"]["layout"] not in ("plain", "shuffled"):
        _err("scales section does not match the tensor")
    if "col_scale" in e and _ref(e["col_scale"], {"section", "codec"}, secs, used) != 2 * c:
        _err("column-scale section does not match the tensor")
    return r, c


def _check(ts, secs):
    used, names = set(), set()
    for e in ts:
        nm = _name(e.get("name"), "tensor name")
        if nm in names:
            _err(f"duplicate tensor {nm!r}")
        names.add(nm)
        if e.get("kind") == "raw":
            if set(e) != {"name", "kind", "shape", "dtype", "data"} or e["dtype"] not in _DT:
                _err(f"tensor {nm!r}: malformed raw entry")
            want = math.prod(_shape(e["shape"])) * np.dtype(_DT[e["dtype"]]).itemsize
            if _ref(e["data"], {"section", "codec"}, secs, used) != want:
                _err(f"tensor {nm!r}: data does not match its shape")
        elif e.get("kind") == "quant":
            r, c = _check_quant(e, _QK | {"name", "kind", "dtype", "lowrank"}, secs, used, True)
            if e["dtype"] not in ("float64", "float32", "float16", "bfloat16"):
                _err(f"tensor {nm!r}: bad dtype")
            lr = e["lowrank"]
            if lr is not None:
                if not isinstance(lr, dict) or set(lr) != {"rank", "a", "b"}:
                    _err(f"tensor {nm!r}: malformed lowrank")
                k = _int(lr["rank"], max(1, min(r, c)), "rank")
                for key, want in (("a", [r, k]), ("b", [k, c])):
                    if not isinstance(lr[key], dict):
                        _err(f"tensor {nm!r}: bad lowrank factor")
                    _check_quant(lr[key], _QK, secs, used)
                    if lr[key]["shape"] != want or k < 1:
                        _err(f"tensor {nm!r}: bad lowrank factor")
        else:
            _err(f"tensor {nm!r}: unknown kind")
    if used != set(secs):
        _err("a section belongs to no tensor")


def _codes(raw, b, lay, n):
    # Symbols s = q + qmax in the byte, packed (width b, LSB first) or trit (base 3, 5 per byte) layout; planes:
    # zigzag symbols z (q = z/2 or -(z+1)/2), all high bytes then all low bytes.
    m = (1 << b - 1) - 1
    u = np.frombuffer(raw, np.uint8)
    if lay == "planes":
        z = u[:n].astype(np.int32) << 8 | u[n:]
        if n and z.max() > 2 * m:
            _err("code symbol out of range")
        return np.where(z & 1, -((z + 1) >> 1), z >> 1).astype(np.int16)
    if lay == "trit":
        if n and (u.max() > 242 or n % 5 and u[-1] >= 3 ** (n % 5)):
            _err("trit codes out of range")
        return ((u[:, None] // np.array([1, 3, 9, 27, 81], np.uint8)) % 3).reshape(-1)[:n].astype(np.int8) - 1
    if lay == "packed":
        bits = np.unpackbits(u, bitorder="little")
        if bits[n * b :].any():
            _err("packed codes have non-zero padding bits")
        u = (bits[: n * b].reshape(n, b).astype(np.uint8) << np.arange(b, dtype=np.uint8)).sum(1, dtype=np.uint8)
    if n and u.max() > 2 * m:
        _err("code symbol out of range")
    return (u.astype(np.int16) - m).astype(np.int8)


def _deq(e, raw):
    # q * fp16 scale (* column scale) in float32, exactly as qpack.quant.base.Quantized.dequantize.
    r, c = _mat(e["shape"])
    q = torch.from_numpy(_codes(raw[e["codes"]["section"]], e["bits"], e["layout"], r * c).astype(np.float32))
    u = np.frombuffer(raw[e["scales"]["section"]], np.uint8)
    h = len(u) // 2
    if e["scales"]["layout"] == "shuffled":
        u = np.stack([u[h:], u[:h]], 1).reshape(-1)
    s = u.view("<f2").astype(np.float32).reshape(r, 1 if not e["group_size"] else -(-c // e["group_size"]))
    if not np.isfinite(s).all():
        _err("scales hold NaN or infinity")
    if e["group_size"]:
        s = s[:, np.arange(c) // e["group_size"]]
    w = q.reshape(r, c) * torch.from_numpy(np.ascontiguousarray(s))
    if "col_scale" in e:  # then times one fp16 multiplier per column
        k = np.frombuffer(raw[e["col_scale"]["section"]], "<f2").astype(np.float32)
        if not (np.isfinite(k) & (k > 0)).all():
            _err("column scales must be finite and positive")
        w = w * torch.from_numpy(k)[None, :]
    return w.reshape(e["shape"])


def _tensor(e, raw):
    if e["kind"] == "raw":
        a = np.frombuffer(raw[e["data"]["section"]], _DT[e["dtype"]]).copy()
        if e["dtype"] == "bool" and a.size and a.max() > 1:
            _err("bool data holds values other than 0 and 1")
        t = torch.from_numpy(a.astype(a.dtype.newbyteorder("="), copy=False))
        t = t.view(torch.bfloat16) if e["dtype"] == "bfloat16" else t.to(getattr(torch, e["dtype"]))
        return t.reshape(e["shape"])
    w = _deq(e, raw)
    lr = e["lowrank"]
    if lr:
        w = w + (_deq(lr["a"], raw) @ _deq(lr["b"], raw)).reshape(w.shape)
    return w


def _decode(secs):
    # One call per codec with all of its sections (the ans part decodes them together, in lock step).
    out, by = {}, {}
    for nm, s in secs.items():
        by.setdefault(s[0]["name"], []).append(nm)
    for codec, names in by.items():
        try:
            got = _CODECS[codec][0]([(secs[x][1], secs[x][3], secs[x][0]["params"]) for x in names])
        except QpkLoadError:
            raise
        except Exception as e:  # the codec libraries raise their own types on corrupt frames
            _err(f"{codec} failed: {e!r:.200}")
        for x, b in zip(names, got):
            if len(b) != secs[x][3]:
                _err(f"section {x!r} decoded to {len(b)} bytes, not {secs[x][3]}")
            out[x] = b
    return out


def load(path):
    """Read the .qpk at `path` and return its state dict {name: torch.Tensor}, exactly as qpack.load does."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        _err(f"{path}: cannot read: {e}")
    meta, ts, secs = _open(data)
    if meta.get("model_config") is not None and not isinstance(meta["model_config"], dict):
        _err("meta model_config must be an object or null")
    _check(ts, secs)
    raw = _decode(secs)
    by = {e["name"]: e for e in ts}
    sp, al, order = meta.get("row_splits") or {}, meta.get("aliases") or {}, meta.get("order")
    if not isinstance(sp, dict) or not isinstance(al, dict):
        _err("meta row_splits/aliases must be objects")
    out, used = {}, set()
    for nm, spec in sp.items():
        bad = f"row split of {nm!r} is malformed, names missing or reused parts, or does not add up"
        if not isinstance(spec, dict) or not isinstance(spec.get("parts"), list) or not isinstance(spec.get("shape"), list):
            _err(bad)
        parts, shape = spec["parts"], spec["shape"]
        if not parts or any(not isinstance(p, str) or p not in by or p in used for p in parts) \
                or not all(type(d) is int and d >= 0 for d in shape):
            _err(bad)
        ps = [_tensor(by[p], raw) for p in parts]
        flat = torch.cat([p.reshape(p.shape[0], -1) if p.ndim > 1 else p.reshape(1, -1) for p in ps], 0)
        if flat.numel() != math.prod(shape):
            _err(bad)
        out[nm] = flat.reshape(shape)
        used.update(parts)
    for e in ts:
        if e["name"] not in used:
            out[e["name"]] = _tensor(e, raw)
    dt = meta.get("dtypes") or {}
    if not isinstance(dt, dict):
        _err("meta dtypes must be an object")
    for k, d in dt.items():
        if d not in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"):
            _err(f"meta dtype {d!r} is unknown")
        if k in out:
            out[k] = out[k].to(getattr(torch, d))
    for a, t in al.items():
        if not isinstance(t, str) or t not in out or a in out:
            _err(f"alias {a!r} is inconsistent")
        out[a] = out[t]
    if isinstance(order, list) and all(isinstance(k, str) for k in order) and set(order) == set(out):
        out = {k: out[k] for k in order}
    return out
