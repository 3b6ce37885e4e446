"""Errors of the transport layer."""

from __future__ import annotations

__all__ = ["EndpointError", "ProtocolError", "TransportError"]


class TransportError(Exception):
    """Base class of every error raised on purpose by :mod:`ipc`."""


class EndpointError(TransportError, ValueError):
    """An endpoint string is not valid (scheme, host, port, ipc name length)."""


class ProtocolError(TransportError):
    """Frames received do not follow the wire protocol (see :mod:`ipc.protocol`).

    ``code`` is the error code the receiver answers with (see ``ErrorCode``);
    ``corr_id`` is the request's correlation id when the header got that far, so
    the error reply can be matched by the sender (0 when it is unknown).
    """

    def __init__(self, message: str, code: int = 1, corr_id: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.corr_id = corr_id
