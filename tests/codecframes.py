"""Checks shared by the codec tests: a damaged frame is refused or decodes to the very bytes it was made from."""
from __future__ import annotations

import numpy as np
import pytest

from qpack.codecs import Codec, CodecError


def assert_damage_never_misdecodes(codec: Codec, frame: bytes, data: bytes, head: int, flips: int = 300) -> None:
    """Flip bits 0 and 5 of every one of the first `head` bytes and of `flips` random ones: each damaged frame
    must raise CodecError or decode to `data`. Every truncation tried must raise."""
    rng = np.random.default_rng(0)
    for pos in sorted(set(rng.integers(0, len(frame), flips).tolist()) | set(range(head))):
        for bit in (0, 5):
            bad = bytearray(frame)
            bad[pos] ^= 1 << bit
            try:
                out = codec.decode(bytes(bad), len(data))
            except CodecError:
                continue
            assert out == data
    for cut in (1, 7, len(frame) // 2, len(frame) - 1):
        with pytest.raises(CodecError):
            codec.decode(frame[:cut], len(data))


def assert_shipped_loader_matches(tmp_path, codecs: list[str], artifact) -> None:
    """The shipped loader for `codecs`, written to tmp_path and imported, loads `artifact` bit-exact with
    qpack.load (same names in the same order, same dtypes, equal tensors)."""
    import importlib.util

    import torch

    import qpack
    from qpack.loader import export_loader

    src = tmp_path / "qpack_load.py"
    src.write_bytes(export_loader(codecs).shipped)
    spec = importlib.util.spec_from_file_location(f"qpack_load_{'_'.join(codecs)}", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    got, want = mod.load(str(artifact)), qpack.load(artifact)
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])
