"""VectorClock: one logical counter per replica, for causality.

Body (version 1): ``[[replica, counter], ...]`` sorted by replica, zero entries
omitted (the GCounter layout). Counters are exact up to 2**256 - 1.
"""

from __future__ import annotations

import enum
from typing import Any, Self

from ._base import CRDT
from ._codec import check_count, check_replica, count_to_wire
from .gcounter import _counts_from_wire

__all__ = ["Order", "VectorClock"]


class Order(enum.Enum):
    """How two vector clocks relate."""

    BEFORE = "before"
    AFTER = "after"
    EQUAL = "equal"
    CONCURRENT = "concurrent"


class VectorClock(CRDT):
    """A vector clock; merge is the entry-wise maximum."""

    __slots__ = ("_clock",)
    TYPE_CODE = 11

    def __init__(self) -> None:
        super().__init__()
        self._clock: dict[str, int] = {}

    @property
    def value(self) -> dict[str, int]:
        return dict(self._clock)

    def __getitem__(self, replica: str) -> int:
        return self._clock.get(replica, 0)

    def tick(self, replica: str) -> VectorClock:
        """Advance ``replica``'s counter by one; returns the delta."""
        clock = self._clock
        if replica not in clock:
            check_replica(replica)
        n = check_count(clock.get(replica, 0) + 1)
        clock[replica] = n
        delta = VectorClock()
        delta._clock[replica] = n
        return self._emit(delta)

    def compare(self, other: VectorClock) -> Order:
        """``BEFORE`` if self happened before other, ``AFTER``, ``EQUAL`` or ``CONCURRENT``."""
        self._check_same_type(other)
        less = greater = False
        mine, theirs = self._clock, other._clock
        for replica in mine.keys() | theirs.keys():
            a, b = mine.get(replica, 0), theirs.get(replica, 0)
            if a < b:
                less = True
            elif a > b:
                greater = True
            if less and greater:
                return Order.CONCURRENT
        if less:
            return Order.BEFORE
        if greater:
            return Order.AFTER
        return Order.EQUAL

    def dominates(self, other: VectorClock) -> bool:
        """True when every entry of ``other`` is <= the matching entry of ``self``."""
        return self.compare(other) in (Order.AFTER, Order.EQUAL)

    def copy(self) -> Self:
        new = type(self)()
        new._clock = dict(self._clock)
        return new

    def _absorb(self, other: Self) -> None:
        clock = self._clock
        for replica, n in other._clock.items():
            if n > clock.get(replica, 0):
                clock[replica] = n

    def _body(self) -> Any:
        clock = self._clock
        return [[r, count_to_wire(clock[r])] for r in sorted(clock)]

    @classmethod
    def _from_body(cls, body: Any) -> Self:
        new = cls()
        new._clock = _counts_from_wire(body)
        return new

    def modified_by(self) -> frozenset[str]:
        return frozenset(self._clock)

    def prune(self, removed: str, collapse_into: str) -> Self:
        # Akka's VersionVector.prune: drop the removed entry and tick the survivor,
        # so the pruned clock is still after everything the removed replica did.
        new = self.copy()
        if new._clock.pop(removed, None) is not None:
            new._clock[collapse_into] = check_count(new._clock.get(collapse_into, 0) + 1)
        return new

    def prune_cleanup(self, removed: str) -> Self:
        new = self.copy()
        new._clock.pop(removed, None)
        return new
