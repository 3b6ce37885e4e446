"""PNCounter: a counter that goes up and down (two GCounters, P and N).

Body (version 1): ``[P body, N body]``, each a GCounter body. ``value = P - N``;
each entry is exact up to 2**256 - 1 (see :mod:`.gcounter`).
"""

from __future__ import annotations

from typing import Any, Self

from ._base import CRDT
from ._errors import DecodeError, InvalidValueError
from .gcounter import GCounter, bump

__all__ = ["PNCounter"]


class PNCounter(CRDT):
    """A counter with increments and decrements; ``value`` may be negative."""

    __slots__ = ("_n", "_p")
    TYPE_CODE = 2

    def __init__(self) -> None:
        super().__init__()
        self._p = GCounter()
        self._n = GCounter()

    @property
    def value(self) -> int:
        return self._p.value - self._n.value

    def increment(self, replica: str, n: int = 1) -> PNCounter:
        """Add ``n`` (>= 0); returns the delta."""
        if type(n) is not int or n < 0:
            _check_amount("increment", n)
        delta = PNCounter.__new__(PNCounter)
        delta._sink = None
        delta._p = bump(self._p, replica, n)
        delta._n = GCounter._empty()
        sink = self._sink
        if sink is not None:
            sink(delta)
        return delta

    def decrement(self, replica: str, n: int = 1) -> PNCounter:
        """Subtract ``n`` (>= 0); returns the delta."""
        if type(n) is not int or n < 0:
            _check_amount("decrement", n)
        delta = PNCounter.__new__(PNCounter)
        delta._sink = None
        delta._p = GCounter._empty()
        delta._n = bump(self._n, replica, n)
        sink = self._sink
        if sink is not None:
            sink(delta)
        return delta

    def copy(self) -> Self:
        new = type(self)()
        new._p, new._n = self._p.copy(), self._n.copy()
        return new

    def _absorb(self, other: Self) -> None:
        self._p._absorb(other._p)
        self._n._absorb(other._n)

    def _body(self) -> Any:
        return [self._p._body(), self._n._body()]

    def _body_bytes(self) -> bytes:
        return b"\x92" + self._p._body_bytes() + self._n._body_bytes()

    @classmethod
    def _from_body(cls, body: Any) -> Self:
        if not isinstance(body, list) or len(body) != 2:
            raise DecodeError("PNCounter body must be [P, N]")
        new = cls()
        new._p = GCounter._from_body(body[0])
        new._n = GCounter._from_body(body[1])
        return new

    def modified_by(self) -> frozenset[str]:
        return self._p.modified_by() | self._n.modified_by()

    def prune(self, removed: str, collapse_into: str) -> Self:
        new = type(self)()
        new._p = self._p.prune(removed, collapse_into)
        new._n = self._n.prune(removed, collapse_into)
        return new

    def prune_cleanup(self, removed: str) -> Self:
        new = type(self)()
        new._p = self._p.prune_cleanup(removed)
        new._n = self._n.prune_cleanup(removed)
        return new


def _check_amount(what: str, n: object) -> None:
    if type(n) is not int or n < 0:
        raise InvalidValueError(f"PNCounter.{what} needs an int n >= 0, got {n!r}")
