"""A tiny name -> object registry used for datasets, models, KD methods and formats."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from abkd_deploy.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; unknown names raise :class:`ConfigError` listing known ones.

    Args:
        kind: What is registered (used in error messages, e.g. ``"dataset"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` (lower case)."""

        def deco(obj: T) -> T:
            key = name.lower()
            if key in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Returns the object registered as ``name``.

        Raises:
            ConfigError: ``name`` is unknown; the message lists the known names.
        """
        key = str(name).lower()
        if key not in self._items:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; expected one of: {', '.join(self.names())}"
            )
        return self._items[key]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return str(name).lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
