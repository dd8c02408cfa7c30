"""Lossless codec plugins. Built-ins register on import; third parties use the `qpack.codecs` entry points."""
from .base import CODECS, Codec, CodecError, codec_names, load_plugins, make_codec, parse_codec, register_codec
from . import _builtin  # noqa: F401,E402  (registers the built-in codecs)

__all__ = ["CODECS", "Codec", "CodecError", "codec_names", "load_plugins", "make_codec", "parse_codec", "register_codec"]
