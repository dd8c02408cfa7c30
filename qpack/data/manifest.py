"""A data folder's manifest.json: its one hash (what checkpoints record and eval compares) and its hardened reader."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import QpackFormatError, Reason
from ..jsonio import canonical_json, read_json, readable_json

MANIFEST_NAME = "manifest.json"
DATA_FORMAT = "qpack-data"
MAX_MANIFEST_BYTES = 4 * 2**20  # a build's manifest is a few kilobytes


def manifest_hash(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own `manifest_hash` field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def manifest_bytes(manifest: dict) -> bytes:
    """The bytes a build writes to manifest.json (indented for people; the hash does not depend on layout)."""
    return readable_json(manifest)


def load_manifest(path: str | os.PathLike) -> dict:
    """Parse a manifest file with the hardened JSON reader; it must be a JSON object."""
    value = read_json(path, "data manifest", MAX_MANIFEST_BYTES)
    if not isinstance(value, dict):
        raise QpackFormatError(path, Reason.BAD_MANIFEST, "data manifest must be a JSON object")
    return value


def data_manifest_hash(data_dir: str | os.PathLike) -> str | None:
    """manifest_hash of DIR/manifest.json, or None when DIR has none (hand-made or foreign shards).

    The trainer records this in every checkpoint and eval compares it, so both name a data folder the same way.
    """
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    return manifest_hash(load_manifest(path))
