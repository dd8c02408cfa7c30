"""Coverage-guided fuzzing (atheris / libFuzzer) of the .qpk reader and every codec decoder.

    python tests/reliability/fuzz.py TARGET [libFuzzer flags...] [CORPUS_DIR...]
    python tests/reliability/fuzz.py container_sealed -max_total_time=600 -artifact_prefix=/tmp/crash-

Targets:
  container         the input is a whole file: loads_artifact(data).tensors()
  container_sealed  the input is manifest JSON + payload; the harness re-frames it with correct CRCs and
                    SHA-256 (and fixes each section's crc32), so mutations reach the checks behind them
  codecs            first byte picks a built-in codec (and params; its top two bits ask for a round trip), next
                    two bytes the promised size, the rest is a frame to decode; with both top bits set, frames of
                    at most 256 bytes are also round-tripped through encode
  safetensors       the input is a .safetensors file for qpack.checkpoint.read_safetensors_header
  checkpoint        the input is a .pt file for qpack.checkpoint.load_state_dict (opcode scan, then
                    torch.load(weights_only=True)); seeds are torch.save outputs and the attack pickles
Every exception other than QpackFormatError (CodecError for a bare codec) is a finding: libFuzzer stops
and writes the input under -artifact_prefix. With no CORPUS_DIR a seed corpus is made from the golden files.
QPACK_FUZZ_KNOWN="OverflowError,..." tolerates findings already filed (attacks/fuzz_findings/ replays them),
so a long pass can look past them.
"""
from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

with atheris.instrument_imports(include=["qpack"]):
    from qpack.artifact import loads_artifact
    from qpack.checkpoint import load_state_dict, read_safetensors_header
    from qpack.codecs import CodecError, make_codec
    from qpack.errors import QpackFormatError

from relhelp import GOLDEN, seal, split  # noqa: E402

CODEC_SPECS = [("raw", {}), ("zlib", {}), ("zstd", {"level": 3}), ("lzma", {"preset": 1}),
               ("lzma", {"format": "raw", "preset": 1}), ("brotli", {"quality": 5}), ("ans", {}),
               ("ans", {"group": 7}), ("ans_ctx", {}), ("ans_ctx", {"width": 57}),
               ("ans_cols", {}), ("ans_cols", {"width": 57})]
ROUND_TRIP_MAX = 256
_TMP = Path(tempfile.mkdtemp(prefix="qpack-fuzz-"))
_KNOWN = tuple(t for t in os.environ.get("QPACK_FUZZ_KNOWN", "").split(",") if t)


def container(data: bytes) -> None:
    try:
        loads_artifact(data, "fuzz.qpk").tensors()
    except QpackFormatError:
        pass


def _fix_section_crcs(manifest: bytes, payload: bytes) -> bytes:
    try:
        m = json.loads(manifest)
    except (ValueError, RecursionError):
        return manifest
    if not isinstance(m, dict) or not isinstance(m.get("sections"), list):
        return manifest
    for rec in m["sections"]:
        if isinstance(rec, dict) and type(rec.get("offset")) is int and type(rec.get("length")) is int \
                and 0 <= rec["offset"] <= len(payload):
            rec["crc32"] = zlib.crc32(payload[rec["offset"]: rec["offset"] + rec["length"]])
    return json.dumps(m, sort_keys=True, separators=(",", ":")).encode()


def container_sealed(data: bytes) -> None:
    if len(data) < 2:
        return
    (mlen,) = struct.unpack_from("<H", data)
    manifest, payload = data[2: 2 + mlen], data[2 + mlen:]
    container(seal(_fix_section_crcs(manifest, payload), payload))


def sealed_seed(artifact: bytes) -> bytes:
    """A real artifact in container_sealed's input form: u16 manifest length, manifest JSON, payload."""
    m, payload = split(artifact)
    body = json.dumps(m, sort_keys=True, separators=(",", ":")).encode()
    return struct.pack("<H", len(body)) + body + payload


def codecs(data: bytes) -> None:
    if len(data) < 3:
        return
    name, params = CODEC_SPECS[data[0] % len(CODEC_SPECS)]
    size = int.from_bytes(data[1:3], "little")
    codec = make_codec(name, params)
    frame = data[3:]
    try:
        out = codec.decode(frame, size)
        if len(out) != size:
            raise AssertionError(f"{name} returned {len(out)} bytes, {size} promised")
    except CodecError:
        pass
    except Exception as exc:
        if type(exc).__name__ not in _KNOWN:
            raise
    # Round trips only where the fuzzer sets the top two bits of the selector byte, and on small frames:
    # encoding costs lzma and small-group ans milliseconds per call, decoding microseconds, and decoding is the
    # target (tests/test_codecs.py round-trips every codec on real data).
    if data[0] & 0xC0 == 0xC0 and len(frame) <= ROUND_TRIP_MAX:
        if codec.decode(codec.encode(frame), len(frame)) != frame:
            raise AssertionError(f"{name} does not round-trip {len(frame)} bytes")


def safetensors(data: bytes) -> None:
    path = _TMP / "x.safetensors"
    path.write_bytes(data)
    try:
        read_safetensors_header(path)
    except QpackFormatError:
        pass


def checkpoint(data: bytes) -> None:
    path = _TMP / "x.pt"
    path.write_bytes(data)
    try:
        load_state_dict(path)
    except QpackFormatError:
        pass


TARGETS = {"container": container, "container_sealed": container_sealed, "codecs": codecs,
           "safetensors": safetensors, "checkpoint": checkpoint}


def seed_corpus(target: str, folder: Path) -> None:
    """A few real inputs per target, so mutations start from valid files."""
    folder.mkdir(parents=True, exist_ok=True)
    goldens = sorted(GOLDEN.glob("*.qpk"))
    for p in goldens:
        data = p.read_bytes()
        if target == "container":
            (folder / p.name).write_bytes(data)
        elif target == "container_sealed":
            (folder / p.name).write_bytes(sealed_seed(data))
    if target == "codecs":
        sample = bytes(range(7, 64)) * 3
        for i, (name, params) in enumerate(CODEC_SPECS):
            frame = make_codec(name, params).encode(sample)
            (folder / f"{i}_{name}").write_bytes(bytes([i]) + len(sample).to_bytes(2, "little") + frame)
    if target == "checkpoint":
        import io

        import torch

        for i, obj in enumerate(({"w": torch.ones(2, 3)}, {"model": {"a": torch.arange(4)}, "config": {"x": 1}})):
            for legacy in (False, True):
                buf = io.BytesIO()
                torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
                (folder / f"torch{i}{legacy:d}").write_bytes(buf.getvalue())
        for p in sorted((HERE / "attacks" / "checkpoints").glob("*.p*")):
            (folder / p.name).write_bytes(p.read_bytes())
    if target == "safetensors":
        hdr = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                          "__metadata__": {"qpack_config": "{}"}}).encode()
        (folder / "st").write_bytes(struct.pack("<Q", len(hdr)) + hdr + bytes(16))


def main() -> None:
    target = sys.argv[1]
    rest = sys.argv[2:]
    if not any(not a.startswith("-") for a in rest):
        corpus = _TMP / f"corpus-{target}"
        seed_corpus(target, corpus)
        rest.append(str(corpus))
    atheris.Setup([sys.argv[0], *rest], TARGETS[target])
    atheris.Fuzz()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
