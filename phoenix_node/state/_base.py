"""The contract every CRDT type of Phoenix keeps.

A CRDT here is a small mutable value with:

- ``merge(other)``: a *new* value, the join of both; neither input changes. Merge
  is commutative, associative and idempotent (a join-semilattice).
- ``value``: the plain Python value (int, set, dict, list...).
- mutators that change the value in place and return a *delta* of the same type:
  for any replica ``r``, ``r.merge(delta)`` has the same effect as merging the
  whole mutated state (delta-state CRDTs, Almeida et al.).
- ``encode()``: canonical msgpack bytes (see :mod:`._codec`), and
  ``Type.decode(data)``, which raises :class:`DecodeError` and nothing else.
- removed-replica pruning hooks, after Akka's ``RemovedNodePruning``:
  ``modified_by()``, ``needs_pruning_from(r)``, ``prune(r, into)`` and
  ``prune_cleanup(r)``. Pruning is coordinated by the cluster: one replica calls
  ``prune`` and spreads the result; every replica then passes states that still
  carry ``r``'s data through ``prune_cleanup(r)`` before merging them.

Subclasses implement ``value``, ``copy``, ``_absorb`` (an in-place join),
``_body`` and ``_from_body``. Mutators end with ``return self._emit(delta)`` so
that an owner (the composite agent state) can collect deltas.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Self

from ._codec import pack, unpack
from ._errors import DecodeError, TypeMismatchError

__all__ = ["CRDT", "DeltaSink"]

DeltaSink = Callable[["CRDT"], None]


class CRDT(ABC):
    """Base class of all Phoenix CRDT types."""

    __slots__ = ("_sink",)

    #: Small integer that tags the type on the wire; unique per type.
    TYPE_CODE: ClassVar[int]
    #: Version of the body's layout; decode refuses any other.
    VERSION: ClassVar[int] = 1

    def __init__(self) -> None:
        self._sink: DeltaSink | None = None

    # --- the lattice ---------------------------------------------------------------

    @property
    @abstractmethod
    def value(self) -> Any:
        """The plain Python value."""

    @abstractmethod
    def copy(self) -> Self:
        """An independent copy (no delta sink attached)."""

    @abstractmethod
    def _absorb(self, other: Self) -> None:
        """Join ``other`` into ``self`` in place. ``other`` is not changed."""

    def merge(self, other: Self) -> Self:
        """The join of ``self`` and ``other`` as a new value; neither input changes."""
        self._check_same_type(other)
        result = self.copy()
        result._absorb(other)
        return result

    def merge_in(self, other: Self) -> None:
        """Join ``other`` into ``self`` in place (no delta is emitted)."""
        self._check_same_type(other)
        self._absorb(other)

    def _check_same_type(self, other: object) -> None:
        if type(other) is not type(self):
            raise TypeMismatchError(
                f"cannot merge {type(self).__name__} with {type(other).__name__}"
            )

    def _emit(self, delta: Self) -> Self:
        sink = self._sink
        if sink is not None:
            sink(delta)
        return delta

    # --- encoding ------------------------------------------------------------------

    @abstractmethod
    def _body(self) -> Any:
        """The canonical wire body (plain lists, ints, str, bytes)."""

    @classmethod
    @abstractmethod
    def _from_body(cls, body: Any) -> Self:
        """Rebuild from a decoded body; raise DecodeError on anything invalid."""

    def _body_bytes(self) -> bytes:
        """The packed body; types on hot paths override it to skip building lists."""
        return pack(self._body())

    def to_wire(self) -> list[Any]:
        """The decoded form of :meth:`encode`: ``[type_code, version, body]``."""
        return [self.TYPE_CODE, self.VERSION, self._body()]

    def encode(self) -> bytes:
        """Canonical msgpack bytes: equal states give equal bytes."""
        return pack(self.to_wire())

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Rebuild a value from :meth:`encode`'s bytes; raises only DecodeError."""
        return cls.from_wire(unpack(data))

    @classmethod
    def from_wire(cls, obj: Any) -> Self:
        """Rebuild a value from its decoded form; raises only DecodeError."""
        if not isinstance(obj, list) or len(obj) != 3:
            raise DecodeError(f"not a {cls.__name__} encoding: expected [code, version, body]")
        code, version, body = obj
        if code != cls.TYPE_CODE or isinstance(code, bool):
            raise DecodeError(f"type tag {code!r} is not {cls.__name__} ({cls.TYPE_CODE})")
        if version != cls.VERSION or isinstance(version, bool):
            raise DecodeError(f"{cls.__name__} encoding version {version!r} is not supported")
        try:
            return cls._from_body(body)
        except DecodeError:
            raise
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError) as exc:
            # Structural validation is explicit; this net keeps the contract that
            # decode raises nothing but DecodeError even on shapes we missed.
            raise DecodeError(f"invalid {cls.__name__} body: {exc}") from None

    # --- removed-replica pruning ---------------------------------------------------

    def modified_by(self) -> frozenset[str]:
        """Replica ids whose data this value carries."""
        return frozenset()

    def needs_pruning_from(self, removed: str) -> bool:
        """True when ``removed`` still has data in this value."""
        return removed in self.modified_by()

    def prune(self, removed: str, collapse_into: str) -> Self:
        """A copy with ``removed``'s data folded into ``collapse_into``; value unchanged."""
        return self.copy()

    def prune_cleanup(self, removed: str) -> Self:
        """A copy with every trace of ``removed`` dropped (for states that predate pruning)."""
        return self.copy()

    # --- comparison ----------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, CRDT)
        return bool(self._body() == other._body())

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.value!r})"
