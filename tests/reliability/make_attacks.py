"""Generate the hostile inputs under tests/reliability/attacks/ and their index.json files of expected refusals.

    python tests/reliability/make_attacks.py            # rewrites attacks/checkpoints, attacks/qpk, attacks/bombs

checkpoints/: pickles that try to run code (each would create the file CANARY in the working directory if it
ever ran) and safetensors files with broken headers.  qpk/: small .qpk files broken one way each, with valid
checksums so that the checks behind the checksums are reached.  bombs/: sections that decode to far more
than their manifest promises.  Every file is a few KB or less, except the 1 GiB lzma bomb (about 150 KB).
"""
from __future__ import annotations

import copy
import io
import json
import lzma
import struct
import sys
import zipfile
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from relhelp import (  # noqa: E402
    ATTACKS, EMPTY_TUPLE, LIST, MARK, MEMOIZE, OBJ, POP, PROTO2, PROTO4, REDUCE, SETITEM, STACK_GLOBAL, STOP,
    TUPLE, TUPLE1, binbytes, binget, canonical, g, raw_tensor_container, seal, section_records, split, su, u,
)

CMD = "touch CANARY"
PY_CANARY = "open('CANARY', 'w').close()"


# ============================================================================================ checkpoints
def _call(fn: bytes, *args: bytes) -> bytes:
    return fn + MARK + b"".join(args) + TUPLE + REDUCE


def _torch_legit(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _rezip(zbytes: bytes, new_pkl: bytes) -> bytes:
    """A torch zip checkpoint with its data.pkl replaced (records stored uncompressed, as torch writes them)."""
    src = zipfile.ZipFile(io.BytesIO(zbytes))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = new_pkl if info.filename.endswith("data.pkl") else src.read(info.filename)
            zi = zipfile.ZipInfo(info.filename, date_time=(2020, 1, 1, 0, 0, 0))
            dst.writestr(zi, data)
    return out.getvalue()


def _hide_in_dict(legit_pkl: bytes, payload_call: bytes) -> bytes:
    """Append {"evil": <payload>} to the dict a legit protocol-2 pickle builds, just before its STOP."""
    assert legit_pkl.endswith(STOP)
    return legit_pkl[:-1] + u("evil") + payload_call + SETITEM + STOP


def malicious_pickles() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, what it tries); every payload would create ./CANARY."""
    os_system = PROTO2 + g("os", "system") + u(CMD) + TUPLE1 + REDUCE + STOP
    p: dict[str, tuple[bytes, str]] = {}
    p["os_system.pt"] = (os_system, "os.system via GLOBAL + REDUCE")
    p["posix_system.pt"] = (PROTO2 + g("posix", "system") + u(CMD) + TUPLE1 + REDUCE + STOP, "posix.system")
    p["builtins_eval.pth"] = (PROTO2 + g("builtins", "eval") + u(PY_CANARY) + TUPLE1 + REDUCE + STOP, "eval")
    p["builtins_exec.bin"] = (PROTO2 + g("builtins", "exec") + u(f"import os; os.system({CMD!r})") + TUPLE1
                              + REDUCE + STOP, "exec")
    p["subprocess_popen.pt"] = (PROTO2 + g("subprocess", "Popen") + MARK + u("touch") + u("CANARY") + LIST
                                + TUPLE1 + REDUCE + STOP, "subprocess.Popen([...])")
    p["subprocess_check_call.pt"] = (PROTO2 + g("subprocess", "check_call") + MARK + u("touch") + u("CANARY")
                                     + LIST + TUPLE1 + REDUCE + STOP, "subprocess.check_call")
    imported_os = _call(g("builtins", "__import__"), u("os"))
    p["getattr_import.pt"] = (PROTO2 + _call(_call(g("builtins", "getattr"), imported_os, u("system")), u(CMD))
                              + STOP, "builtins.getattr(__import__('os'), 'system')(cmd): nested reduce")
    p["importlib_getattr.pt"] = (PROTO2 + _call(_call(g("builtins", "getattr"),
                                                      _call(g("importlib", "import_module"), u("os")),
                                                      u("system")), u(CMD)) + STOP,
                                 "importlib.import_module('os').system via getattr")
    p["stack_global.pt"] = (PROTO4 + su("os") + MEMOIZE + su("system") + MEMOIZE + STACK_GLOBAL + su(CMD)
                            + TUPLE1 + REDUCE + STOP, "protocol 4 STACK_GLOBAL os.system")
    p["stack_global_memo.pt"] = (PROTO4 + su("posix") + MEMOIZE + su("system") + MEMOIZE + POP + POP
                                 + binget(0) + binget(1) + STACK_GLOBAL + su(CMD) + TUPLE1 + REDUCE + STOP,
                                 "STACK_GLOBAL with names fetched back from the memo")
    p["inst_opcode.pt"] = (b"(S'" + CMD.encode() + b"'\nios\nsystem\n.", "protocol 0 INST os.system")
    p["obj_opcode.pt"] = (PROTO2 + MARK + g("os", "system") + u(CMD) + OBJ + STOP, "OBJ opcode calls os.system")
    p["functools_partial.pt"] = (PROTO2 + _call(g("functools", "partial"), g("os", "system"), u(CMD))
                                 + EMPTY_TUPLE + REDUCE + STOP, "functools.partial(os.system, cmd)(): nested reduce")
    p["operator_methodcaller.pt"] = (PROTO2 + _call(_call(g("operator", "methodcaller"), u("system"), u(CMD)),
                                                    imported_os) + STOP,
                                     "operator.methodcaller('system', cmd)(os)")
    p["pickle_loads_nested.pt"] = (b"\x80\x03" + g("pickle", "loads") + binbytes(os_system) + TUPLE1 + REDUCE
                                   + STOP, "pickle.loads of an inner malicious pickle")
    p["torch_load_from_bytes.pt"] = (b"\x80\x03" + g("torch.storage", "_load_from_bytes") + binbytes(os_system)
                                     + TUPLE1 + REDUCE + STOP,
                                     "torch.storage._load_from_bytes: a torch function that unpickles fully")
    p["os_popen.pt"] = (PROTO2 + g("os", "popen") + u(CMD) + TUPLE1 + REDUCE + STOP, "os.popen")
    p["builtins_open.pt"] = (PROTO2 + g("builtins", "open") + MARK + u("CANARY") + u("w") + TUPLE + REDUCE + STOP,
                             "builtins.open creates a file")
    p["timeit_stmt.pt"] = (PROTO2 + _call(g("timeit", "timeit"), u(f"import os; os.system({CMD!r})"),
                                          u("pass"), g("time", "perf_counter"), b"K\x01") + STOP,
                           "timeit.timeit(stmt) executes a statement")

    import torch

    legit_zip = _torch_legit({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)})
    p["torch_zip_system.pt"] = (_rezip(legit_zip, os_system), "torch zip checkpoint whose data.pkl is os.system")
    legit_pkl = zipfile.ZipFile(io.BytesIO(legit_zip)).read(
        next(n for n in zipfile.ZipFile(io.BytesIO(legit_zip)).namelist() if n.endswith("data.pkl")))
    hidden = _hide_in_dict(legit_pkl, g("os", "system") + u(CMD) + TUPLE1 + REDUCE)
    p["torch_zip_hidden_entry.bin"] = (_rezip(legit_zip, hidden),
                                       "a real state dict with one extra entry that calls os.system")
    legacy = io.BytesIO()
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    legacy_bytes = legacy.getvalue()
    # The legacy format is 3 small pickles (magic, protocol, sys info) and then the object pickle.
    cut = _pickle_ends(legacy_bytes, 3)
    p["torch_legacy_system.pt"] = (legacy_bytes[:cut] + os_system, "legacy (non-zip) torch file, payload in the 4th pickle")
    return p


def _pickle_ends(data: bytes, n: int) -> int:
    import pickletools

    f = io.BytesIO(data)
    for _ in range(n):
        for _op in pickletools.genops(f):
            pass
    return f.tell()


def _st(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def bad_safetensors() -> dict[str, tuple[bytes, str, str]]:
    """name -> (bytes, expected reason, what)."""
    f32 = lambda shape, a, b: {"dtype": "F32", "shape": shape, "data_offsets": [a, b]}  # noqa: E731
    ok = {"w": f32([2, 2], 0, 16)}
    d16 = bytes(16)
    s: dict[str, tuple[bytes, str, str]] = {}
    s["st_len_max.safetensors"] = (_st(ok, d16, length=2**64 - 1), "limit", "header length 2^64-1")
    s["st_len_past_eof.safetensors"] = (_st(ok, d16, length=5000), "truncated", "header length past the end")
    s["st_short.safetensors"] = (b"\x10\x00\x00\x00\x00\x00\x00", "truncated", "7 bytes")
    s["st_not_json.safetensors"] = (_st(b"{not json at all}", d16), "bad_header", "header is not JSON")
    s["st_array.safetensors"] = (_st(b"[1,2,3]", d16), "bad_header", "header is a JSON array")
    s["st_deep.safetensors"] = (_st(b"{\"a\":" + b"[" * 5_000 + b"]" * 5_000 + b"}"), "limit",
                                "5,000-deep JSON")
    s["st_dtype.safetensors"] = (_st({"w": {"dtype": "PYOBJ", "shape": [2, 2], "data_offsets": [0, 16]}}, d16),
                                 "bad_header", "unknown dtype")
    s["st_neg_shape.safetensors"] = (_st({"w": f32([-2, -2], 0, 16)}, d16), "bad_header", "negative shape")
    s["st_shape_mismatch.safetensors"] = (_st({"w": f32([3, 3], 0, 16)}, d16), "layout", "shape vs offsets")
    s["st_shape_overflow.safetensors"] = (_st({"w": f32([2**62, 2**62], 0, 16)}, d16), "layout",
                                          "shape product overflows 64 bits")
    s["st_overlap.safetensors"] = (_st({"a": f32([2, 2], 0, 16), "b": f32([2, 2], 8, 24)}, bytes(24)), "layout",
                                   "overlapping tensors")
    s["st_gap.safetensors"] = (_st({"a": f32([2], 0, 8), "b": f32([2], 12, 20)}, bytes(20)), "layout", "gap")
    s["st_dup.safetensors"] = (_st(b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                                   b'"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}', d16),
                               "bad_header", "duplicate tensor names")
    s["st_past_end.safetensors"] = (_st({"w": f32([4, 4], 0, 64)}, d16), "truncated", "offsets past the end")
    s["st_meta_nonstr.safetensors"] = (_st({"__metadata__": {"qpack_config": {"x": 1}}, **ok}, d16), "bad_header",
                                       "metadata value is not a string")
    s["st_nan.safetensors"] = (_st(b'{"w":{"dtype":"F32","shape":[NaN],"data_offsets":[0,16]}}', d16),
                               "bad_header", "NaN in the header")
    s["st_empty.safetensors"] = (_st({}), "not_a_model", "no tensors")
    s["st_bool_offsets.safetensors"] = (_st({"w": {"dtype": "F32", "shape": [1], "data_offsets": [False, 4]}},
                                            bytes(4)), "bad_header", "JSON false as an offset")
    s["st_bad_config.safetensors"] = (_st({"__metadata__": {"qpack_config": "{oops"}, **ok}, d16), "bad_header",
                                      "qpack_config is not JSON")
    s["st_quantized.safetensors"] = (_st({"l.weight": {"dtype": "I8", "shape": [2, 2], "data_offsets": [0, 4]},
                                          "l.weight_scale": {"dtype": "F16", "shape": [2], "data_offsets": [4, 8]}},
                                         bytes(8)), "not_a_model", "int8 weights with scales: already quantized")
    return s


def other_checkpoints() -> dict[str, tuple[bytes, str, str]]:
    import torch

    out: dict[str, tuple[bytes, str, str]] = {}
    out["text_file.pt"] = (b"hello, this is not a checkpoint\n", "not_a_model", "a text file")
    out["empty.pt"] = (b"", "not_a_model", "an empty file")
    out["truncated_zip.pt"] = (_torch_legit({"w": torch.ones(64)})[:300], "not_a_model", "a torch zip cut short")
    out["list_of_tensors.pt"] = (_torch_legit([torch.ones(2)]), "not_a_model", "a list, not a dict")
    out["no_tensors.pt"] = (_torch_legit({"step": 3, "lr": 0.1}), "not_a_model", "a dict without tensors")
    out["golf_int8_export.pt"] = (_torch_legit({"__quant_format__": "int8_clean_per_row_v1",
                                                "quantized": {"w": torch.zeros(2, 2, dtype=torch.int8)},
                                                "scales": {"w": torch.ones(2, dtype=torch.float16)}}),
                                  "not_a_model", "a parameter-golf int8 export: already quantized")
    out["int8_with_scales.pt"] = (_torch_legit({"l.weight": torch.zeros(4, 4, dtype=torch.int8),
                                                "l.weight_scale": torch.ones(4)}),
                                  "not_a_model", "int8 weights with scales: already quantized")
    out["artifact_renamed.pt"] = (seal({"format": "qpack"}, b""), "not_a_model", "a .qpk renamed to .pt")
    return out


# ============================================================================================ qpk attacks
def base_artifact() -> bytes:
    """A small real artifact: "w" int4 codes (zstd) + fp16 scales (raw), "b" fp32 passthrough (raw)."""
    import numpy as np
    import torch

    from qpack.artifact import TensorEntry, build_artifact
    from qpack.codecs import make_codec
    from qpack.quant.base import Quantized

    rng = np.random.default_rng(7)
    q = rng.integers(-7, 8, size=(4, 8)).astype(np.int8)
    scales = (rng.random((4, 1)) + 0.5).astype(np.float16)
    entries = [TensorEntry("w", Quantized(q, scales, (4, 8), 4, "rtn"), layout="byte", codec=make_codec("zstd", {}),
                           scale_layout="plain"),
               TensorEntry("b", torch.arange(4, dtype=torch.float32))]
    return build_artifact(entries, {"libraries": {}, "qpack_version": "0"})


def _reseal(m: dict, payload: bytes) -> bytes:
    return seal(m, payload)


def _resection(m: dict, payload_parts: dict[str, bytes]) -> tuple[dict, bytes]:
    """Recompute offsets/lengths/CRCs after replacing some sections' bytes (by name)."""
    payload, out = b"", []
    old_payload = payload_parts.pop("__payload__")
    for rec in m["sections"]:
        data = payload_parts.get(rec["name"], old_payload[rec["offset"]: rec["offset"] + rec["length"]])
        rec = dict(rec, offset=len(payload), length=len(data), crc32=zlib.crc32(data))
        out.append(rec)
        payload += data
    m = dict(m, sections=out)
    return m, payload


def qpk_attacks() -> dict[str, tuple[bytes, str, str]]:
    base = base_artifact()
    M, P = split(base)
    body = canonical(M)
    a: dict[str, tuple[bytes, str, str]] = {}

    def mut(fn) -> bytes:
        m = copy.deepcopy(M)
        fn(m)
        return _reseal(m, P)

    def sec(name):
        return lambda m: next(s for s in m["sections"] if s["name"] == name)

    codes, scales = sec("w:codes"), sec("w:scales")
    tw = lambda m: next(t for t in m["tensors"] if t["name"] == "w")  # noqa: E731
    tb = lambda m: next(t for t in m["tensors"] if t["name"] == "b")  # noqa: E731

    # -- framing
    a["empty.qpk"] = (b"", "truncated", "empty file")
    a["magic_only.qpk"] = (base[:7], "truncated", "7 bytes of the magic")
    a["header_cut.qpk"] = (base[:20], "truncated", "file ends inside the header")
    a["wrong_magic.qpk"] = (b"QPACK\x00\n\r" + base[8:], "bad_magic", "magic with \\n\\r swapped")
    a["header_crc.qpk"] = (seal(M, P, header_crc=0), "checksum", "header CRC wrong")
    a["version_2.qpk"] = (seal(M, P, version=2), "bad_version", "format version 2")
    a["version_max.qpk"] = (seal(M, P, version=2**32 - 1), "bad_version", "format version 2^32-1")
    a["flags_unknown.qpk"] = (seal(M, P, flags=2), "bad_header", "an unknown flag bit")
    a["flags_all.qpk"] = (seal(M, P, flags=2**32 - 1), "bad_header", "every flag bit set")
    a["deflated_manifest_bomb.qpk"] = (seal(zlib.compress(b" " * (20 * 2**20), 9), P, flags=1), "limit",
                                       "zlib manifest inflating to 20 MiB (limit 16 MiB)")
    a["deflated_manifest_garbage.qpk"] = (seal(b"\x78\x9c" + bytes(range(60)), P, flags=1), "bad_manifest",
                                          "zlib flag set, stream is garbage")
    a["deflated_manifest_trailing.qpk"] = (seal(zlib.compress(body, 9) + b"junk", P, flags=1), "bad_manifest",
                                           "zlib manifest followed by junk")
    a["mlen_max.qpk"] = (seal(M, P, mlen=2**64 - 1), "limit", "manifest length 2^64-1")
    a["mlen_16mib_plus1.qpk"] = (seal(M, P, mlen=16 * 2**20 + 1), "limit", "manifest length over 16 MiB")
    a["mlen_past_eof.qpk"] = (seal(M, P, mlen=len(body) + len(P) + 100), "truncated", "manifest past the end")
    a["mlen_zero.qpk"] = (seal(M, P, mlen=0), "bad_header", "manifest length 0")
    a["manifest_crc.qpk"] = (seal(M, P, manifest_crc=zlib.crc32(body) ^ 1), "checksum", "manifest CRC wrong")
    a["trailer_sha.qpk"] = (seal(M, P, trailer=bytes(32)), "checksum", "SHA-256 trailer zeroed")
    a["trailing_junk.qpk"] = (base + b"\x00" * 9, "trailing", "9 bytes after the trailer")
    # -- manifest JSON
    a["json_garbage.qpk"] = (seal(b"{this is not json}", P), "bad_manifest", "manifest is not JSON")
    a["json_utf8.qpk"] = (seal(b'{"format":"\xff\xfe"}', P), "bad_manifest", "manifest is not UTF-8")
    a["json_deep_5k.qpk"] = (seal(b"[" * 5_000 + b"]" * 5_000, b""), "limit", "5,000-deep JSON")
    a["json_deep_33.qpk"] = (mut(lambda m: m["meta"].update(x=json.loads("[" * 33 + "]" * 33))), "limit",
                             "JSON one level deeper than allowed")
    a["json_nan.qpk"] = (seal(body.replace(b'"offset":0', b'"offset":NaN', 1), P), "bad_manifest", "NaN offset")
    a["json_huge_float.qpk"] = (seal(body.replace(b'"offset":0', b'"offset":1e400', 1), P), "bad_manifest",
                                "offset 1e400 (infinity)")
    a["json_huge_int.qpk"] = (seal(body.replace(b'"offset":0', b'"offset":' + b"9" * 5000, 1), P), "bad_manifest",
                              "a 5,000-digit integer")
    a["json_dup_key.qpk"] = (seal(body[:-1] + b',"meta":{}}', P), "bad_manifest", "duplicate key 'meta'")
    a["json_array.qpk"] = (seal(b"[]", P), "bad_manifest", "manifest is an array")
    a["manifest_missing_keys.qpk"] = (mut(lambda m: m.pop("tensors")), "bad_manifest", "no 'tensors'")
    a["manifest_format.qpk"] = (mut(lambda m: m.update(format="zip")), "bad_version", "format 'zip'")
    a["manifest_version.qpk"] = (mut(lambda m: m.update(version=2)), "bad_version", "manifest version 2")
    a["meta_config_list.qpk"] = (mut(lambda m: m["meta"].update(model_config=[1])), "bad_manifest",
                                 "model_config is a list")
    # -- sections
    a["section_overlap.qpk"] = (mut(lambda m: scales(m).update(offset=scales(m)["offset"] - 1)), "layout",
                                "a section starts inside the previous one")
    a["section_gap.qpk"] = (mut(lambda m: scales(m).update(offset=scales(m)["offset"] + 1)), "layout",
                            "a gap between sections")
    a["section_dup_name.qpk"] = (mut(lambda m: scales(m).update(name="w:codes")), "bad_manifest",
                                 "two sections named w:codes")
    a["section_neg_length.qpk"] = (mut(lambda m: codes(m).update(length=-1)), "limit", "negative length")
    a["section_float_length.qpk"] = (mut(lambda m: codes(m).update(length=1.5)), "bad_manifest", "length 1.5")
    a["section_bool_length.qpk"] = (mut(lambda m: codes(m).update(length=True)), "bad_manifest", "length true")
    a["section_raw_2p64.qpk"] = (mut(lambda m: codes(m).update(raw_length=2**64)), "limit", "raw_length 2^64")
    a["section_raw_4gib_plus1.qpk"] = (mut(lambda m: codes(m).update(raw_length=4 * 2**30 + 1)), "limit",
                                       "raw_length just over 4 GiB")

    def total_raw(m):
        extra = [{"name": f"pad{i}", "codec": {"name": "raw", "params": {}}, "offset": 0, "length": 0,
                  "raw_length": 4 * 2**30, "crc32": 0} for i in range(17)]
        m["sections"] = extra + m["sections"]

    a["sections_total_raw.qpk"] = (mut(total_raw), "limit", "17 sections of 4 GiB: over 64 GiB decoded")
    a["section_too_long.qpk"] = (mut(lambda m: sec("b:data")(m).update(length=sec("b:data")(m)["length"] + 50)),
                                 "truncated", "the last section runs past the end")
    a["section_too_short.qpk"] = (mut(lambda m: sec("b:data")(m).update(length=sec("b:data")(m)["length"] - 4)),
                                  "trailing", "payload bytes that no section claims")
    a["section_crc.qpk"] = (mut(lambda m: codes(m).update(crc32=codes(m)["crc32"] ^ 1)), "checksum",
                            "section CRC wrong (trailer recomputed)")
    a["section_extra_key.qpk"] = (mut(lambda m: codes(m).update(path="/etc/passwd")), "bad_manifest",
                                  "an unknown key in a section record")

    def set_codec(spec):
        def fn(m):
            codes(m)["codec"] = spec
            tw(m)["codes"]["codec"] = spec
        return fn

    a["codec_unknown.qpk"] = (mut(set_codec({"name": "snappy", "params": {}})), "unknown_codec", "codec 'snappy'")
    a["codec_import_path.qpk"] = (mut(set_codec({"name": "os:system", "params": {}})), "unknown_codec",
                                  "codec name that looks like an import path")
    a["codec_dotted_path.qpk"] = (mut(set_codec({"name": "qpack.codecs.zstd_codec.Zstd", "params": {}})),
                                  "unknown_codec", "dotted class path as codec name")
    a["codec_bad_param.qpk"] = (mut(set_codec({"name": "zstd", "params": {"level": 99}})), "bad_manifest",
                                "zstd level 99")
    a["codec_unknown_param.qpk"] = (mut(set_codec({"name": "zstd", "params": {"__class__": "x"}})), "bad_manifest",
                                    "an unknown codec parameter")
    a["codec_params_list.qpk"] = (mut(set_codec({"name": "zstd", "params": []})), "bad_manifest",
                                  "codec params is a list")
    # -- tensors
    a["tensor_shape_overflow.qpk"] = (mut(lambda m: tw(m).update(shape=[2**40, 2**40])), "limit",
                                      "shape product 2^80")
    a["tensor_shape_neg.qpk"] = (mut(lambda m: tw(m).update(shape=[-4, -8])), "limit", "negative shape")
    a["tensor_shape_float.qpk"] = (mut(lambda m: tw(m).update(shape=[4.0, 8])), "bad_manifest", "float dimension")
    a["tensor_shape_rank17.qpk"] = (mut(lambda m: tw(m).update(shape=[1] * 17)), "bad_manifest", "rank 17")
    a["tensor_shape_mismatch.qpk"] = (mut(lambda m: tw(m).update(shape=[4, 9])), "layout",
                                      "shape needs more codes than the section holds")
    a["raw_shape_mismatch.qpk"] = (mut(lambda m: tb(m).update(shape=[5])), "layout", "raw shape vs bytes")
    a["tensor_bits_9.qpk"] = (mut(lambda m: tw(m).update(bits=9)), "layout", "bits 9 in a byte layout")
    a["tensor_bits_13.qpk"] = (mut(lambda m: tw(m).update(bits=13)), "bad_manifest", "bits 13")
    a["tensor_bits_0.qpk"] = (mut(lambda m: tw(m).update(bits=0)), "bad_manifest", "bits 0")
    a["tensor_layout.qpk"] = (mut(lambda m: tw(m).update(layout="zigzag")), "layout", "unknown code layout")
    a["tensor_raw_dtype.qpk"] = (mut(lambda m: tb(m).update(dtype="object")), "bad_manifest", "dtype 'object'")
    a["tensor_dup_name.qpk"] = (mut(lambda m: tb(m).update(name="w")), "bad_manifest", "two tensors named w")
    a["tensor_missing_section.qpk"] = (mut(lambda m: tb(m)["data"].update(section="nope")), "bad_manifest",
                                       "a tensor names a section that does not exist")

    def share(m):
        tb(m)["data"] = dict(tw(m)["scales"])
        tb(m)["data"].pop("layout")

    a["tensor_shared_section.qpk"] = (mut(share), "bad_manifest", "two tensors use one section")
    a["section_orphan.qpk"] = (mut(lambda m: m.update(tensors=[t for t in m["tensors"] if t["name"] != "b"])),
                               "bad_manifest", "a section that belongs to no tensor")
    a["tensor_scheme_path.qpk"] = (mut(lambda m: tw(m).update(scheme="../../etc/passwd")), "unknown_scheme",
                                   "scheme name with a path")
    a["tensor_kind.qpk"] = (mut(lambda m: tw(m).update(kind="pickle")), "bad_manifest", "kind 'pickle'")
    a["tensor_group_zero.qpk"] = (mut(lambda m: tw(m).update(group_size=0)), "bad_manifest", "group_size 0")
    a["tensor_codec_disagrees.qpk"] = (mut(lambda m: tw(m)["codes"].update(codec={"name": "raw", "params": {}})),
                                       "bad_manifest", "entry's codec differs from its section's")
    a["tensor_name_long.qpk"] = (mut(lambda m: tb(m).update(name="x" * 5000)), "bad_manifest", "a 5,000-char name")
    a["tensor_name_control.qpk"] = (mut(lambda m: tb(m).update(name="b\x1b[2J")), "bad_manifest",
                                    "terminal escape in a name")

    def lowrank_huge(m):
        tw(m)["lowrank"] = {"rank": 2**40, "a": {}, "b": {}}

    a["tensor_lowrank_rank.qpk"] = (mut(lowrank_huge), "limit", "LQER rank 2^40")

    def col_scale_from_b(keep_b: bool):
        def fn(m):
            tw(m)["col_scale"] = dict(tb(m)["data"])  # 16 bytes: 8 fp16 column scales for w's 8 columns
            if not keep_b:
                m["tensors"] = [t for t in m["tensors"] if t["name"] != "b"]
        return fn

    a["tensor_col_scale_zero.qpk"] = (mut(col_scale_from_b(False)), "bad_manifest",
                                      "column scales read from fp32 0..3: a zero and tiny values")
    a["tensor_col_scale_shared.qpk"] = (mut(col_scale_from_b(True)), "bad_manifest",
                                        "column scales in another tensor's section")

    # -- payloads that pass the manifest checks but not decoding
    def with_section(name: str, data: bytes):
        m, p = _resection(copy.deepcopy(M), {"__payload__": P, name: data})
        return seal(m, p)

    nan_scales = struct.pack("<4e", float("nan"), 1.0, 1.0, 1.0)
    a["scales_nan.qpk"] = (with_section("w:scales", nan_scales), "bad_manifest", "a NaN scale")
    import zstandard

    too_big = zstandard.ZstdCompressor(write_content_size=True).compress(bytes([15]) * 32)
    a["codes_out_of_range.qpk"] = (with_section("w:codes", too_big), "layout", "code symbol 15 at int4 (max 14)")
    lying = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(31))
    a["zstd_size_lie.qpk"] = (with_section("w:codes", lying), "codec", "zstd frame declares 31 bytes, 32 promised")
    a["zstd_garbage.qpk"] = (with_section("w:codes", b"\x28\xb5\x2f\xfd" + bytes(range(40))), "codec",
                             "zstd magic then garbage")

    def bool_data(m):
        tb(m).update(dtype="bool", shape=[16])

    m2 = copy.deepcopy(M)
    bool_data(m2)
    m2, p2 = _resection(m2, {"__payload__": P, "b:data": bytes([0, 1, 2]) + bytes(13)})
    a["bool_data_2.qpk"] = (seal(m2, p2), "bad_manifest", "bool tensor holding the value 2")
    return a


# ============================================================================================ bombs
GIB = 2**30
MIB = 2**20


def _zstd_stream(total: int, content_size: bool) -> bytes:
    import zstandard

    cctx = zstandard.ZstdCompressor(level=1, write_content_size=content_size)
    chunk = bytes(min(16 * MIB, total))
    if content_size:
        obj = cctx.compressobj(size=total)
    else:
        obj = cctx.compressobj()
    parts = [obj.compress(chunk) for _ in range(total // len(chunk))]
    parts.append(obj.flush())
    return b"".join(parts)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _ans_frame(group: int, tables: bytes, words: bytes = b"") -> bytes:
    """An ANS frame as qpack/codecs/ans_codec.py lays it out: version, group varint, CRC-32, tables, words."""
    return bytes([1]) + _varint(group) + struct.pack("<I", 0) + tables + words


def bombs() -> dict[str, tuple[bytes, str, int, str]]:
    """name -> (container bytes, expected reason, declared raw_length, what)."""
    import brotli

    zstd = {"name": "zstd", "params": {"level": 1, "long": False, "window_log": 0}}
    b: dict[str, tuple[bytes, str, int, str]] = {}

    def put(name, codec, data, raw, reason, what):
        b[name] = (raw_tensor_container("t", codec, data, raw), reason, raw, what)

    z1g = _zstd_stream(GIB, content_size=False)
    put("zstd_1gib_unknown_size.qpk", zstd, z1g, MIB, "codec", "zstd: 1 GiB of zeros, no content size, 1 MiB promised")
    put("zstd_1gib_promise_0.qpk", zstd, z1g, 0, "codec", "zstd: 1 GiB of zeros, 0 bytes promised")
    z1g_sized = _zstd_stream(GIB, content_size=True)
    put("zstd_declares_1gib.qpk", zstd, z1g_sized, MIB, "codec",
        "zstd: frame header declares 1 GiB, manifest 1 MiB (refuse before decoding)")
    # Patch the 4-byte frame content size (FHD 0x?? with FCS flag 2) to claim exactly 1 MiB: a frame that lies.
    fhd = z1g_sized[4]
    assert fhd >> 6 == 2, "expected a 4-byte frame content size"
    single_segment = (fhd >> 5) & 1
    pos = 5 + (0 if single_segment else 1)
    lying = z1g_sized[:pos] + struct.pack("<I", MIB) + z1g_sized[pos + 4:]
    put("zstd_lies_1mib.qpk", zstd, lying, MIB, "codec", "zstd: header says 1 MiB, blocks hold 1 GiB")
    small = _zstd_stream(MIB, content_size=True)
    put("zstd_second_frame.qpk", zstd, small + z1g, MIB, "codec", "zstd: an honest 1 MiB frame then a 1 GiB frame")
    import zstandard

    big_window = bytearray(zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(1024)))
    assert big_window[4] & 0x20 == 0, "expected a window descriptor (not single-segment)"
    big_window[5] = (31 - 10) << 3  # window descriptor: exponent 21 -> a 2 GiB window
    big_window = bytes(big_window)
    put("zstd_window_2gib.qpk", zstd, big_window, 1024, "codec", "zstd: frame asks for a 2 GiB window")
    skippable = struct.pack("<II", 0x184D2A50, 0xFFFFFFFF) + bytes(64)
    put("zstd_skippable_4gib.qpk", zstd, skippable, MIB, "codec", "zstd: skippable frame claiming 4 GiB")

    comp = brotli.Compressor(quality=5, lgwin=24)
    parts = [comp.process(bytes(16 * MIB)) for _ in range(GIB // (16 * MIB))]
    br = b"".join(parts) + comp.finish()
    put("brotli_1gib.qpk", {"name": "brotli", "params": {"lgwin": 22, "quality": 11}}, br, MIB, "codec",
        "brotli: 1 GiB of zeros, 1 MiB promised")

    xz = lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, preset=0)
    xz_data = b"".join(xz.compress(bytes(16 * MIB)) for _ in range(GIB // (16 * MIB))) + xz.flush()
    lz = {"name": "lzma", "params": {"extreme": False, "filters": None, "format": "xz", "preset": 6}}
    put("lzma_1gib.qpk", lz, xz_data, MIB, "codec", "lzma/xz: 1 GiB of zeros, 1 MiB promised")
    lzr = lzma.LZMACompressor(format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 0}])
    lzr_data = b"".join(lzr.compress(bytes(16 * MIB)) for _ in range(16)) + lzr.flush()
    put("lzma_raw_1gib_dict.qpk", {"name": "lzma", "params": {"extreme": False, "format": "raw", "preset": 6,
                                                              "filters": [{"id": "lzma2", "dict_size": 1 << 30}]}},
        lzr_data, MIB, "codec", "raw LZMA2 with a 1 GiB dictionary in the params, 256 MiB of zeros, 1 MiB promised")

    zc = zlib.compressobj(9)
    zl = b"".join(zc.compress(bytes(16 * MIB)) for _ in range(4)) + zc.flush()
    put("zlib_64mib.qpk", {"name": "zlib", "params": {"level": 9, "wbits": 15}}, zl, MIB, "codec",
        "zlib: 64 MiB of zeros, 1 MiB promised")

    ans = {"name": "ans", "params": {"group": 0}}
    put("ans_table_2p40.qpk", ans, _ans_frame(0, bytes([0, 0]) + _varint(2**40)), MIB, "codec",
        "ans: one table claiming 2^40 symbols for a 1 MiB section")
    put("ans_table_span_huge_counts.qpk", ans, _ans_frame(0, bytes([0, 255]) + _varint(2**60) * 256), MIB, "codec",
        "ans: 256 counts of 2^60 each")
    put("ans_group1_64mib.qpk", {"name": "ans", "params": {"group": 1}}, _ans_frame(1, bytes([0, 0]) + _varint(1)),
        64 * MIB, "codec", "ans: group=1 over a 64 MiB promise (64M tables claimed, one present)")
    put("ans_group1_4gib.qpk", {"name": "ans", "params": {"group": 1}}, _ans_frame(1, bytes([0, 0]) + _varint(1)),
        4 * GIB, "codec", "ans: group=1 over a 4 GiB promise")

    def cols_frame(width: int, k: int, ids: bytes, inner: bytes) -> bytes:
        """An ans_cols frame (qpack/loader/parts/ans_cols_part.py): version, CRC-32, width, classes, ids, ans."""
        return bytes([1]) + struct.pack("<I", 0) + _varint(width) + _varint(k) + ids + inner

    cols = {"name": "ans_cols", "params": {"lane_bytes": 8192, "width": 1024}}
    half = bytes(64) + bytes([255]) * 64  # 1024 columns: 512 of class 0, then 512 of class 1 (1 bit each)
    put("ans_cols_inner_2p40.qpk", cols, cols_frame(1024, 2, half, _ans_frame(0, bytes([0, 0]) + _varint(2**40))),
        MIB, "codec", "ans_cols: valid column classes, then an ans table claiming 2^40 symbols for 1 MiB")
    put("ans_cols_ids_16mib.qpk", {"name": "ans_cols", "params": {"lane_bytes": 8192, "width": 1 << 24}},
        cols_frame(1 << 24, 16, b"", b""), 1 << 24, "codec",
        "ans_cols: 2^24 columns in 16 classes (8 MiB of class ids claimed, none present)")
    return b


# ============================================================================================ main
def _write(folder: Path, files: dict[str, tuple], index: dict[str, dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for name, item in sorted(files.items()):
        (folder / name).write_bytes(item[0])
    (folder / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")


def main() -> None:
    ck: dict[str, tuple] = {}
    ck_index: dict[str, dict] = {}
    for name, (data, what) in malicious_pickles().items():
        ck[name] = (data,)
        ck_index[name] = {"reason": "unsafe", "what": what, "runs_code": True}
    for name, (data, reason, what) in {**bad_safetensors(), **other_checkpoints()}.items():
        ck[name] = (data,)
        ck_index[name] = {"reason": reason, "what": what, "runs_code": False}
    _write(ATTACKS / "checkpoints", ck, ck_index)

    qa = qpk_attacks()
    _write(ATTACKS / "qpk", qa, {n: {"reason": r, "what": w} for n, (_, r, w) in qa.items()})
    (ATTACKS / "qpk" / "base.qpk.ok").write_bytes(base_artifact())

    bo = bombs()
    _write(ATTACKS / "bombs", bo, {n: {"reason": r, "raw_length": raw, "what": w} for n, (_, r, raw, w) in bo.items()})
    for folder in ("checkpoints", "qpk", "bombs"):
        files = [p for p in (ATTACKS / folder).iterdir() if p.name != "index.json"]
        print(f"{folder}: {len(files)} files, {sum(p.stat().st_size for p in files):,} bytes")


if __name__ == "__main__":
    main()
