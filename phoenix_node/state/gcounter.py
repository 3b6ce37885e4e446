"""GCounter: a grow-only counter (one non-negative entry per replica).

Body (version 1): ``[[replica, count], ...]`` sorted by replica, zero entries
omitted; ``count`` is an int up to 2**64 - 1 or big-endian bytes above (see
:func:`._codec.count_to_wire`). Entries are exact up to 2**256 - 1 each; an
increment past that raises :class:`CounterOverflowError`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Self

from ._base import CRDT
from ._codec import (
    MAX_COUNT,
    check_count,
    check_replica,
    count_from_wire,
    count_to_wire,
    pack,
    replica_from_wire,
)
from ._errors import CounterOverflowError, DecodeError, InvalidValueError

__all__ = ["GCounter"]

_UINT64_MAX = 2**64 - 1


@lru_cache(maxsize=1024)
def _packed_replica(replica: str) -> bytes:
    return pack(replica)


class GCounter(CRDT):
    """A grow-only counter. ``value`` is the sum of every replica's entry."""

    __slots__ = ("_counts",)
    TYPE_CODE = 1

    def __init__(self) -> None:
        super().__init__()
        self._counts: dict[str, int] = {}

    @property
    def value(self) -> int:
        return sum(self._counts.values())

    def increment(self, replica: str, n: int = 1) -> GCounter:
        """Add ``n`` (>= 0) to ``replica``'s entry; returns the delta."""
        if type(n) is not int or n < 0:
            raise InvalidValueError(f"GCounter.increment needs an int n >= 0, got {n!r}")
        delta = bump(self, replica, n)
        sink = self._sink
        if sink is not None:
            sink(delta)
        return delta

    def entry(self, replica: str) -> int:
        """``replica``'s own contribution."""
        return self._counts.get(replica, 0)

    def copy(self) -> Self:
        new = type(self)()
        new._counts = dict(self._counts)
        return new

    def _absorb(self, other: Self) -> None:
        counts = self._counts
        for replica, n in other._counts.items():
            if n > counts.get(replica, 0):
                counts[replica] = n

    def _body(self) -> Any:
        counts = self._counts
        if len(counts) <= 1:  # the common case of a counter written by one replica
            return [[r, count_to_wire(n)] for r, n in counts.items() if n]
        return [[r, count_to_wire(counts[r])] for r in sorted(counts) if counts[r]]

    def _body_bytes(self) -> bytes:
        counts = self._counts
        if not counts:
            return b"\x90"
        if len(counts) == 1:
            for replica, n in counts.items():
                if 0 < n <= _UINT64_MAX:
                    return b"\x91\x92" + _packed_replica(replica) + pack(n)
        return pack(self._body())

    @classmethod
    def _empty(cls) -> GCounter:
        """An empty counter without the constructor chain (hot path of PNCounter)."""
        new = GCounter.__new__(GCounter)
        new._sink = None
        new._counts = {}
        return new

    @classmethod
    def _from_body(cls, body: Any) -> Self:
        new = cls()
        new._counts = _counts_from_wire(body)
        return new

    def modified_by(self) -> frozenset[str]:
        return frozenset(self._counts)

    def prune(self, removed: str, collapse_into: str) -> Self:
        new = self.copy()
        n = new._counts.pop(removed, 0)
        if n:
            new._counts[collapse_into] = check_count(new._counts.get(collapse_into, 0) + n)
        return new

    def prune_cleanup(self, removed: str) -> Self:
        new = self.copy()
        new._counts.pop(removed, None)
        return new


def bump(counter: GCounter, replica: str, n: int) -> GCounter:
    """Add ``n`` (an int >= 0, checked by the caller) to ``replica``'s entry in place and
    return the delta, without emitting it. Shared with PNCounter: this is the hot path
    of every counter update, so it is one frame with no further calls."""
    counts = counter._counts
    total = counts.get(replica, 0) + n
    if total > MAX_COUNT:
        raise CounterOverflowError(f"counter entry {total} exceeds 2**256 - 1")
    if replica not in counts:
        check_replica(replica)
    counts[replica] = total
    delta = GCounter.__new__(GCounter)
    delta._sink = None
    delta._counts = {replica: total}
    return delta


def _counts_from_wire(body: Any) -> dict[str, int]:
    if not isinstance(body, list):
        raise DecodeError("counter body must be an array")
    counts: dict[str, int] = {}
    previous = None
    for item in body:
        if not isinstance(item, list) or len(item) != 2:
            raise DecodeError("counter entry must be [replica, count]")
        replica = replica_from_wire(item[0])
        if previous is not None and replica <= previous:
            raise DecodeError("counter entries are not sorted by replica")
        n = count_from_wire(item[1])
        if n == 0:
            raise DecodeError("zero counter entry in canonical encoding")
        counts[replica] = n
        previous = replica
    return counts
