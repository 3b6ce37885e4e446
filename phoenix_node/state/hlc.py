"""HybridClock: a hybrid logical clock for last-writer-wins timestamps.

After Kulkarni et al., "Logical Physical Clocks and Consistent Snapshots in
Globally Distributed Databases" (2014). A timestamp is one non-negative int::

    ts = (physical_ms << 16) | logical        0 <= ts < 2**63

``physical_ms`` is wall-clock milliseconds since the Unix epoch (47 bits: good
until the year 6429), ``logical`` a 16-bit counter that orders events within one
millisecond, or while the wall clock stands still or goes backwards. Timestamps
travel on the wire as plain msgpack ints.

Guarantees of one :class:`HybridClock`:

- ``now()`` is strictly increasing, whatever the wall clock does. When the
  logical part would pass 0xFFFF the physical part advances by one (the int
  simply carries), so the clock runs at most a little ahead of the wall clock.
- ``update(remote)`` returns a timestamp greater than ``remote`` and than every
  timestamp the clock gave before; every later ``now()`` is greater still.

Limits: a timestamp from the far future (a peer's wrong wall clock, or a user's
explicit timestamp) pulls the clock forward, and the clock then advances by its
logical part until the wall clock catches up; this is inherent to HLCs. A clock
that would pass ``2**63 - 1`` raises :class:`InvalidValueError` and keeps its
state.

:data:`DEFAULT_CLOCK` is the process-wide instance that the LWW types use when
a mutator gets ``timestamp=None`` (like :mod:`random`'s hidden instance); tests
replace it (``monkeypatch.setattr(hlc, "DEFAULT_CLOCK", HybridClock(fake))``).
Its wall clock is also the "now" of :class:`TTLMap` reads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from ._errors import DecodeError, InvalidValueError

__all__ = [
    "DEFAULT_CLOCK",
    "LOGICAL_BITS",
    "MAX_TIMESTAMP",
    "HybridClock",
    "check_timestamp",
    "logical",
    "make_timestamp",
    "physical_ms",
    "system_wall_ms",
    "timestamp_from_wire",
]

LOGICAL_BITS = 16
_LOGICAL_MASK = (1 << LOGICAL_BITS) - 1
#: The largest valid timestamp (timestamps fit a signed 64-bit int).
MAX_TIMESTAMP = 2**63 - 1


def system_wall_ms() -> int:
    """Wall-clock milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def physical_ms(ts: int) -> int:
    """The wall-clock milliseconds part of a timestamp."""
    return ts >> LOGICAL_BITS


def logical(ts: int) -> int:
    """The logical counter part of a timestamp."""
    return ts & _LOGICAL_MASK


def make_timestamp(ms: int, counter: int = 0) -> int:
    """The timestamp of wall-clock ``ms`` with logical ``counter`` (for explicit writes)."""
    if type(counter) is not int or not 0 <= counter <= _LOGICAL_MASK:
        raise InvalidValueError(f"logical counter must be an int in [0, 65535], got {counter!r}")
    if type(ms) is not int or ms < 0:
        raise InvalidValueError(f"milliseconds must be an int >= 0, got {ms!r}")
    return check_timestamp((ms << LOGICAL_BITS) | counter)


def check_timestamp(ts: Any) -> int:
    """Validate a user-given timestamp: an int with ``0 <= ts < 2**63``."""
    if type(ts) is not int or not 0 <= ts <= MAX_TIMESTAMP:
        raise InvalidValueError(f"timestamp must be an int in [0, 2**63), got {ts!r}")
    return ts


def timestamp_from_wire(obj: Any) -> int:
    """Validate a decoded timestamp; raise DecodeError."""
    if type(obj) is not int or not 0 <= obj <= MAX_TIMESTAMP:
        raise DecodeError("timestamp must be an int in [0, 2**63)")
    return obj


class HybridClock:
    """A hybrid logical clock; thread-safe.

    ``wall_ms`` returns wall-clock milliseconds as an int (inject a fake one in
    tests); it may stand still or go backwards.
    """

    __slots__ = ("_last", "_lock", "_wall_ms")

    def __init__(self, wall_ms: Callable[[], int] = system_wall_ms) -> None:
        self._wall_ms = wall_ms
        self._last = -1
        self._lock = threading.Lock()

    @property
    def last(self) -> int:
        """The latest timestamp given or observed (-1 before the first)."""
        return self._last

    def wall_ms(self) -> int:
        """The injected wall clock's current milliseconds (not a timestamp)."""
        return self._wall_ms()

    def now(self) -> int:
        """A new timestamp, greater than every one this clock gave or observed."""
        with self._lock:
            return self._tick(self._last)

    def update(self, remote_ts: int) -> int:
        """Observe ``remote_ts``; returns a new timestamp greater than it and than ``last``."""
        check_timestamp(remote_ts)
        with self._lock:
            last = self._last
            return self._tick(remote_ts if remote_ts > last else last)

    def _tick(self, floor: int) -> int:
        ts = self._wall_ms() << LOGICAL_BITS
        if ts <= floor:
            # wall clock behind or standing still: count logically; past 0xFFFF
            # the carry advances the physical part
            ts = floor + 1
        if ts > MAX_TIMESTAMP:
            raise InvalidValueError(f"no timestamp after {floor} fits in 63 bits")
        self._last = ts
        return ts

    def __repr__(self) -> str:
        return f"HybridClock(last={self._last})"


#: The process-wide clock used when a mutator is given no timestamp.
DEFAULT_CLOCK = HybridClock()
