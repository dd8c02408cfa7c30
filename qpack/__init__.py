"""qpack: quantize, pack and entropy-code language models into a fixed byte budget, then score them.

Public API: load(), compress(), QpackError, QpackFormatError. Heavy modules import lazily.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import BudgetError, QpackError, QpackFormatError, QpackInputError

__all__ = ["__version__", "BudgetError", "QpackError", "QpackFormatError", "QpackInputError", "load", "compress"]


def load(path, *, device: str = "cpu"):
    """Read a .qpk artifact and return its tensors dequantized: dict[str, torch.Tensor]."""
    from .statedict import load as _load

    return _load(path, device=device)


def compress(source, output, **options):
    """Compress a checkpoint (path or state dict) to a .qpk artifact; options mirror `qpack compress`."""
    from .compress import compress as _compress

    return _compress(source, output, **options)
