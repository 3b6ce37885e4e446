"""TwoPhaseSet: a set whose members can be removed once and never come back.

Body (version 1): ``[added, removed]``, each a list of members sorted by their
msgpack bytes (the GSet body, see :mod:`.gset`). ``removed`` holds the
tombstones; ``added`` holds the members added and *not* removed, so the two
lists are disjoint (decode refuses a member in both).

Semantics: the state is a pair of grow-only sets (A, R) and ``value = A - R``;
merge is the union of each side. We store ``(A - R, R)`` instead of ``(A, R)``:
the join of normalised pairs is the normalised join, so merge stays a join, and
a removed member is kept once (as its tombstone) instead of twice.

- ``remove(x)`` records a tombstone even when ``x`` was never seen here, so a
  concurrent or later ``add(x)`` from any replica is cancelled when the states
  meet ("remove wins", forever).
- ``add(x)`` of a member this replica already knows to be removed raises
  :class:`InvalidValueError` instead of silently doing nothing.

Limits: tombstones are never collected; a set that churns through many distinct
members grows without bound (use an ORSet for that). Members are the
:mod:`._codec` elements (hashable plain data). The set stores no replica ids,
so there is nothing to prune.
"""

from __future__ import annotations

from typing import Any, Self

from ._base import CRDT
from ._codec import check_element, sorted_elements
from ._errors import DecodeError, InvalidValueError
from .gset import elements_from_wire

__all__ = ["TwoPhaseSet"]


class TwoPhaseSet(CRDT):
    """Add and remove members; a removed member can never be added again."""

    __slots__ = ("_added", "_removed")
    TYPE_CODE = 4

    def __init__(self) -> None:
        super().__init__()
        self._added: set[Any] = set()  # live members only: disjoint from _removed
        self._removed: set[Any] = set()

    @property
    def value(self) -> frozenset[Any]:
        """The live members (added and not removed)."""
        return frozenset(self._added)

    @property
    def tombstones(self) -> frozenset[Any]:
        """Every member ever removed (they can never be added again)."""
        return frozenset(self._removed)

    def __contains__(self, element: object) -> bool:
        return element in self._added

    def __len__(self) -> int:
        return len(self._added)

    def add(self, element: Any) -> TwoPhaseSet:
        """Add ``element``; returns the delta.

        Raises :class:`InvalidValueError` when ``element`` is not a valid member
        or was already removed (known to this replica).
        """
        check_element(element)
        if element in self._removed:
            raise InvalidValueError(
                f"TwoPhaseSet: {element!r} was removed and can never be added again"
            )
        self._added.add(element)
        return self._emit(self._delta({element}, set()))

    def remove(self, element: Any) -> TwoPhaseSet:
        """Remove ``element`` for good; returns the delta (its tombstone).

        Works for a member never seen here too: the tombstone cancels any
        concurrent add and blocks every future one.
        """
        check_element(element)
        self._added.discard(element)
        self._removed.add(element)
        return self._emit(self._delta(set(), {element}))

    @staticmethod
    def _delta(added: set[Any], removed: set[Any]) -> TwoPhaseSet:
        delta = TwoPhaseSet.__new__(TwoPhaseSet)
        delta._sink = None
        delta._added, delta._removed = added, removed
        return delta

    def copy(self) -> Self:
        new = type(self)()
        new._added = set(self._added)
        new._removed = set(self._removed)
        return new

    def _absorb(self, other: Self) -> None:
        removed = self._removed
        removed |= other._removed
        added = self._added
        # work proportional to ``other`` (a delta is small), not to ``self``
        added |= other._added - removed
        added -= other._removed

    def _body(self) -> Any:
        return [sorted_elements(self._added), sorted_elements(self._removed)]

    @classmethod
    def _from_body(cls, body: Any) -> Self:
        if not isinstance(body, list) or len(body) != 2:
            raise DecodeError("TwoPhaseSet body must be [added, removed]")
        added = elements_from_wire(body[0])
        removed = elements_from_wire(body[1])
        if not added.isdisjoint(removed):
            raise DecodeError("TwoPhaseSet member is both live and removed (not canonical)")
        new = cls()
        new._added, new._removed = added, removed
        return new
