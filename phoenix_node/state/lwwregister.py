"""LWWRegister: a last-writer-wins register holding one plain value.

Body (version 1)::

    []                        never written
    [timestamp, replica, value]

``timestamp`` is a hybrid-logical-clock int in ``[0, 2**63)`` (see :mod:`.hlc`),
``replica`` the writer's replica id, ``value`` a canonical plain value (see
:func:`._codec.canonical_value`: dicts with sorted str keys, tuples as lists).

Semantics:

- The winner of two writes is the larger ``(timestamp, replica, sort_key(value))``;
  the last part keeps merge deterministic when one replica is given the same
  explicit timestamp twice (``sort_key`` is the msgpack bytes, so ``1``,
  ``1.0`` and ``True`` are distinct values with a fixed order).
- ``set(..., timestamp=None)`` takes its timestamp from :data:`.hlc.DEFAULT_CLOCK`
  after letting the clock observe the register's current timestamp, so a
  replica's own write always supersedes what it has seen. An explicit
  timestamp is used as given: an older one loses (the delta still carries it).
- Pruning: none is needed. The register keeps one replica id, only as a
  tie-breaker; it is not per-replica data and does not grow, and any later
  write replaces it. Rewriting it to another id would change the order against
  a concurrent write with the same timestamp (merge would then depend on
  whether pruning ran first), and ``prune_cleanup`` could not know the new id.
  So ``modified_by()`` is empty and the pruning hooks return copies.
"""

from __future__ import annotations

from typing import Any, Self

from . import hlc
from ._base import CRDT
from ._codec import canonical_value, check_replica, replica_from_wire, sort_key, value_from_wire
from ._errors import DecodeError

__all__ = ["LWWRegister", "copy_value", "same_bytes"]


def copy_value(value: Any) -> Any:
    """A copy of a canonical plain value that a caller may change freely."""
    if isinstance(value, list):
        return [copy_value(v) for v in value]
    if isinstance(value, dict):
        return {k: copy_value(v) for k, v in value.items()}
    return value


_EXACT_TYPES = frozenset((str, bytes, int, type(None)))


def same_bytes(x: Any, y: Any) -> bool:
    """A cheap sure "x and y encode alike" (False means: compare their sort keys).

    Python equality is not enough: ``1 == 1.0 == True`` and ``0.0 == -0.0``.
    """
    return x is y or (type(x) is type(y) and type(x) in _EXACT_TYPES and x == y)


class LWWRegister(CRDT):
    """A register whose value is the one written with the largest timestamp."""

    __slots__ = ("_replica", "_ts", "_value")
    TYPE_CODE = 6

    def __init__(self) -> None:
        super().__init__()
        # never written: ts -1 (below every valid timestamp), replica ""
        self._ts = -1
        self._replica = ""
        self._value: Any = None

    @property
    def value(self) -> Any:
        """The winning value (a copy), or None when never written."""
        return copy_value(self._value)

    @property
    def timestamp(self) -> int | None:
        """The winning write's timestamp, or None when never written."""
        return None if self._ts < 0 else self._ts

    @property
    def replica(self) -> str | None:
        """The replica that made the winning write, or None when never written."""
        return self._replica or None

    def set(self, replica: str, value: Any, timestamp: int | None = None) -> LWWRegister:
        """Write ``value`` as ``replica``; returns the delta (a register holding the write).

        With ``timestamp=None`` the write gets a fresh clock timestamp greater than
        the current one. Raises InvalidValueError for a value that is not plain data,
        a bad replica id or a timestamp outside ``[0, 2**63)``.
        """
        check_replica(replica)
        stored = canonical_value(value)
        if timestamp is None:
            current = self._ts
            clock = hlc.DEFAULT_CLOCK
            ts = clock.now() if current < 0 else clock.update(current)
        else:
            ts = hlc.check_timestamp(timestamp)
        delta = LWWRegister.__new__(LWWRegister)
        delta._sink = None
        delta._ts, delta._replica, delta._value = ts, replica, stored
        self._absorb(delta)
        return self._emit(delta)

    def copy(self) -> Self:
        new = type(self)()
        new._ts, new._replica, new._value = self._ts, self._replica, self._value
        return new

    def _absorb(self, other: Self) -> None:
        ts, mine = other._ts, self._ts
        if ts < mine:
            return
        if ts == mine:
            replica = other._replica
            if replica < self._replica:
                return
            # same (timestamp, replica): only explicit timestamps get here
            if replica == self._replica and (
                same_bytes(other._value, self._value)
                or sort_key(other._value) <= sort_key(self._value)
            ):
                return
        self._ts, self._replica, self._value = ts, other._replica, other._value

    def _body(self) -> Any:
        if self._ts < 0:
            return []
        return [self._ts, self._replica, self._value]

    @classmethod
    def _from_body(cls, body: Any) -> Self:
        if not isinstance(body, list) or len(body) not in (0, 3):
            raise DecodeError("register body must be [] or [timestamp, replica, value]")
        new = cls()
        if body:
            new._ts = hlc.timestamp_from_wire(body[0])
            new._replica = replica_from_wire(body[1])
            new._value = value_from_wire(body[2])
        return new

    def __repr__(self) -> str:
        return f"LWWRegister({self._value!r}, timestamp={self.timestamp}, replica={self.replica!r})"
