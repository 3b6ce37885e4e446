"""ORSet: an add-wins observed-remove set with dots and a causal context.

The optimized add-wins OR-Set of Almeida et al., "Delta State Replicated Data
Types" (AWORSet), as in Akka's ``ORSet``. Each add tags the element with a fresh
*dot* ``(replica, counter)``; the *causal context* records every dot the state
has seen. A dot that is in the context but in no entry was removed, so removes
need no tombstones. An add on one replica concurrent with a remove on another
wins: the remove only covers the dots it observed.

Body (version 1)::

    [entries, vv, cloud]
    entries = [[element, [[replica, counter], ...]], ...]
    vv      = [[replica, counter], ...]
    cloud   = [[replica, counter], ...]

- ``entries``: the present elements, sorted by their msgpack bytes (see
  :func:`._codec.sort_key`), each with its non-empty list of dots sorted by
  ``(replica, counter)``. A dot belongs to one element only.
- ``vv``: the version vector of the context, sorted by replica: every dot
  ``(replica, 1..counter)`` was seen. Counters are >= 1.
- ``cloud``: seen dots beyond the vector (deltas arrive out of order), sorted
  by ``(replica, counter)``. The context is always compacted: a cloud dot is
  never ``<= vv[replica] + 1`` (it would be part of the vector).
- Every dot of ``entries`` is covered by the context.

Counters are written as in :func:`._codec.count_to_wire`. Decode refuses any
non-canonical or inconsistent body, so equal states give equal bytes.

Deltas: ``add`` returns the element with its new dot and a context of that dot
plus the element's older dots (the add supersedes them); ``remove`` returns an
empty set whose context is the removed element's dots. Deltas may be merged in
any order and more than once: the dot cloud keeps out-of-order contexts exact.

Limits: elements are plain hashable data (see :mod:`._codec`). Elements that
are equal in Python but distinct on the wire (``1``, ``1.0``, ``True``) share
one entry, as in :class:`.GSet`; do not mix them in one set.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Self

from ._base import CRDT
from ._codec import (
    _element_to_wire,
    check_count,
    check_element,
    check_replica,
    count_from_wire,
    count_to_wire,
    element_from_wire,
    replica_from_wire,
    sort_key,
)
from ._errors import DecodeError
from .gcounter import _counts_from_wire

__all__ = ["ORSet"]

Dot = tuple[str, int]

_MISSING = object()


class ORSet(CRDT):
    """An add-wins observed-remove set; ``value`` is a frozenset of the elements."""

    __slots__ = ("_cloud", "_entries", "_owner", "_vv")
    TYPE_CODE = 5

    def __init__(self) -> None:
        super().__init__()
        #: element -> its dots
        self._entries: dict[Any, set[Dot]] = {}
        #: replica -> counter -> element: the same dots, indexed so that a join
        #: with a small delta costs the size of the delta, not of the set.
        self._owner: dict[str, dict[int, Any]] = {}
        #: the causal context: contiguous part and out-of-order dots
        self._vv: dict[str, int] = {}
        self._cloud: dict[str, set[int]] = {}

    # --- reading -------------------------------------------------------------------

    @property
    def value(self) -> frozenset[Any]:
        return frozenset(self._entries)

    def __contains__(self, element: object) -> bool:
        return element in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def elements(self) -> Iterator[Any]:
        """Iterate over the present elements (do not mutate the set meanwhile)."""
        return iter(self._entries)

    # --- mutators ------------------------------------------------------------------

    def add(self, replica: str, element: Any) -> ORSet:
        """Add ``element`` as ``replica``; returns the delta.

        The element gets a fresh dot that replaces the dots it had: the delta's
        context covers them, so this add wins over every remove concurrent with it
        and supersedes earlier adds.
        """
        check_element(element)
        if replica not in self._vv and replica not in self._cloud:
            check_replica(replica)
        dot = (replica, check_count(self._max_counter(replica) + 1))
        old = self._entries.get(element)
        if old:
            self._drop_owner(old)
        self._entries[element] = {dot}
        self._owner.setdefault(replica, {})[dot[1]] = element
        _context_add(self._vv, self._cloud, replica, dot[1])

        delta = ORSet._blank()
        delta._entries[element] = {dot}
        delta._owner[replica] = {dot[1]: element}
        delta._context_add_all(old or ())
        _context_add(delta._vv, delta._cloud, replica, dot[1])
        return self._emit(delta)

    def remove(self, element: Any) -> ORSet:
        """Remove ``element`` (the adds this replica has seen); returns the delta.

        Removing an absent element changes nothing and returns an empty delta.
        """
        check_element(element)
        delta = ORSet._blank()
        dots = self._entries.pop(element, None)
        if dots:
            self._drop_owner(dots)
            delta._context_add_all(dots)
        return self._emit(delta)

    # --- the lattice ---------------------------------------------------------------

    def copy(self) -> Self:
        new = type(self)()
        new._entries = {e: set(dots) for e, dots in self._entries.items()}
        new._owner = {r: dict(by_counter) for r, by_counter in self._owner.items()}
        new._vv = dict(self._vv)
        new._cloud = {r: set(counters) for r, counters in self._cloud.items()}
        return new

    def _absorb(self, other: Self) -> None:
        if other is self:
            return
        # Order matters: both steps read the contexts *before* they are joined.
        for dot in self._dots_removed_by(other):
            self._discard_dot(dot)
        self._add_unseen_dots(other)
        for replica, n in other._vv.items():
            if n > self._vv.get(replica, 0):
                self._raise_vv(replica, n)
        for replica, counters in other._cloud.items():
            for counter in counters:
                _context_add(self._vv, self._cloud, replica, counter)

    def _dots_removed_by(self, other: ORSet) -> list[Dot]:
        """Own dots that ``other`` has seen but no longer holds for the same element."""
        removed: list[Dot] = []
        owner = self._owner
        theirs = other._owner
        for replica, n in other._vv.items():
            mine = owner.get(replica)
            if not mine:
                continue
            if len(mine) <= n:
                covered: Iterable[int] = [c for c in mine if c <= n]
            else:
                covered = [c for c in range(1, n + 1) if c in mine]
            their_r = theirs.get(replica, {})
            for c in covered:
                if their_r.get(c, _MISSING) != mine[c]:
                    removed.append((replica, c))
        for replica, counters in other._cloud.items():
            mine = owner.get(replica)
            if not mine:
                continue
            their_r = theirs.get(replica, {})
            for c in counters:
                if c in mine and their_r.get(c, _MISSING) != mine[c]:
                    removed.append((replica, c))
        return removed

    def _add_unseen_dots(self, other: ORSet) -> None:
        """Take ``other``'s dots that this state's context has not seen."""
        vv, cloud, entries, owner = self._vv, self._cloud, self._entries, self._owner
        for replica, their_r in other._owner.items():
            seen = vv.get(replica, 0)
            seen_cloud = cloud.get(replica, ())
            for c, element in their_r.items():
                if c <= seen or c in seen_cloud:
                    continue
                entries.setdefault(element, set()).add((replica, c))
                owner.setdefault(replica, {})[c] = element

    def _discard_dot(self, dot: Dot) -> None:
        replica, c = dot
        by_counter = self._owner[replica]
        element = by_counter.pop(c)
        if not by_counter:
            del self._owner[replica]
        dots = self._entries[element]
        dots.discard(dot)
        if not dots:
            del self._entries[element]

    def _drop_owner(self, dots: Iterable[Dot]) -> None:
        owner = self._owner
        for replica, c in dots:
            by_counter = owner[replica]
            del by_counter[c]
            if not by_counter:
                del owner[replica]

    # --- the causal context --------------------------------------------------------

    @classmethod
    def _blank(cls) -> ORSet:
        new = ORSet.__new__(ORSet)
        new._sink = None
        new._entries, new._owner, new._vv, new._cloud = {}, {}, {}, {}
        return new

    def _max_counter(self, replica: str) -> int:
        n = self._vv.get(replica, 0)
        cloud = self._cloud.get(replica)
        return max(n, max(cloud)) if cloud else n

    def _context_add_all(self, dots: Iterable[Dot]) -> None:
        for replica, c in dots:
            _context_add(self._vv, self._cloud, replica, c)

    def _raise_vv(self, replica: str, n: int) -> None:
        self._vv[replica] = n
        cloud = self._cloud.get(replica)
        if cloud:
            cloud.difference_update([c for c in cloud if c <= n])
            _compact(self._vv, self._cloud, replica)

    # --- encoding ------------------------------------------------------------------

    def _body(self) -> Any:
        entries = self._entries
        ordered = sorted((sort_key(e), e) for e in entries)
        return [
            [[_element_to_wire(e), _dots_to_wire(entries[e])] for _, e in ordered],
            [[r, count_to_wire(self._vv[r])] for r in sorted(self._vv)],
            _dots_to_wire((r, c) for r, counters in self._cloud.items() for c in counters),
        ]

    @classmethod
    def _from_body(cls, body: Any) -> Self:
        if not isinstance(body, list) or len(body) != 3:
            raise DecodeError("ORSet body must be [entries, vv, cloud]")
        new = cls()
        new._vv = _counts_from_wire(body[1])
        for replica, c in _dots_from_wire(body[2]):
            if c <= new._vv.get(replica, 0) + 1:
                raise DecodeError("ORSet context is not compacted")
            new._cloud.setdefault(replica, set()).add(c)
        new._entries_from_wire(body[0])
        return new

    def _entries_from_wire(self, obj: Any) -> None:
        if not isinstance(obj, list):
            raise DecodeError("ORSet entries must be an array")
        previous: bytes | None = None
        for item in obj:
            if not isinstance(item, list) or len(item) != 2:
                raise DecodeError("ORSet entry must be [element, dots]")
            element = element_from_wire(item[0])
            key = sort_key(element)
            if previous is not None and key <= previous:
                raise DecodeError("ORSet elements are not in canonical order")
            previous = key
            if element in self._entries:
                raise DecodeError("ORSet element appears twice")
            dots = _dots_from_wire(item[1])
            if not dots:
                raise DecodeError("ORSet element without dots")
            for replica, c in dots:
                by_counter = self._owner.setdefault(replica, {})
                if c in by_counter:
                    raise DecodeError("ORSet dot belongs to two elements")
                if not self._covers(replica, c):
                    raise DecodeError("ORSet dot is not covered by the causal context")
                by_counter[c] = element
            self._entries[element] = set(dots)

    def _covers(self, replica: str, c: int) -> bool:
        return c <= self._vv.get(replica, 0) or c in self._cloud.get(replica, ())

    # --- removed-replica pruning ---------------------------------------------------

    def modified_by(self) -> frozenset[str]:
        return frozenset(self._vv.keys() | self._cloud.keys())

    def prune(self, removed: str, collapse_into: str) -> Self:
        """A copy where ``removed``'s dots are re-issued as new dots of ``collapse_into``.

        ``collapse_into`` must be the replica that performs the pruning (its own
        id), because the new dots are minted in its name; ``value`` is unchanged.
        """
        check_replica(collapse_into)
        new = self.copy()
        if removed == collapse_into:
            return new
        affected = {new._owner[removed][c] for c in new._owner.get(removed, {})}
        new._forget(removed)
        for element in sorted(affected, key=sort_key):
            c = check_count(new._max_counter(collapse_into) + 1)
            new._entries.setdefault(element, set()).add((collapse_into, c))
            new._owner.setdefault(collapse_into, {})[c] = element
            _context_add(new._vv, new._cloud, collapse_into, c)
        return new

    def prune_cleanup(self, removed: str) -> Self:
        """A copy without ``removed``'s dots and context entries."""
        new = self.copy()
        new._forget(removed)
        return new

    def _forget(self, removed: str) -> None:
        for c in list(self._owner.get(removed, ())):
            self._discard_dot((removed, c))
        self._vv.pop(removed, None)
        self._cloud.pop(removed, None)


def _context_add(vv: dict[str, int], cloud: dict[str, set[int]], replica: str, c: int) -> None:
    """Add dot ``(replica, c)`` to a context, keeping it compacted."""
    n = vv.get(replica, 0)
    if c <= n:
        return
    if c == n + 1:
        vv[replica] = c
        if replica in cloud:
            _compact(vv, cloud, replica)
    else:
        cloud.setdefault(replica, set()).add(c)


def _compact(vv: dict[str, int], cloud: dict[str, set[int]], replica: str) -> None:
    """Move ``replica``'s cloud dots that continue the vector into it."""
    counters = cloud[replica]
    n = vv.get(replica, 0)
    while n + 1 in counters:
        n += 1
        counters.remove(n)
    if n:
        vv[replica] = n
    if not counters:
        del cloud[replica]


def _dots_to_wire(dots: Iterable[Dot]) -> list[list[Any]]:
    if isinstance(dots, set) and len(dots) == 1:  # the common case: one adder
        for r, c in dots:
            return [[r, count_to_wire(c)]]
    return [[r, count_to_wire(c)] for r, c in sorted(dots)]


def _dots_from_wire(obj: Any) -> list[Dot]:
    """Decode a list of dots sorted by ``(replica, counter)``, counters >= 1."""
    if not isinstance(obj, list):
        raise DecodeError("ORSet dots must be an array")
    dots: list[Dot] = []
    previous: Dot | None = None
    for item in obj:
        if not isinstance(item, list) or len(item) != 2:
            raise DecodeError("ORSet dot must be [replica, counter]")
        dot = (replica_from_wire(item[0]), count_from_wire(item[1]))
        if dot[1] == 0:
            raise DecodeError("ORSet dot counter must be >= 1")
        if previous is not None and dot <= previous:
            raise DecodeError("ORSet dots are not sorted or not unique")
        dots.append(dot)
        previous = dot
    return dots
