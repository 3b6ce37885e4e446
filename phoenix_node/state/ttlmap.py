"""TTLMap: a last-writer-wins map whose entries expire at a wall-clock time.

Body (version 1): one array per key, sorted by the msgpack bytes of the key
(:func:`._codec.sort_key`)::

    [[key, timestamp, replica, expires_at, value], ...]   an entry
    [[key, timestamp, replica, expires_at], ...]          a tombstone

``timestamp`` is a hybrid-logical-clock int (see :mod:`.hlc`); ``expires_at`` is
wall-clock milliseconds since the Unix epoch in ``[0, 2**63)``, or None for an
entry that never expires. A tombstone with ``expires_at = None`` comes from
``remove``; one with an ``expires_at`` from ``compact`` (an expired entry whose
value was dropped).

Semantics:

- Merge never looks at a clock: per key, the winner is the largest
  ``(timestamp, replica, is_tombstone, expires_at, sort_key(value), sort_key(key))``
  (None expiry below every int), exactly as in :class:`.LWWMap`. All replicas
  therefore hold the same state after the same merges, whatever their clocks.
- Expiry applies when reading: an entry is live at ``now_ms`` when
  ``expires_at`` is None or ``now_ms < expires_at``. ``value``, ``in`` and
  ``len`` read the wall clock of :data:`.hlc.DEFAULT_CLOCK` (hence
  ``VALUE_DEPENDS_ON_CLOCK``); ``value_at(now_ms)`` and ``get(..., now_ms=...)``
  take an explicit time. An expired entry still wins over older writes, so a
  value written before it never comes back.
- ``compact(now_ms)`` replaces expired entries by tombstones that keep
  ``(timestamp, replica, expires_at)`` and drop the value. A tombstone wins over
  its uncompacted twin (same timestamp and replica), so compaction is a join
  like any write and spreads by merge. A replica whose clock runs ahead
  compacts early: readers on other replicas lose the entry up to that skew
  before their own clock says so.
- ``ttl`` (seconds) is turned into ``expires_at`` with the default clock's
  wall time when the put is made (rounded up to a millisecond).

Limits: tombstones are kept forever (see :mod:`.lwwmap`); pruning is not needed
(see :mod:`.lwwregister`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar, Self

from . import hlc
from ._codec import _element_to_wire, canonical_value, value_from_wire
from ._errors import DecodeError, InvalidValueError
from .lwwmap import (
    EXPIRES,
    KEY,
    REPLICA,
    TOMB,
    TS,
    VALUE,
    Entry,
    EntryMap,
    entry_head_from_wire,
)
from .lwwregister import copy_value

__all__ = ["TTLMap"]


class TTLMap(EntryMap):
    """A last-writer-wins map with per-entry expiry, applied when reading."""

    __slots__ = ()
    TYPE_CODE = 10
    #: ``value`` reads the wall clock: equal states may show different values.
    VALUE_DEPENDS_ON_CLOCK: ClassVar[bool] = True

    @property
    def value(self) -> dict[Any, Any]:
        """The keys live now (default clock's wall time) and their values."""
        return self.value_at(hlc.DEFAULT_CLOCK.wall_ms())

    def value_at(self, now_ms: int) -> dict[Any, Any]:
        """The keys live at wall-clock ``now_ms`` and their values (a new dict)."""
        _check_ms("now_ms", now_ms)
        return {e[KEY]: copy_value(e[VALUE]) for e in self._entries.values() if _live(e, now_ms)}

    def put(
        self,
        replica: str,
        key: Any,
        value: Any,
        ttl: float | None = None,
        timestamp: int | None = None,
        *,
        expires_at: int | None = None,
    ) -> TTLMap:
        """Write ``key = value`` as ``replica``, expiring after ``ttl`` seconds.

        Give ``ttl`` or ``expires_at`` (wall-clock ms) or neither (never
        expires). Returns the delta. Raises InvalidValueError for a bad key,
        value, replica id, timestamp, ttl or expiry.
        """
        if ttl is not None:
            if expires_at is not None:
                raise InvalidValueError("give ttl or expires_at, not both")
            expires_at = _expiry_from_ttl(ttl)
        elif expires_at is not None:
            _check_ms("expires_at", expires_at)
        return self._write(replica, key, (False, expires_at, canonical_value(value)), timestamp)

    def remove(self, replica: str, key: Any, timestamp: int | None = None) -> TTLMap:
        """Remove ``key`` as ``replica`` (a tombstone); returns the delta."""
        return self._write(replica, key, (True, None, None), timestamp)

    def compact(self, now_ms: int | None = None) -> TTLMap:
        """Replace entries expired at ``now_ms`` by tombstones; returns the delta.

        ``now_ms`` defaults to the default clock's wall time. The delta holds
        the new tombstones (merging it elsewhere compacts there too).
        """
        if now_ms is None:
            now_ms = hlc.DEFAULT_CLOCK.wall_ms()
        _check_ms("now_ms", now_ms)
        delta = TTLMap()
        for key, e in self._entries.items():
            if not e[TOMB] and not _live(e, now_ms):
                delta._entries[key] = (e[TS], e[REPLICA], True, e[EXPIRES], None, e[KEY])
        for key, entry in delta._entries.items():
            self._put_entry(key, entry)
        return self._emit(delta)

    def get(self, key: Any, default: Any = None, now_ms: int | None = None) -> Any:
        """The value of ``key`` (a copy) if live at ``now_ms`` (default: now), else ``default``."""
        entry = self._live_entry(key)
        if entry is None:
            return default
        if now_ms is None:
            now_ms = hlc.DEFAULT_CLOCK.wall_ms()
        else:
            _check_ms("now_ms", now_ms)
        return copy_value(entry[VALUE]) if _live(entry, now_ms) else default

    def expiry(self, key: Any) -> int | None:
        """The wall-clock ms at which ``key``'s entry expires (None: never or absent)."""
        entry = self._live_entry(key)
        return None if entry is None else entry[EXPIRES]

    def __contains__(self, key: object) -> bool:
        entry = self._live_entry(key)
        return entry is not None and _live(entry, hlc.DEFAULT_CLOCK.wall_ms())

    def __len__(self) -> int:
        return len(self.keys())

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys())

    def keys(self, now_ms: int | None = None) -> list[Any]:
        """The keys live at ``now_ms`` (default: now)."""
        if now_ms is None:
            now_ms = hlc.DEFAULT_CLOCK.wall_ms()
        else:
            _check_ms("now_ms", now_ms)
        return [e[KEY] for e in self._entries.values() if _live(e, now_ms)]

    def _body(self) -> Any:
        return [
            [_element_to_wire(e[KEY]), e[TS], e[REPLICA], e[EXPIRES]]
            if e[TOMB]
            else [_element_to_wire(e[KEY]), e[TS], e[REPLICA], e[EXPIRES], e[VALUE]]
            for e in self._sorted_entries()
        ]

    @classmethod
    def _from_body(cls, body: Any) -> Self:
        return cls._from_entries(body, _parse_entry)


def _live(entry: Entry, now_ms: int) -> bool:
    if entry[TOMB]:
        return False
    expires = entry[EXPIRES]
    return expires is None or now_ms < expires


def _check_ms(name: str, ms: Any) -> None:
    if type(ms) is not int or not 0 <= ms <= hlc.MAX_TIMESTAMP:
        raise InvalidValueError(f"{name} must be wall-clock ms, an int in [0, 2**63), got {ms!r}")


def _expiry_from_ttl(ttl: Any) -> int:
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise InvalidValueError(f"ttl must be a number of seconds, got {ttl!r}")
    if not math.isfinite(ttl) or ttl < 0:
        raise InvalidValueError(f"ttl must be finite and >= 0, got {ttl!r}")
    expires_at = hlc.DEFAULT_CLOCK.wall_ms() + math.ceil(ttl * 1000)
    if expires_at > hlc.MAX_TIMESTAMP:
        raise InvalidValueError(f"ttl {ttl!r} puts the expiry past 2**63 ms")
    return expires_at


def _expiry_from_wire(obj: Any) -> int | None:
    if obj is None:
        return None
    if type(obj) is not int or not 0 <= obj <= hlc.MAX_TIMESTAMP:
        raise DecodeError("expires_at must be None or an int in [0, 2**63)")
    return obj


def _parse_entry(item: list[Any], key: Any) -> Entry:
    if len(item) == 4:
        return (*entry_head_from_wire(item), True, _expiry_from_wire(item[3]), None, key)
    if len(item) == 5:
        expires = _expiry_from_wire(item[3])
        return (*entry_head_from_wire(item), False, expires, value_from_wire(item[4]), key)
    raise DecodeError("TTLMap entry must be [key, ts, replica, expires_at(, value)]")
