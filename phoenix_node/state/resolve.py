"""Conflict resolution for plain (non-CRDT) values written on several replicas.

A :class:`Version` is one replica's write: the value, the vector clock of the
write, a timestamp (any int the application chooses, e.g. milliseconds of a
hybrid logical clock; never compared across units) and the writer's replica id.
:func:`resolve` turns the versions of one key into a :class:`Resolution`.

Every strategy starts with the same causal step:

1. versions whose clock is strictly before another version's clock are dropped:
   their writer's successor had seen them, so they are superseded, and clock
   skew can never let a causally older write win;
2. the survivors (the concurrent frontier) are grouped by value; each distinct
   value is kept once, as its latest version by ``(timestamp, replica)``;
3. when a single value is left there is no conflict: that is the result.

Only a real conflict, two or more concurrent distinct values, reaches the
strategy, which sees them ordered by ``(timestamp, replica, value key)``,
oldest first (the *value key* is a canonical msgpack encoding of the value; it
breaks ties and makes "larger value" well defined for any data):

- :class:`LastWriterWins`: the last of them wins.
- :class:`VectorClockSiblings`: nothing is chosen; the siblings go back to the
  caller (Riak's siblings), who resolves them and writes back with the merged
  clock, which dominates every input.
- :class:`SemanticMerge`: merges values by kind (see its docstring).
- :class:`CustomResolver`: calls the application's function.

The result never depends on the order of the input versions.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ._codec import check_replica
from ._errors import InvalidValueError, StateError
from .vclock import Order, VectorClock

__all__ = [
    "CustomResolver",
    "LastWriterWins",
    "Resolution",
    "ResolverError",
    "SemanticMerge",
    "Strategy",
    "VectorClockSiblings",
    "Version",
    "resolve",
]


class ResolverError(StateError):
    """A :class:`CustomResolver`'s function raised; the original is ``__cause__``."""


@dataclass(frozen=True, eq=True)
class Version:
    """One replica's write of a value.

    ``value`` may be any Python value; :class:`SemanticMerge` understands numbers,
    sets, lists, tuples and dicts and treats the rest as opaque.
    ``clock`` is copied on construction, so ticking the caller's clock later does
    not change the version. Versions compare by value; they are not hashable.
    """

    value: Any
    clock: VectorClock
    timestamp: int
    replica: str

    __hash__ = None  # type: ignore[assignment]  # the clock (and often the value) is mutable

    def __post_init__(self) -> None:
        if not isinstance(self.clock, VectorClock):
            raise InvalidValueError(
                f"Version.clock must be a VectorClock, got {type(self.clock).__name__}"
            )
        if type(self.timestamp) is not int:
            raise InvalidValueError(f"Version.timestamp must be an int, got {self.timestamp!r}")
        check_replica(self.replica)
        object.__setattr__(self, "clock", self.clock.copy())


@dataclass(frozen=True)
class Resolution:
    """What :func:`resolve` decided.

    ``value`` is the resolved value, or None while ``siblings`` is not empty;
    ``siblings`` are the concurrent versions left for the caller (oldest first);
    ``clock`` is the merge of every input's clock: write the resolved value back
    with a clock that dominates it (tick it for the writing replica).
    """

    value: Any
    siblings: list[Version] = field(default_factory=list)
    clock: VectorClock = field(default_factory=VectorClock)

    __hash__ = None  # type: ignore[assignment]

    @property
    def resolved(self) -> bool:
        """True when ``value`` is the answer (it may itself be None)."""
        return not self.siblings


class Strategy(ABC):
    """How a real conflict (two or more concurrent distinct values) is settled."""

    __slots__ = ()

    @abstractmethod
    def _settle(self, conflict: list[Version]) -> tuple[Any, list[Version]]:
        """``(value, siblings)`` for versions sorted oldest first."""


class LastWriterWins(Strategy):
    """The version with the largest ``(timestamp, replica, value key)`` wins."""

    __slots__ = ()

    def _settle(self, conflict: list[Version]) -> tuple[Any, list[Version]]:
        return conflict[-1].value, []

    def __repr__(self) -> str:
        return "LastWriterWins()"


class VectorClockSiblings(Strategy):
    """Keep every concurrent value as a sibling and let the caller decide."""

    __slots__ = ()

    def _settle(self, conflict: list[Version]) -> tuple[Any, list[Version]]:
        return None, conflict

    def __repr__(self) -> str:
        return "VectorClockSiblings()"


class SemanticMerge(Strategy):
    """Merge concurrent values by kind, recursively.

    - numbers (int, float; not bool): the largest (a high-water mark);
    - sets / frozensets: the union (a frozenset only when all are frozensets);
    - lists / tuples: a multiset union in first-seen order: the oldest version's
      items, then each newer version's items that are not there yet, keeping the
      largest count of an item any one version holds;
    - dicts: key by key: keys of any version are kept (a concurrent deletion of
      a key loses), values under a shared key are merged by these same rules
      with the owning versions' timestamps;
    - anything else (str, bytes, bool, None, other objects) and mismatched kinds:
      last writer wins, among the versions holding a value at that place.
    """

    __slots__ = ()

    def _settle(self, conflict: list[Version]) -> tuple[Any, list[Version]]:
        return _merge([(v.value, i) for i, v in enumerate(conflict)]), []

    def __repr__(self) -> str:
        return "SemanticMerge()"


class CustomResolver(Strategy):
    """Settle a conflict with ``fn(versions) -> value``.

    ``fn`` gets the concurrent versions with distinct values, oldest first, only
    when there is a real conflict. Any exception it raises is re-raised as a
    :class:`ResolverError` naming it (the original is its ``__cause__``).
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[list[Version]], Any]) -> None:
        if not callable(fn):
            raise InvalidValueError(f"CustomResolver needs a callable, got {fn!r}")
        self.fn = fn

    def _settle(self, conflict: list[Version]) -> tuple[Any, list[Version]]:
        try:
            return self.fn(list(conflict)), []
        except Exception as exc:
            name = getattr(self.fn, "__qualname__", repr(self.fn))
            raise ResolverError(
                f"custom resolver {name} failed on {len(conflict)} versions: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def __repr__(self) -> str:
        return f"CustomResolver({self.fn!r})"


def resolve(versions: Iterable[Version], strategy: Strategy) -> Resolution:
    """Resolve the versions of one value with ``strategy`` (see the module docs).

    Raises :class:`InvalidValueError` for no versions, a non-Version item or a
    strategy that is not a :class:`Strategy`; :class:`ResolverError` when a
    custom resolver fails.
    """
    if not isinstance(strategy, Strategy):
        raise InvalidValueError(f"resolve needs a Strategy instance, got {strategy!r}")
    versions = list(versions)
    if not versions:
        raise InvalidValueError("resolve needs at least one version")
    for v in versions:
        if not isinstance(v, Version):
            raise InvalidValueError(f"resolve takes Version objects, got {type(v).__name__}")
    clock = VectorClock()
    for v in versions:
        clock.merge_in(v.clock)
    conflict = _distinct_values(_frontier(versions))
    if len(conflict) == 1:
        return Resolution(conflict[0].value, [], clock)
    value, siblings = strategy._settle(conflict)
    return Resolution(value, siblings, clock)


# --- the causal step --------------------------------------------------------------------


def _frontier(versions: list[Version]) -> list[Version]:
    """Versions whose clock is not strictly before another's."""
    return [
        v
        for v in versions
        if not any(w.clock.compare(v.clock) is Order.AFTER for w in versions if w is not v)
    ]


def _distinct_values(versions: list[Version]) -> list[Version]:
    """One version per distinct value (its latest), sorted oldest first."""
    latest: dict[bytes, tuple[tuple[int, str, bytes], Version]] = {}
    for v in versions:
        key = _value_key(v.value)
        rank = (v.timestamp, v.replica, v.clock.encode())
        held = latest.get(key)
        if held is None or rank > held[0]:
            latest[key] = (rank, v)
    ordered = sorted(latest.items(), key=lambda kv: (kv[1][0][0], kv[1][0][1], kv[0]))
    return [version for _, (_, version) in ordered]


# --- value keys -------------------------------------------------------------------------

_INT_MIN, _UINT_MAX = -(2**63), 2**64 - 1


def _value_key(value: Any) -> bytes:
    """A canonical byte key of any value: equal data gives equal keys.

    Plain msgpack data encodes as msgpack; ints beyond 64 bits, tuples, dicts (by
    sorted keys), sets (by sorted members) and other objects (by type and repr)
    get tagged ext types, so distinct values get distinct keys.
    """
    return msgpack.packb(_keyable(value, 0), use_bin_type=True)


def _keyable(value: Any, depth: int) -> Any:
    if depth > 64:
        raise InvalidValueError("value nests deeper than 64 levels")
    if value is None or isinstance(value, (bool, str, bytes)):
        return value
    if isinstance(value, int):
        if _INT_MIN <= value <= _UINT_MAX:
            return value
        return msgpack.ExtType(4, str(value).encode())
    if isinstance(value, float):
        return msgpack.ExtType(5, b"nan") if math.isnan(value) else value
    if isinstance(value, list):
        return [_keyable(v, depth + 1) for v in value]
    if isinstance(value, tuple):
        return msgpack.ExtType(1, _pack([_keyable(v, depth + 1) for v in value]))
    if isinstance(value, (set, frozenset)):
        return msgpack.ExtType(2, _pack(sorted(_pack(_keyable(v, depth + 1)) for v in value)))
    if isinstance(value, dict):
        pairs = sorted(
            ([_pack(_keyable(k, depth + 1)), _keyable(v, depth + 1)] for k, v in value.items()),
            key=lambda pair: pair[0],
        )
        return msgpack.ExtType(3, _pack(pairs))
    kind = type(value)
    return msgpack.ExtType(127, f"{kind.__module__}.{kind.__qualname__}:{value!r}".encode())


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# --- semantic merge ---------------------------------------------------------------------

#: (value, rank): rank orders the owning versions, oldest first
_Item = tuple[Any, int]


def _merge(items: Sequence[_Item]) -> Any:
    kinds = {_kind(value) for value, _ in items}
    if len(kinds) == 1:
        kind = kinds.pop()
        if kind == "number":
            return max((value for value, _ in items), key=_number_key)
        if kind == "set":
            return _merge_sets([value for value, _ in items])
        if kind == "sequence":
            return _merge_sequences([value for value, _ in items])
        if kind == "dict":
            return _merge_dicts(items)
    return max(items, key=lambda item: item[1])[0]  # last writer wins


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "other"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (set, frozenset)):
        return "set"
    if isinstance(value, (list, tuple)):
        return "sequence"
    if isinstance(value, dict):
        return "dict"
    return "other"


def _number_key(value: float) -> tuple[bool, float]:
    return (not math.isnan(value), value)  # NaN never wins over a number


def _merge_sets(values: list[Any]) -> Any:
    union: set[Any] = set().union(*values)
    return frozenset(union) if all(isinstance(v, frozenset) for v in values) else union


def _merge_sequences(values: list[Any]) -> Any:
    out: list[Any] = []
    emitted: dict[bytes, int] = {}
    for seq in values:
        counts: dict[bytes, int] = {}
        for item in seq:
            key = _value_key(item)
            counts[key] = counts.get(key, 0) + 1
            if counts[key] > emitted.get(key, 0):
                emitted[key] = counts[key]
                out.append(item)
    return tuple(out) if all(isinstance(v, tuple) for v in values) else out


def _merge_dicts(items: Sequence[_Item]) -> dict[Any, Any]:
    under: dict[Any, list[_Item]] = {}
    for value, rank in items:
        for k, v in value.items():
            under.setdefault(k, []).append((v, rank))
    return {k: held[0][0] if len(held) == 1 else _merge(held) for k, held in under.items()}
