"""A closed name -> class registry with a decorator, as torchao / compressed-tensors use, minus dynamic imports."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from .errors import QpackError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; registering a name twice raises, a failed lookup lists what exists."""

    def __init__(self, kind: str, error: type[QpackError] = QpackError):
        self.kind = kind
        self.error = error
        self._items: dict[str, T] = {}

    def register(self, name: str, set_name: bool = False) -> Callable[[T], T]:
        """Decorator: register the decorated object under `name` (and set its `.name` when `set_name`)."""

        def deco(obj: T) -> T:
            if set_name:
                obj.name = name  # type: ignore[attr-defined]
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        """Register `obj` under `name`; a name may be registered once."""
        if not isinstance(name, str) or not name.isidentifier() and not name.replace("-", "_").isidentifier():
            raise QpackError(f"invalid {self.kind} name {name!r}")
        if name in self._items:
            raise QpackError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj

    def get(self, name: str) -> T:
        """Look `name` up in this table only (names read from files are never imported)."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            known = ", ".join(sorted(self._items)) or "none"
            raise self.error(f"unknown {self.kind} {name!r}; known: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)
