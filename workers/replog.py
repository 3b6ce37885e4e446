"""The value of a replication change log entry (the ``repl`` db of the node's LMDB).

Key: the agent id (UTF-8). Written by a worker's commit, in the same transaction
as the agent's state, and by the control process (anti-entropy repairs, migrated
agents); read and compare-and-deleted by the control's replicator
(:mod:`phoenix_node.cluster.replication`). Value, version 1::

    b"W" stamp                         ship the whole stored state
    b"D" n:u8 stamp delta              ship ``delta`` where the replica is known to
                                       hold everything logged before it

- ``stamp`` (1..255 bytes) is unique to the write that made the value: a worker
  commit's ``>IQ`` (pid, commit sequence), the control's ``ae<n>``. In a ``D``
  value ``n`` is its length. Held client replies wait on stamps only: a stamp
  tells one logged change from the next without keeping the delta around.
- ``delta`` is an agent state record (:meth:`phoenix_node.state.AgentState.encode`)
  holding the join of the deltas of every commit since the entry was last
  deleted: a worker that commits an agent whose entry is still there joins its
  new delta into the logged one, so a shipment of the value holds every change
  it stands for. Merged into a replica's state with the agent's schema it is
  the join, like a whole state.
- The replicator deletes an entry once every replica answered, only if its value
  is unchanged (compare-and-delete on the whole value); a value rewritten
  meanwhile carries a new stamp and is shipped again.

A value that is none of these (empty, another tag, a length past the end, an
empty delta) reads as "ship the whole state", with the whole value as its
stamp: a damaged entry costs one whole-state shipment, never a lost change or a
crash.
"""

from __future__ import annotations

__all__ = ["DELTA", "WHOLE", "delta_entry", "entry_stamp", "read_entry", "whole_entry"]

WHOLE = b"W"
DELTA = b"D"
_MAX_STAMP = 255


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
