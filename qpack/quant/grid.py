"""The shared grid arithmetic of the quantizers: per-row (or per-group) absmax and rounding onto stored scales."""
from __future__ import annotations

import torch

from .base import qmax


def group_absmax(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """max|w| per row (shape (rows, 1)) or per row and column group (shape (rows, n_groups))."""
    if not group_size:
        return w.abs().amax(dim=1, keepdim=True)
    rows, cols = w.shape
    pad = (-cols) % group_size
    wp = torch.nn.functional.pad(w.abs(), (0, pad))
    return wp.reshape(rows, -1, group_size).amax(dim=2)


def quantize_with_scales(w: torch.Tensor, scales16: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Codes round(w / s) clamped to [-qmax, qmax] on w's device, using the fp16-rounded scales that will be
    stored."""
    s = torch.as_tensor(scales16, device=w.device).to(torch.float32)
    if group_size:
        s = s.repeat_interleave(group_size, dim=1)[:, : w.shape[1]]
    m = qmax(bits)
    return torch.round(w / s).clamp_(-m, m).to(torch.int8)
