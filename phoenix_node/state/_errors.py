"""Errors of the state layer.

Every error raised on purpose by :mod:`phoenix_node.state` derives from
:class:`StateError`, so a caller can catch the whole layer with one clause.
"""

from __future__ import annotations

__all__ = [
    "CounterOverflowError",
    "DecodeError",
    "InvalidValueError",
    "StateError",
    "StoreClosedError",
    "StoreError",
    "StoreFullError",
    "StoreWriteError",
    "TypeMismatchError",
]


class StateError(Exception):
    """Base class of every error of the state layer."""


class DecodeError(StateError, ValueError):
    """Bytes are not a valid encoding of the type asked for.

    Raised for a wrong type tag, an unsupported version, truncated or trailing
    bytes, hostile sizes, malformed structure. ``decode`` never raises anything
    else, whatever the input.
    """


class InvalidValueError(StateError, ValueError):
    """A value, element, key or replica id cannot be stored in a CRDT.

    Elements and values must be plain msgpack data (None, bool, int within 64
    bits, float, str, bytes, and lists/tuples/str-keyed dicts of them).
    """


class TypeMismatchError(StateError, TypeError):
    """Two values of different CRDT types were merged, or a schema mismatch."""


class CounterOverflowError(StateError, OverflowError):
    """A counter entry would exceed :data:`MAX_COUNT` (2**256 - 1).

    Counters never wrap or lose precision: past 64 bits they are encoded as
    big-endian bytes, and past 256 bits an increment is refused.
    """


class StoreError(StateError):
    """Base class of the LMDB store's errors."""


class StoreClosedError(StoreError):
    """The store was closed (or never opened in this process)."""


class StoreFullError(StoreError):
    """The map reached its configured maximum size; nothing of the batch was written."""


class StoreWriteError(StoreError):
    """A commit failed (disk full, I/O error); nothing of the batch was written.

    The data committed before stays readable.
    """
