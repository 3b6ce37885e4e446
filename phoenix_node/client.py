"""The Phoenix client: ``tell`` and ``ask`` agents of a node.

A client first sends HELLO to the node's public endpoint and learns its
topology (the tcp endpoint of every worker); from then on it sends each
message straight to the worker that owns the agent (jump hash of the agent
id, as the node computes it), so no process of the node is a hop that every
message crosses. Pipelined calls (:meth:`Client.ask_many`) keep many asks in
flight for throughput.

A client is not thread-safe: use one per thread. It must not cross a fork.
Pending asks never outlive their timeout; an ask held by a worker that
disconnects fails early with :class:`WorkerLostError` (the action may or may
not have run: ``ask`` is at-most-once).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from ipc import make_dealer
from ipc.protocol import (
    ASK,
    HELLO,
    MAX_ACTION,
    STATUS,
    TELL,
    ProtocolError,
    check_agent_id,
    decode_reply_header,
    encode_request,
    pack,
    split_envelope,
    unpack,
)
from workers.placement import owner_index

from .errors import (
    AskTimeoutError,
    ClientClosedError,
    InvalidRequestError,
    NodeUnreachableError,
    PhoenixError,
    WorkerLostError,
    error_from_reply,
)

__all__ = ["Client"]

_MISSING = object()


class Client:
    """A connection to one node. Use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        endpoint: str,
        *,
        timeout: float = 10.0,
        route: bool = True,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        """``route=False`` sends everything through the node endpoint (one extra hop)."""
        self.endpoint = endpoint
        self.timeout = timeout
        self.route = route
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._pid = os.getpid()
        self._corr = itertools.count(1)
        self._front: zmq.Socket[bytes] | None = None
        self._workers: list[zmq.Socket[bytes]] = []
        self._monitors: dict[zmq.Socket[bytes], int] = {}
        self._poller = zmq.Poller()
        self._pending: dict[int, int] = {}  # corr -> worker index (-1: via the node endpoint)
        self._results: dict[int, tuple[int, Any]] = {}
        self._lost: set[int] = set()
        self.topology: dict[str, Any] = {}
        self.late_replies = 0
        self._closed = False

    # --- public API -------------------------------------------------------------------

    def tell(self, agent_id: str, action: str, **kwargs: Any) -> None:
        """Fire-and-forget: returns once the message is handed to the transport."""
        sock, _ = self._target(agent_id)
        header = encode_request(TELL, next(self._corr), agent_id, _check_action(action))
        self._send(sock, [b"", header, _pack_kwargs(kwargs)])

    def ask(
        self, agent_id: str, action: str, *, timeout: float | None = None, **kwargs: Any
    ) -> Any:
        """Run ``action`` on ``agent_id`` and return its result, or raise its error."""
        corr = self._send_ask(agent_id, action, kwargs)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        return self._take(corr, deadline, agent_id, action)

    def ask_many(
        self, calls: Iterable[tuple[str, str, Mapping[str, Any]]], *, timeout: float | None = None
    ) -> list[Any]:
        """Pipelined asks: every call is sent before any reply is awaited.

        Returns one entry per call, in order: the result, or the exception
        (a :class:`PhoenixError`) for that call. Nothing is raised for one call's
        failure; the timeout covers the whole batch.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        sent = [(self._send_ask(a, act, dict(kw)), a, act) for a, act, kw in calls]
        out: list[Any] = []
        for corr, agent_id, action in sent:
            try:
                out.append(self._take(corr, deadline, agent_id, action))
            except PhoenixError as exc:
                out.append(exc)
        return out

    def status(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The node's status: workers (pid, CPU, state, agents, messages, restarts)."""
        front = self._ensure_front()
        corr = next(self._corr)
        self._pending[corr] = -1
        self._send(front, [b"", encode_request(STATUS, corr), b""])
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        result: dict[str, Any] = self._take(corr, deadline, "", "status", unreachable=True)
        return result

    def close(self) -> None:
        """Close every socket (pending asks are abandoned)."""
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._pid:
            return  # inherited across fork: the sockets are not ours to close
        # Tells still queued get a bounded moment to leave (a tell followed by close,
        # as `phoenix-node tell` does, must not be dropped); asks are abandoned.
        linger_ms = int(min(self.timeout, 1.0) * 1000)
        for monitor in self._monitors:
            monitor.close(linger=0)
        for sock in self._workers:
            sock.close(linger=linger_ms)
        if self._front is not None:
            self._front.close(linger=linger_ms)
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- connection -------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError("the client is closed")
        if os.getpid() != self._pid:
            raise ClientClosedError("a Client cannot be used across fork: make one per process")

    def _ensure_front(self) -> zmq.Socket[bytes]:
        self._check_open()
        if self._front is None:
            front = make_dealer(self._ctx, immediate=False)
            front.connect(self.endpoint)
            self._poller.register(front, zmq.POLLIN)
            self._front = front
        return self._front

    def _connect(self) -> None:
        front = self._ensure_front()
        corr = next(self._corr)
        self._pending[corr] = -1
        self._send(front, [b"", encode_request(HELLO, corr), b""])
        hello = self._take(corr, time.monotonic() + self.timeout, "", "hello", unreachable=True)
        if not isinstance(hello, dict) or not isinstance(hello.get("workers"), list):
            raise NodeUnreachableError(f"{self.endpoint} did not answer HELLO with a topology")
        self.topology = hello
        host = self.endpoint.rpartition(":")[0]
        for endpoint in hello["workers"]:
            sock = make_dealer(self._ctx)
            if isinstance(endpoint, str):
                w_host, _, port = endpoint.rpartition(":")
                if w_host.endswith(("0.0.0.0", "*", "[::]")):
                    endpoint = f"{host}:{port}"  # wildcard bind: reach it where the node is
                monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
                self._monitors[monitor] = len(self._workers)
                self._poller.register(monitor, zmq.POLLIN)
                sock.connect(endpoint)
            self._poller.register(sock, zmq.POLLIN)
            self._workers.append(sock)

    def _target(self, agent_id: str) -> tuple[zmq.Socket[bytes], int]:
        self._check_open()
        if not isinstance(agent_id, str):
            raise InvalidRequestError(f"agent id must be a str, got {type(agent_id).__name__}")
        try:
            check_agent_id(agent_id)
        except ProtocolError as exc:
            raise InvalidRequestError(str(exc)) from None
        if not self.route:
            return self._ensure_front(), -1
        if not self.topology:
            self._connect()
        workers = self.topology["workers"]
        index = owner_index(agent_id, len(workers))
        if workers[index] is None:
            return self._ensure_front(), -1  # that worker has not reported yet: go via the node
        return self._workers[index], index

    def _send_ask(self, agent_id: str, action: str, kwargs: Mapping[str, Any]) -> int:
        sock, index = self._target(agent_id)
        corr = next(self._corr)
        header = encode_request(ASK, corr, agent_id, _check_action(action))
        self._send(sock, [b"", header, _pack_kwargs(kwargs)])
        self._pending[corr] = index
        return corr

    def _send(self, sock: zmq.Socket[bytes], frames: list[bytes]) -> None:
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
            return
        except zmq.Again:
            pass
        # Not connected yet (IMMEDIATE) or at the high-water mark: wait, bounded.
        if not sock.poll(int(self.timeout * 1000), zmq.POLLOUT):
            raise NodeUnreachableError(
                f"cannot send to {self.endpoint} within {self.timeout} s (node down or overloaded)"
            )
        sock.send_multipart(frames, zmq.NOBLOCK)

    # --- replies ----------------------------------------------------------------------

    def _take(
        self, corr: int, deadline: float, agent_id: str, action: str, unreachable: bool = False
    ) -> Any:
        while corr not in self._results:
            if corr in self._lost:
                self._lost.discard(corr)
                self._pending.pop(corr, None)
                raise WorkerLostError(
                    f"the worker holding {agent_id}.{action} disconnected; "
                    "the action may or may not have run",
                    agent=agent_id,
                    action=action,
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._pending.pop(corr, None)
                if unreachable:
                    raise NodeUnreachableError(f"no answer from {self.endpoint}")
                raise AskTimeoutError(f"no reply to {agent_id}.{action} from {self.endpoint}")
            self._poll(remaining)
        status, payload = self._results.pop(corr)
        if status != 0:
            raise error_from_reply(status, payload)
        return payload

    def _poll(self, remaining: float) -> None:
        for sock, _ in self._poller.poll(max(1, int(remaining * 1000))):
            assert isinstance(sock, zmq.Socket)
            if sock in self._monitors:
                self._on_monitor(sock)
                continue
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_reply(frames)

    def _on_reply(self, frames: list[bytes]) -> None:
        try:
            _, header, payload = split_envelope(frames)
            corr, status = decode_reply_header(header)
            body = unpack(payload) if payload else None
        except ProtocolError:
            self.late_replies += 1
            return
        if self._pending.pop(corr, _MISSING) is _MISSING:
            self.late_replies += 1  # its ask already timed out
            return
        self._results[corr] = (status, body)

    def _on_monitor(self, monitor: zmq.Socket[bytes]) -> None:
        index = self._monitors[monitor]
        while monitor.poll(0):
            event = recv_monitor_message(monitor)
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._lost.update(c for c, i in self._pending.items() if i == index)


def _check_action(action: str) -> str:
    if not isinstance(action, str) or not action.isidentifier() or len(action) > MAX_ACTION:
        raise InvalidRequestError(f"action {action!r} is not an identifier of <= 128 chars")
    return action


def _pack_kwargs(kwargs: Mapping[str, Any]) -> bytes:
    try:
        return pack(dict(kwargs))
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequestError(f"arguments cannot be sent: {exc}") from None
