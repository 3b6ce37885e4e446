"""Composite agent state: the CRDT fields an agent class declares, as one record.

An agent class declares its state as CRDT fields (``hits = GCounter()``); a
:class:`StateSchema` collects them, and each agent instance gets its own
:class:`AgentState` with fresh, empty values. The composite

- tracks the delta since its last flush (every field mutator's delta is
  joined into a pending delta for that field), for replication;
- knows whether it changed since it was last saved (``dirty``);
- encodes as one record and merges field by field.

Wire format (version 1)::

    [20, 1, [[field_name, field_wire], ...]]   # sorted by field name

where ``field_wire`` is the field's own ``[type_code, version, body]``. Fields
present in a record but no longer declared by the class are *kept* (and written
back) so that removing a field from a class never destroys stored data; a
declared field missing from a record starts empty. A stored field whose type
differs from the declared one is refused with :class:`DecodeError`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import msgpack

from ._base import CRDT
from ._codec import pack, unpack
from ._errors import DecodeError, InvalidValueError, TypeMismatchError

__all__ = ["AgentState", "StateSchema"]

COMPOSITE_CODE = 20
COMPOSITE_VERSION = 1
_MAX_FIELDS = 256


def _array_header(n: int) -> bytes:
    header: bytes = msgpack.Packer(autoreset=True).pack_array_header(n)
    return header


class StateSchema:
    """The CRDT fields of an agent type: name -> CRDT class, in a fixed order."""

    __slots__ = ("_fields", "_head", "_prefixes", "owner")

    def __init__(self, fields: Mapping[str, type[CRDT]], owner: str = "<schema>") -> None:
        if len(fields) > _MAX_FIELDS:
            raise InvalidValueError(f"{owner}: more than {_MAX_FIELDS} state fields")
        for name, cls in fields.items():
            if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
                raise InvalidValueError(f"{owner}: state field name {name!r} is not a public name")
            if not (isinstance(cls, type) and issubclass(cls, CRDT)):
                raise InvalidValueError(f"{owner}.{name}: {cls!r} is not a CRDT type")
        self._fields = dict(sorted(fields.items()))
        self.owner = owner
        # The constant bytes of a record of this schema, so that encoding a state is
        # a join of precomputed prefixes and packed field bodies: the same canonical
        # bytes as packing the nested lists, at a fraction of the cost (hot path).
        self._head = (
            b"\x93"
            + pack(COMPOSITE_CODE)
            + pack(COMPOSITE_VERSION)
            + _array_header(len(self._fields))
        )
        self._prefixes = [
            b"\x92" + pack(name) + b"\x93" + pack(cls.TYPE_CODE) + pack(cls.VERSION)
            for name, cls in self._fields.items()
        ]

    @classmethod
    def from_class(cls, klass: type) -> StateSchema:
        """Collect the CRDT instances declared on ``klass`` (and its bases) as fields.

        Each declaration must be empty (``hits = GCounter()``): it is a template,
        never shared state.
        """
        fields: dict[str, type[CRDT]] = {}
        for base in reversed(klass.__mro__):
            for name, attr in vars(base).items():
                if isinstance(attr, CRDT):
                    if attr != type(attr)():
                        raise InvalidValueError(
                            f"{klass.__qualname__}.{name}: declare state fields empty "
                            f"(e.g. {name} = {type(attr).__name__}()); got {attr!r}"
                        )
                    fields[name] = type(attr)
        return cls(fields, owner=klass.__qualname__)

    @property
    def fields(self) -> Mapping[str, type[CRDT]]:
        return self._fields

    def __contains__(self, name: object) -> bool:
        return name in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def new_state(self, *, track_deltas: bool = True) -> AgentState:
        """A fresh state with every field empty."""
        return AgentState(self, track_deltas=track_deltas)

    def decode(self, data: bytes, *, track_deltas: bool = True) -> AgentState:
        """Rebuild a state of this schema from :meth:`AgentState.encode` bytes."""
        return AgentState.decode(data, self, track_deltas=track_deltas)

    def load(self, stored: bytes | None, *, track_deltas: bool = True) -> AgentState:
        """The state a stored record holds, or a fresh one when nothing was stored."""
        if stored is None:
            return AgentState(self, track_deltas=track_deltas)
        return AgentState.decode(stored, self, track_deltas=track_deltas)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StateSchema) and self._fields == other._fields

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v.__name__}" for k, v in self._fields.items())
        return f"StateSchema({self.owner}: {inner})"


class AgentState:
    """One agent's state: a value per declared field, plus the pending delta."""

    __slots__ = ("_delta", "_dirty", "_extra", "_fields", "_schema", "_track")

    def __init__(self, schema: StateSchema, *, track_deltas: bool = True) -> None:
        """``track_deltas=False`` keeps only the dirty flag (no replication needs deltas)."""
        self._schema = schema
        self._track = track_deltas
        self._fields: dict[str, CRDT] = {}
        self._delta: dict[str, CRDT] = {}
        self._extra: dict[str, CRDT] = {}  # stored fields the class no longer declares
        self._dirty = False
        for name, cls in schema.fields.items():
            self._attach(name, cls())

    def _attach(self, name: str, value: CRDT) -> None:
        pending = self._delta
        if not self._track:

            def mark(delta: CRDT) -> None:
                self._dirty = True

            value._sink = mark
            self._fields[name] = value
            return

        def sink(delta: CRDT) -> None:
            # Runs inside every mutator of this field: keep it to a dict lookup and a join.
            current = pending.get(name)
            if current is None:
                current = pending[name] = type(delta)()
            current._absorb(delta)
            self._dirty = True

        value._sink = sink
        self._fields[name] = value

    # --- access --------------------------------------------------------------------

    @property
    def schema(self) -> StateSchema:
        return self._schema

    def __getitem__(self, name: str) -> CRDT:
        try:
            return self._fields[name]
        except KeyError:
            raise KeyError(f"{self._schema.owner} has no state field {name!r}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    @property
    def value(self) -> dict[str, Any]:
        """Plain values of the declared fields."""
        return {name: field.value for name, field in self._fields.items()}

    @property
    def dirty(self) -> bool:
        """True when a field changed since the last :meth:`mark_clean`."""
        return self._dirty

    def mark_clean(self) -> None:
        """Record that the current state was saved."""
        self._dirty = False

    @property
    def tracks_deltas(self) -> bool:
        """Whether mutations are collected for :meth:`take_delta`."""
        return self._track

    def set_delta_tracking(self, on: bool) -> None:
        """Start or stop collecting deltas; either way the pending delta is dropped (a
        delta taken afterwards holds only the changes made after this call)."""
        self._delta.clear()
        if on is self._track:
            return
        self._track = on
        for name, value in list(self._fields.items()):
            self._attach(name, value)

    def take_delta(self) -> AgentState | None:
        """The join of every field delta since the last call, or None; resets it.

        The delta is a partial state: only the changed fields, in the schema's order.
        Its :meth:`encode` is a record of those fields; decoded with the schema, the
        others start empty, so merging it into any state of the schema is the join.
        """
        if not self._delta:
            return None
        pending = self._delta
        delta = AgentState.__new__(AgentState)
        delta._schema = self._schema
        delta._track = False
        delta._fields = {name: pending[name] for name in self._schema.fields if name in pending}
        delta._delta = {}
        delta._extra = {}
        delta._dirty = False
        self._delta.clear()
        return delta

    # --- lattice -------------------------------------------------------------------

    def merge_in(self, other: AgentState) -> None:
        """Join ``other`` into this state field by field (marks it dirty, emits no delta)."""
        if other._schema != self._schema:
            raise TypeMismatchError(
                f"cannot merge state of {other._schema.owner} into {self._schema.owner}"
            )
        for name, value in other._fields.items():
            self._fields[name].merge_in(value)
        for name, value in other._extra.items():
            mine = self._extra.get(name)
            self._extra[name] = value.copy() if mine is None else mine.merge(value)
        self._dirty = True

    def merge(self, other: AgentState) -> AgentState:
        """The field-by-field join as a new state; neither input changes."""
        result = self.copy()
        result.merge_in(other)
        result._dirty = False
        return result

    def copy(self) -> AgentState:
        new = AgentState.__new__(AgentState)
        new._schema = self._schema
        new._track = self._track
        new._fields = {}
        new._delta = {}
        new._extra = {k: v.copy() for k, v in self._extra.items()}
        new._dirty = False
        for name, value in self._fields.items():
            new._attach(name, value.copy())
        return new

    # --- encoding ------------------------------------------------------------------

    def encode(self) -> bytes:
        """One canonical record holding every field (a delta: every changed field)."""
        schema = self._schema
        if not self._extra and len(self._fields) == len(schema._prefixes):
            if len(schema._prefixes) == 1:
                for value in self._fields.values():
                    return schema._head + schema._prefixes[0] + value._body_bytes()
            return schema._head + b"".join(
                [
                    prefix + value._body_bytes()
                    for prefix, value in zip(schema._prefixes, self._fields.values(), strict=True)
                ]
            )
        items = {name: value.to_wire() for name, value in self._fields.items()}
        for name, value in self._extra.items():
            items[name] = value.to_wire()
        return pack([COMPOSITE_CODE, COMPOSITE_VERSION, [[k, items[k]] for k in sorted(items)]])

    @classmethod
    def decode(cls, data: bytes, schema: StateSchema, *, track_deltas: bool = True) -> AgentState:
        """Rebuild from :meth:`encode`'s bytes; raises only DecodeError."""
        from ._types import crdt_from_wire

        obj = unpack(data)
        if not isinstance(obj, list) or len(obj) != 3:
            raise DecodeError("not an agent state record: expected [code, version, fields]")
        code, version, body = obj
        if code != COMPOSITE_CODE or isinstance(code, bool):
            raise DecodeError(f"type tag {code!r} is not an agent state ({COMPOSITE_CODE})")
        if version != COMPOSITE_VERSION or isinstance(version, bool):
            raise DecodeError(f"agent state version {version!r} is not supported")
        if not isinstance(body, list) or len(body) > _MAX_FIELDS:
            raise DecodeError("agent state fields must be an array of at most 256")
        state = cls(schema, track_deltas=track_deltas)
        previous = None
        for item in body:
            if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str):
                raise DecodeError("agent state field must be [name, value]")
            name, wire = item
            if previous is not None and name <= previous:
                raise DecodeError("agent state fields are not sorted by name")
            previous = name
            value = crdt_from_wire(wire)
            declared = schema.fields.get(name)
            if declared is None:
                state._extra[name] = value
            elif type(value) is not declared:
                raise DecodeError(
                    f"{schema.owner}.{name}: stored {type(value).__name__}, "
                    f"declared {declared.__name__}"
                )
            else:
                state._attach(name, value)
        return state

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AgentState):
            return NotImplemented
        return self._schema == other._schema and self.encode() == other.encode()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"AgentState({self._schema.owner}: {self.value!r})"

    def __reduce__(self) -> Any:
        raise TypeError("AgentState is never pickled: use encode()")
