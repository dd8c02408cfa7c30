"""Imports the built-in codec modules so that they register."""
from . import raw  # noqa: F401
