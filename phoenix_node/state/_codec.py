"""Canonical msgpack encoding shared by every CRDT type.

Wire format of a CRDT value (version 1)::

    msgpack array [type_code: uint, version: uint, body]

``body`` is type specific and always *canonical*: maps are written as arrays of
``[key, value]`` pairs sorted by the msgpack bytes of the key, set members are
sorted by their msgpack bytes, and dicts inside plain values have their keys
sorted. Equal states therefore give equal bytes.

Limits enforced on decode (hostile input): the whole input is at most
:data:`MAX_ENCODED_BYTES`; plain values nest at most :data:`MAX_DEPTH` levels;
ext types are refused; integers outside the 64-bit range are refused except
where a counter uses its big-integer form (big-endian bytes, at most 32 bytes).

Elements (set members, map keys) are hashable plain data: None, int, str,
bytes and tuples of those (tuples travel as arrays and come back as tuples).
Floats and bools are refused as elements: ``1 == 1.0 == True`` in Python, so
replicas could hold one member under different spellings and encode equal
sets differently. Values (register and map values) are plain data: the element types plus
lists and str-keyed dicts; tuples come back as lists.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import msgpack

from ._errors import CounterOverflowError, DecodeError, InvalidValueError

__all__ = [
    "MAX_COUNT",
    "MAX_DEPTH",
    "MAX_ENCODED_BYTES",
    "canonical_value",
    "check_element",
    "check_replica",
    "count_from_wire",
    "count_to_wire",
    "element_from_wire",
    "pack",
    "sort_key",
    "sorted_elements",
    "unpack",
    "value_from_wire",
]

MAX_ENCODED_BYTES = 256 * 1024 * 1024
MAX_DEPTH = 32
MAX_REPLICA_LEN = 256
MAX_COUNT = 2**256 - 1
_INT64_MIN = -(2**63)
_UINT64_MAX = 2**64 - 1

_packer = msgpack.Packer(use_bin_type=True, autoreset=True)


def pack(obj: Any) -> bytes:
    """msgpack-encode an already canonical structure."""
    return _packer.pack(obj)


def sort_key(element: Any) -> bytes:
    """The canonical ordering key of an element: its msgpack bytes."""
    return msgpack.packb(element, use_bin_type=True)


def sorted_elements(elements: Iterable[Any]) -> list[Any]:
    """Elements in canonical order, tuples written as lists."""
    return [_element_to_wire(e) for e in sorted(elements, key=sort_key)]


def unpack(data: Any) -> Any:
    """Decode msgpack bytes with the layer's limits; any failure is a DecodeError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_ENCODED_BYTES:
        raise DecodeError(f"encoding of {len(data)} bytes exceeds {MAX_ENCODED_BYTES}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
        )
    except DecodeError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as exc:
        # ExtraData, FormatError, StackError, UnicodeDecodeError, size limits (which
        # unpackb derives from len(data)) and unhashable map keys all land here.
        raise DecodeError(f"malformed msgpack: {type(exc).__name__}: {exc}") from None


def _refuse_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"msgpack ext type {code} is not allowed")


# --- elements ---------------------------------------------------------------------------


def check_element(element: Any, depth: int = 0) -> Any:
    """Validate a set member / map key and return it; raise InvalidValueError otherwise."""
    if element is None or isinstance(element, (str, bytes)):
        return element
    if isinstance(element, int) and not isinstance(element, bool):
        _check_int(element)
        return element
    if isinstance(element, tuple):
        if depth >= MAX_DEPTH:
            raise InvalidValueError(f"element nests deeper than {MAX_DEPTH}")
        for item in element:
            check_element(item, depth + 1)
        return element
    raise InvalidValueError(
        f"element {element!r} of type {type(element).__name__} is not allowed "
        "(use None, int, str, bytes or a tuple of them)"
    )


def _element_to_wire(element: Any) -> Any:
    if isinstance(element, tuple):
        return [_element_to_wire(e) for e in element]
    return element


def element_from_wire(obj: Any, depth: int = 0) -> Any:
    """Rebuild an element from its decoded form (arrays become tuples)."""
    if obj is None or isinstance(obj, (str, bytes)):
        return obj
    if isinstance(obj, int) and not isinstance(obj, bool):
        if not _INT64_MIN <= obj <= _UINT64_MAX:
            raise DecodeError("integer element out of the 64-bit range")
        return obj
    if isinstance(obj, list):
        if depth >= MAX_DEPTH:
            raise DecodeError(f"element nests deeper than {MAX_DEPTH}")
        return tuple(element_from_wire(item, depth + 1) for item in obj)
    raise DecodeError(f"invalid element of type {type(obj).__name__}")


# --- plain values -----------------------------------------------------------------------


def canonical_value(value: Any, depth: int = 0) -> Any:
    """Validate a plain value and return its canonical form.

    Dicts get sorted keys, tuples become lists, so that the stored value equals
    what a decode gives back and encodes to canonical bytes.
    """
    if value is None or isinstance(value, (bool, str, bytes)):
        return value
    if isinstance(value, int):
        _check_int(value)
        return value
    if isinstance(value, float):
        _check_float(value)
        return value
    if depth >= MAX_DEPTH:
        raise InvalidValueError(f"value nests deeper than {MAX_DEPTH}")
    if isinstance(value, (list, tuple)):
        return [canonical_value(v, depth + 1) for v in value]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise InvalidValueError(f"dict key {key!r} is not a str")
        return {k: canonical_value(value[k], depth + 1) for k in sorted(value)}
    raise InvalidValueError(
        f"value of type {type(value).__name__} is not plain data "
        "(use None, bool, int, float, str, bytes, list or a str-keyed dict)"
    )


def value_from_wire(obj: Any, depth: int = 0) -> Any:
    """Validate a decoded plain value (canonical form) and return it."""
    if obj is None or isinstance(obj, (bool, str, bytes)):
        return obj
    if isinstance(obj, float):
        if math.isnan(obj):
            raise DecodeError("NaN value: it is not equal to itself")
        return obj
    if isinstance(obj, int):
        if not _INT64_MIN <= obj <= _UINT64_MAX:
            raise DecodeError("integer value out of the 64-bit range")
        return obj
    if depth >= MAX_DEPTH:
        raise DecodeError(f"value nests deeper than {MAX_DEPTH}")
    if isinstance(obj, list):
        return [value_from_wire(v, depth + 1) for v in obj]
    if isinstance(obj, dict):
        keys = list(obj)
        if keys != sorted(keys) or not all(isinstance(k, str) for k in keys):
            raise DecodeError("dict value is not canonical (str keys, sorted)")
        return {k: value_from_wire(v, depth + 1) for k, v in obj.items()}
    raise DecodeError(f"invalid value of type {type(obj).__name__}")


def _check_int(n: int) -> None:
    if not _INT64_MIN <= n <= _UINT64_MAX:
        raise InvalidValueError(f"integer {n} does not fit in 64 bits")


def _check_float(x: float) -> None:
    if math.isnan(x):
        raise InvalidValueError("NaN is not allowed: it is not equal to itself")


# --- replica ids and counters -----------------------------------------------------------


def check_replica(replica: Any) -> str:
    """Validate a replica id (node id plus incarnation, e.g. ``"node-a#3"``)."""
    if not isinstance(replica, str) or not replica:
        raise InvalidValueError(f"replica id must be a non-empty str, got {replica!r}")
    if len(replica) > MAX_REPLICA_LEN:
        raise InvalidValueError(f"replica id longer than {MAX_REPLICA_LEN} characters")
    return replica


def replica_from_wire(obj: Any) -> str:
    if not isinstance(obj, str) or not obj or len(obj) > MAX_REPLICA_LEN:
        raise DecodeError("invalid replica id")
    return obj


def check_count(n: int) -> int:
    if n > MAX_COUNT:
        raise CounterOverflowError(f"counter entry {n} exceeds 2**256 - 1")
    return n


def count_to_wire(n: int) -> int | bytes:
    """A non-negative counter entry: an int up to 2**64 - 1, big-endian bytes above."""
    if n <= _UINT64_MAX:
        return n
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


def count_from_wire(obj: Any) -> int:
    if isinstance(obj, int) and not isinstance(obj, bool):
        if not 0 <= obj <= _UINT64_MAX:
            raise DecodeError("counter entry out of range")
        return obj
    if isinstance(obj, bytes):
        if not 8 < len(obj) <= 32 or obj[0] == 0:
            raise DecodeError("invalid big counter encoding")
        n = int.from_bytes(obj, "big")
        if n <= _UINT64_MAX:
            raise DecodeError("non-canonical big counter encoding")
        return n
    raise DecodeError(f"invalid counter entry of type {type(obj).__name__}")
