"""Imports the built-in quantizer modules so that they register."""
from . import gptq, gptq_lite, rtn, sdclip  # noqa: F401
from . import sdclip_gptq, uniform  # noqa: F401
