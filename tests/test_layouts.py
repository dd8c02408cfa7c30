"""Code layouts as an encoding choice: every layout round-trips (qpack.load and the shipped loader), and the
encoder stores the smallest (layout, codec) pair, checked against sizes computed here with numpy and zstandard."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import torch
import zstandard
from click.testing import CliRunner

import qpack
from qpack.artifact import TensorEntry, build_artifact, encode_entry, loads_artifact
from qpack.cli import main
from qpack.codecs import make_codec
from qpack.compress import CompressConfig, _Encoder, compress
from qpack.errors import QpackInputError
from qpack.loader import export_loader
from qpack.quant.base import Quantized

ANS, ZSTD, RAW = make_codec("ans", {}), make_codec("zstd", {}), make_codec("raw", {})

# `python -I -S`: no site-packages processing, numpy/torch from the interpreter's own site-packages only, and
# qpack / constriction refused, as tests/test_export_loader.py runs the shipped loader.
RUNNER = r'''
import hashlib, importlib.util, json, sys
sys.path.append(sys.argv[1])
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("qpack", "trainers", "constriction"):
            raise ImportError(name)
sys.meta_path.insert(0, Block())
import torch
spec = importlib.util.spec_from_file_location("qpack_load", sys.argv[2])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
out = {}
for path in json.loads(sys.argv[3]):
    out[path] = [[k, list(t.shape), hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()]
                 for k, t in mod.load(path).items()]
print(json.dumps(out))
'''


def codes(shape: tuple[int, int], bits: int, seed: int, spread: float = 0.35) -> Quantized:
    """Laplace-distributed codes at `bits` (as quantized weights look) with one fp16 scale per row."""
    rng = np.random.default_rng(seed)
    qmax = (1 << (bits - 1)) - 1
    q = np.clip(np.round(rng.laplace(0.0, spread * qmax + 0.3, size=shape)), -qmax, qmax).astype(np.int8)
    scales = (rng.random((shape[0], 1)) * 0.02 + 0.001).astype(np.float16)
    return Quantized(q, scales, shape, bits, "rtn")


def symbols(q: Quantized) -> np.ndarray:
    """One symbol per code, q + qmax, as uint8 (the byte layout)."""
    return (q.q.numpy().astype(np.int16) + (1 << (q.bits - 1)) - 1).reshape(-1).astype(np.uint8)


def packed(q: Quantized) -> bytes:
    """Dense little-endian bit packing, written independently of qpack.pack: each symbol's `bits` low bits,
    least significant first, concatenated; the last byte zero-padded."""
    bits = np.unpackbits(symbols(q)[:, None], axis=1, bitorder="little")[:, : q.bits].reshape(-1)
    return np.packbits(bits, bitorder="little").tobytes()


def trits(q: Quantized) -> bytes:
    """Five codes in {-1, 0, 1} per byte, base 3, first code least significant."""
    d = q.q.numpy().reshape(-1).astype(np.int64) + 1
    d = np.concatenate([d, np.zeros(-d.size % 5, dtype=np.int64)]).reshape(-1, 5)
    return (d * 3 ** np.arange(5)).sum(axis=1).astype(np.uint8).tobytes()


def zstd19(data: bytes) -> int:
    """Bytes of a zstd level-19 frame, as the zstd codec writes it (content size, no checksum)."""
    return len(zstandard.ZstdCompressor(level=19, write_checksum=False, write_content_size=True).compress(data))


def dequantized(q: Quantized) -> torch.Tensor:
    """q * scale per row, float32, computed here."""
    return torch.from_numpy(q.q.numpy().astype(np.float32) * q.scales.numpy().astype(np.float32)).reshape(q.shape)


def fingerprint(sd: dict[str, torch.Tensor]) -> list:
    return [[k, list(t.shape), hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()] for k, t in sd.items()]


# ------------------------------------------------------------------------------------------ round trips

# layout -> (name, Quantized, codec) entries stored in that layout; odd sizes exercise packing's padding bits
ROUND_TRIPS = {
    "byte": [(f"w{b}", codes((7, 13), b, b), ANS if b % 2 else ZSTD) for b in range(2, 9)],
    "packed": [(f"w{b}", codes((7, 13), b, 10 + b), ZSTD if b % 2 else RAW) for b in range(2, 9)],
    "trit": [("t0", codes((6, 11), 2, 1), RAW), ("t1", codes((4, 40), 2, 2), ANS)],
}


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """One artifact per layout (plus a mixed one with LQER factors), their qpack.load results and the
    exported loader's results from an isolated subprocess."""
    tmp = tmp_path_factory.mktemp("layouts")
    paths, entries = {}, {}
    for layout, items in ROUND_TRIPS.items():
        entries[layout] = [TensorEntry(n, q, layout=layout, codec=c, scale_codec=c) for n, q, c in items]
    base, a, b = codes((24, 20), 5, 7), codes((24, 3), 4, 8), codes((3, 20), 2, 9)
    entries["mixed"] = [
        TensorEntry("auto3", codes((32, 32), 3, 3), layout="auto", codec=[ANS, ZSTD]),
        TensorEntry("map4", codes((16, 48), 4, 4), layout={"byte": ANS, "packed": [ZSTD, RAW]}),
        TensorEntry("lqer", base, layout="byte", codec=ZSTD, lowrank=(a, b), lowrank_layout=("packed", "trit")),
    ]
    for key, ents in entries.items():
        paths[key] = tmp / f"{key}.qpk"
        paths[key].write_bytes(build_artifact(ents))
    loader = tmp / "qpack_load.py"
    loader.write_bytes(export_loader(["ans", "zstd", "raw"]).shipped)
    runner = tmp / "runner.py"
    runner.write_text(RUNNER)
    proc = subprocess.run([sys.executable, "-I", "-S", str(runner), sysconfig.get_paths()["purelib"], str(loader),
                           json.dumps([str(p) for p in paths.values()])], capture_output=True, text=True, cwd=tmp,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {"paths": paths, "loader": json.loads(proc.stdout)}


@pytest.mark.parametrize("layout", sorted(ROUND_TRIPS))
def test_each_layout_round_trips_through_qpack_load_and_the_shipped_loader(shipped, layout):
    path = shipped["paths"][layout]
    art = qpack.artifact.read_artifact(path)
    assert {e["layout"] for e in art.entries} == {layout}
    sd = qpack.load(path)
    for name, q, _ in ROUND_TRIPS[layout]:
        assert torch.equal(sd[name], dequantized(q)), name
        # the codes section holds exactly this layout's bytes, built here with numpy
        raw = art.container.section(art.entry(name)["codes"]["section"])
        want = {"byte": symbols(q).tobytes(), "packed": packed(q), "trit": trits(q)[: -(-q.q.numel() // 5)]}
        assert raw == want[layout], name
    assert shipped["loader"][str(path)] == fingerprint(sd)


def test_chosen_layouts_round_trip_with_lqer_factors(shipped):
    path = shipped["paths"]["mixed"]
    art = qpack.artifact.read_artifact(path)
    lr = art.entry("lqer")["lowrank"]
    assert art.entry("lqer")["layout"] == "byte"
    assert lr["a"]["layout"] == "packed"  # 4-bit factor: "trit" cannot hold it and is skipped
    assert lr["b"]["layout"] == "trit"  # 2-bit factor: trits (1.6 bits) beat 2-bit packing under zstd
    sd = qpack.load(path)
    a, b = art.lowrank("lqer")
    want = dequantized(codes((24, 20), 5, 7)) + dequantized(codes((24, 3), 4, 8)) @ dequantized(codes((3, 20), 2, 9))
    assert torch.allclose(sd["lqer"], want, atol=1e-6)
    assert torch.equal(a.q, codes((24, 3), 4, 8).q) and torch.equal(b.q, codes((3, 20), 2, 9).q)
    assert torch.equal(sd["auto3"], dequantized(codes((32, 32), 3, 3)))
    assert shipped["loader"][str(path)] == fingerprint(sd)


# ------------------------------------------------------------------------------------------ the choice

def test_auto_stores_the_smallest_layout_and_codec_pair():
    q = codes((64, 96), 4, 21)
    enc = encode_entry(TensorEntry("w", q, layout="auto", codec=[ANS, ZSTD]))
    sizes = {("byte", "ans"): len(ANS.encode(symbols(q).tobytes())), ("packed", "ans"): len(ANS.encode(packed(q))),
             ("byte", "zstd"): zstd19(symbols(q).tobytes()), ("packed", "zstd"): zstd19(packed(q))}
    best = min(sizes, key=sizes.get)
    assert (enc.manifest["layout"], enc.manifest["codes"]["codec"]["name"]) == best
    assert len(enc.sections[0].data) == sizes[best]


@pytest.mark.parametrize("bits, want", [(2, "trit"), (3, "packed"), (4, "packed"), (8, "byte")])
def test_auto_with_raw_takes_the_densest_layout_and_skips_packed_at_8_bits(bits, want):
    q = codes((5, 17), bits, bits)
    enc = encode_entry(TensorEntry("w", q, layout="auto"))
    assert enc.manifest["layout"] == want
    n = q.q.numel()
    assert len(enc.sections[0].data) == {"trit": -(-n // 5), "packed": -(-n * bits // 8), "byte": n}[want]


def test_a_mapping_tries_each_layout_with_its_own_codecs_only():
    q = codes((16, 48), 4, 4)
    # raw packed (384 bytes) beats raw byte (768); with packed tied to zstd only, the byte layout's raw codec
    # and packed+zstd are the only trials
    enc = encode_entry(TensorEntry("w", q, layout={"byte": RAW, "packed": ZSTD}))
    sizes = {("byte", "raw"): q.q.numel(), ("packed", "zstd"): zstd19(packed(q))}
    best = min(sizes, key=sizes.get)
    assert (enc.manifest["layout"], enc.manifest["codes"]["codec"]["name"]) == best


def heavy_tailed_model() -> dict[str, torch.Tensor]:
    """Laplace and Student-t matrices (trained weights are heavy-tailed like these) and a norm that passes through."""
    torch.manual_seed(5)
    # a.weight holds more codes than compress's 64 Ki sample: its full trials are the pairs the sample kept
    return {"a.weight": torch.distributions.Laplace(0.0, 0.05).sample((512, 256)),
            "b.weight": torch.distributions.StudentT(3.0).sample((128, 256)), "norm.weight": torch.ones(128),
            "c.weight": torch.randn(256, 128)}  # Gaussian: byte+zstd is (slightly) smaller


def stored_code_sizes(path, name: str) -> dict[str, int]:
    """zstd-19 sizes of the stored codes of `name` in the byte and packed layouts, computed here."""
    q = qpack.artifact.read_artifact(path).quantized(name)
    return {"byte": zstd19(symbols(q).tobytes()), "packed": zstd19(packed(q))}


def test_compress_with_zstd_at_4_bits_stores_packed_codes_when_they_are_smaller(tmp_path):
    path = tmp_path / "z.qpk"
    res = compress(heavy_tailed_model(), path, codecs=("zstd",), bits=(4,), fixed_bits=4)
    art = qpack.artifact.read_artifact(path)
    rows = {t.name: t for t in res.tensors}
    for name in ("a.weight", "b.weight"):
        sizes = stored_code_sizes(path, name)
        assert sizes["packed"] < sizes["byte"], sizes  # the premise, measured here
        e = art.entry(name)
        assert e["layout"] == rows[name].layout == "packed"
        assert art.section_bytes(name)["codes"] == sizes["packed"]
    sizes = stored_code_sizes(path, "c.weight")
    assert art.entry("c.weight")["layout"] == rows["c.weight"].layout == min(sizes, key=sizes.get)
    assert art.section_bytes("c.weight")["codes"] == min(sizes.values())
    assert rows["norm.weight"].layout is None


def test_compress_with_ans_only_keeps_byte_codes_when_they_are_smaller(tmp_path):
    path = tmp_path / "a.qpk"
    res = compress(heavy_tailed_model(), path, codecs=("ans",), bits=(4,), fixed_bits=4)
    art = qpack.artifact.read_artifact(path)
    for name in ("a.weight", "b.weight"):
        q = art.quantized(name)
        byte, pack = len(ANS.encode(symbols(q).tobytes())), len(ANS.encode(packed(q)))
        assert byte < pack  # an order-0 coder on nibble pairs pays a 2-symbol table for the same entropy
        assert art.entry(name)["layout"] == "byte"
        assert art.section_bytes(name)["codes"] == byte
    assert {t.layout for t in res.tensors if t.bits} == {"byte"}


def test_each_tensor_gets_its_own_smallest_pair(tmp_path):
    # "rep" repeats 8 rows, which zstd finds and an order-0 coder cannot; "iid" has no structure, so ANS on one
    # symbol per byte wins there. A codec choice made once per width, on the first tensor, would store both
    # with zstd.
    torch.manual_seed(6)
    sd = {"rep.weight": torch.distributions.Laplace(0.0, 0.05).sample((8, 128)).repeat(32, 1),
          "iid.weight": torch.distributions.Laplace(0.0, 0.05).sample((256, 128))}
    path = tmp_path / "m.qpk"
    compress(sd, path, codecs=("ans", "zstd"), fixed_bits=4)
    art = qpack.artifact.read_artifact(path)
    picked = {}
    for name in sd:
        q = art.quantized(name)
        sizes = {("byte", "ans"): len(ANS.encode(symbols(q).tobytes())), ("packed", "ans"): len(ANS.encode(packed(q))),
                 ("byte", "zstd"): zstd19(symbols(q).tobytes()), ("packed", "zstd"): zstd19(packed(q))}
        e = art.entry(name)
        picked[name] = (e["layout"], e["codes"]["codec"]["name"])
        assert picked[name] == min(sizes, key=sizes.get), (name, sizes)
        assert art.section_bytes(name)["codes"] == min(sizes.values())
    assert picked["rep.weight"][1] == "zstd" and picked["iid.weight"] == ("byte", "ans")


def test_compress_layouts_restrict_the_choice(tmp_path):
    only_byte = compress(heavy_tailed_model(), None, codecs=("zstd",), fixed_bits=4, layouts=("byte",), dry_run=True)
    auto = compress(heavy_tailed_model(), None, codecs=("zstd",), fixed_bits=4, dry_run=True)
    assert {t.layout for t in only_byte.tensors if t.bits} == {"byte"}
    assert auto.bytes_model < only_byte.bytes_model


def test_lqer_factor_codes_take_their_own_smallest_layout():
    w = codes((64, 64), 6, 30)
    a, b = codes((64, 4), 4, 31), codes((4, 64), 4, 32)
    enc = _Encoder(CompressConfig(codecs=("zstd",))).candidate("w", w, "float32", (a, b))
    lr = enc.manifest["lowrank"]
    sections = {s.name: len(s.data) for s in enc.sections}
    for key, f in (("a", a), ("b", b)):
        sizes = {"byte": zstd19(symbols(f).tobytes()), "packed": zstd19(packed(f))}
        assert lr[key]["layout"] == min(sizes, key=sizes.get)
        assert sections[lr[key]["codes"]["section"]] == min(sizes.values())


def test_json_rows_and_the_table_name_the_layout(tmp_path):
    ckpt = tmp_path / "m.pt"
    torch.save(heavy_tailed_model(), ckpt)
    out = tmp_path / "m.qpk"
    res = CliRunner().invoke(main, ["compress", str(ckpt), "--bits", "4", "--codec", "zstd", "-o", str(out), "--json",
                                    "-q"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)["tensors"]}
    art = qpack.artifact.read_artifact(out)
    assert rows["a.weight"]["layout"] == art.entry("a.weight")["layout"] == "packed"
    assert rows["norm.weight"]["layout"] is None
    table = CliRunner().invoke(main, ["compress", str(ckpt), "--bits", "4", "--codec", "zstd", "--dry-run", "-q"])
    assert table.exit_code == 0, table.output
    header = table.output.splitlines()[0].split()
    assert header[:5] == ["tensor", "shape", "scheme", "bits", "layout"]
    line = next(r for r in table.output.splitlines() if r.startswith("a.weight"))
    assert line.split()[4] == "packed"


# ------------------------------------------------------------------------------------------ bad input

def test_bad_layouts_are_refused():
    q4 = codes((4, 8), 4, 1)
    with pytest.raises(QpackInputError, match="unknown code layout 'zigzag'"):
        encode_entry(TensorEntry("w", q4, layout=("byte", "zigzag")))
    with pytest.raises(QpackInputError, match="none of the code layouts"):
        encode_entry(TensorEntry("w", q4, layout=("trit",)))
    with pytest.raises(QpackInputError, match="trit"):
        encode_entry(TensorEntry("w", q4, layout="trit"))  # one named layout is used as it is, or refused
    with pytest.raises(QpackInputError, match="code layouts must be"):
        CompressConfig(layouts=("byte", "nibble"))
    with pytest.raises(QpackInputError, match="need 'byte' or 'packed'"):
        CompressConfig(layouts=("trit",))
