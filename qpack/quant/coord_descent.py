"""Coordinate descent on GPTQ's objective over a fixed grid (as QuantEase, Behdin et al. 2023, and CDQuant,
Nair and Suggala 2024): after GPTQ's one greedy sweep, revisit every code with the others fixed.

GPTQ chooses each column once, pushing its error onto the columns not yet quantized, and never looks back; the
columns quantized first cannot absorb anything the later ones got wrong. Coordinate descent minimizes the same
layer objective f(Q) = tr(E H E^T), E = W - Q * S, one code at a time, all rows at once (rows are independent
given H): for column j the best code given every other is x = q_j + (E H)_j / (s H_jj), rounded and clamped,
so each step is exact and f never increases. One pass costs about one GPTQ sweep (rows x cols^2 flops in lazy
column blocks, as GPTQ's own).

H is damped as GPTQ damps it (the prepared state's percdamp), so both minimize one objective; dead columns keep
their zero weights.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import QpackInputError
from .gptq import GPTQ, _one_thread


def layer_error(W: torch.Tensor, Q: torch.Tensor, S: torch.Tensor, H: torch.Tensor) -> float:
    """tr(E H E^T) for E = W - Q * S (S: one scale per row (rows, 1), or per weight), in float64."""
    E = (W.to(torch.float64) - Q.to(torch.float64) * S.to(torch.float64))
    return float(((E @ H.to(torch.float64)) * E).sum())


class CoordinateDescent:
    """One weight matrix and its damped Hessian, from a prepared GPTQ; `refine` improves codes on a fixed grid."""

    def __init__(self, prepared: GPTQ, blocksize: int = 128):
        if not isinstance(blocksize, int) or blocksize < 1:
            raise QpackInputError(f"coordinate descent: blocksize must be a positive integer, got {blocksize!r}")
        self.W = prepared.W
        H = prepared.H
        damp = prepared.percdamp * float(torch.diagonal(H).mean())
        self.H = H + damp * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        self.diag = torch.diagonal(self.H).clone()
        # the order GPTQ used (largest curvature first); any order converges, this one first fixes what matters
        self.order = prepared.perm if prepared.perm is not None else torch.arange(H.shape[0], device=H.device)
        self.blocksize = blocksize

    def error(self, Q: torch.Tensor, S: torch.Tensor) -> float:
        """The objective tr(E H E^T) (damped H) of codes Q on scales S."""
        return layer_error(self.W, Q, S, self.H)

    def refine(self, Q: torch.Tensor, S: torch.Tensor, m: int, passes: int = 1, mu: float = 0.0,
               lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Codes after `passes` sweeps of coordinate descent from Q (rows, cols) on per-row scales S (rows, 1),
        codes in [-m, m]; with `mu` > 0 and code `lengths` (bits per level -m..m) each code is the cheaper of the
        two levels around its optimum by g_j * (x - q)^2 + mu * L(q), g_j = H_jj / mean(diag H) (the RDO rounding
        of qpack.rd.grid_gptq). Returns (codes in Q's dtype, {"cd_passes", "cd_changed"})."""
        if isinstance(passes, bool) or not isinstance(passes, int) or passes < 0:
            raise QpackInputError(f"coordinate descent: passes must be an integer >= 0, got {passes!r}")
        rows, cols = self.W.shape
        if tuple(Q.shape) != (rows, cols):
            raise QpackInputError(f"coordinate descent: codes of shape {tuple(Q.shape)} for a {rows}x{cols} weight")
        S = S.to(device=self.W.device, dtype=self.W.dtype).reshape(rows, 1)
        if not bool((S > 0).all()):
            raise QpackInputError("coordinate descent: every row's scale must be positive")
        Qf = Q.to(device=self.W.device, dtype=self.W.dtype).clone()
        changed = 0
        with _one_thread(self.W.device):
            for _ in range(passes):
                n = self._pass(Qf, S, m, float(mu), lengths)
                changed += n
                if n == 0:
                    break
        return Qf.to(Q.dtype), {"cd_passes": passes, "cd_changed": changed}

    def _pass(self, Q: torch.Tensor, S: torch.Tensor, m: int, mu: float, lengths: torch.Tensor | None) -> int:
        """One sweep over every column in place; returns how many codes moved."""
        from ..rd.grid_gptq import round_rdo

        H, d = self.H, self.diag
        rate = mu > 0 and lengths is not None
        mean_d = d.mean()
        s = S[:, 0]
        G = (self.W - Q * S) @ H  # recomputed each pass, so float32 drift cannot build up across passes
        moved = 0
        order = self.order
        cols = order.numel()
        for b0 in range(0, cols, self.blocksize):
            idx = order[b0:b0 + self.blocksize]
            Gb = G[:, idx]  # a copy: the block's gradient, kept exact column by column below
            Hb = H[idx][:, idx]
            D = torch.zeros_like(Gb)
            for t in range(idx.numel()):
                j = int(idx[t])
                q = Q[:, j]
                x = q + Gb[:, t] / (s * d[j])  # the best code for this weight, the others fixed
                new = round_rdo(x, m, mu, lengths, d[j] / mean_d) if rate else torch.round(x).clamp_(-m, m)
                delta = (new - q) * s  # how much the dequantized weight moves (E moves by -delta)
                Q[:, j] = new
                Gb.addr_(delta, Hb[t], alpha=-1.0)
                D[:, t] = delta
            moved += int((D != 0).sum())
            G.addmm_(D, H[idx], alpha=-1.0)  # the block's columns too: Gb is discarded, G stays one source
        return moved

