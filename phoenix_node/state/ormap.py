"""ORMap: a map from keys to CRDT values, keys kept in an add-wins :class:`.ORSet`.

Each key holds a value of any built-in CRDT type (a counter, a set, another
ORMap...), merged with that type's own ``merge``. Putting or updating a key adds
it to the key set; ``remove`` removes it from the key set only. An update
concurrent with a remove wins (add-wins, like the key set).

Body (version 1)::

    [keys, values]
    keys   = an ORSet body (see :mod:`.orset`)
    values = [[key, [type_code, version, body]], ...]

``values`` is sorted by the msgpack bytes of the key (see :func:`._codec.sort_key`)
and holds each value's own ``to_wire()`` form. It holds a value for every key
present in ``keys``, and may hold values of removed keys (see below). Decode
refuses unsorted or duplicate keys, a present key without a value, and any
value its own type refuses.

Semantics: the state is the product of the key set and a map of value lattices
(merged key by key), so merge is a true join. ``value`` is ``{key:
stored.value}`` for the keys present in the key set only.

Known limitation: a removed key's value is *kept* in the state (removing it
would not be a join: a concurrent update must still merge with it). Re-adding
a removed key, by ``put`` or ``update`` on any replica, therefore continues
from the merged earlier value: a GCounter under a removed and re-added key
keeps counting from its old total. Akka's ORMap has the same caveat. Use
fresh keys (a key plus a generation) when a removed entry must restart empty;
the values of removed keys also keep taking space until the replica is pruned.

The same key must always hold the same CRDT type: a mutation with another type
raises :class:`TypeMismatchError`, and so does merging two maps that disagree.

Limits: keys are plain hashable data (see :mod:`._codec`). Decode refuses maps
nested more than :data:`MAX_NESTING` deep (msgpack cannot encode much deeper
ones anyway); do not build deeper ones.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, Self, TypeVar, cast

from ._base import CRDT
from ._codec import _element_to_wire, check_element, check_replica, element_from_wire, sort_key
from ._errors import DecodeError, InvalidValueError, TypeMismatchError
from .orset import ORSet

__all__ = ["MAX_NESTING", "ORMap"]

#: How deep ORMaps may nest in one encoding (decode refuses deeper ones).
MAX_NESTING = 64

V = TypeVar("V", bound=CRDT)

# Nesting depth of the decode in progress, per thread: values are decoded through
# crdt_from_wire, whose signature carries no depth.
_decoding = threading.local()


class ORMap(CRDT):
    """An observed-remove map of CRDT values; ``value`` is ``{key: value.value}``."""

    __slots__ = ("_keys", "_values")
    TYPE_CODE = 8

    def __init__(self) -> None:
        super().__init__()
        self._keys = ORSet()
        #: every key ever added (removed ones too) -> its value; never attached to a sink
        self._values: dict[Any, CRDT] = {}

    # --- reading -------------------------------------------------------------------

    @property
    def value(self) -> dict[Any, Any]:
        values = self._values
        return {key: values[key].value for key in self._keys.elements()}

    def get(self, key: Any) -> CRDT | None:
        """The live value under ``key``, or None when the key is not present.

        Read it freely, but change it only through :meth:`update`: a mutator called
        on the returned value directly produces no ORMap delta, so the change would
        never reach the other replicas by delta.
        """
        return self._values[key] if key in self._keys else None

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> Iterator[Any]:
        """Iterate over the present keys (do not mutate the map meanwhile)."""
        return self._keys.elements()

    # --- mutators ------------------------------------------------------------------

    def put(self, replica: str, key: Any, value: CRDT) -> ORMap:
        """Add ``key`` as ``replica`` and merge ``value`` into its stored value.

        ``value`` is copied, never kept. Returns the delta. Raises
        :class:`TypeMismatchError` when ``key`` holds a value of another type.
        """
        if not isinstance(value, CRDT):
            raise InvalidValueError(
                f"ORMap values are CRDTs, got {type(value).__name__} for key {key!r}"
            )
        check_element(key)
        check_replica(replica)
        stored = self._values.get(key)
        if stored is None:
            self._values[key] = value.copy()
        else:
            _check_kind(key, stored, type(value))
            if isinstance(stored, ORMap):
                stored._check_mergeable(cast(ORMap, value))  # refuse before any change
            stored._absorb(value)
        keys_delta = self._keys.add(replica, key)
        return self._emit(_delta(keys_delta, key, value.copy()))

    def update(self, replica: str, key: Any, kind: type[V], mutate: Callable[[V], V]) -> ORMap:
        """Add ``key`` as ``replica`` and change its value with one mutator.

        ``mutate`` receives the stored value (a new ``kind()`` when the key never
        had one), applies one mutator to it and returns that mutator's delta, e.g.
        ``m.update(r, "hits", GCounter, lambda c: c.increment(r))``. Returns the
        ORMap delta, which carries the value's delta. If ``mutate`` raises, the map
        is unchanged (unless ``mutate`` changed the value before raising).
        Raises :class:`TypeMismatchError` when ``key`` holds a value of another type.
        """
        if not (isinstance(kind, type) and issubclass(kind, CRDT)):
            raise InvalidValueError(f"ORMap.update needs a CRDT type as kind, got {kind!r}")
        check_element(key)
        check_replica(replica)  # before mutate runs: a bad id must change nothing
        stored = self._values.get(key)
        if stored is None:
            target = kind()
        else:
            _check_kind(key, stored, kind)
            target = cast(V, stored)  # its type was checked just above
        value_delta = mutate(target)
        if type(value_delta) is not kind:
            raise TypeMismatchError(
                f"ORMap.update: mutate returned {type(value_delta).__name__}, "
                f"expected a {kind.__name__} delta"
            )
        if value_delta is target:
            value_delta = target.copy()  # never let a delta alias the live value
        keys_delta = self._keys.add(replica, key)
        if stored is None:
            self._values[key] = target
        return self._emit(_delta(keys_delta, key, value_delta))

    def remove(self, key: Any) -> ORMap:
        """Remove ``key`` (the adds of it this replica has seen); returns the delta.

        The stored value is kept (see the module docstring). Removing an absent key
        changes nothing and returns an empty delta.
        """
        delta = ORMap._blank()
        delta._keys = self._keys.remove(key)
        return self._emit(delta)

    # --- the lattice ---------------------------------------------------------------

    @classmethod
    def _blank(cls) -> ORMap:
        new = ORMap.__new__(ORMap)
        new._sink = None
        new._keys = ORSet()
        new._values = {}
        return new

    def copy(self) -> Self:
        new = type(self)()
        new._keys = self._keys.copy()
        new._values = {key: v.copy() for key, v in self._values.items()}
        return new

    def _absorb(self, other: Self) -> None:
        if other is self:
            return
        self._check_mergeable(other)
        values = self._values
        self._keys._absorb(other._keys)
        for key, theirs in other._values.items():
            mine = values.get(key)
            if mine is None:
                values[key] = theirs.copy()
            else:
                mine._absorb(theirs)

    def _check_mergeable(self, other: ORMap) -> None:
        """Raise TypeMismatchError, before any change, if a shared key's types differ."""
        values = self._values
        for key, theirs in other._values.items():
            mine = values.get(key)
            if mine is not None:
                _check_kind(key, mine, type(theirs))
                if isinstance(mine, ORMap):
                    mine._check_mergeable(cast(ORMap, theirs))

    # --- encoding ------------------------------------------------------------------

    def _body(self) -> Any:
        values = self._values
        ordered = sorted((sort_key(key), key) for key in values)
        return [
            self._keys._body(),
            [[_element_to_wire(key), values[key].to_wire()] for _, key in ordered],
        ]

    @classmethod
    def _from_body(cls, body: Any) -> Self:
        if not isinstance(body, list) or len(body) != 2:
            raise DecodeError("ORMap body must be [keys, values]")
        depth: int = getattr(_decoding, "depth", 0)
        if depth >= MAX_NESTING:
            raise DecodeError(f"ORMaps nested deeper than {MAX_NESTING}")
        new = cls()
        new._keys = ORSet._from_body(body[0])
        _decoding.depth = depth + 1
        try:
            new._values = _values_from_wire(body[1])
        finally:
            _decoding.depth = depth
        for key in new._keys.elements():
            if key not in new._values:
                raise DecodeError(f"ORMap key {key!r} has no value")
        return new

    # --- removed-replica pruning ---------------------------------------------------

    def modified_by(self) -> frozenset[str]:
        replicas = set(self._keys.modified_by())
        for v in self._values.values():
            replicas |= v.modified_by()
        return frozenset(replicas)

    def prune(self, removed: str, collapse_into: str) -> Self:
        new = type(self)()
        new._keys = self._keys.prune(removed, collapse_into)
        new._values = {k: v.prune(removed, collapse_into) for k, v in self._values.items()}
        return new

    def prune_cleanup(self, removed: str) -> Self:
        new = type(self)()
        new._keys = self._keys.prune_cleanup(removed)
        new._values = {k: v.prune_cleanup(removed) for k, v in self._values.items()}
        return new


def _check_kind(key: Any, stored: CRDT, kind: type[CRDT]) -> None:
    if type(stored) is not kind:
        raise TypeMismatchError(
            f"ORMap key {key!r} holds a {type(stored).__name__}, not a {kind.__name__}"
        )


def _delta(keys_delta: ORSet, key: Any, value_delta: CRDT) -> ORMap:
    delta = ORMap._blank()
    delta._keys = keys_delta
    delta._values[key] = value_delta
    return delta


def _values_from_wire(obj: Any) -> dict[Any, CRDT]:
    from ._types import crdt_from_wire  # lazily: _types imports this module

    if not isinstance(obj, list):
        raise DecodeError("ORMap values must be an array")
    values: dict[Any, CRDT] = {}
    previous: bytes | None = None
    for item in obj:
        if not isinstance(item, list) or len(item) != 2:
            raise DecodeError("ORMap value entry must be [key, value]")
        key = element_from_wire(item[0])
        sk = sort_key(key)
        if previous is not None and sk <= previous:
            raise DecodeError("ORMap keys are not in canonical order")
        previous = sk
        if key in values:
            raise DecodeError("ORMap key appears twice")
        values[key] = crdt_from_wire(item[1])
    return values
