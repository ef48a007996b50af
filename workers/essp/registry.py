"""One small type for every "name -> thing" table of ESSP: stages, extractors, fusion strategies and
architectures. Registration is open (the paper's §3.3): a plugin registers under a new name, the
pipeline never changes. The DAGs' trigger forms list the registered names (their enums come from here,
not from copies), and an unknown name gets one error that lists the known ones."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from essp.errors import EsspError

T = TypeVar("T")


class UnknownName(EsspError, ValueError):
    """A name that no entry of the registry has."""


class Registry(Generic[T]):
    """Names of one ``kind`` ("stage", "extractor", ...) mapped to their things, in registration order."""

    def __init__(self, kind: str, *, unknown: type[Exception] = UnknownName) -> None:
        self.kind = kind
        self.unknown = unknown
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        """Register ``item`` under ``name``; the same item again is a no-op (a module imported twice)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        existing = self._items.get(name)
        if existing is not None and not _same(existing, item):
            raise ValueError(f"{self.kind} {name!r} is already registered by {_origin(existing)}")
        self._items[name] = item
        return item

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda item: self.add(name, item)

    def remove(self, name: str) -> None:
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            known = ", ".join(self._items) or "none"
            raise self.unknown(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)


def _same(a: object, b: object) -> bool:
    """The same entry again: the same object, an equal value, or a class or function of the same name
    from a module imported once more."""
    return a is b or a == b or (hasattr(b, "__qualname__") and _origin(a) == _origin(b))


def _origin(item: object) -> str:
    """Where an entry was defined (module.qualname), to tell a re-import from a clash."""
    module = getattr(item, "__module__", None) or type(item).__module__
    name = getattr(item, "__qualname__", None) or type(item).__qualname__
    return f"{module}.{name}"
