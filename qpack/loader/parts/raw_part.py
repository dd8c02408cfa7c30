"""Loader part: the `raw` codec (bytes stored as they are)."""
from .base import _CODECS

# PART
_CODECS["raw"] = (lambda items: [bytes(d) for d, n, p in items], {})
