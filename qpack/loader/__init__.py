"""A loader that ships with an artifact: one self-contained Python file that reads .qpk with numpy and torch.

`export_loader(codecs)` gives its text in source and shipped (minified, compressed) form; the pieces live in
qpack/loader/parts and are also importable, so the tests run the same code the exported file holds.
"""
from __future__ import annotations

from dataclasses import dataclass

from .export import CODEC_PARTS, artifact_codecs, loader_source, minify, parse_codecs, shipped


@dataclass(frozen=True)
class ExportedLoader:
    """The loader for a set of codecs: its readable source and the bytes that ship."""

    codecs: tuple[str, ...]
    source: str
    shipped: bytes


def export_loader(codecs: list[str]) -> ExportedLoader:
    """The loader reading exactly `codecs` (raw always included)."""
    names = parse_codecs(",".join(codecs))
    src = loader_source(names)
    return ExportedLoader(tuple(names), src, shipped(src))


__all__ = ["CODEC_PARTS", "ExportedLoader", "artifact_codecs", "export_loader", "loader_source", "minify",
           "parse_codecs", "shipped"]
