"""The records' pipeline as qpack's baseline: roles, byte shuffle, stream size, and the k multiplier fit."""
from __future__ import annotations

import brotli
import numpy as np
import pytest
import torch

from qpack.errors import QpackInputError
from qpack.quant.base import Quantized
from qpack.rd import record_pipeline as rp


def _model(seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {"tok_emb.weight": torch.randn(256, 64, generator=g) * 0.05,
          "blocks.0.attn.q.weight": torch.randn(64, 64, generator=g) * 0.1,
          "blocks.0.mlp.fc.weight": torch.randn(128, 64, generator=g) * 0.1,
          "blocks.0.attn_scale": torch.ones(64)}
    X = torch.randn(512, 64, generator=g)
    H = X.T @ X / 512
    return sd, {n: H for n in sd if sd[n].ndim == 2}


def test_roles_follow_the_records():
    assert rp.role_of("tok_emb.weight") == "embed"
    assert rp.role_of("blocks.3.mlp.proj.weight") == "mlp"
    assert rp.role_of("blocks.3.attn.proj.weight") == "attn"
    assert rp.role_of("blocks.3.attn_scale") == "other"


def test_byte_shuffle_is_even_then_odd_bytes_and_inverts():
    data = bytes(range(11))
    assert rp.byte_shuffle(data) == bytes([0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9])
    rnd = np.random.default_rng(0).integers(0, 256, 1001, dtype=np.uint8).tobytes()
    assert rp.byte_unshuffle(rp.byte_shuffle(rnd)) == rnd


def test_stream_is_codes_scales_fp16_then_brotli():
    sd, hs = _model()
    parts = rp.quantize_record(sd, hs, rp.PRESETS["2026-04-05"])
    emb, att = parts["tok_emb.weight"], parts["blocks.0.attn.q.weight"]
    assert isinstance(emb, Quantized) and emb.bits == 8 and emb.params["k"] == 20.0
    assert isinstance(att, Quantized) and att.bits == 6 and int(att.q.abs().max()) <= 31
    assert parts["blocks.0.attn_scale"].dtype == torch.float16
    mlp = parts["blocks.0.mlp.fc.weight"]
    raw = b"".join([x.numpy().tobytes() for x in (emb.q, emb.scales, att.q, att.scales, mlp.q, mlp.scales)]
                   + [np.ones(64, dtype=np.float16).tobytes()])
    shuffled = raw[0::2] + raw[1::2]
    assert rp.compressed_size(parts) == len(brotli.compress(shuffled, quality=11))


def test_fit_size_lands_under_the_target_and_close_to_it():
    sd, hs = _model()
    settings = rp.PRESETS["2026-04-05"]
    full = rp.compressed_size(rp.quantize_record(sd, hs, settings))
    target = int(full * 0.7)
    fit = rp.fit_size(sd, hs, settings, target)
    assert fit.size <= target and fit.mult > 1.0
    assert rp.compressed_size(fit.parts) == fit.size
    # a slightly smaller multiplier (finer grid) no longer fits
    finer = rp.compressed_size(rp.quantize_record(sd, hs, settings.scaled(fit.mult * 0.97)))
    assert finer > target


def test_per_role_ratio_and_multiplier():
    s = rp.PRESETS["2026-04-27"].scaled(2.0, 0.5)
    assert s.k["mlp"] == 23.0 and s.k["attn"] == 26.0 and s.k["embed"] == 13.0 and s.bits["embed"] == 7


@pytest.mark.parametrize("kw", [dict(k={"embed": 0, "attn": 1, "mlp": 1, "other": 1}),
                                dict(lam=-0.5),
                                dict(bits={"embed": 9, "attn": 6, "mlp": 6, "other": 6})])
def test_bad_settings_raise(kw):
    with pytest.raises(QpackInputError):
        rp.RecordSettings(**kw)


def test_missing_hessian_is_an_input_error():
    sd, hs = _model()
    del hs["tok_emb.weight"]
    with pytest.raises(QpackInputError, match="tok_emb"):
        rp.quantize_record(sd, hs, rp.PRESETS["2026-04-05"])


def test_a_size_past_the_widths_ceiling_is_reported_not_faked():
    sd, hs = _model()
    settings = rp.PRESETS["2026-04-05"]
    raw = len(rp.raw_stream(rp.quantize_record(sd, hs, settings)))
    fit = rp.fit_size(sd, hs, settings, 2 * raw)  # more bytes than int6/int8 codes can ever take
    assert not fit.reached and fit.size < raw and fit.mult >= rp.MIN_MULT
