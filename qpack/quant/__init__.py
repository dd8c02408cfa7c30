"""Quantizers: one module per scheme, one interface (qpack.quant.base)."""
from .base import QUANTIZERS, Quantized, Quantizer, make_quantizer, qmax, register_quantizer

__all__ = ["QUANTIZERS", "Quantized", "Quantizer", "make_quantizer", "qmax", "register_quantizer"]
