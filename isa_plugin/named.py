"""A registry of named strategy objects (selection modes, executors): one rule for registering and finding them."""

from __future__ import annotations

from typing import Dict, Generic, TypeVar

__all__ = ["NamedRegistry"]

T = TypeVar("T")


class NamedRegistry(Generic[T]):
    """Objects of one base class, found by their ``name`` attribute.

    Args:
        kind: what the objects are, for messages (``"selection mode"``, ``"executor"``).
        base: the class every registered object must be an instance of.

    Example:
        >>> reg = NamedRegistry("executor", object)
    """

    def __init__(self, kind: str, base: type):
        self.kind, self.base = kind, base
        self._items: Dict[str, T] = {}

    def register(self, item: T) -> T:
        """Add ``item`` under ``item.name`` (registering an instance of the same class again replaces it).

        Raises:
            TypeError: not an instance of the base class. ValueError: no name, or the name is taken by another class.
        """
        if not isinstance(item, self.base):
            raise TypeError(f"a {self.kind} must be a {self.base.__name__} instance, got {type(item).__name__}")
        name = getattr(item, "name", None)
        if not name or not isinstance(name, str):
            raise ValueError(f"{type(item).__name__}.name must be a non-empty string")
        old = self._items.get(name)
        same = old is not None and (type(old).__module__, type(old).__qualname__) == (type(item).__module__, type(item).__qualname__)
        if old is not None and not same:  # a reloaded module registers its (new) class again
            raise ValueError(f"a {self.kind} named {name!r} is already registered ({type(old).__name__})")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        """The object registered as ``name``.

        Raises:
            ValueError: nothing is registered under that name (the message lists what is).
        """
        item = self._items.get(name)
        if item is None:
            raise ValueError(f"{self.kind} {name!r} is not registered; registered: {sorted(self._items)}")
        return item

    def remove(self, name: str) -> None:
        self._items.pop(name, None)

    def all(self) -> Dict[str, T]:
        """Name -> object, in registration order."""
        return dict(self._items)
