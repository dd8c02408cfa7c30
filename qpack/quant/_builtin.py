"""Imports the built-in quantizer modules so that they register."""
from . import rtn  # noqa: F401
