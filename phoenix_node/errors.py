"""Errors a Phoenix client raises.

Errors that come from a node are rebuilt from the reply's numeric ``code``
through :data:`ERRORS_BY_CODE`, a whitelist: never from a class name on the
wire. ``remote_type`` carries the name of the exception an action raised, for
display only.
"""

from __future__ import annotations

from typing import Any

from ipc.protocol import ErrorCode

__all__ = [
    "ERRORS_BY_CODE",
    "ActionFailedError",
    "AskTimeoutError",
    "BackpressureError",
    "BadArgumentsError",
    "BadRequestError",
    "BadResultError",
    "ClientClosedError",
    "InternalError",
    "InvalidRequestError",
    "NodeUnreachableError",
    "NotAcknowledgedError",
    "PhoenixError",
    "RateLimitedError",
    "RemoteError",
    "StoreFailedError",
    "UnavailableError",
    "UnknownActionError",
    "UnknownAgentTypeError",
    "UnsupportedVersionError",
    "WorkerLostError",
    "error_from_reply",
]


class PhoenixError(Exception):
    """Base class of every error the Phoenix client raises."""


class InvalidRequestError(PhoenixError, ValueError):
    """The call was refused before sending: bad agent id, action name or arguments."""


class ClientClosedError(PhoenixError):
    """The client was closed (or is used in another process than the one that made it)."""


class NodeUnreachableError(PhoenixError, ConnectionError):
    """No answer from the node's endpoint within the timeout."""


class AskTimeoutError(PhoenixError, TimeoutError):
    """No reply within the ask's timeout. The action may or may not have run."""


class RemoteError(PhoenixError):
    """An error reply from the node."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(
        self, message: str, *, agent: str = "", action: str = "", remote_type: str = ""
    ) -> None:
        super().__init__(message)
        self.message = message
        self.agent = agent
        self.action = action
        self.remote_type = remote_type


class BadRequestError(RemoteError):
    code = ErrorCode.BAD_REQUEST


class UnknownAgentTypeError(RemoteError):
    code = ErrorCode.UNKNOWN_AGENT_TYPE


class UnknownActionError(RemoteError):
    code = ErrorCode.UNKNOWN_ACTION


class ActionFailedError(RemoteError):
    """The action (or ``on_start``) raised; ``remote_type`` names the exception."""

    code = ErrorCode.ACTION_FAILED


class UnavailableError(RemoteError):
    code = ErrorCode.UNAVAILABLE


class WorkerLostError(UnavailableError):
    """The worker holding the ask went away; the action may or may not have run."""


class StoreFailedError(RemoteError):
    """The state change could not be committed; it did not take effect."""

    code = ErrorCode.STORE_FAILED


class BadArgumentsError(RemoteError):
    code = ErrorCode.BAD_ARGUMENTS


class InternalError(RemoteError):
    code = ErrorCode.INTERNAL


class UnsupportedVersionError(RemoteError):
    code = ErrorCode.UNSUPPORTED_VERSION


class BadResultError(RemoteError):
    """The action ran (and its effect was committed) but its result cannot be sent."""

    code = ErrorCode.BAD_RESULT


class BackpressureError(RemoteError):
    """The receiver's mailbox is full (or the sender's window is used up): retry later."""

    code = ErrorCode.BACKPRESSURE


class RateLimitedError(RemoteError):
    """The sender or the agent is over its rate limit: retry later."""

    code = ErrorCode.RATE_LIMITED


class NotAcknowledgedError(PhoenixError, TimeoutError):
    """``flush`` timed out with guaranteed messages still waiting for their ack (they
    stay in the outbox and are sent again on the next call)."""


ERRORS_BY_CODE: dict[int, type[RemoteError]] = {
    cls.code: cls
    for cls in (
        BadRequestError,
        UnknownAgentTypeError,
        UnknownActionError,
        ActionFailedError,
        UnavailableError,
        StoreFailedError,
        BadArgumentsError,
        InternalError,
        UnsupportedVersionError,
        BadResultError,
        BackpressureError,
        RateLimitedError,
    )
}


def error_from_reply(status: int, payload: Any) -> RemoteError:
    """Rebuild the error of an error reply (unknown codes become InternalError)."""
    info = payload if isinstance(payload, dict) else {}
    cls = ERRORS_BY_CODE.get(status, InternalError)
    message = info.get("message")
    if not isinstance(message, str):
        message = f"error reply with code {status}"
    return cls(
        message,
        agent=str(info.get("agent", "")),
        action=str(info.get("action", "")),
        remote_type=str(info.get("type", "")),
    )
