"""Rebuild a model from a checkpoint/artifact config: `{"arch": NAME, ...}` -> nn.Module.

Names come from qpack's built-in models (`gpt`: qpack.models.gpt, the reference GPT with every seed switch), the
entry-point group `qpack.models` (plugins), or `register_model`.
A name read from a file is only ever looked up, never imported; `load_model_factory("module:factory")` imports,
and exists for the CLI's `--arch`, where a person typed the string.
"""
from __future__ import annotations

import importlib
import re
from typing import Any, Callable

from ..errors import QpackError, QpackInputError

ENTRY_POINT_GROUP = "qpack.models"
ModelFactory = Callable[[dict], Any]  # config dict (arch included) -> torch.nn.Module

_REGISTERED: dict[str, ModelFactory] = {}
#: built-in arch names -> the submodule of qpack.models that defines `build_from_config` (imported on first use)
_BUILTIN: dict[str, str] = {"gpt": "gpt"}
_SPEC_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def register_model(name: str, factory: ModelFactory) -> None:
    """Register `factory` under `name` in this process (plugins and tests); a name may be registered once."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w-]*", name):
        raise QpackError(f"invalid model name {name!r}")
    if name in _REGISTERED or name in _BUILTIN:
        raise QpackError(f"model {name!r} is already registered")
    if not callable(factory):
        raise QpackError(f"model factory for {name!r} is not callable")
    _REGISTERED[name] = factory


def unregister_model(name: str) -> None:
    """Remove a name added with `register_model` (tests clean up with it)."""
    _REGISTERED.pop(name, None)


def _entry_points() -> dict:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def model_names() -> list[str]:
    """Every arch name build_model can resolve: registered ones and installed entry points."""
    return sorted(set(_BUILTIN) | set(_REGISTERED) | set(_entry_points()))


def get_model_factory(arch: str) -> ModelFactory:
    """The factory registered for `arch`; an unknown name raises QpackInputError listing the known ones."""
    if arch in _REGISTERED:
        return _REGISTERED[arch]
    if isinstance(arch, str) and arch in _BUILTIN:
        return importlib.import_module(f"{__name__}.{_BUILTIN[arch]}").build_from_config
    eps = _entry_points()
    ep = eps.get(arch) if isinstance(arch, str) else None
    if ep is None:
        known = ", ".join(model_names()) or "none"
        raise QpackInputError(f"unknown model arch {arch!r}; known: {known} "
                              "(or pass --arch module:factory)")
    try:
        factory = ep.load()
    except Exception as exc:  # a broken plugin is reported, not a traceback
        raise QpackError(f"model arch {arch!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}") from None
    if not callable(factory):
        raise QpackError(f"model arch {arch!r} ({ep.value}) is not callable")
    return factory


def load_model_factory(spec: str, flag: str = "--arch") -> ModelFactory:
    """Import `module:factory` (dots allowed in both parts). Only for strings a person typed (--arch, --forward)."""
    if not isinstance(spec, str) or not _SPEC_RE.match(spec):
        what = "factory" if flag == "--arch" else "function"
        raise QpackInputError(f"{flag} must look like module.path:{what}, got {spec!r}")
    module_name, attr = spec.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise QpackInputError(f"{flag} {spec}: cannot import {module_name!r}: {exc}") from None
    except Exception as exc:  # the module itself raised while importing: still one line for the user
        raise QpackInputError(f"{flag} {spec}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise QpackInputError(f"{flag} {spec}: {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise QpackInputError(f"{flag} {spec}: {attr!r} is not callable")
    return obj


def build_model(config: dict, factory: ModelFactory | None = None):
    """Build the nn.Module a config describes: `factory` if given (from --arch), else the one named by config["arch"]."""
    import torch.nn as nn

    if not isinstance(config, dict):
        raise QpackInputError(f"a model config must be a JSON object, got {type(config).__name__}")
    if factory is None:
        arch = config.get("arch")
        if not isinstance(arch, str) or not arch:
            raise QpackInputError("the model config names no \"arch\"; pass --arch module:factory to say which "
                                  f"model it is (known archs: {', '.join(model_names()) or 'none'})")
        factory = get_model_factory(arch)
    name = config.get("arch", getattr(factory, "__qualname__", "factory"))
    try:
        model = factory(dict(config))
    except (TypeError, ValueError, KeyError) as exc:
        raise QpackInputError(f"model config does not fit arch {name!r}: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise QpackError(f"model factory for {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
