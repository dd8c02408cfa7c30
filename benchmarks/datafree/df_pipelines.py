"""The two data-free baselines, as streams with their exact bytes and the state dict their decoder rebuilds.

(a) SDClip RTN: every matrix (>= min_numel elements, 2-D) int6 with scale k*std(row)/31, k = 12.85, other
    tensors fp16; codes, scales and fp16 back to back, byte shuffle (stride 2), brotli-11
    (qpack.rd.record_pipeline's stream pieces).
(b) naive int8: every matrix int8 with scale = the row's 99.99984th-percentile |w| / 127 (clipped), other
    tensors fp16, the same stream, zlib level 9.
And qpack data-free: `compress --budget B` with no calibration data, decoded back with qpack.statedict.assemble.
"""
from __future__ import annotations

import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import torch

from qpack.quant.base import Quantized, make_quantizer, scales_fp16
from qpack.quant.grid import quantize_with_scales
from qpack.rd import record_pipeline as rp

INT8_CLIP_Q = 0.9999984  # the parameter-golf baseline's int8 clip quantile


def _is_matrix(t: torch.Tensor, min_numel: int) -> bool:
    return t.is_floating_point() and t.ndim >= 2 and t.numel() >= min_numel


def sdclip_rtn(sd: dict[str, torch.Tensor], k: float = 12.85, bits: int = 6, min_numel: int = 4096,
               measure: bool = True) -> tuple[int | None, dict[str, torch.Tensor]]:
    """(brotli-11 bytes of the shuffled stream, or None when not `measure`d, dequantized state dict) of SDClip
    RTN."""
    parts: dict[str, Quantized | torch.Tensor] = {}
    for n, t in sd.items():
        if _is_matrix(t, min_numel):
            parts[n] = make_quantizer("sdclip", bits, k=k).quantize(t.float())
        else:
            parts[n] = t.detach().to(torch.float16)
    return rp.compressed_size(parts) if measure else None, rp.dequantized(parts, sd)


def naive_int8(sd: dict[str, torch.Tensor], clip_q: float | None = INT8_CLIP_Q, min_numel: int = 4096,
               measure: bool = True) -> tuple[int | None, dict[str, torch.Tensor]]:
    """(zlib-9 bytes of the stream, or None when not `measure`d, dequantized state dict) of per-row int8;
    clip_q None: per-row absmax."""
    parts: dict[str, Quantized | torch.Tensor] = {}
    for n, t in sd.items():
        if not _is_matrix(t, min_numel):
            parts[n] = t.detach().to(torch.float16)
            continue
        w = t.float().reshape(t.shape[0], -1)
        a = w.abs()
        clip = a.amax(dim=1, keepdim=True) if clip_q is None else torch.quantile(a, clip_q, dim=1, keepdim=True)
        s = scales_fp16(clip.clamp_min(1e-12) / 127)
        q = quantize_with_scales(w, s, 8, None)
        parts[n] = Quantized(q, s, tuple(t.shape), 8, "int8", None, {})
    return len(zlib.compress(rp.raw_stream(parts), 9)) if measure else None, rp.dequantized(parts, sd)


@contextmanager
def gptq_lite_defaults(**params):
    """gptq_lite's default params replaced for the duration (compress passes none of its own to it), e.g.
    protect_sigma=None for the plain-MSE clip search of before."""
    from qpack.quant.gptq_lite import GPTQLite

    old = dict(GPTQLite.defaults)
    GPTQLite.defaults.update(params)
    try:
        yield
    finally:
        GPTQLite.defaults.clear()
        GPTQLite.defaults.update(old)


@contextmanager
def embed_weight(value: float | None):
    """qpack.quant.datafree.EMBED_WEIGHT replaced for the duration (None: left as it is)."""
    from qpack.quant import datafree

    old = datafree.EMBED_WEIGHT
    datafree.EMBED_WEIGHT = old if value is None else float(value)
    try:
        yield
    finally:
        datafree.EMBED_WEIGHT = old


def qpack_datafree(sd: dict[str, torch.Tensor], budget: int, gptq_lite: dict | None = None,
                   embed: float | None = None, **options) -> tuple[int, dict[str, torch.Tensor], object]:
    """(artifact bytes, decoded state dict, CompressResult) of `compress --budget` without calibration data;
    `gptq_lite` overrides that scheme's default params, `embed` the relative+embed loss's embedding weight."""
    from qpack.artifact import read_artifact
    from qpack.compress import CompressConfig, compress
    from qpack.statedict import assemble

    with (tempfile.TemporaryDirectory(prefix="datafree_") as tmp, gptq_lite_defaults(**(gptq_lite or {})),
          embed_weight(embed)):
        path = Path(tmp) / "m.qpk"
        r = compress(dict(sd), path, CompressConfig(budget=budget, **options))
        out = assemble(read_artifact(path))
    return r.bytes_total, {n: out[n].to(sd[n].dtype) for n in sd}, r
