"""A tiny name -> object registry used for datasets, models, KD methods and formats.

Names are checked in two steps: :func:`check_name` against a static table
(:mod:`abkd_deploy.names`, importable without torch, so the CLI rejects a typo before any
heavy import), then :meth:`Registry.get` returns the registered object.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from abkd_deploy.errors import ConfigError
from abkd_deploy.names import DECLARED

T = TypeVar("T")


def check_name(kind: str, name: object, known: Iterable[str]) -> str:
    """Returns ``name`` in lower case if it is one of ``known``.

    Args:
        kind: What the name is (``"architecture"``), for the message.
        name: The value given by the user.
        known: The accepted names (lower case).

    Raises:
        ConfigError: ``name`` is unknown; the message suggests the closest known name
            (``unknown architecture 'gcnn'; did you mean 'gcn'? expected one of: ...``).
    """
    key = str(name).lower()
    names = sorted(known)
    if key in names:
        return key
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ";"
    raise ConfigError(f"unknown {kind} {name!r}{hint} expected one of: {', '.join(names)}")


class Registry(Generic[T]):
    """Maps names to objects; unknown names raise :class:`ConfigError` listing known ones.

    Args:
        kind: What is registered (used in error messages, e.g. ``"dataset"``). A kind
            listed in :data:`abkd_deploy.names.DECLARED` only accepts the names declared
            there, so that the static table and the registry cannot drift apart.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.declared: tuple[str, ...] | None = DECLARED.get(kind)
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` (lower case)."""

        def deco(obj: T) -> T:
            key = name.lower()
            if key in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            if self.declared is not None and key not in self.declared:
                raise ValueError(
                    f"{self.kind} {name!r} is not declared in abkd_deploy/names.py; add it "
                    "there so that the command line knows it without importing torch"
                )
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Returns the object registered as ``name``.

        Raises:
            ConfigError: ``name`` is unknown; the message suggests the closest name and
                lists the known ones.
        """
        key = check_name(self.kind, name, self.names())
        return self._items[key]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return str(name).lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
