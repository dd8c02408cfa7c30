"""GPTQ (Frantar et al. 2022, as in IST-DASLab/gptq): quantize W column by column, pushing each column's
rounding error onto the columns not yet quantized through the inverse Hessian of the layer's input.

Names follow the paper: W (rows x cols weight), H = X^T X (cols x cols), Hinv (the upper Cholesky factor
of H^-1), Q (integer codes), Err (scaled errors of one block).

`GPTQ(W, H)` prepares one matrix once (dead columns, damping, act-order permutation, Cholesky of the
inverse); `solve` / `quantize` then run the sweep at any width from that state, so a caller that tries
widths 2..8 factorizes once, not seven times. Two things are pluggable:
  * the grid: per-row (or per-group) fp16 scales fixed before the sweep, from a scale rule
    (`absmax_scales`, `clip_search_scales(ratios)`, `sdclip_scales(k)`) or given as a tensor, so the codes
    are plain symmetric intN codes and Quantized.dequantize() rebuilds exactly what the sweep assumed;
  * the rounding of each column: round-to-nearest-and-clamp by default, or any `Rounding` callable, such as
    `RateDistortionRounding`, which picks between the two nearest levels by distortion + lambda * code length.
Everything runs on W's device; only the CPU gets its thread count changed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..errors import QpackInputError
from .base import Quantized, Quantizer, as_matrix, bits_for, code_dtype, qmax, register_quantizer, scales_fp16
from .gptq_lite import DEFAULT_GRID, DEFAULT_MIN_RATIO, clip_ratios, search_clip_scales
from .grid import group_absmax
from .sdclip import group_std

MAX_DAMP_RETRIES = 6  # damping x10 per retry: 1% of mean diag -> at most 10^4 %, far past any sane H

#: (W float32 (rows, cols), bits, group_size) -> fp16 scales (rows, n_groups) on W's device.
ScaleRule = Callable[[torch.Tensor, int, "int | None"], torch.Tensor]


def absmax_scales(W: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """max|w| / qmax per row or group, rounded to fp16 (GPTQ's default grid)."""
    return scales_fp16(group_absmax(W, group_size) / qmax(bits))


def clip_search_scales(ratios: Sequence[float]) -> ScaleRule:
    """The grid of GPTQ-lite: per row or group, the clip ratio with the smallest weight MSE."""
    ratios = list(ratios)

    def rule(W: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
        return search_clip_scales(W, bits, group_size, ratios)

    return rule


def sdclip_scales(k: float) -> ScaleRule:
    """The grid of SDClip: clip = k * std per row or group, scale = clip / qmax."""

    def rule(W: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
        return scales_fp16(group_std(W, group_size) * float(k) / qmax(bits))

    return rule


@dataclass(frozen=True)
class Column:
    """What a rounding rule sees for one column of the sweep (all tensors on W's device)."""

    index: int  # the column's index in the original (unpermuted) order
    w: torch.Tensor  # (rows,) the column after the earlier columns' errors were pushed onto it
    s: torch.Tensor  # (rows,) its scales
    qmax: int  # codes must lie in [-qmax, qmax]
    hinv: torch.Tensor  # 0-d: Hinv[i, i]; an error e in this column costs 0.5 * (e / hinv)^2 of 0.5 tr(E H E^T)


#: Column -> codes (rows,) as integral floats in [-qmax, qmax].
Rounding = Callable[[Column], torch.Tensor]


def round_to_nearest(col: Column) -> torch.Tensor:
    """The default rounding: round(w / s), clamped to the code range."""
    return torch.round(col.w / col.s).clamp_(-col.qmax, col.qmax)


class RateDistortionRounding:
    """Rounding for a rate-aware caller: of the two levels around w / s, keep the one with the smaller
    0.5 * (e / Hinv[i, i])^2 + lam * code_bits[level], e = w - level * s (ties keep the lower level)."""

    def __init__(self, code_bits: torch.Tensor, lam: float):
        code_bits = torch.as_tensor(code_bits, dtype=torch.float64)
        if code_bits.ndim != 1 or code_bits.numel() < 3 or code_bits.numel() % 2 != 1:
            raise QpackInputError(f"gptq: code_bits must hold 2*qmax+1 values, one per level, got "
                                  f"{tuple(code_bits.shape)}")
        if not bool(torch.isfinite(code_bits).all()) or not float(lam) >= 0:
            raise QpackInputError(f"gptq: code_bits must be finite and lam >= 0, got lam={lam!r}")
        self.code_bits = code_bits
        self.lam = float(lam)
        self.params = {"rounding": "rdo", "rdo_lambda": self.lam}
        self._on: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _bits(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in self._on:
            self._on[key] = self.code_bits.to(device=like.device, dtype=like.dtype)
        return self._on[key]

    def __call__(self, col: Column) -> torch.Tensor:
        m = col.qmax
        bits = self._bits(col.w)
        if bits.numel() != 2 * m + 1:
            raise QpackInputError(f"gptq: code_bits has {bits.numel()} levels, {2 * m + 1} needed at qmax {m}")
        lo = torch.floor(col.w / col.s).clamp_(-m, m - 1)
        hi = lo + 1
        d_lo = 0.5 * ((col.w - lo * col.s) / col.hinv).square()
        d_hi = 0.5 * ((col.w - hi * col.s) / col.hinv).square()
        c_lo = d_lo + self.lam * bits[(lo + m).long()]
        c_hi = d_hi + self.lam * bits[(hi + m).long()]
        return torch.where(c_hi < c_lo, hi, lo)


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """On the CPU, run the sweep on one thread: it is mostly tiny vector ops whose thread hand-offs cost more
    than the work; on a busy 2-core machine two threads made GPTQ 2-30x slower (cholesky_inverse worst).
    Other devices are left alone."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def inverse_cholesky(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of (H + damp I)^-1 with damp = percdamp * mean(diag H); on failure the damping
    grows tenfold and the factorisation is retried. Returns (Hinv, percdamp used, retries)."""
    mean_diag = float(torch.diag(H).mean())
    if not mean_diag > 0:
        raise QpackInputError("gptq: the Hessian's diagonal must be positive (is it X^T X?)")
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for retry in range(MAX_DAMP_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(H + (percdamp * mean_diag) * eye)
        if int(info) == 0:
            Hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and torch.isfinite(Hinv).all():
                return Hinv, percdamp, retry
        percdamp *= 10.0
    raise QpackInputError(f"gptq: Cholesky failed even with damping {percdamp / 10:g} x mean(diag H)")


class GPTQ:
    """One weight matrix W and its input Hessian H, prepared once; `solve` / `quantize` sweep it at any width."""

    def __init__(self, W: torch.Tensor, H: torch.Tensor, dtype: torch.dtype = torch.float32,
                 percdamp: float = 0.01, actorder: bool = True):
        rows, cols = W.shape
        if tuple(H.shape) != (cols, cols):
            raise QpackInputError(f"gptq: Hessian shape {tuple(H.shape)} does not match the weight's {cols} input "
                                  "columns")
        if not torch.isfinite(H).all():
            raise QpackInputError("gptq: the Hessian holds NaN or infinite values")
        if not float(percdamp) > 0:
            raise QpackInputError(f"gptq: percdamp must be positive, got {percdamp!r}")
        self.W = W.detach().to(dtype).clone()
        self.H = H.detach().to(device=self.W.device, dtype=dtype).clone()
        # Dead inputs (always zero) carry no information: give them unit curvature so H stays invertible,
        # and zero their weights, which can never affect the layer's output.
        dead = torch.diag(self.H) == 0
        self.H[dead, dead] = 1.0
        self.W[:, dead] = 0.0
        self.n_dead = int(dead.sum())
        self.actorder = bool(actorder)
        with _one_thread(self.W.device):
            if self.actorder:
                # Largest curvature first, so the most important columns are quantized while most columns
                # remain to absorb their error. Groups stay the static groups of the original order.
                self.perm = torch.argsort(torch.diag(self.H), descending=True, stable=True)
                self.invperm = torch.argsort(self.perm)
                Hp = self.H[self.perm][:, self.perm]
            else:
                self.perm = self.invperm = None
                Hp = self.H
            self.Hinv, self.percdamp, self.damp_retries = inverse_cholesky(Hp, float(percdamp))

    @property
    def info(self) -> dict[str, Any]:
        """What the preparation did, as recorded in each result's params."""
        return {"percdamp": self.percdamp, "damp_retries": self.damp_retries, "dead_columns": self.n_dead}

    def solve(self, scales: torch.Tensor, bits: int, group_size: int | None = None, blocksize: int = 128,
              rounding: Rounding | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Codes (rows, cols) as code_dtype(bits) on W's device for fp16 `scales` (rows, n_groups), in the
        original column order; `rounding` (default round-to-nearest-and-clamp) turns each column into codes."""
        if not isinstance(blocksize, int) or blocksize < 1:
            raise QpackInputError(f"gptq: blocksize must be a positive integer, got {blocksize!r}")
        with _one_thread(self.W.device):
            return self._solve(scales, bits, group_size, blocksize, rounding), self.info

    def _expand(self, scales: torch.Tensor, group_size: int | None) -> torch.Tensor:
        """fp16 scales (rows, n_groups) as one scale per weight (rows, cols) in W's dtype and device."""
        rows, cols = self.W.shape
        S = torch.as_tensor(scales, device=self.W.device).to(torch.float32).to(self.W.dtype)
        return S.repeat_interleave(group_size, dim=1)[:, :cols] if group_size else S.expand(rows, cols)

    def _solve(self, scales: torch.Tensor, bits: int, group_size: int | None, blocksize: int,
               rounding: Rounding | None) -> torch.Tensor:
        return self._sweep(self.W.clone(), self._expand(scales, group_size), qmax(bits), blocksize, rounding)

    def solve_stacked(self, scales: Sequence[torch.Tensor], bits: Sequence[int], group_size: int | None = None,
                      blocksize: int = 128) -> list[torch.Tensor]:
        """Codes for several (scales, bits) in one sweep over W's rows repeated once per entry. Rows are
        independent given H, so each part equals its own `solve` up to the block matmul's summation order (bit
        for bit on this machine's CPU); one sweep instead of len(bits) divides the per-column kernel launches
        that bound GPTQ on a GPU."""
        if len(scales) != len(bits) or not bits:
            raise QpackInputError("gptq: solve_stacked needs one scale tensor per width, and at least one")
        if not isinstance(blocksize, int) or blocksize < 1:
            raise QpackInputError(f"gptq: blocksize must be a positive integer, got {blocksize!r}")
        rows = self.W.shape[0]
        W = self.W.repeat(len(bits), 1)
        S = torch.cat([self._expand(s, group_size) for s in scales])
        m = torch.cat([torch.full((rows,), float(qmax(b)), dtype=W.dtype, device=W.device) for b in bits])
        with _one_thread(self.W.device):
            Q = self._sweep(W, S, m, blocksize, None)
        return list(Q.split(rows))

    def _sweep(self, W: torch.Tensor, S: torch.Tensor, m: int | torch.Tensor, blocksize: int,
               rounding: Rounding | None) -> torch.Tensor:
        """The column sweep on W (changed in place when not permuted) with scales S and code bound m (an int, or
        one bound per row)."""
        rows, cols = W.shape
        Hinv = self.Hinv
        if self.perm is not None:
            W, S = W[:, self.perm], S[:, self.perm]
        order = self.perm.tolist() if (self.perm is not None and rounding is not None) else None
        Q = torch.zeros_like(W)
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                w, s = W1[:, i], S[:, i1 + i]
                if rounding is not None:
                    index = order[i1 + i] if order is not None else i1 + i
                    q = rounding(Column(index, w, s, m, Hinv1[i, i]))
                elif isinstance(m, int):
                    q = torch.round(w / s).clamp_(-m, m)
                else:
                    q = torch.minimum(torch.maximum(torch.round(w / s), -m), m)
                Q[:, i1 + i] = q
                err = (w - q * s) / Hinv1[i, i]
                # Lazy update: only the rest of this block now; later blocks get one matmul below.
                W1[:, i + 1 :].addr_(err, Hinv1[i, i + 1 :], alpha=-1.0)
                Err1[:, i] = err
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)
        if self.invperm is not None:
            Q = Q[:, self.invperm]
        return Q.to(code_dtype(bits_for(m if isinstance(m, int) else int(m.max()))))  # the sweep's widest bound

    def quantize(self, bits: int, group_size: int | None = None, scales: ScaleRule | torch.Tensor = absmax_scales,
                 blocksize: int = 128, rounding: Rounding | None = None, shape: tuple[int, ...] | None = None,
                 params: dict[str, Any] | None = None) -> Quantized:
        """A Quantized at `bits` from the prepared state: scales from the rule (applied to W with dead columns
        zeroed) or as given, then the sweep. `shape` is the original tensor's shape (default W's)."""
        S = self.scales_for(scales, bits, group_size)
        Q, _ = self.solve(S, bits, group_size, blocksize, rounding)
        return self.result(Q, S, bits, group_size, blocksize, rounding, shape, params)

    def scales_for(self, scales: ScaleRule | torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
        """The fp16 scales a rule gives for W (dead columns zeroed), or the given tensor on W's device."""
        if callable(scales):
            return scales(self.W.to(torch.float32), bits, group_size)
        return torch.as_tensor(scales).to(self.W.device)

    def result(self, Q: torch.Tensor, S: torch.Tensor, bits: int, group_size: int | None, blocksize: int,
               rounding: Rounding | None = None, shape: tuple[int, ...] | None = None,
               params: dict[str, Any] | None = None) -> Quantized:
        """Codes and scales from this matrix as a Quantized, with what the preparation and sweep used as params."""
        extra = dict(getattr(rounding, "params", None) or ({} if rounding is None else {"rounding": "custom"}))
        recorded = {"actorder": self.actorder, "blocksize": blocksize, "dtype": str(self.W.dtype).split(".")[-1],
                    **(params or {}), **self.info, **extra}
        return Quantized(Q, S, tuple(shape or self.W.shape), bits, "gptq", group_size, recorded)


@register_quantizer("gptq")
class GPTQQuantizer(Quantizer):
    """GPTQ with act-order, lazy blocks and scales fixed before the sweep; needs the input Hessian."""

    needs_hessian = True
    defaults: dict[str, Any] = {
        "percdamp": 0.01,  # damping as a fraction of mean(diag H)
        "blocksize": 128,  # columns per lazy batch update
        "actorder": True,  # quantize columns by descending diag H
        "clip_search": False,  # scales from a GPTQ-lite clip search instead of absmax
        "grid": DEFAULT_GRID,  # clip ratios for clip_search (count or list)
        "min_ratio": DEFAULT_MIN_RATIO,
        "sdclip_k": None,  # scales from SDClip's k * std instead of absmax (exclusive with clip_search)
        "dtype": "float32",  # "float64" for a slower, more exact sweep
    }

    def _dtype(self) -> torch.dtype:
        p = self.params
        dtype = {"float32": torch.float32, "float64": torch.float64}.get(p["dtype"])
        if dtype is None:
            raise QpackInputError(f"gptq: dtype must be 'float32' or 'float64', got {p['dtype']!r}")
        if not isinstance(p["blocksize"], int) or p["blocksize"] < 1:
            raise QpackInputError(f"gptq: blocksize must be a positive integer, got {p['blocksize']!r}")
        if not float(p["percdamp"]) > 0:
            raise QpackInputError(f"gptq: percdamp must be positive, got {p['percdamp']!r}")
        return dtype

    def prepare(self, w: torch.Tensor, hessian: torch.Tensor | None) -> GPTQ:
        """The prepared state for one weight, reusable at every width (see quantize_prepared)."""
        if hessian is None:
            raise QpackInputError("gptq needs the Hessian of the layer's input (compress with --calib)")
        dtype = self._dtype()
        return GPTQ(as_matrix(w), hessian, dtype, float(self.params["percdamp"]), bool(self.params["actorder"]))

    def scale_rule(self) -> ScaleRule:
        """The grid these parameters choose: absmax, GPTQ-lite clip search, or SDClip k * std."""
        p = self.params
        k = p["sdclip_k"]
        if k is not None:
            if p["clip_search"]:
                raise QpackInputError("gptq: choose clip_search or sdclip_k, not both")
            if isinstance(k, bool) or not isinstance(k, (int, float)) or not k > 0 or k == float("inf"):
                raise QpackInputError(f"gptq: sdclip_k must be a positive number, got {k!r}")
            return sdclip_scales(float(k))
        if p["clip_search"]:
            return clip_search_scales(clip_ratios(p["grid"], p["min_ratio"]))
        return absmax_scales

    def recorded_params(self) -> dict[str, Any]:
        """The grid parameters a result records (the sweep adds its own)."""
        p = self.params
        params: dict[str, Any] = {"clip_search": bool(p["clip_search"])}
        if p["sdclip_k"] is not None:
            params["sdclip_k"] = float(p["sdclip_k"])
        return params

    def quantize_prepared(self, prepared: GPTQ, shape: tuple[int, ...], rounding: Rounding | None = None) -> Quantized:
        """This quantizer's result from an already prepared matrix (same bits, group size and grid)."""
        return prepared.quantize(self.bits, self.group_size, self.scale_rule(), self.params["blocksize"], rounding,
                                 tuple(shape), self.recorded_params())

    def quantize(self, w: torch.Tensor, hessian: torch.Tensor | None = None) -> Quantized:
        if hessian is None:
            raise QpackInputError("gptq needs the Hessian of the layer's input (compress with --calib)")
        self._dtype()
        self.scale_rule()  # bad grid parameters fail before the factorisation
        return self.quantize_prepared(self.prepare(w, hessian), tuple(w.shape))


def quantize_widths(w: torch.Tensor, hessian: torch.Tensor, widths: Sequence[int], group_size: int | None = None,
                    rounding: Rounding | None = None, stacked: bool | None = None,
                    **params: Any) -> dict[int, Quantized]:
    """GPTQ of one weight at every width in `widths`, prepared (damped, permuted, factorized) once; each result
    equals make_quantizer("gptq", bits, group_size, **params).quantize(w, hessian). `stacked` sweeps all widths
    at once (GPTQ.solve_stacked; default: off the CPU, where kernel launches dominate; never with `rounding`)."""
    quantizers = {int(b): GPTQQuantizer(int(b), group_size, **params) for b in widths}
    if not quantizers:
        return {}
    first = next(iter(quantizers.values()))
    for qz in quantizers.values():
        qz.scale_rule()
    prepared = first.prepare(w, hessian)
    if stacked is None:
        stacked = prepared.W.device.type != "cpu"
    if not stacked or rounding is not None:
        return {b: qz.quantize_prepared(prepared, tuple(w.shape), rounding) for b, qz in quantizers.items()}
    bits = list(quantizers)
    scales = [prepared.scales_for(quantizers[b].scale_rule(), b, group_size) for b in bits]
    blocksize = first.params["blocksize"]
    codes = prepared.solve_stacked(scales, bits, group_size, blocksize)
    return {b: prepared.result(Q, S, b, group_size, blocksize, None, tuple(w.shape), quantizers[b].recorded_params())
            for b, Q, S in zip(bits, codes, scales)}
