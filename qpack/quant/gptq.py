"""GPTQ (Frantar et al. 2022, as in IST-DASLab/gptq): quantize W column by column, pushing each column's
rounding error onto the columns not yet quantized through the inverse Hessian of the layer's input.

Names follow the paper: W (rows x cols weight), H = X^T X / n (cols x cols), Hinv (the upper Cholesky factor
of H^-1), Q (integer codes), Err (scaled errors of one block). Scales are fixed before the sweep (absmax per
row or per static group, or a GPTQ-lite clip search), so the codes are plain symmetric intN codes and
Quantized.dequantize() rebuilds exactly what the sweep assumed.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..errors import QpackInputError
from .base import Quantized, Quantizer, as_matrix, qmax, register_quantizer, scales_fp16
from .gptq_lite import DEFAULT_GRID, DEFAULT_MIN_RATIO, clip_ratios, search_clip_scales
from .rtn import group_absmax

MAX_DAMP_RETRIES = 6  # damping x10 per retry: 1% of mean diag -> at most 10^4 %, far past any sane H


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


class GPTQ:
    """One weight matrix and its input Hessian; `solve` returns the codes for given scales."""

    def __init__(self, W: torch.Tensor, H: torch.Tensor, dtype: torch.dtype = torch.float32):
        rows, cols = W.shape
        if tuple(H.shape) != (cols, cols):
            raise QpackInputError(f"gptq: Hessian shape {tuple(H.shape)} does not match the weight's {cols} input columns")
        if not torch.isfinite(H).all():
            raise QpackInputError("gptq: the Hessian holds NaN or infinite values")
        self.W = W.detach().to(dtype).clone()
        self.H = H.detach().to(device=self.W.device, dtype=dtype).clone()
        # Dead inputs (always zero) carry no information: give them unit curvature so H stays invertible,
        # and zero their weights, which can never affect the layer's output.
        dead = torch.diag(self.H) == 0
        self.H[dead, dead] = 1.0
        self.W[:, dead] = 0.0
        self.n_dead = int(dead.sum())

    def inverse_cholesky(self, H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float, int]:
        """Upper Cholesky factor of (H + damp I)^-1 with damp = percdamp * mean(diag H); on failure the
        damping grows tenfold and the factorisation is retried. Returns (Hinv, percdamp used, retries)."""
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

    def solve(self, scales: torch.Tensor, bits: int, group_size: int | None, blocksize: int = 128,
              percdamp: float = 0.01, actorder: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
        """Codes int8 (rows, cols) on W's device for fp16 `scales` (rows, n_groups), in the original column
        order."""
        with _one_thread(self.W.device):
            return self._solve(scales, bits, group_size, blocksize, percdamp, actorder)

    def _solve(self, scales: torch.Tensor, bits: int, group_size: int | None, blocksize: int,
               percdamp: float, actorder: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        W, H = self.W.clone(), self.H
        rows, cols = W.shape
        S = torch.as_tensor(scales, device=W.device).to(torch.float32).to(W.dtype)
        S = S.repeat_interleave(group_size, dim=1)[:, :cols] if group_size else S.expand(rows, cols)
        if actorder:
            # Largest curvature first, so the most important columns are quantized while most columns
            # remain to absorb their error. Groups stay the static groups of the original order.
            perm = torch.argsort(torch.diag(H), descending=True, stable=True)
            W, H, S = W[:, perm], H[perm][:, perm], S[:, perm]
        Hinv, used, retries = self.inverse_cholesky(H, percdamp)
        m = qmax(bits)
        Q = torch.zeros_like(W)
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                w, s = W1[:, i], S[:, i1 + i]
                q = torch.round(w / s).clamp_(-m, m)
                Q[:, i1 + i] = q
                err = (w - q * s) / Hinv1[i, i]
                # Lazy update: only the rest of this block now; later blocks get one matmul below.
                W1[:, i + 1 :].addr_(err, Hinv1[i, i + 1 :], alpha=-1.0)
                Err1[:, i] = err
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)
        if actorder:
            Q = Q[:, torch.argsort(perm)]
        info = {"percdamp": used, "damp_retries": retries, "dead_columns": self.n_dead}
        return Q.to(torch.int8), info


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
        "dtype": "float32",  # "float64" for a slower, more exact sweep
    }

    def quantize(self, w: torch.Tensor, hessian: torch.Tensor | None = None) -> Quantized:
        if hessian is None:
            raise QpackInputError("gptq needs the Hessian of the layer's input (compress with --calib)")
        p = self.params
        dtype = {"float32": torch.float32, "float64": torch.float64}.get(p["dtype"])
        if dtype is None:
            raise QpackInputError(f"gptq: dtype must be 'float32' or 'float64', got {p['dtype']!r}")
        if not isinstance(p["blocksize"], int) or p["blocksize"] < 1:
            raise QpackInputError(f"gptq: blocksize must be a positive integer, got {p['blocksize']!r}")
        if not float(p["percdamp"]) > 0:
            raise QpackInputError(f"gptq: percdamp must be positive, got {p['percdamp']!r}")
        gptq = GPTQ(as_matrix(w), hessian, dtype)
        W32 = gptq.W.to(torch.float32)
        if p["clip_search"]:
            scales = search_clip_scales(W32, self.bits, self.group_size, clip_ratios(p["grid"], p["min_ratio"]))
        else:
            scales = scales_fp16(group_absmax(W32, self.group_size) / qmax(self.bits))
        q, info = gptq.solve(scales, self.bits, self.group_size, p["blocksize"], float(p["percdamp"]),
                             bool(p["actorder"]))
        params = {"actorder": bool(p["actorder"]), "blocksize": p["blocksize"], "clip_search": bool(p["clip_search"]),
                  "dtype": p["dtype"], **info}
        return Quantized(q, scales, tuple(w.shape), self.bits, self.name, self.group_size, params)
