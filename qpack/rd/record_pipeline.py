"""The parameter-golf records' compression pipeline (2026-04-05 .. 04-27), clean-room, as qpack's baseline.

Every matrix goes through GPTQ on SDClip's grid (qpack.quant.sdclip_gptq) with a width and a k per role
(embedding / attention / MLP); other tensors are kept as fp16. The stream is the codes (int8), scales (fp16)
and fp16 tensors back to back, byte-shuffled with stride 2 (every even byte, then every odd byte), then
brotli quality 11. Its size is the stream alone, with no container or names, which favours the baseline.
A common multiplier on the k's is bisected to land under a target size, as the records tune their k's.

Deviation, said loudly: the records keep tensors of <= 65,536 elements in fp16; at the small models qpack
benchmarks that would keep every matrix in fp16, so the threshold here is `min_numel` (qpack's 4,096).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import QpackInputError
from ..quant.base import Quantized, make_quantizer

ROLES = ("embed", "attn", "mlp", "other")
MIN_MULT = 1 / 16  # below this the clip (under one std at int6) only throws weights away


@dataclass(frozen=True)
class RecordSettings:
    """Per-role k (clip in row standard deviations) and width, plus the Hessian-aware SDClip strength."""

    k: dict = field(default_factory=lambda: {"embed": 20.0, "attn": 12.85, "mlp": 12.85, "other": 12.85})
    bits: dict = field(default_factory=lambda: {"embed": 8, "attn": 6, "mlp": 6, "other": 6})
    lam: float = 0.0

    def __post_init__(self) -> None:
        for role in ROLES:
            k, b = self.k.get(role), self.bits.get(role)
            if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k <= 0:
                raise QpackInputError(f"record pipeline: k for {role} must be a positive number, got {k!r}")
            if not isinstance(b, int) or not 2 <= b <= 8:
                raise QpackInputError(f"record pipeline: bits for {role} must be 2..8, got {b!r}")
        if not self.lam >= 0:
            raise QpackInputError(f"record pipeline: lambda must be >= 0, got {self.lam!r}")

    def scaled(self, mult: float, embed_ratio: float | None = None) -> "RecordSettings":
        """Every k times `mult`; with `embed_ratio`, the embedding's k set to ratio * the matrices' (attn) k."""
        k = {r: v * mult for r, v in self.k.items()}
        if embed_ratio is not None:
            k["embed"] = embed_ratio * k["attn"]
        return RecordSettings(k, dict(self.bits), self.lam)


#: the records' own settings: 04-05 (int6 k 12.85, int8 embedding k 20), 04-06 (+ Hessian-aware, lambda 0.175),
#: 04-27 (MLP 11.5, attention 13, int7 embedding k 14)
PRESETS = {
    "2026-04-05": RecordSettings(),
    "2026-04-06": RecordSettings(lam=0.175),
    "2026-04-27": RecordSettings({"embed": 14.0, "attn": 13.0, "mlp": 11.5, "other": 12.85},
                                 {"embed": 7, "attn": 6, "mlp": 6, "other": 6}),
}


def role_of(name: str) -> str:
    """The records' parameter classes: embedding, attention, MLP, other."""
    if "tok_emb" in name or "lm_head" in name or "embed" in name:
        return "embed"
    if ".mlp." in name:
        return "mlp"
    if ".attn." in name:
        return "attn"
    return "other"


def byte_shuffle(data: bytes, stride: int = 2) -> bytes:
    """Bytes at positions 0, stride, 2*stride, ... then 1, 1+stride, ...: fp16 high and low bytes apart."""
    a = np.frombuffer(data, dtype=np.uint8)
    return b"".join(a[i::stride].tobytes() for i in range(stride))


def byte_unshuffle(data: bytes, stride: int = 2) -> bytes:
    """Inverse of byte_shuffle."""
    a = np.frombuffer(data, dtype=np.uint8)
    n = a.size
    out = np.empty(n, dtype=np.uint8)
    pos = 0
    for i in range(stride):
        cnt = len(range(i, n, stride))
        out[i::stride] = a[pos:pos + cnt]
        pos += cnt
    return out.tobytes()


def quantize_record(sd: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], settings: RecordSettings,
                    min_numel: int = 4096, cache: dict | None = None) -> dict[str, Quantized | torch.Tensor]:
    """Each tensor as the pipeline stores it: Quantized (GPTQ on SDClip's grid) or an fp16 tensor."""
    out: dict[str, Quantized | torch.Tensor] = {}
    for name, t in sd.items():
        if not t.is_floating_point() or t.ndim < 2 or t.numel() < min_numel:
            out[name] = t.detach().to(torch.float16) if t.is_floating_point() else t.detach()
            continue
        if name not in hessians:
            raise QpackInputError(f"record pipeline: no Hessian for {name!r} (collect them on calibration tokens)")
        role = role_of(name)
        key = (name, round(settings.k[role], 9), settings.bits[role], settings.lam)
        if cache is not None and key in cache:
            out[name] = cache[key]
            continue
        q = make_quantizer("sdclip_gptq", settings.bits[role], k=float(settings.k[role]), lam=settings.lam)
        out[name] = q.quantize(t, hessians[name])
        if cache is not None:
            cache[key] = out[name]
    return out


def raw_stream(parts: dict[str, Quantized | torch.Tensor]) -> bytes:
    """Codes, scales and fp16 tensors back to back in state-dict order (what the records pickle, minus pickle)."""
    chunks = []
    for p in parts.values():
        if isinstance(p, Quantized):
            chunks += [p.q.cpu().contiguous().numpy().tobytes(), p.scales.cpu().contiguous().numpy().tobytes()]
        else:
            chunks.append(p.cpu().contiguous().numpy().tobytes())
    return b"".join(chunks)


def compressed_size(parts: dict[str, Quantized | torch.Tensor]) -> int:
    """Bytes of the pipeline's stream: byte shuffle (stride 2) + brotli-11."""
    import brotli

    return len(brotli.compress(byte_shuffle(raw_stream(parts)), quality=11))


def dequantized(parts: dict[str, Quantized | torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict the pipeline's decoder rebuilds, in the dtypes of `like`."""
    out = {}
    for name, p in parts.items():
        t = p.dequantize() if isinstance(p, Quantized) else p
        out[name] = t.to(like[name].dtype).reshape(like[name].shape)
    return out


@dataclass
class Fit:
    """One pipeline setting fitted to a size."""

    mult: float
    size: int
    parts: dict = field(repr=False)
    reached: bool = True  # False when the widths cannot make a stream that large (the fit is their largest)


def _proxy_size(parts: dict[str, Quantized | torch.Tensor]) -> int:
    """brotli-5 of the same shuffled stream: 40x faster than quality 11, its size a smooth fraction of it."""
    import brotli

    return len(brotli.compress(byte_shuffle(raw_stream(parts)), quality=5))


def fit_size(sd: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], settings: RecordSettings, target: int,
             min_numel: int = 4096, iters: int = 40, cache: dict | None = None, tol: float = 0.003) -> Fit:
    """The smallest common k multiplier whose brotli-11 stream fits `target` bytes (within `tol` under it).

    Size falls as k grows. The search runs on brotli-5 sizes scaled by the brotli-11/brotli-5 ratio measured at
    the nearest multiplier (the ratio drifts slowly with k), and every candidate it settles on is measured with
    brotli-11; only measured sizes are returned. `cache` (one per settings) keeps trials across targets.
    Raises QpackInputError when even mult = 64 does not fit."""
    cache = {} if cache is None else cache
    trials: dict[float, tuple] = cache.setdefault("_trials", {})  # mult -> (parts, proxy size)
    exact: dict[float, int] = cache.setdefault("_exact", {})  # mult -> brotli-11 size

    def proxy(mult: float) -> int:
        if mult not in trials:
            parts = quantize_record(sd, hessians, settings.scaled(mult), min_numel, cache)
            trials[mult] = (parts, _proxy_size(parts))
        return trials[mult][1]

    def measure(mult: float) -> int:
        if mult not in exact:
            proxy(mult)
            exact[mult] = compressed_size(trials[mult][0])
        return exact[mult]

    def estimate(mult: float) -> float:
        near = min(exact, key=lambda m: abs(math.log(m / mult)))
        return proxy(mult) * exact[near] / trials[near][1]

    if not exact:
        measure(1.0)
    for _ in range(iters):
        fits = [m for m, n in exact.items() if n <= target]
        if fits and exact[min(fits)] >= target * (1 - tol):
            break
        goal = target * (1 - tol / 2)
        est = {m: estimate(m) for m in trials}
        below = [m for m, e in est.items() if e <= goal]
        above = [m for m, e in est.items() if e > goal]
        hi = min(below) if below else None  # fits, finest grid
        lo = max(above) if above else None  # too big, coarsest grid
        if hi is not None and est[hi] >= target * (1 - tol) and hi not in exact:
            measure(hi)
            continue
        if hi is None:
            if lo >= 64:
                raise QpackInputError(f"record pipeline: cannot reach {target:,} bytes (at k x 64)")
            proxy(min(lo * 2, 64.0))
            continue
        if lo is None:
            # a finer grid no longer grows the stream once the codes pile up at the clip: the widths' ceiling
            if hi / 2 < MIN_MULT or (hi / 2 in trials and trials[hi / 2][1] <= trials[hi][1]):
                measure(hi)
                break
            proxy(hi / 2)
            continue
        # regula falsi in log-log, kept inside the middle 80% of the bracket so it always shrinks
        a, b = math.log(lo), math.log(hi)
        if b - a < 2e-3:  # the bracket is down to proxy noise: settle on its fitting end
            if hi in exact:
                measure(math.exp(a + 0.5 * (b - a)))
            else:
                measure(hi)
            continue
        t = (math.log(est[lo]) - math.log(goal)) / (math.log(est[lo]) - math.log(est[hi]))
        m = math.exp(a + min(max(t, 0.1), 0.9) * (b - a))
        if abs(math.log(m / hi)) < 1e-6:
            measure(hi)
        else:
            proxy(m)
    fits = [m for m, n in exact.items() if n <= target]
    if not fits:
        raise QpackInputError(f"record pipeline: no multiplier found that fits {target:,} bytes")
    m = max(fits, key=lambda m: exact[m])  # the largest stream that fits (its finest grid when the size is reached)
    return Fit(m, exact[m], trials[m][0], exact[m] >= target * (1 - tol))
