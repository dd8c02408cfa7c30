"""qpack: quantize, pack and entropy-code language models into a fixed byte budget, then score them.

Public API: calibrate(), compress(), load(), tuner(), QpackError, QpackFormatError. Heavy modules import lazily.
"""
from __future__ import annotations

__version__ = "0.1.0"

import sys as _sys
import types as _types

from .errors import BudgetError, QpackError, QpackFormatError, QpackInputError

__all__ = ["__version__", "BudgetError", "QpackError", "QpackFormatError", "QpackInputError", "calibrate", "compress",
           "load", "tuner"]


def load(path, *, device: str = "cpu"):
    """Read a .qpk artifact and return its tensors dequantized on `device`: dict[str, torch.Tensor]."""
    from .statedict import load as _load

    return _load(path, device=device)


def calibrate(model, tokens_or_batches, forward=None, seq_len=None, n_tokens=None, **options):
    """Hessians {weight name: X^T X / n} of `model` on its device, for compress(hessians=...).

    `tokens_or_batches`: a 1-D token stream (cut into rows of seq_len) or 2-D batches of token ids. Under
    torch.distributed every rank runs its own batches and the Hessians are summed over ranks (see
    the module qpack.calibrate for the sequence-length rule and `forward`).
    """
    from .calibrate import calibrate as _calibrate

    return _calibrate(model, tokens_or_batches, forward=forward, seq_len=seq_len, n_tokens=n_tokens, **options)


def tuner(model, tokens_or_batches, forward=None, seq_len=None, n_tokens=None, **options):
    """A passthrough tuner for compress(tune=...): after the solve it fits the unquantized float tensors (norm gains,
    scales) of the quantized model to `model`'s next-token distribution on these tokens (qpack.tune), at no cost
    in bytes. Options: epochs (4), lr (0.003), batch_size (4). Needs logits (see qpack.forward)."""
    from .calibrate import tuner as _tuner

    return _tuner(model, tokens_or_batches, forward=forward, seq_len=seq_len, n_tokens=n_tokens, **options)


def compress(source, output, *, budget=None, code=None, code_codec=None, hessians=None, **options):
    """Compress a checkpoint (path or state dict) to a .qpk artifact; options mirror `qpack compress`.

    `budget` takes "16MB", "15.5MiB" or bytes, for artifact + code; `code` lists the files shipped beside the
    artifact, counted against the budget (compressed with `code_codec` when given, e.g. "lzma"). Hessians follow
    the state dict to its device.
    """
    from .compress import code_size
    from .compress import compress as _compress
    from .units import parse_size

    if budget is not None:
        options["budget"] = parse_size(budget)
    if code_codec is not None and not code:
        raise QpackInputError("code_codec compresses the code files: pass code=[...] as well")
    if code:
        options["code_bytes"] = code_size([code] if isinstance(code, (str, bytes)) or hasattr(code, "__fspath__")
                                          else code, code_codec)
    if hessians:
        hessians = _to_device_of(hessians, source)
    return _compress(source, output, hessians=hessians, **options)


def _to_device_of(hessians, source):
    """Hessians moved to where the state dict's tensors are (a path loads on the CPU)."""
    import torch

    device = torch.device("cpu")
    if isinstance(source, dict):
        device = next((t.device for t in source.values() if isinstance(t, torch.Tensor)), device)
    return {k: v.to(device) for k, v in hessians.items()}


class _Package(_types.ModuleType):
    """Keeps `qpack.compress` and `qpack.calibrate` the functions above after their same-named submodules are
    imported (the import system would otherwise rebind the package attribute to the submodule)."""

    def __setattr__(self, name: str, value) -> None:
        if name in ("compress", "calibrate") and isinstance(value, _types.ModuleType):
            return  # the submodule stays importable through sys.modules ("from qpack.compress import ...")
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
