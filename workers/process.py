"""The worker process: one per CPU, forked by the supervisor.

Boot order in the child (see GOTCHAS: fork): reset inherited signal handlers,
reseed ``random``, pin to the CPU, *then* create the ZeroMQ context, *then* open
LMDB, *then* bind sockets and loop. Plugins were imported and validated by the
supervisor before the fork. The child ends with ``os._exit`` and a named code
(:class:`WorkerExit`).

Sockets: one ROUTER bound to the worker's tcp endpoint (clients reach the
owning worker directly) and to its abstract ipc endpoint (the control process
and the other workers of the node). A message for an agent that another
worker owns is forwarded once, over that worker's ipc endpoint, and the reply
is relayed back.

The loop, once per iteration: poll; receive up to ``batch_size`` messages
without blocking; run them (and the tells agents sent to agents of this
worker); commit the state of every changed agent in one LMDB transaction; only
then send the replies; write a heartbeat line to the supervisor's pipe if one
is due; passivate idle agents if due.

Heartbeats: a JSON line on a pipe, written by the loop itself, so a worker
whose loop is stuck (or which is stopped with SIGSTOP) stops sending them and
the supervisor replaces it. The worker exits when the supervisor dies: it
polls the read end of a pipe whose only write end the supervisor holds, and
EOF there means the supervisor is gone.

Drain (SIGTERM or SIGINT): stop taking new work, run whatever is already
queued in the socket, commit, reply, call ``on_stop`` on every active agent,
commit again, close the sockets, exit 0.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Any, NoReturn

import orjson
import zmq

from ipc import bindable, make_dealer, make_router, worker_ipc_endpoint
from ipc.protocol import (
    ASK,
    TELL,
    ErrorCode,
    ProtocolError,
    decode_header,
    encode_reply,
    encode_request,
    pack,
    split_envelope,
)
from phoenix_node.state import StateError
from phoenix_node.state.store import Store

from .agent import Agent
from .host import OK, AgentHost, error_payload
from .placement import owner_index

__all__ = ["WorkerExit", "WorkerSpec", "run_worker"]

log = logging.getLogger("phoenix.worker")


class WorkerExit(enum.IntEnum):
    """Exit codes of a worker process."""

    OK = 0
    BOOT_ERROR = 3  # could not open the store, bind, ... (supervisor backs off)
    SUPERVISOR_GONE = 4  # the supervisor died; exit rather than linger as an orphan
    CRASHED = 5  # an unexpected error escaped the loop


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, set by the supervisor before the fork."""

    index: int
    workers: int
    node_id: str
    replica: str
    cpu: int | None
    store_path: str
    durability: str
    tcp_endpoint: str
    heartbeat_fd: int
    parent_fd: int
    types: dict[str, type[Agent]]
    batch_size: int = 1000
    idle_timeout: float = 300.0
    max_active: int = 100_000
    heartbeat_interval: float = 0.5
    passivate_interval: float = 1.0


def run_worker(spec: WorkerSpec) -> NoReturn:
    """Entry point in the forked child; never returns."""
    code = WorkerExit.CRASHED
    try:
        code = _Worker(spec).run()
    except _BootError as exc:
        log.error("worker %d failed to start: %s", spec.index, exc)
        code = WorkerExit.BOOT_ERROR
    except BaseException:
        log.exception("worker %d crashed", spec.index)
    finally:
        logging.shutdown()
    os._exit(int(code))


class _BootError(Exception):
    pass


class _Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.draining = False
        self.bad_frames = 0
        self.dropped_replies = 0
        self.forwarded = 0
        self._next_corr = 1
        self._peers: dict[int, zmq.Socket[bytes]] = {}

    # --- boot --------------------------------------------------------------------------

    def _boot(self) -> None:
        spec = self.spec
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        self._wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGTERM, self._on_drain_signal)
        signal.signal(signal.SIGINT, self._on_drain_signal)
        random.seed()
        if spec.cpu is not None:
            os.sched_setaffinity(0, {spec.cpu})
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            self.store = Store(spec.store_path, durability=spec.durability)  # type: ignore[arg-type]
        except StateError as exc:
            raise _BootError(f"cannot open the store: {exc}") from exc
        self.host = AgentHost(
            spec.types,
            self.store,
            spec.replica,
            idle_timeout=spec.idle_timeout,
            max_active=spec.max_active,
        )
        self.router = make_router(self.ctx)
        try:
            self.router.bind(worker_ipc_endpoint(spec.node_id, spec.index))
            self.router.bind(bindable(spec.tcp_endpoint))
        except zmq.ZMQError as exc:
            raise _BootError(f"cannot bind {spec.tcp_endpoint}: {exc}") from exc
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self.poller.register(spec.parent_fd, zmq.POLLIN)
        self.poller.register(self._wake_r, zmq.POLLIN)

    def _on_drain_signal(self, signum: int, frame: Any) -> None:
        self.draining = True  # the loop does the work (GOTCHAS: signals)

    # --- loop ----------------------------------------------------------------------------

    def run(self) -> WorkerExit:
        self._boot()
        spec = self.spec
        next_beat = 0.0
        next_passivate = time.monotonic() + spec.passivate_interval
        try:
            while True:
                now = time.monotonic()
                if now >= next_beat:
                    self._heartbeat()
                    next_beat = now + spec.heartbeat_interval
                if now >= next_passivate:
                    if self.host.passivate_idle():
                        self.host.commit()
                    next_passivate = now + spec.passivate_interval
                if self.draining:
                    return self._drain()
                timeout_ms = max(1, int((min(next_beat, next_passivate) - now) * 1000))
                events = dict(self.poller.poll(timeout_ms))
                if spec.parent_fd in events:
                    log.warning("worker %d: supervisor is gone, exiting", spec.index)
                    return WorkerExit.SUPERVISOR_GONE
                if self._wake_r in events:
                    _drain_fd(self._wake_r)
                for sock in events:
                    if isinstance(sock, zmq.Socket):
                        if sock is self.router:
                            self._run_batch()
                        else:
                            self._relay_replies(sock)
        finally:
            self._close()

    def _run_batch(self) -> None:
        """Receive up to batch_size messages, run them, commit once, then reply."""
        router, host = self.router, self.host
        replies: list[tuple[list[bytes], int, int, Any]] = []
        for _ in range(self.spec.batch_size):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                self._dispatch(frames, replies)
            except Exception:
                # A bug must cost one message, not the worker and every agent on it.
                log.exception("worker %d: unexpected error handling a message", self.spec.index)
                self._bad_frame(frames[:1], ErrorCode.INTERNAL, 0, "internal error")
        self._run_local_tells()
        committed = host.commit()
        for stack, corr, status, result in replies:
            if status == OK and not committed:
                status = ErrorCode.STORE_FAILED
                result = error_payload(
                    status,
                    "state commit failed; the action's effect was not stored (see the worker log)",
                )
            self._reply(stack, corr, status, result)
        self._heartbeat_if_stale()

    def _dispatch(
        self, frames: list[bytes], replies: list[tuple[list[bytes], int, int, Any]]
    ) -> None:
        try:
            stack, header, payload = split_envelope(frames)
        except ProtocolError as exc:
            # frames[0] is the id the ROUTER pushed: the sender can still be answered.
            self._bad_frame(frames[:1], exc.code, 0, str(exc))
            return
        try:
            kind, corr, agent_id, action = decode_header(header)
        except ProtocolError as exc:
            self._bad_frame(stack, exc.code, exc.corr_id, str(exc))
            return
        if kind not in (ASK, TELL):
            replies.append(
                (
                    stack,
                    corr,
                    ErrorCode.BAD_REQUEST,
                    error_payload(
                        ErrorCode.BAD_REQUEST,
                        "HELLO and STATUS go to the node endpoint, not a worker",
                    ),
                )
            )
            return
        owner = owner_index(agent_id, self.spec.workers)
        if owner != self.spec.index:
            self._forward(owner, frames)
            return
        status, result = self.host.handle(agent_id, action, payload)
        if kind == ASK:
            replies.append((stack, corr, status, result))

    def _bad_frame(self, stack: list[bytes], code: int, corr: int, message: str) -> None:
        self.bad_frames += 1
        if stack and stack[0]:
            self._reply(stack, corr, code, error_payload(code, message))

    def _run_local_tells(self) -> None:
        """Deliver tells sent by agents during this batch: locally, or to the owner."""
        outgoing, spec = self.host.outgoing, self.spec
        budget = self.spec.batch_size  # a tell storm cannot starve the socket forever
        while outgoing and budget:
            budget -= 1
            agent_id, action, payload = outgoing.popleft()
            try:
                owner = owner_index(agent_id, spec.workers)
            except Exception:
                continue
            if owner == spec.index:
                status, result = self.host.handle(agent_id, action, payload)
                if status != OK:
                    log.warning("tell to %s.%s failed: %s", agent_id, action, result.get("message"))
            else:
                self._next_corr += 1
                self._forward(
                    owner, [b"", encode_request(TELL, self._next_corr, agent_id, action), payload]
                )

    def _forward(self, owner: int, frames: list[bytes]) -> None:
        peer = self._peers.get(owner)
        if peer is None:
            peer = make_dealer(self.ctx, immediate=False)
            peer.connect(worker_ipc_endpoint(self.spec.node_id, owner))
            self.poller.register(peer, zmq.POLLIN)
            self._peers[owner] = peer
        try:
            peer.send_multipart(frames, zmq.NOBLOCK)
            self.forwarded += 1
        except zmq.Again:
            self.dropped_replies += 1
            stack, _, _ = split_envelope(frames)
            if stack:
                self._reply(
                    stack,
                    0,
                    ErrorCode.UNAVAILABLE,
                    error_payload(
                        ErrorCode.UNAVAILABLE,
                        f"worker {owner} is not accepting messages (backpressure)",
                    ),
                )

    def _relay_replies(self, peer: zmq.Socket[bytes]) -> None:
        """Replies to forwarded messages: pass them back, undecoded, to the sender."""
        for _ in range(self.spec.batch_size):
            try:
                frames = peer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._send(frames)

    def _reply(self, stack: list[bytes], corr: int, status: int, result: Any) -> None:
        try:
            body = pack(result)
        except (TypeError, ValueError, OverflowError) as exc:
            status = ErrorCode.BAD_RESULT
            body = pack(error_payload(status, f"result cannot be sent: {exc}"))
        self._send([*stack, b"", encode_reply(corr, status), body])

    def _send(self, frames: list[bytes]) -> None:
        try:
            self.router.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the sender is gone; EAGAIN: it does not read. Count, go on.
            if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                raise
            self.dropped_replies += 1

    # --- heartbeats, drain, close --------------------------------------------------------

    def _heartbeat_if_stale(self) -> None:
        # A long batch must not starve the supervisor of heartbeats.
        if time.monotonic() - getattr(self, "_last_beat", 0.0) > self.spec.heartbeat_interval:
            self._heartbeat()

    def _heartbeat(self) -> None:
        self._last_beat = time.monotonic()
        host = self.host
        line = (
            orjson.dumps(
                {
                    "pid": os.getpid(),
                    "index": self.spec.index,
                    "state": "draining" if self.draining else "ready",
                    "endpoint": self.endpoint,
                    "agents": len(host.active),
                    "handled": host.handled,
                    "failed": host.failed,
                    "activations": host.activations,
                    "passivations": host.passivations,
                    "commits": host.commits,
                    "bad_frames": self.bad_frames,
                    "dropped_replies": self.dropped_replies,
                    "forwarded": self.forwarded,
                }
            )
            + b"\n"
        )
        try:
            os.write(self.spec.heartbeat_fd, line)
        except BlockingIOError:
            pass  # the supervisor is behind; the next beat will do
        except BrokenPipeError:
            self.draining = True

    def _drain(self) -> WorkerExit:
        log.info("worker %d draining", self.spec.index)
        self._heartbeat()
        self._run_batch()  # whatever is already queued in the socket
        while int(self.router.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._run_batch()
        self.host.stop_all()
        self.host.commit()
        return WorkerExit.OK

    def _close(self) -> None:
        for peer in self._peers.values():
            peer.close(linger=0)
        if hasattr(self, "router"):
            self.router.close(linger=200)
        if hasattr(self, "ctx"):
            self.ctx.term()
        if hasattr(self, "store"):
            self.store.close()


def _drain_fd(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
