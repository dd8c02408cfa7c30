"""Artifact entries -> the model's state dict: re-joins row-split tensors and restores tied (aliased) names.

compress may store one weight as several row blocks (each with its own bit width) and stores a tied weight
once; the artifact's meta records both ("row_splits", "aliases"), and this module undoes them.
"""
from __future__ import annotations

import os

import torch

from .errors import QpackFormatError, Reason


def assemble(artifact, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The dequantized state dict an artifact stands for, in the original tensor order where recorded."""
    path = getattr(artifact, "path", None)
    meta = artifact.meta if isinstance(artifact.meta, dict) else {}
    splits = meta.get("row_splits") or {}
    aliases = meta.get("aliases") or {}
    order = meta.get("order")
    if not isinstance(splits, dict) or not isinstance(aliases, dict):
        raise QpackFormatError(path, Reason.BAD_MANIFEST, "meta row_splits/aliases must be objects")
    names = set(artifact.names())
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, spec in splits.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("parts"), list) or not isinstance(spec.get("shape"), list):
            raise QpackFormatError(path, Reason.BAD_MANIFEST, f"row split of {name!r} is malformed")
        parts = spec["parts"]
        if not parts or any(p not in names or p in used for p in parts):
            raise QpackFormatError(path, Reason.BAD_MANIFEST, f"row split of {name!r} names missing or reused parts")
        shape = tuple(spec["shape"])
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise QpackFormatError(path, Reason.BAD_MANIFEST, f"row split of {name!r} has a bad shape")
        pieces = [artifact.tensor(p, device) for p in parts]
        flat = torch.cat([p.reshape(p.shape[0], -1) if p.ndim > 1 else p.reshape(1, -1) for p in pieces], dim=0)
        if flat.numel() != _prod(shape):
            raise QpackFormatError(path, Reason.BAD_MANIFEST, f"row split of {name!r} does not add up to {shape}")
        out[name] = flat.reshape(shape)
        used.update(parts)
    for name in artifact.names():
        if name not in used:
            out[name] = artifact.tensor(name, device)
    for alias, target in aliases.items():
        if target not in out or alias in out:
            raise QpackFormatError(path, Reason.BAD_MANIFEST, f"alias {alias!r} -> {target!r} is inconsistent")
        out[alias] = out[target]
    if isinstance(order, list) and set(order) == set(out):
        out = {n: out[n] for n in order}
    return out


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read an artifact and return its model state dict, dequantized (qpack.load)."""
    from .artifact import read_artifact

    return assemble(read_artifact(path), device)
