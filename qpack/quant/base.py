"""What every quantizer returns (Quantized) and how quantizers register.

A quantizer sees one weight as a 2-D float32 matrix W (rows = output features; a tensor of higher rank is
viewed as (shape[0], -1)). Codes are symmetric signed integers in [-qmax, qmax], qmax = 2**(bits-1) - 1
(int6: [-31, 31]), with one fp16 scale per row, or per row and group of `group_size` columns.
Dequantization is q * scale in float32 and is the only definition of it in qpack.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import QpackInputError
from ..registry import Registry

MIN_BITS, MAX_BITS = 2, 8


def qmax(bits: int) -> int:
    """Largest code magnitude at `bits` (symmetric range [-qmax, qmax])."""
    return (1 << (bits - 1)) - 1


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


@dataclass
class Quantized:
    """Integer codes plus scales for one tensor; enough to rebuild it exactly as the quantizer meant."""

    q: np.ndarray  # int8, shape (rows, cols), values in [-qmax(bits), qmax(bits)]
    scales: np.ndarray  # float16, shape (rows, n_groups(cols, group_size))
    shape: tuple[int, ...]  # original tensor shape
    bits: int
    scheme: str
    group_size: int | None = None
    params: dict[str, Any] = field(default_factory=dict)  # scheme parameters worth recording (clip k, ...)

    def __post_init__(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise QpackInputError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {self.bits}")
        if self.q.dtype != np.int8 or self.q.ndim != 2:
            raise QpackInputError(f"codes must be a 2-D int8 array, got {self.q.dtype} {self.q.shape}")
        rows, cols = self.q.shape
        if math.prod(self.shape) != rows * cols:
            raise QpackInputError(f"codes {self.q.shape} do not match shape {self.shape}")
        want = (rows, n_groups(cols, self.group_size))
        if self.scales.dtype != np.float16 or self.scales.shape != want:
            raise QpackInputError(f"scales must be float16 {want}, got {self.scales.dtype} {self.scales.shape}")

    @property
    def numel(self) -> int:
        return int(self.q.size)

    def dequantize(self) -> torch.Tensor:
        """q * scale in float32, reshaped to the original shape."""
        q = torch.from_numpy(self.q.astype(np.float32))
        s = torch.from_numpy(self.scales.astype(np.float32))
        if self.group_size:
            s = s.repeat_interleave(self.group_size, dim=1)[:, : q.shape[1]]
        return (q * s).reshape(self.shape)


def scales_fp16(scale: torch.Tensor) -> np.ndarray:
    """Round scales to fp16 the one way qpack does (zero or tiny scales become the smallest normal fp16)."""
    s = scale.detach().to(torch.float32).clamp(min=float(np.finfo(np.float16).tiny), max=65504.0)
    return s.to(torch.float16).numpy()


class Quantizer(ABC):
    """A weight quantizer configured by bits, group size and its own parameters."""

    name: ClassVar[str]
    needs_hessian: ClassVar[bool] = False
    #: extra parameter name -> default; unknown parameters are rejected.
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, bits: int, group_size: int | None = None, **params: Any):
        if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise QpackInputError(f"{self.name}: bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
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

    def deco(cls: type[Quantizer]) -> type[Quantizer]:
        cls.name = name
        QUANTIZERS.add(name, cls)
        return cls

    return deco


def make_quantizer(name: str, bits: int, group_size: int | None = None, **params: Any) -> Quantizer:
    """Build a registered quantizer by name."""
    from . import _builtin  # noqa: F401  (registers the built-in schemes)

    return QUANTIZERS.get(name)(bits, group_size, **params)
