"""What an artifact records about where it came from: qpack's version, the model config, the source
checkpoint's extra keys, and the versions of the libraries its bytes depend on. The one writer of those meta keys.
"""
from __future__ import annotations

import functools
from typing import Any

from . import __version__
from .errors import QpackInputError


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries whose output bytes depend on them (recorded for determinism)."""
    return dict(_library_versions())


@functools.lru_cache(maxsize=1)
def _library_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version
    import zlib

    out: dict[str, str | None] = {}
    for pkg in ("zstandard", "brotli", "constriction", "numpy", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    out["liblzma"] = _liblzma_version()
    out["zlib"] = zlib.ZLIB_RUNTIME_VERSION
    return out


def _liblzma_version() -> str | None:
    # Python's lzma module does not expose liblzma's version; ask the shared library itself.
    import ctypes
    import ctypes.util

    for name in ("liblzma.so.5", ctypes.util.find_library("lzma")):
        if not name:
            continue
        try:
            fn = ctypes.CDLL(name).lzma_version_string
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_char_p
        return fn().decode("ascii", "replace")
    return None


def provenance(model_config: dict | None = None, source: dict | None = None) -> dict[str, Any]:
    """The provenance keys of a compress run's meta: qpack version, model config, source extras, libraries."""
    return complete_meta({"model_config": model_config, "source": source or {}})


def complete_meta(meta: dict | None) -> dict[str, Any]:
    """`meta` over the defaults every artifact carries (qpack version, model config null, library versions)."""
    full: dict[str, Any] = {"qpack_version": __version__, "model_config": None, "libraries": library_versions()}
    if meta:
        if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
            raise QpackInputError("artifact meta must be a dict with string keys")
        full.update(meta)
    cfg = full.get("model_config")
    if cfg is not None and not isinstance(cfg, dict):
        raise QpackInputError("meta model_config must be a dict or None")
    return full
