"""LWWMap: a map whose every key is a last-writer-wins register, with tombstones.

Body (version 1): one array per key, sorted by the msgpack bytes of the key
(:func:`._codec.sort_key`)::

    [[key, timestamp, replica, value], ...]   a live entry
    [[key, timestamp, replica], ...]          a tombstone (the key was removed)

``key`` is an element (see :mod:`._codec`: None, bool, int, float, str, bytes or
tuples of them), ``timestamp`` a hybrid-logical-clock int in ``[0, 2**63)`` (see
:mod:`.hlc`), ``replica`` the writer's id, ``value`` a canonical plain value.

Semantics:

- Per key, the winning write is the largest
  ``(timestamp, replica, is_tombstone, sort_key(value), sort_key(key))``, as in
  :class:`.LWWRegister`. A remove is a write of "absent": it wins over older
  puts, and a concurrent put with a newer timestamp wins over it. At the same
  ``(timestamp, replica)`` (explicit timestamps only) the tombstone wins. A
  remove of a key never seen still writes a tombstone (it deletes concurrent
  older puts).
- Keys are compared as Python compares them (``1``, ``1.0`` and ``True`` are one
  key, as in a dict); the spelling kept is the winning write's, hence the last
  part of the order.
- ``timestamp=None`` takes a clock timestamp greater than the key's current one
  (see :class:`.LWWRegister`).

Limits: tombstones are kept forever, so a removed key costs its key, a
timestamp and a replica id: about 10 bytes plus the key and the replica id on
the wire, about 160 bytes plus the key in memory. A map with heavy key churn grows; use an ORMap or
reuse keys. Pruning is not needed, for the reason given in :mod:`.lwwregister`:
the replica id in an entry is a tie-breaker that a later write replaces, at most
one per key.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final, Self

from . import hlc
from ._base import CRDT
from ._codec import (
    _element_to_wire,
    canonical_value,
    check_element,
    check_replica,
    element_from_wire,
    replica_from_wire,
    sort_key,
    value_from_wire,
)
from ._errors import DecodeError
from .lwwregister import copy_value, same_bytes

__all__ = ["LWWMap"]

#: An entry: ``(timestamp, replica, is_tombstone, expires_at, value, key)``.
#: ``expires_at`` is used by TTLMap only (None here); ``key`` is the winning
#: write's spelling of the key. Entries are immutable and shared between copies.
Entry = tuple[int, str, bool, int | None, Any, Any]
TS: Final = 0
REPLICA: Final = 1
TOMB: Final = 2
EXPIRES: Final = 3
VALUE: Final = 4
KEY: Final = 5


def beats(a: Entry, b: Entry) -> bool:
    """True when entry ``a`` wins over entry ``b`` (a strict total order)."""
    if a[TS] != b[TS]:
        return a[TS] > b[TS]
    if a[REPLICA] != b[REPLICA]:
        return a[REPLICA] > b[REPLICA]
    # Same (timestamp, replica): explicit timestamps, or a TTLMap entry against
    # its compacted twin. The tombstone wins, so compaction never loses.
    if a[TOMB] != b[TOMB]:
        return a[TOMB]
    ea, eb = a[EXPIRES], b[EXPIRES]
    if ea != eb:
        return (-1 if ea is None else ea) > (-1 if eb is None else eb)
    if not same_bytes(a[VALUE], b[VALUE]):
        va, vb = sort_key(a[VALUE]), sort_key(b[VALUE])
        if va != vb:
            return va > vb
    return not same_bytes(a[KEY], b[KEY]) and sort_key(a[KEY]) > sort_key(b[KEY])


class EntryMap(CRDT):
    """Shared core of LWWMap and TTLMap: a dict of entries joined key by key."""

    __slots__ = ("_entries", "_live")

    def __init__(self) -> None:
        super().__init__()
        self._entries: dict[Any, Entry] = {}
        self._live = 0  # entries that are not tombstones

    def _write(
        self,
        replica: str,
        key: Any,
        entry_tail: tuple[bool, int | None, Any],
        timestamp: int | None,
    ) -> Self:
        """Apply a put or remove of ``key``; returns the emitted delta."""
        check_replica(replica)
        check_element(key)
        if timestamp is None:
            current = self._entries.get(key)
            clock = hlc.DEFAULT_CLOCK
            ts = clock.now() if current is None else clock.update(current[TS])
        else:
            ts = hlc.check_timestamp(timestamp)
        entry: Entry = (ts, replica, *entry_tail, key)
        delta = self._single(key, entry)
        self._put_entry(key, entry)
        return self._emit(delta)

    @classmethod
    def _single(cls, key: Any, entry: Entry) -> Self:
        delta = cls.__new__(cls)
        delta._sink = None
        delta._entries = {key: entry}
        delta._live = 0 if entry[TOMB] else 1
        return delta

    def _put_entry(self, key: Any, entry: Entry) -> None:
        """Join one entry in."""
        entries = self._entries
        mine = entries.get(key)
        if mine is None:
            entries[key] = entry
            self._live += not entry[TOMB]
        elif mine is not entry and beats(entry, mine):
            entries[key] = entry
            self._live += mine[TOMB] - entry[TOMB]

    def _live_entry(self, key: Any) -> Entry | None:
        try:
            entry = self._entries.get(key)
        except TypeError:  # unhashable: never a key
            return None
        return None if entry is None or entry[TOMB] else entry

    def all_keys(self) -> list[Any]:
        """The keys of every entry, removed ones (tombstones) included."""
        return [e[KEY] for e in self._entries.values()]

    def entry_count(self) -> int:
        """Entries held, tombstones included (what the map costs, not its length)."""
        return len(self._entries)

    def copy(self) -> Self:
        new = type(self)()
        new._entries = dict(self._entries)
        new._live = self._live
        return new

    def _absorb(self, other: Self) -> None:
        for key, entry in other._entries.items():
            self._put_entry(key, entry)

    def _sorted_entries(self) -> list[Entry]:
        return sorted(self._entries.values(), key=lambda e: sort_key(e[KEY]))

    @classmethod
    def _from_entries(cls, body: Any, parse: Any) -> Self:
        """Decode a sorted entry list; ``parse(item, key)`` returns the entry."""
        if not isinstance(body, list):
            raise DecodeError(f"{cls.__name__} body must be an array")
        new = cls()
        entries = new._entries
        previous: bytes | None = None
        for item in body:
            if not isinstance(item, list) or not item:
                raise DecodeError(f"{cls.__name__} entry must be a non-empty array")
            key = element_from_wire(item[0])
            order = sort_key(key)
            if previous is not None and order <= previous:
                raise DecodeError(f"{cls.__name__} keys are not in canonical order")
            if key in entries:  # 1 and True: distinct bytes, one Python key
                raise DecodeError(f"{cls.__name__} holds the key {key!r} twice")
            previous = order
            entry = parse(item, key)
            entries[key] = entry
            new._live += not entry[TOMB]
        return new


def entry_head_from_wire(item: list[Any]) -> tuple[int, str]:
    """Decode an entry's ``timestamp, replica``."""
    return hlc.timestamp_from_wire(item[1]), replica_from_wire(item[2])


class LWWMap(EntryMap):
    """A map of last-writer-wins entries; removes leave tombstones."""

    __slots__ = ()
    TYPE_CODE = 7

    @property
    def value(self) -> dict[Any, Any]:
        """The live keys and their values (a new dict)."""
        return {e[KEY]: copy_value(e[VALUE]) for e in self._entries.values() if not e[TOMB]}

    def put(self, replica: str, key: Any, value: Any, timestamp: int | None = None) -> LWWMap:
        """Write ``key = value`` as ``replica``; returns the delta (just that entry).

        Raises InvalidValueError for a bad key, value, replica id or timestamp.
        """
        return self._write(replica, key, (False, None, canonical_value(value)), timestamp)

    def remove(self, replica: str, key: Any, timestamp: int | None = None) -> LWWMap:
        """Remove ``key`` as ``replica`` (a tombstone); returns the delta."""
        return self._write(replica, key, (True, None, None), timestamp)

    def get(self, key: Any, default: Any = None) -> Any:
        """The value of ``key`` (a copy), or ``default`` when absent."""
        entry = self._live_entry(key)
        return default if entry is None else copy_value(entry[VALUE])

    def __contains__(self, key: object) -> bool:
        return self._live_entry(key) is not None

    def __len__(self) -> int:
        return self._live

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys())

    def keys(self) -> list[Any]:
        """The live keys."""
        return [e[KEY] for e in self._entries.values() if not e[TOMB]]

    def _body(self) -> Any:
        return [
            [_element_to_wire(e[KEY]), e[TS], e[REPLICA]]
            if e[TOMB]
            else [_element_to_wire(e[KEY]), e[TS], e[REPLICA], e[VALUE]]
            for e in self._sorted_entries()
        ]

    @classmethod
    def _from_body(cls, body: Any) -> Self:
        return cls._from_entries(body, _parse_entry)


def _parse_entry(item: list[Any], key: Any) -> Entry:
    if len(item) == 3:
        return (*entry_head_from_wire(item), True, None, None, key)
    if len(item) == 4:
        return (*entry_head_from_wire(item), False, None, value_from_wire(item[3]), key)
    raise DecodeError("LWWMap entry must be [key, ts, replica] or [key, ts, replica, value]")
