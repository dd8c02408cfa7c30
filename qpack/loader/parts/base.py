"""Placeholder"""
class QpkLoadError(ValueError):
    pass
_CODECS = {}
