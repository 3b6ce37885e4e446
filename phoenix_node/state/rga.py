"""RGA: a replicated ordered list (Replicated Growable Array), delta-state.

Body (version 1): ``[replicas, nodes]``

- ``replicas``: the distinct replica ids used by the node ids and parent ids
  below, sorted, each used at least once;
- ``nodes``: ``[[counter, r, parent, deleted, value], ...]`` sorted by id, where
  the id is ``(counter, replicas[r])`` (ordered by counter, then replica);
  ``counter`` is an int in 1..2**64 - 1; ``parent`` is nil (the list's head) or
  ``[counter, r]`` with a counter *smaller* than the node's own; ``deleted`` is
  a bool; ``value`` is a plain value (see :mod:`._codec`), nil when deleted.

Semantics. Every element ever inserted is a node: an id that names it for good,
the id of the element it was inserted after (its parent), its value and a
deleted flag. Ids are Lamport stamps: a new node's counter is the largest
counter this replica has seen in the list plus one, so a node's id is larger
than its parent's and than every id its writer had seen. Merge is the union of
the nodes, a node deleted on either side stays deleted.

The visible list is a depth-first walk from the head: a node, then its children
(the nodes inserted right after it) newest id first, ties by replica id (larger
first), each followed by its own subtree; deleted nodes are skipped but their
subtrees are not. A new node gets the largest id so far, so it lands right after
its parent, i.e. at the index asked for; concurrent inserts at the same place are
ordered by id the same way on every replica, and a run of text typed by one
replica is never interleaved with another's. A node whose parent has not arrived
yet (its delta came first) is kept but stays invisible until the parent comes.

Consistency: one id always has one parent and one value. Decode refuses
duplicate ids and parents that are not older than their child; a merge of
corrupt states that disagree on an id (a replica id reused after a restart,
which :mod:`phoenix_node` forbids) still converges: it keeps the version with
the smallest parent, then the smallest value (msgpack bytes), deleted if any is.

Costs and limits. Deleted elements stay as tombstones forever: their id and
parent (about 200 bytes in memory, about 12 on the wire), not their value, which is
dropped. A list that churns through many inserts and deletes grows; snapshot
the value into a fresh RGA to compact it if you can coordinate that. The
visible order is cached: local inserts, deletes and merges of single-node deltas
keep it up to date (an O(n) list shift at most); other merges drop it and the
next read rebuilds it in O(n log n). Pruning: replica ids inside node ids are
names, not per-replica data, and other replicas' nodes point at them as
parents, so they can never be rewritten; a removed replica's ids stay and
``prune`` / ``prune_cleanup`` return plain copies (see :meth:`RGA.needs_pruning_from`).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise
from typing import Any, Self, overload

from ._base import CRDT
from ._codec import (
    canonical_value,
    check_replica,
    replica_from_wire,
    sort_key,
    value_from_wire,
)
from ._errors import CounterOverflowError, DecodeError, InvalidValueError

__all__ = ["RGA", "RGAIndexError"]

Id = tuple[int, str]
#: (parent id or None for the head, value or None when deleted, deleted)
Node = tuple[Id | None, Any, bool]

_MAX_COUNTER = 2**64 - 1
_HEAD_KEY: Id = (0, "")  # sorts before every real id (counters start at 1)


class RGAIndexError(InvalidValueError, IndexError):
    """An index outside the visible list (or not an int).

    Both an :class:`InvalidValueError` (the state layer's bad-input error) and an
    :class:`IndexError` (so the sequence protocol and ``except IndexError`` work).
    """


class RGA(CRDT):
    """A list that replicas edit concurrently; every replica converges to one order."""

    __slots__ = ("_clock", "_nodes", "_order")
    TYPE_CODE = 9

    def __init__(self) -> None:
        super().__init__()
        self._nodes: dict[Id, Node] = {}
        self._clock = 0  # the largest counter in _nodes (0 when empty)
        self._order: list[Id] | None = []  # visible ids in order; None = rebuild

    # --- reading ---------------------------------------------------------------------

    @property
    def value(self) -> list[Any]:
        """The visible elements, in order.

        A new list each time; nested lists and dicts inside it are the stored
        values themselves: treat them as read-only.
        """
        nodes = self._nodes
        return [nodes[i][1] for i in self._visible()]

    def __len__(self) -> int:
        return len(self._visible())

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...
    def __getitem__(self, index: int | slice) -> Any:
        order = self._visible()
        if isinstance(index, slice):
            nodes = self._nodes
            return [nodes[i][1] for i in order[index]]
        return self._nodes[order[_check_index(index, len(order), "RGA index")]][1]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.value)

    @property
    def tombstone_count(self) -> int:
        """How many deleted elements the state still carries (O(n))."""
        return sum(1 for node in self._nodes.values() if node[2])

    # --- mutators --------------------------------------------------------------------

    def insert(self, replica: str, index: int, value: Any) -> RGA:
        """Insert ``value`` so that it ends up at visible position ``index``.

        ``0 <= index <= len(self)``; returns the delta (the new node). Raises
        :class:`RGAIndexError` for a bad index and :class:`InvalidValueError` for
        a bad replica id or a value that is not plain data.
        """
        order = self._visible()
        if type(index) is not int or not 0 <= index <= len(order):
            raise RGAIndexError(
                f"RGA.insert index must be an int in 0..{len(order)} (the list length), "
                f"got {index!r}"
            )
        check_replica(replica)
        value = canonical_value(value)
        counter = self._clock + 1
        if counter > _MAX_COUNTER:
            raise CounterOverflowError("RGA Lamport counter would exceed 2**64 - 1")
        node_id = (counter, replica)
        # The new id is the largest in the list, so the node becomes its parent's
        # first child and sits right after it: at ``index``, before any tombstones.
        node: Node = (order[index - 1] if index else None, value, False)
        self._nodes[node_id] = node
        self._clock = counter
        order.insert(index, node_id)
        return self._emit(_delta(node_id, node))

    def append(self, replica: str, value: Any) -> RGA:
        """Insert ``value`` at the end; returns the delta."""
        return self.insert(replica, len(self._visible()), value)

    def delete(self, index: int) -> RGA:
        """Delete the visible element at ``index`` (negative counts from the end).

        Returns the delta (the node as a tombstone). Needs no replica id: a delete
        creates no id. Raises :class:`RGAIndexError` for a bad index.
        """
        order = self._visible()
        node_id = order.pop(_check_index(index, len(order), "RGA.delete index"))
        node: Node = (self._nodes[node_id][0], None, True)
        self._nodes[node_id] = node
        return self._emit(_delta(node_id, node))

    # --- the lattice -----------------------------------------------------------------

    def copy(self) -> Self:
        new = type(self)()
        new._nodes = dict(self._nodes)  # nodes are immutable tuples: sharing is safe
        new._clock = self._clock
        new._order = None if self._order is None else list(self._order)
        return new

    def _absorb(self, other: Self) -> None:
        nodes = self._nodes
        old_clock = self._clock
        changed: list[tuple[Id, Node | None]] = []
        for node_id, theirs in other._nodes.items():
            mine = nodes.get(node_id)
            if mine is None:
                nodes[node_id] = theirs
                changed.append((node_id, None))
            elif mine is not theirs:
                joined = _join_nodes(mine, theirs)
                if joined is not mine:
                    nodes[node_id] = joined
                    changed.append((node_id, mine))
        if other._clock > old_clock:
            self._clock = other._clock
        if changed and not (len(changed) == 1 and self._patch_order(*changed[0], old_clock)):
            self._order = None

    def _patch_order(self, node_id: Id, old: Node | None, old_clock: int) -> bool:
        """Update the cached order for one changed node; False when it cannot."""
        order = self._order
        if order is None:
            return True  # nothing cached, nothing to keep right
        parent, _, deleted = self._nodes[node_id]
        if old is not None:  # a known node: only a plain delete is patched here
            if not (deleted and not old[2] and old[0] == parent):
                return False
            if node_id in order:  # absent when the node is under a missing parent
                order.remove(node_id)
            return True
        if node_id[0] <= old_clock:
            return False  # may sit between existing siblings, or adopt waiting children
        # The largest id so far: no node points at it yet, and it is its parent's first
        # child, right after the parent (unless the parent is hidden).
        if deleted:
            return True
        if parent is None:
            order.insert(0, node_id)
            return True
        parent_node = self._nodes.get(parent)
        if parent_node is None:
            return True  # parent not here yet: the node waits, invisible
        if parent_node[2]:
            return False  # after a tombstone: its place needs the walk
        if order and order[-1] == parent:  # the common case: an append
            order.append(node_id)
            return True
        try:
            order.insert(order.index(parent) + 1, node_id)
        except ValueError:
            pass  # the parent itself waits for its own parent: invisible too
        return True

    def _visible(self) -> list[Id]:
        order = self._order
        if order is None:
            order = self._order = _walk(self._nodes)
        return order

    # --- encoding --------------------------------------------------------------------

    def _body(self) -> Any:
        nodes = self._nodes
        names = self.modified_by()
        replicas = sorted(names)
        slot = {r: i for i, r in enumerate(replicas)}
        out = []
        for node_id in sorted(nodes):
            parent, value, deleted = nodes[node_id]
            wire_parent = None if parent is None else [parent[0], slot[parent[1]]]
            out.append([node_id[0], slot[node_id[1]], wire_parent, deleted, value])
        return [replicas, out]

    @classmethod
    def _from_body(cls, body: Any) -> Self:
        if not isinstance(body, list) or len(body) != 2:
            raise DecodeError("RGA body must be [replicas, nodes]")
        replicas = _replicas_from_wire(body[0])
        nodes = _nodes_from_wire(body[1], replicas)
        new = cls()
        new._nodes = nodes
        new._clock = next(reversed(nodes))[0] if nodes else 0  # ids arrive sorted
        new._order = None
        if len(new.modified_by()) != len(replicas):
            raise DecodeError("RGA replica table has unused entries (not canonical)")
        return new

    # --- removed-replica pruning -----------------------------------------------------

    def modified_by(self) -> frozenset[str]:
        """Replica ids named by node ids or parent ids."""
        names = {node_id[1] for node_id in self._nodes}
        names.update(node[0][1] for node in self._nodes.values() if node[0] is not None)
        return frozenset(names)

    def needs_pruning_from(self, removed: str) -> bool:
        """Always False: an RGA holds no per-replica data to fold away.

        A replica id inside a node id only makes the id unique; ids are immutable
        identities (other nodes point at them as parents, tombstones must match
        them), so renaming them would fork the list. A removed replica creates no
        new ids, so its old ones cost nothing more than any element.
        """
        return False

    def prune(self, removed: str, collapse_into: str) -> Self:
        """A plain copy: see :meth:`needs_pruning_from`."""
        return self.copy()

    def prune_cleanup(self, removed: str) -> Self:
        """A plain copy: dropping the removed replica's nodes would drop elements."""
        return self.copy()


# --- helpers --------------------------------------------------------------------------


def _delta(node_id: Id, node: Node) -> RGA:
    delta = RGA.__new__(RGA)
    delta._sink = None
    delta._nodes = {node_id: node}
    delta._clock = node_id[0]
    delta._order = None
    return delta


def _check_index(index: Any, length: int, what: str) -> int:
    if type(index) is not int or not -length <= index < length:
        raise RGAIndexError(
            f"{what} must be an int in {-length}..{length - 1} (list length {length}), "
            f"got {index!r}"
        )
    return index


def _walk(nodes: dict[Id, Node]) -> list[Id]:
    """Visible ids: depth-first from the head, children by id descending. O(n log n)."""
    children: dict[Id | None, list[Id]] = {}
    for node_id in sorted(nodes):  # so that each children list is ascending
        children.setdefault(nodes[node_id][0], []).append(node_id)
    out: list[Id] = []
    stack = list(children.get(None, ()))
    while stack:  # iterative: a typed run of text is a chain as deep as it is long
        node_id = stack.pop()  # the largest pending sibling first
        if not nodes[node_id][2]:
            out.append(node_id)
        kids = children.get(node_id)
        if kids:
            stack.extend(kids)
    return out


def _parent_key(parent: Id | None) -> Id:
    return _HEAD_KEY if parent is None else parent


def _join_nodes(a: Node, b: Node) -> Node:
    """Join two versions of one id (returns ``a`` itself when nothing changes)."""
    if a[0] != b[0]:
        # Corrupt input (an id reused): pick deterministically so replicas converge.
        first, second = (a, b) if _parent_key(a[0]) < _parent_key(b[0]) else (b, a)
        if first[2] or not second[2]:
            return first
        return (first[0], None, True)
    if a[2]:
        return a
    if b[2]:
        return b
    va, vb = a[1], b[1]
    if _same_value(va, vb):
        return a
    return a if sort_key(va) < sort_key(vb) else b


def _same_value(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if type(a) is not type(b) or a != b:
        return False
    if isinstance(a, (float, list, dict)):  # -0.0 == 0.0, [1] == [1.0]: compare bytes
        return sort_key(a) == sort_key(b)
    return True


def _counter_from_wire(obj: Any) -> int:
    if type(obj) is not int or not 1 <= obj <= _MAX_COUNTER:
        raise DecodeError(f"invalid RGA counter {obj!r}")
    return obj


def _replicas_from_wire(obj: Any) -> list[str]:
    if not isinstance(obj, list):
        raise DecodeError("RGA replica table must be an array")
    replicas = [replica_from_wire(r) for r in obj]
    if any(a >= b for a, b in pairwise(replicas)):
        raise DecodeError("RGA replica table is not sorted (not canonical)")
    return replicas


def _id_from_wire(counter: Any, index: Any, replicas: list[str]) -> Id:
    if type(index) is not int or not 0 <= index < len(replicas):
        raise DecodeError(f"RGA replica index {index!r} out of the table")
    return (_counter_from_wire(counter), replicas[index])


def _nodes_from_wire(obj: Any, replicas: list[str]) -> dict[Id, Node]:
    if not isinstance(obj, list):
        raise DecodeError("RGA nodes must be an array")
    nodes: dict[Id, Node] = {}
    previous: Id | None = None
    for item in obj:
        if not isinstance(item, list) or len(item) != 5:
            raise DecodeError("RGA node must be [counter, replica, parent, deleted, value]")
        counter, index, wire_parent, deleted, value = item
        node_id = _id_from_wire(counter, index, replicas)
        if previous is not None and node_id <= previous:
            raise DecodeError("RGA nodes are not sorted by id, or an id repeats")
        previous = node_id
        parent: Id | None = None
        if wire_parent is not None:
            if not isinstance(wire_parent, list) or len(wire_parent) != 2:
                raise DecodeError("RGA parent must be nil or [counter, replica]")
            parent = _id_from_wire(wire_parent[0], wire_parent[1], replicas)
            if parent[0] >= node_id[0]:
                raise DecodeError("RGA parent is not older than its child")
        if type(deleted) is not bool:
            raise DecodeError("RGA deleted flag must be a bool")
        if deleted and value is not None:
            raise DecodeError("RGA tombstone carries a value (not canonical)")
        nodes[node_id] = (parent, None if deleted else value_from_wire(value), deleted)
    return nodes
