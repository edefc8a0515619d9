"""One generic name -> object registry, shared by tools, rewards and advantage estimators.

It lives in `tools` because `tools` is the bottom of the dependency graph (it imports nothing of ours);
`align.registry` re-exports it. Duplicate names are rejected, unknown names get a close-match
suggestion, and third-party plug-ins arrive through an entry-point group.
"""
from __future__ import annotations

import difflib
from importlib import metadata
from typing import Generic, Iterator, TypeVar

from align.errors import UserError

T = TypeVar("T")


class UnknownNameError(UserError, KeyError):
    """A name that is not registered; the message names the close matches and the known names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str, entry_point_group: str | None = None):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._entry_points_loaded = False

    def register(self, name: str, obj: T | None = None, *, aliases: tuple[str, ...] = (), overwrite: bool = False):
        """Register `obj` under `name` (and aliases). Usable as a decorator when `obj` is omitted."""

        def _add(target: T) -> T:
            for key in (name, *aliases):
                if not overwrite and (key in self._items or key in self._aliases):
                    raise ValueError(f"{self.kind} {key!r} is already registered; pass overwrite=True to replace it")
            self._items[name] = target
            for alias in aliases:
                self._aliases[alias] = name
            return target

        if obj is None:
            return _add
        return _add(obj)

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)
        for alias in [a for a, n in self._aliases.items() if n == name]:
            del self._aliases[alias]

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded or not self.entry_point_group:
            return
        self._entry_points_loaded = True
        for ep in metadata.entry_points(group=self.entry_point_group):
            if ep.name not in self._items:
                self._items[ep.name] = ep.load()

    def resolve(self, name: str) -> str:
        """The canonical name for `name` (an alias or the name itself); raises UnknownNameError."""
        if name in self._items:
            return name
        if name in self._aliases:
            return self._aliases[name]
        self._load_entry_points()
        if name in self._items:
            return name
        known = sorted([*self._items, *self._aliases])
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownNameError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(known)})")

    def get(self, name: str) -> T:
        return self._items[self.resolve(name)]

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._items or name in self._aliases)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


def suggest(name: str, choices: list[str]) -> str:
    """'; did you mean X?' for the closest choice, or ''."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


__all__ = ["Registry", "UnknownNameError", "suggest"]
