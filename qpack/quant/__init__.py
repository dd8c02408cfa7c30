"""Quantizers: one module per scheme, one interface (qpack.quant.base)."""
from .base import QUANTIZERS, Quantized, Quantizer, make_quantizer, qmax, register_quantizer

from . import _builtin  # noqa: E402,F401  (the built-in schemes register on import, as codecs do)

__all__ = ["QUANTIZERS", "Quantized", "Quantizer", "make_quantizer", "qmax", "register_quantizer"]
