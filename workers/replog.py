"""The replication change log: the ``repl`` db of the node's LMDB.

One entry per change: a worker's commit writes one for each agent it changed, in
the same transaction as the agent's state, under :func:`entry_key` (the agent id,
a 0xFF byte, which no UTF-8 text holds, and the commit's stamp); the control
process writes "ship the whole state" marks (anti-entropy repairs, migrated
agents) under the bare agent id. The control's replicator
(:mod:`phoenix_node.cluster.replication`) reads every entry of an agent at once
(an agent's 0xFF entries are contiguous in key order), ships them, and deletes
exactly the entries it shipped once every replica answered (compare-and-delete):
an entry is never rewritten, so one shipped is never shipped again, and an
agent written faster than it ships has several small entries, never a growing
one. Value, version 1::

    b"W" stamp                         ship the whole stored state
    b"D" n:u8 stamp delta              ship ``delta`` where the replica is known to
                                       hold everything logged before it

- ``stamp`` (1..255 bytes) is unique to the write that made the value: a worker
  commit's ``>IQ`` (pid, commit sequence), the control's ``ae<n>``. In a ``D``
  value ``n`` is its length. Held client replies wait on stamps only.
- ``delta`` is an agent state record (:meth:`phoenix_node.state.AgentState.encode`)
  holding the fields that commit changed, each the join of that commit's changes
  (:meth:`~phoenix_node.state.AgentState.take_delta`). Merged into a replica's
  state with the agent's schema it is a join, like a whole state.

A value that is none of these (empty, another tag, a length past the end, an
empty delta) reads as "ship the whole state", with the whole value as its
stamp: a damaged entry costs one whole-state shipment, never a lost change or a
crash.
"""

from __future__ import annotations

__all__ = [
    "DELTA",
    "WHOLE",
    "delta_entry",
    "entry_agent",
    "entry_key",
    "entry_stamp",
    "read_entry",
    "whole_entry",
]

WHOLE = b"W"
DELTA = b"D"
_MAX_STAMP = 255
_MAX_KEY = 511  # LMDB's default key limit (phoenix_node.state.store.MAX_KEY_SIZE)
_SEP = b"\xff"  # never in UTF-8 text: an agent id's bytes end before the first one


def entry_key(agent_id: str, stamp: bytes) -> bytes | None:
    """The key of the entry a commit with ``stamp`` logs for ``agent_id``; None when it
    would pass LMDB's key limit (an id near 511 bytes): then the commit logs a whole
    mark under the bare id, which a later commit may rewrite without losing anything."""
    key = agent_id.encode() + _SEP + _check_stamp(stamp)
    return key if len(key) <= _MAX_KEY else None


def entry_agent(key: bytes) -> str:
    """The agent id of an entry's key (a worker's entry, or a control's bare id)."""
    return key.partition(_SEP)[0].decode(errors="replace")


def _check_stamp(stamp: bytes) -> bytes:
    if not isinstance(stamp, bytes) or not 0 < len(stamp) <= _MAX_STAMP:
        raise ValueError(f"a change log stamp is 1..{_MAX_STAMP} bytes, got {stamp!r}")
    return stamp


def whole_entry(stamp: bytes) -> bytes:
    """A log value asking for the whole stored state to be shipped."""
    return WHOLE + _check_stamp(stamp)


def delta_entry(stamp: bytes, delta: bytes) -> bytes:
    """A log value carrying ``delta`` (an encoded agent state record, not empty)."""
    if not delta:
        raise ValueError("a logged delta cannot be empty")
    return DELTA + bytes((len(_check_stamp(stamp)),)) + stamp + delta


def _stamp_span(value: bytes) -> tuple[int, int] | None:
    """Where the stamp of a well-formed value lies (a W value: up to its end)."""
    tag = value[:1]
    if tag == WHOLE and len(value) > 1:
        return 1, len(value)
    if tag == DELTA and len(value) > 2 and value[1] and len(value) > 2 + value[1]:
        return 2, 2 + value[1]
    return None


def read_entry(value: bytes) -> tuple[bytes, bytes | None]:
    """``(stamp, delta)`` of a log value; ``delta`` is None for "ship the whole state"
    (a ``W`` value, or one that is not well formed: see the module docstring)."""
    span = _stamp_span(value)
    if span is None:
        return value, None
    start, end = span
    return value[start:end], (value[end:] if end < len(value) else None)


def entry_stamp(value: bytes) -> bytes:
    """The stamp of a log value (no copy of its delta)."""
    span = _stamp_span(value)
    return value if span is None else value[span[0] : span[1]]
