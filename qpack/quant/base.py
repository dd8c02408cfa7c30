"""What every quantizer returns (Quantized) and how quantizers register.

A quantizer sees one weight as a 2-D float32 matrix W (rows = output features; a tensor of higher rank is
viewed as (shape[0], -1)). Codes are symmetric signed integers in [-qmax, qmax], qmax = 2**(bits-1) - 1
(int6: [-31, 31]), held as int8 up to 8 bits and int16 above (scheme "uniform" only), with one fp16 scale per
row, or per row and group of `group_size` columns, and optionally one fp16 multiplier per column (`col_scale`: a
column-scaled grid, finer where the columns matter more).
Dequantization is q * scale (* col_scale) in float32 and is the only definition of it in qpack.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import QpackInputError
from ..registry import Registry

MIN_BITS, MAX_BITS = 2, 8  # the widths a width scheme (rtn, gptq, sdclip, ...) quantizes at
#: the widest codes a Quantized holds: scheme "uniform" goes past int8 when its step is finer than a row's
#: absmax / 127 (high rates: the 17M-param golf baseline at 16 MB is 7.4 bits/param); stored as two byte planes
MAX_CODE_BITS = 12


def qmax(bits: int) -> int:
    """Largest code magnitude at `bits` (symmetric range [-qmax, qmax])."""
    return (1 << (bits - 1)) - 1


def code_dtype(bits: int) -> torch.dtype:
    """The integer dtype that holds `bits`-bit codes: int8 up to 8 bits, int16 above."""
    return torch.int8 if bits <= 8 else torch.int16


def bits_for(top: int, least: int = MIN_BITS) -> int:
    """The narrowest width (at least `least`) whose symmetric range [-qmax, qmax] holds codes up to |top|."""
    return max(least, int(top).bit_length() + 1)


def code_width(q: torch.Tensor, least: int = MIN_BITS) -> int:
    """The narrowest width (at least `least`) whose symmetric range [-qmax, qmax] holds every code of q."""
    return bits_for(int(q.abs().max()) if q.numel() else 0, least)


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """The 2-D float32 view a quantizer works on: (shape[0], prod(shape[1:])); 1-D becomes one row."""
    w = w.detach().to(torch.float32)
    if w.ndim == 0:
        return w.reshape(1, 1)
    if w.ndim == 1:
        return w.reshape(1, -1)
    return w.reshape(w.shape[0], -1)


def n_groups(cols: int, group_size: int | None) -> int:
    """Number of scale groups per row."""
    return 1 if not group_size else math.ceil(cols / group_size)


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    """A torch tensor as is; a numpy array becomes one (shared memory, on the CPU)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if not x.dtype.isnative:  # torch only takes native byte order ('>f2' from a foreign buffer)
            x = x.astype(x.dtype.newbyteorder("="))
        try:
            # A read-only buffer (np.frombuffer) would make torch warn; one copy is the price of silence.
            return torch.from_numpy(x if x.flags.writeable else x.copy())
        except TypeError:
            raise QpackInputError(f"{what} of numpy dtype {x.dtype} cannot become a torch tensor") from None
    raise QpackInputError(f"{what} must be a torch tensor or a numpy array, got {type(x).__name__}")


@dataclass
class Quantized:
    """Integer codes plus scales for one tensor; enough to rebuild it exactly as the quantizer meant.

    `q` and `scales` are torch tensors on one device (numpy arrays given here are converted); bytes are made
    from them only where an artifact is written (qpack.artifact)."""

    q: torch.Tensor  # code_dtype(bits), shape (rows, cols), values in [-qmax(bits), qmax(bits)]
    scales: torch.Tensor  # float16, shape (rows, n_groups(cols, group_size)), on q's device
    shape: tuple[int, ...]  # original tensor shape
    bits: int
    scheme: str
    group_size: int | None = None
    params: dict[str, Any] = field(default_factory=dict)  # scheme parameters worth recording (clip k, ...)
    col_scale: torch.Tensor | None = None  # float16 (cols,), positive: column j dequantizes as q * scale * col_scale[j]

    def __post_init__(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_CODE_BITS:
            raise QpackInputError(f"bits must be in {MIN_BITS}..{MAX_CODE_BITS}, got {self.bits}")
        self.q = _as_tensor(self.q, "codes")
        self.scales = _as_tensor(self.scales, "scales")
        want_dtype = code_dtype(self.bits)
        if self.q.dtype != want_dtype or self.q.ndim != 2:
            raise QpackInputError(f"codes at {self.bits} bits must be a 2-D {str(want_dtype).replace('torch.', '')} "
                                  f"tensor, got {self.q.dtype} {tuple(self.q.shape)}")
        rows, cols = self.q.shape
        if math.prod(self.shape) != rows * cols:
            raise QpackInputError(f"codes {tuple(self.q.shape)} do not match shape {self.shape}")
        want = (rows, n_groups(cols, self.group_size))
        if self.scales.dtype != torch.float16 or tuple(self.scales.shape) != want:
            raise QpackInputError(f"scales must be float16 {want}, got {self.scales.dtype} "
                                  f"{tuple(self.scales.shape)}")
        if self.scales.device != self.q.device:
            raise QpackInputError(f"codes on {self.q.device} and scales on {self.scales.device} must share a device")
        if self.col_scale is not None:
            self.col_scale = _as_tensor(self.col_scale, "column scales")
            c = self.col_scale
            if c.dtype != torch.float16 or tuple(c.shape) != (cols,) or c.device != self.q.device:
                raise QpackInputError(f"column scales must be float16 ({cols},) on {self.q.device}, got {c.dtype} "
                                      f"{tuple(c.shape)} on {c.device}")
            if not bool((torch.isfinite(c) & (c > 0)).all()):
                raise QpackInputError("column scales must be finite and positive")

    @property
    def numel(self) -> int:
        return int(self.q.numel())

    @property
    def device(self) -> torch.device:
        """Where the codes and scales live."""
        return self.q.device

    def to(self, device: torch.device | str) -> "Quantized":
        """The same codes and scales on `device` (self when already there)."""
        device = torch.device(device)
        if self.q.device == device:
            return self
        cs = None if self.col_scale is None else self.col_scale.to(device)
        return replace(self, q=self.q.to(device), scales=self.scales.to(device), params=dict(self.params),
                       col_scale=cs)

    def cpu(self) -> "Quantized":
        """The same codes and scales on the CPU."""
        return self.to("cpu")

    def dequantize(self) -> torch.Tensor:
        """q * scale (then * col_scale) in float32 on the codes' device, reshaped to the original shape."""
        q = self.q.to(torch.float32)
        s = self.scales.to(torch.float32)
        if self.group_size:
            s = s.repeat_interleave(self.group_size, dim=1)[:, : q.shape[1]]
        w = q * s
        if self.col_scale is not None:
            w = w * self.col_scale.to(torch.float32)[None, :]
        return w.reshape(self.shape)


FP16_TINY = float(torch.finfo(torch.float16).tiny)  # smallest normal fp16
FP16_MAX = float(torch.finfo(torch.float16).max)


def scales_fp16(scale: torch.Tensor) -> torch.Tensor:
    """Round scales to fp16 the one way qpack does (zero or tiny scales become the smallest normal fp16);
    the result stays on `scale`'s device."""
    s = scale.detach().to(torch.float32).clamp(min=FP16_TINY, max=FP16_MAX)
    return s.to(torch.float16)


class Quantizer(ABC):
    """A weight quantizer configured by bits, group size and its own parameters."""

    name: ClassVar[str]
    needs_hessian: ClassVar[bool] = False
    max_bits: ClassVar[int] = MAX_BITS  # the widest `bits` it takes (scheme "uniform": MAX_CODE_BITS)
    #: extra parameter name -> default; unknown parameters are rejected.
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, bits: int, group_size: int | None = None, **params: Any):
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= self.max_bits:
            raise QpackInputError(f"{self.name}: bits must be an integer in {MIN_BITS}..{self.max_bits}, got {bits!r}")
        if group_size is not None and (not isinstance(group_size, int) or group_size <= 0):
            raise QpackInputError(f"{self.name}: group_size must be a positive integer, got {group_size!r}")
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise QpackInputError(f"{self.name} has no parameter(s) {sorted(unknown)}; known: {sorted(self.defaults)}")
        self.bits = bits
        self.group_size = group_size
        self.params: dict[str, Any] = {**self.defaults, **params}

    @abstractmethod
    def quantize(self, w: torch.Tensor, hessian: torch.Tensor | None = None) -> Quantized:
        """Quantize one tensor (any shape; see as_matrix). `hessian` is X^T X of its input, (cols, cols)."""


QUANTIZERS: Registry[type[Quantizer]] = Registry("quantization scheme", QpackInputError)


def register_quantizer(name: str):
    """Class decorator: register a Quantizer subclass under `name` (sets cls.name)."""
    return QUANTIZERS.register(name, set_name=True)


def make_quantizer(name: str, bits: int, group_size: int | None = None, **params: Any) -> Quantizer:
    """Build a registered quantizer by name."""
    from . import _builtin  # noqa: F401  (registers the built-in schemes)

    return QUANTIZERS.get(name)(bits, group_size, **params)
