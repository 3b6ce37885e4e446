"""The one place where Phoenix makes ZeroMQ sockets, with safe options.

Every socket gets ``LINGER`` (the default is infinite and ``term()`` would
hang), ``MAXMSGSIZE`` (a peer cannot make us allocate without bound), and
high-water marks. ROUTERs get ``ROUTER_MANDATORY`` so that a message to an
unknown or departed peer raises ``EHOSTUNREACH`` instead of vanishing; callers
send with ``NOBLOCK`` and treat ``EAGAIN`` as backpressure. DEALERs get
``IMMEDIATE`` so sends do not queue on connections that are not up.
"""

from __future__ import annotations

import zmq

__all__ = ["DEFAULT_MAX_MESSAGE", "make_dealer", "make_router"]

DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024
DEFAULT_HWM = 100_000


def _common(sock: zmq.Socket[bytes], linger_ms: int, max_message: int, hwm: int) -> None:
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)


def make_router(
    ctx: zmq.Context[zmq.Socket[bytes]],
    *,
    identity: bytes | None = None,
    linger_ms: int = 0,
    max_message: int = DEFAULT_MAX_MESSAGE,
    hwm: int = DEFAULT_HWM,
) -> zmq.Socket[bytes]:
    """A ROUTER with ROUTER_MANDATORY, ROUTER_HANDOVER, LINGER, MAXMSGSIZE and HWMs set."""
    sock = ctx.socket(zmq.ROUTER)
    _common(sock, linger_ms, max_message, hwm)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # A peer whose DEALER reconnects (or is re-created) with the same routing id before
    # this side has dropped its old connection takes the id over; without this, the
    # ROUTER refuses the new connection and everything sent on it vanishes.
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    return sock


def make_dealer(
    ctx: zmq.Context[zmq.Socket[bytes]],
    *,
    identity: bytes | None = None,
    linger_ms: int = 0,
    max_message: int = DEFAULT_MAX_MESSAGE,
    hwm: int = DEFAULT_HWM,
    immediate: bool = True,
) -> zmq.Socket[bytes]:
    """A DEALER with IMMEDIATE, LINGER, MAXMSGSIZE, HWMs and fast reconnects."""
    sock = ctx.socket(zmq.DEALER)
    _common(sock, linger_ms, max_message, hwm)
    sock.setsockopt(zmq.IMMEDIATE, 1 if immediate else 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 50)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    return sock
