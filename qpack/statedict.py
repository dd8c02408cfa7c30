"""The state-dict plan, both directions: which artifact entries a state dict becomes, and how they come back.

compress stores a tied weight once (aliases), may store one weight as several row blocks, each with its own
bit width (row splits, entries named "NAME#rows0-128"), and records the state dict's key order and every
tensor's original dtype. `Plan` holds all four; `plan_state_dict` makes it, `Plan.to_meta` / `Plan.from_meta`
are its on-disk form (the meta keys "aliases", "row_splits", "order", "dtypes"), and `assemble` undoes it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from .errors import QpackFormatError, Reason

#: dtype names the plan records (the original dtype of a tensor; restored on load).
_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}


def dtype_name(dtype: torch.dtype) -> str | None:
    """The plan's name of a torch dtype, or None for dtypes an artifact cannot hold."""
    return next((name for name, td in _DTYPES.items() if td == dtype), None)


@dataclass(frozen=True)
class Block:
    """One artifact entry made from rows r0:r1 of a state-dict tensor (the whole tensor when unsplit)."""

    entry: str  # artifact entry name
    tensor: str  # state-dict name
    r0: int
    r1: int


@dataclass(frozen=True)
class RowSplit:
    """A weight stored as row blocks: the entry names, in row order, and the weight's shape."""

    parts: tuple[str, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    """How a state dict maps onto artifact entries; the artifact meta records it (see to_meta)."""

    order: tuple[str, ...]  # the state dict's key order
    aliases: dict[str, str] = field(default_factory=dict)  # tied name -> the name stored once
    splits: dict[str, RowSplit] = field(default_factory=dict)  # weight -> its row blocks
    dtypes: dict[str, str] = field(default_factory=dict)  # name -> original dtype (restored by assemble)

    @property
    def stored(self) -> list[str]:
        """State-dict names stored in the artifact (aliases are not), in state-dict order."""
        return [n for n in self.order if n not in self.aliases]

    def blocks(self, name: str, rows: int) -> list[Block]:
        """The artifact entries of state-dict tensor `name` (with `rows` rows), in row order."""
        split = self.splits.get(name)
        if split is None:
            return [Block(name, name, 0, rows)]
        return [Block(p, name, *_rows_of(p)) for p in split.parts]

    def to_meta(self) -> dict[str, Any]:
        """The plan as artifact meta keys (the same JSON keys every qpack version has written)."""
        return {
            "aliases": dict(sorted(self.aliases.items())),
            "row_splits": {n: {"parts": list(s.parts), "shape": list(s.shape)} for n, s in self.splits.items()},
            "order": list(self.order),
            "dtypes": dict(self.dtypes),
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], path: str | os.PathLike | None = None) -> "Plan":
        """Read and check the plan an artifact's meta records; keys an older artifact lacks mean "none"."""
        splits = meta.get("row_splits") or {}
        aliases = meta.get("aliases") or {}
        order = meta.get("order")
        dtypes = meta.get("dtypes") or {}
        if not isinstance(splits, dict) or not isinstance(aliases, dict) or not isinstance(dtypes, dict):
            raise QpackFormatError(path, Reason.BAD_MANIFEST, "meta row_splits/aliases/dtypes must be objects")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
            raise QpackFormatError(path, Reason.BAD_MANIFEST, "meta aliases must map names to names")
        if not all(isinstance(v, str) and v in _DTYPES for v in dtypes.values()):
            raise QpackFormatError(path, Reason.BAD_MANIFEST, f"meta dtypes must be among {', '.join(_DTYPES)}")
        parsed: dict[str, RowSplit] = {}
        for name, spec in splits.items():
            if not isinstance(spec, dict) or not isinstance(spec.get("parts"), list) \
                    or not isinstance(spec.get("shape"), list):
                raise QpackFormatError(path, Reason.BAD_MANIFEST, f"row split of {name!r} is malformed")
            shape = tuple(spec["shape"])
            if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
                raise QpackFormatError(path, Reason.BAD_MANIFEST, f"row split of {name!r} has a bad shape")
            if not spec["parts"] or not all(isinstance(p, str) for p in spec["parts"]):
                raise QpackFormatError(path, Reason.BAD_MANIFEST, f"row split of {name!r} names no parts")
            parsed[name] = RowSplit(tuple(spec["parts"]), shape)
        order_t = tuple(order) if isinstance(order, list) and all(isinstance(n, str) for n in order) else ()
        return cls(order_t, dict(aliases), parsed, dict(dtypes))


def _rows_of(part: str) -> tuple[int, int]:
    r0, r1 = part.rsplit("#rows", 1)[1].split("-")
    return int(r0), int(r1)


def part_name(name: str, r0: int, r1: int) -> str:
    """The artifact entry name of rows r0:r1 of weight `name`."""
    return f"{name}#rows{r0}-{r1}"


def row_blocks(rows: int, numel: int, chunk_numel: int, max_blocks: int = 8) -> list[tuple[int, int]]:
    """Split `rows` into up to `max_blocks` near-equal blocks of about `chunk_numel` elements (0: one block)."""
    if chunk_numel <= 0 or rows < 2:
        return [(0, rows)]
    k = max(1, min(max_blocks, rows, numel // chunk_numel))
    edges = [rows * i // k for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


def find_aliases(sd: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Names whose tensor is the same storage as (or bit-identical to) an earlier name: {alias: original}."""
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    by_shape: dict[tuple, list[str]] = {}
    for name, t in sd.items():
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        if t.ndim >= 2 and t.numel() >= 1024:
            # The first row is a cheap fingerprint: full comparisons only between tensors that share it.
            first = t.detach().reshape(t.shape[0], -1)[0].cpu()
            first = first.view(torch.int16) if t.dtype == torch.bfloat16 else first  # numpy has no bfloat16
            group = (tuple(t.shape), t.dtype, first.numpy().tobytes())
            for other in by_shape.get(group, []):
                if torch.equal(sd[other], t):
                    aliases[name] = other
                    break
            else:
                by_shape.setdefault(group, []).append(name)
    return aliases


def plan_state_dict(sd: Mapping[str, torch.Tensor], split: Callable[[str, torch.Tensor], list[tuple[int, int]]]
                    ) -> Plan:
    """The plan of a state dict: aliases found, each stored tensor split into the row blocks `split` gives."""
    aliases = find_aliases(sd)
    splits: dict[str, RowSplit] = {}
    for name, t in sd.items():
        if name in aliases:
            continue
        blocks = split(name, t)
        if len(blocks) > 1:
            splits[name] = RowSplit(tuple(part_name(name, r0, r1) for r0, r1 in blocks), tuple(t.shape))
    dtypes = {n: d for n, t in sd.items() if (d := dtype_name(t.dtype)) is not None}
    return Plan(tuple(sd), aliases, splits, dtypes)


def assemble(artifact, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The state dict an artifact stands for: row blocks re-joined, tied names restored, original dtypes and order."""
    path = getattr(artifact, "path", None)
    plan = Plan.from_meta(artifact.meta if isinstance(artifact.meta, dict) else {}, path)
    names = set(artifact.names())
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, split in plan.splits.items():
        if any(p not in names or p in used for p in split.parts):
            raise QpackFormatError(path, Reason.BAD_MANIFEST, f"row split of {name!r} names missing or reused parts")
        out[name] = _join_rows(artifact, path, name, split, device)
        used.update(split.parts)
    for name in artifact.names():
        if name not in used:
            out[name] = artifact.tensor(name, device)
    for name, dtype in plan.dtypes.items():
        if name in out and out[name].dtype != _DTYPES[dtype]:
            out[name] = out[name].to(_DTYPES[dtype])
    for alias, target in plan.aliases.items():
        if target not in out or alias in out:
            raise QpackFormatError(path, Reason.BAD_MANIFEST, f"alias {alias!r} -> {target!r} is inconsistent")
        out[alias] = out[target]
    if plan.order and set(plan.order) == set(out):
        out = {n: out[n] for n in plan.order}
    return out


def _join_rows(artifact, path, name: str, split: RowSplit, device) -> torch.Tensor:
    """The row blocks of one weight written into one tensor of its shape (no concatenation copy)."""
    rows = [matrix_rows(artifact.entry(p)) for p in split.parts]
    total = sum(r * c for r, c in rows)
    if total != math.prod(split.shape) or len({c for _, c in rows}) > 1:
        raise QpackFormatError(path, Reason.BAD_MANIFEST, f"row split of {name!r} does not add up to {split.shape}")
    first = None
    r0 = 0
    for part, (r, c) in zip(split.parts, rows):
        piece = artifact.tensor(part, device)
        if first is None:
            first = torch.empty((sum(rr for rr, _ in rows), c), dtype=piece.dtype, device=piece.device)
        first[r0:r0 + r] = piece.reshape(r, c)
        r0 += r
    return first.reshape(split.shape)


def matrix_rows(entry: Mapping[str, Any]) -> tuple[int, int]:
    """(rows, cols) of a manifest entry's matrix view."""
    shape = entry["shape"]
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, int(shape[0])
    return int(shape[0]), math.prod(int(d) for d in shape[1:])


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read an artifact and return its model state dict, dequantized (qpack.load)."""
    from .artifact import read_artifact

    art = read_artifact(path)
    if torch.device(device).type != "cpu":
        return assemble(art, device)
    # Decoding is one memory-bound pass per block (codes times scales, a few hundred thousand values each):
    # thread hand-offs cost more than they save, and on a busy 2-core machine two threads made load 3-6x
    # slower in wall time for the same result.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return assemble(art, device)
    finally:
        torch.set_num_threads(threads)
