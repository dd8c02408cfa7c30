"""Imports the built-in codec modules so that they register."""
from . import ans_codec, ans_cols_codec, ans_ctx_codec, brotli_codec, lzma_codec, raw, zlib_codec, zstd_codec  # noqa: F401
