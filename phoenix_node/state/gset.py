"""GSet: a grow-only set.

Body (version 1): the members, sorted by their msgpack bytes (see :mod:`._codec`
for what a member may be).
"""

from __future__ import annotations

from typing import Any, Self

from ._base import CRDT
from ._codec import check_element, element_from_wire, sort_key, sorted_elements
from ._errors import DecodeError

__all__ = ["GSet"]


class GSet(CRDT):
    """A set that only grows; merge is union."""

    __slots__ = ("_items",)
    TYPE_CODE = 3

    def __init__(self) -> None:
        super().__init__()
        self._items: set[Any] = set()

    @property
    def value(self) -> frozenset[Any]:
        return frozenset(self._items)

    def __contains__(self, element: object) -> bool:
        return element in self._items

    def __len__(self) -> int:
        return len(self._items)

    def add(self, element: Any) -> GSet:
        """Add ``element``; returns the delta (a GSet holding just it)."""
        check_element(element)
        self._items.add(element)
        delta = GSet()
        delta._items.add(element)
        return self._emit(delta)

    def copy(self) -> Self:
        new = type(self)()
        new._items = set(self._items)
        return new

    def _absorb(self, other: Self) -> None:
        self._items |= other._items

    def _body(self) -> Any:
        return sorted_elements(self._items)

    @classmethod
    def _from_body(cls, body: Any) -> Self:
        new = cls()
        new._items = elements_from_wire(body)
        return new


def elements_from_wire(body: Any) -> set[Any]:
    """Decode a canonical sorted member list (shared by the set types)."""
    if not isinstance(body, list):
        raise DecodeError("set body must be an array")
    items: set[Any] = set()
    previous: bytes | None = None
    for obj in body:
        element = element_from_wire(obj)
        key = sort_key(element)
        if previous is not None and key <= previous:
            raise DecodeError("set members are not in canonical order")
        previous = key
        items.add(element)
    return items
