"""Corr ids of the control process's own requests: one range per requester.

The replicator, the registry's gossip, migrations and the handoff all send requests
over the same sockets (the peer DEALERs, the DEALERs to the workers); each answer
goes to the requester whose range holds its corr id (:func:`owner_of`), decoded once.
"""

from __future__ import annotations

from ipc.protocol import ProtocolError, decode_reply_kind

__all__ = ["HANDOFF", "MIGRATION", "REGISTRY", "REPLICATOR", "CorrIds", "reply_corr"]

REPLICATOR = (1, 1 << 60)
REGISTRY = (1 << 60, 1 << 61)
MIGRATION = (1 << 61, 1 << 62)
HANDOFF = (1 << 62, 1 << 63)


class CorrIds:
    """The corr ids of one requester: ``base <= corr < end``, handed out in turn."""

    __slots__ = ("_next", "base", "end")

    def __init__(self, span: tuple[int, int]) -> None:
        self.base, self.end = span
        self._next = self.base

    def next(self) -> int:
        corr = self._next
        self._next = corr + 1 if corr + 1 < self.end else self.base
        return corr

    def owns(self, corr: int) -> bool:
        return self.base <= corr < self.end


def reply_corr(frames: list[bytes]) -> int | None:
    """The corr id of a reply addressed to this process (``[b"", header, payload]``)."""
    if len(frames) != 3:
        return None
    try:
        return decode_reply_kind(frames[1])[1]
    except ProtocolError:
        return None
