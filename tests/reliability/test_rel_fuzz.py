"""Part 1: a bounded atheris pass per target (fuzz.py) and a Hypothesis round-trip property.

Normal run (`make test`): every atheris target for CI_RUNS inputs in one long-lived fuzzing process per target,
the property for PROPERTY_EXAMPLES examples. Long pass (`pytest -m slow tests/reliability`): each target for
LONG_SECONDS.
"""
from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qpack.artifact import DTYPES, FLOAT_DTYPES, TensorEntry, build_artifact, loads_artifact
from qpack.codecs import make_codec
from qpack.quant.base import Quantized, n_groups, qmax
from relhelp import HERE, record, run_py

#: Inputs per target in the normal run: counted, not timed, so a loaded machine runs longer instead of fewer.
CI_RUNS = int(os.environ.get("QPACK_FUZZ_RUNS", "50000"))
CI_TARGETS = ["container", "container_sealed", "codecs", "safetensors", "checkpoint"]
LONG_TARGETS = ["container", "container_sealed", "codecs", "safetensors", "checkpoint"]
LONG_SECONDS = int(os.environ.get("QPACK_FUZZ_SECONDS", "240"))
PROPERTY_EXAMPLES = int(os.environ.get("QPACK_PROPERTY_EXAMPLES", "1000"))
CODECS = [("raw", {}), ("zlib", {}), ("zstd", {"level": 3}), ("zstd", {}), ("lzma", {}),
          ("lzma", {"format": "raw"}), ("brotli", {}), ("ans", {}), ("ans", {"group": 5}),
          ("ans_ctx", {}), ("ans_cols", {})]


#: Findings already filed but not yet fixed (replayed by test_replay_fuzz_findings); a long pass looks past
#: them. Empty: the ANS varint overflow found by the long pass was fixed in qpack/codecs/ans_codec.py (be4ea4c).
KNOWN: dict[str, str] = {}
FINDINGS = HERE / "attacks" / "fuzz_findings"


def _fuzz(target: str, tmp_path, *, seconds: int | None = None, runs: int | None = None, known: str = "") -> int:
    """Run fuzz.py TARGET in one process for `seconds` or for `runs` inputs; returns the inputs it ran."""
    code = ("import runpy, sys; sys.argv = [sys.argv[1], *sys.argv[2:]]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    bound = f"-max_total_time={seconds}" if seconds is not None else f"-runs={runs}"
    res = run_py(code, str(HERE / "fuzz.py"), target, bound, "-print_final_stats=1",
                 f"-artifact_prefix={tmp_path}/", "-max_len=16384", timeout=(seconds or 0) + 1800,
                 env={"QPACK_FUZZ_KNOWN": known})
    crashes = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-", "leak-"))]
    assert res.returncode == 0 and not crashes, f"finding in {target}: {crashes}\n{res.stderr[-4000:]}"
    done = re.search(r"Done (\d+) runs in (\d+) second", res.stderr)
    assert done, res.stderr[-2000:]
    return int(done.group(1))


@pytest.mark.parametrize("target", CI_TARGETS)
def test_atheris_bounded_pass(target, tmp_path):
    runs = _fuzz(target, tmp_path, runs=CI_RUNS)
    assert runs >= CI_RUNS, f"only {runs} of {CI_RUNS} inputs ran"
    record("1 atheris", target=target, inputs=runs, findings=0)
    print(f"{target}: {runs} inputs, no findings")


@pytest.mark.slow
@pytest.mark.parametrize("target", LONG_TARGETS)
def test_atheris_long_pass(target, tmp_path):
    runs = _fuzz(target, tmp_path, seconds=LONG_SECONDS, known=KNOWN.get(target, ""))
    record("1 atheris long", target=target, inputs=runs, seconds=LONG_SECONDS, findings=0)
    print(f"{target}: {runs} inputs in {LONG_SECONDS} s, no findings")


@pytest.mark.parametrize("name", sorted(p.name for p in FINDINGS.iterdir()))
def test_replay_fuzz_findings(name):
    """Inputs atheris found (named TARGET-...); each must pass its target without an exception now."""
    import fuzz

    getattr(fuzz, name.split("-")[0])((FINDINGS / name).read_bytes())


# ------------------------------------------------------------------------------------------ property
@st.composite
def quant_entries(draw, name: str):
    bits = draw(st.integers(2, 8))
    layout = draw(st.sampled_from(["byte", "packed"] + (["trit"] if bits == 2 else [])))
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 40))
    group = draw(st.one_of(st.none(), st.integers(1, cols + 3)))
    m = qmax(bits)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    q = rng.integers(-m, m + 1, size=(rows, cols)).astype(np.int8)
    scales = (rng.standard_normal((rows, n_groups(cols, group))) * 0.1).astype(np.float16)
    rank = draw(st.one_of(st.none(), st.integers(1, min(rows, cols))))
    lowrank = None
    if rank:
        fb = 2 if layout == "trit" else 4  # factors share the tensor's code layout (artifact.py)
        fm = qmax(fb)
        a = Quantized(rng.integers(-fm, fm + 1, size=(rows, rank)).astype(np.int8),
                      np.full((rows, 1), 0.5, np.float16), (rows, rank), fb, "rtn")
        b = Quantized(rng.integers(-fm, fm + 1, size=(rank, cols)).astype(np.int8),
                      np.full((rank, 1), 0.25, np.float16), (rank, cols), fb, "rtn")
        lowrank = (a, b)
    shape = draw(st.sampled_from([(rows, cols), (rows, 1, cols)] + ([(cols,)] if rows == 1 else [])))
    codec = make_codec(*draw(st.sampled_from(CODECS)))
    scale_codec = make_codec(*draw(st.sampled_from(CODECS)))
    return TensorEntry(name, Quantized(q, scales, shape, bits, "rtn", group), layout=layout, codec=codec,
                       scale_codec=scale_codec, lowrank=lowrank, dtype=draw(st.sampled_from(FLOAT_DTYPES)),
                       scale_layout=draw(st.sampled_from(["auto", "plain", "shuffled"])))


@st.composite
def raw_entries(draw, name: str):
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    n = math.prod(shape)
    raw = draw(st.binary(min_size=n * 8, max_size=n * 8))
    torch_dtype = DTYPES[dtype][0]
    if torch_dtype == torch.bool:
        t = torch.tensor([b & 1 for b in raw[:n]], dtype=torch.bool).reshape(shape)
    else:
        itemsize = torch.empty(0, dtype=torch_dtype).element_size()
        t = torch.frombuffer(bytearray(raw[: n * itemsize]) or bytearray(itemsize), dtype=torch_dtype)[:n]
        t = t.clone().reshape(shape)
    return TensorEntry(name, t, codec=make_codec(*draw(st.sampled_from(CODECS))))


@st.composite
def artifacts(draw):
    k = draw(st.integers(1, 3))
    return [draw(st.one_of(quant_entries(f"t{i}"), raw_entries(f"t{i}"))) for i in range(k)]


def _bits(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()


@settings(max_examples=PROPERTY_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(artifacts())
def test_round_trip_property(entries):
    record("1 hypothesis example", n=1)
    art = loads_artifact(build_artifact(entries, {"libraries": {}}))
    assert art.names() == [e.name for e in entries]
    for e in entries:
        got = art.quantized(e.name)
        if isinstance(e.payload, torch.Tensor):
            assert got.dtype == e.payload.dtype and got.shape == e.payload.shape
            assert _bits(got) == _bits(e.payload)
            continue
        want = e.payload
        assert (got.bits, got.group_size, tuple(got.shape)) == (want.bits, want.group_size, tuple(want.shape))
        assert np.array_equal(got.q, want.q)
        assert got.scales.numpy().tobytes() == want.scales.numpy().tobytes()
        if e.lowrank:
            a, b = art.lowrank(e.name)
            assert np.array_equal(a.q, e.lowrank[0].q) and np.array_equal(b.q, e.lowrank[1].q)
        deq = want.dequantize()
        if e.lowrank:
            deq = deq + (e.lowrank[0].dequantize() @ e.lowrank[1].dequantize()).reshape(deq.shape)
        assert _bits(art.tensor(e.name)) == _bits(deq)
