"""Late QAT: a straight-through fake quantizer that rounds exactly as qpack's own quantizers do.

`rtn` runs in torch on the weight's device (the same ops and fp16 scale rounding as qpack.quant.rtn, tested
bit for bit against it); any other registered scheme goes through qpack's quantizer on the CPU (slow, exact).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from qpack.quant import make_quantizer, qmax
from qpack.quant.grid import group_absmax

from qpack.models.gpt import GPT, Linear

FP16_TINY = float(np.finfo(np.float16).tiny)
FP16_MAX = 65504.0


def rtn_dequantized(w: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """make_quantizer("rtn", bits, group_size).quantize(w).dequantize(), computed in torch on w's device."""
    m = w.detach().to(torch.float32).reshape(w.shape[0], -1)
    top = qmax(bits)
    s = (group_absmax(m, group_size) / top).clamp(min=FP16_TINY, max=FP16_MAX).to(torch.float16).to(torch.float32)
    if group_size:
        s = s.repeat_interleave(group_size, dim=1)[:, : m.shape[1]]
    q = torch.round(m / s).clamp_(-top, top)
    return (q * s).reshape(w.shape).to(w.dtype)


def make_fake_quant(scheme: str, bits: int, group_size: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function w -> dequantized(quantized(w)) for the named qpack scheme (unknown names raise)."""
    quantizer = make_quantizer(scheme, bits, group_size)  # validates scheme, bits and group size up front
    if scheme == "rtn":
        return lambda w: rtn_dequantized(w, bits, group_size)
    if quantizer.needs_hessian:
        raise ValueError(f"QAT cannot use {scheme!r}: it needs a Hessian; use a data-free scheme such as rtn")
    return lambda w: quantizer.quantize(w.detach().cpu()).dequantize().to(w.device, w.dtype)


def set_fake_quant(model: GPT | nn.Module, fn: Callable[[torch.Tensor], torch.Tensor] | None,
                   only_mlp: bool = False) -> int:
    """Attach `fn` (or None to detach) to every linear layer inside the blocks (or only the MLPs'); returns how many.

    The layers apply it in training mode only: evaluation sees the float weights that final.pt holds.
    """
    n = 0
    for name, module in model.blocks.named_modules():
        if isinstance(module, Linear) and (not only_mlp or ".mlp." in f".{name}"):
            module.fake_quant = fn
            n += 1
    return n
