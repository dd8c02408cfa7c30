"""Rate-distortion tools: the records' pipeline as a baseline, rate-aware quantization, RDO rounding."""
