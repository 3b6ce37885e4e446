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

The loop, once per iteration: poll; read up to ``batch_size`` messages
without blocking and hand them to the message engine (:mod:`workers.engine`:
mailboxes, delivery guarantees, pub/sub); let it run queued messages; commit
everything of the iteration in one LMDB transaction; only then send the
replies (batched per sender), the credits, the messages for other workers and
the events for subscribed clients; write a heartbeat line to the supervisor's
pipe if one is due; passivate idle agents if due.

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
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import orjson
import zmq

from ipc import bindable, control_ipc_endpoint, make_dealer, make_router, worker_ipc_endpoint
from ipc.cloudevents import check_attrs, decompress_payload
from ipc.protocol import (
    ACKS,
    ADMIN,
    ASK,
    BATCH,
    CREDIT,
    EVENT,
    PUBLISH,
    REPLY,
    REPLY_BATCH,
    SUBSCRIBE,
    TELL,
    UNSUBSCRIBE,
    ErrorCode,
    ProtocolError,
    decode_acks,
    decode_batch,
    decode_reply_batch,
    decode_reply_kind,
    decode_request,
    encode_acks,
    encode_batch_header,
    encode_entry,
    encode_reply,
    encode_reply_batch,
    encode_reply_kind,
    encode_request,
    join_entries,
    pack,
    split_envelope,
    unpack,
)
from phoenix_node.cluster.view import CHECK_INTERVAL, NodeView
from phoenix_node.state import StateError
from phoenix_node.state.store import Store, StoreError

from .agent import Agent, check_action_name, check_agent_id_arg
from .engine import OTHER_NODE, RELAY_ACTION, Engine, Msg, Output
from .gossip import Gossip, Rumor
from .host import OK, AgentHost, error_payload
from .mailbox import MailboxPolicy
from .placement import owner_index
from .ratelimit import RateLimit
from .topics import check_pattern, check_topic

__all__ = ["BootError", "WorkerExit", "WorkerSpec", "run_child", "run_worker"]

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
    mailbox: MailboxPolicy | None = None
    sender_rate: RateLimit | None = None
    dedup_window: float = 86400.0


def run_worker(spec: WorkerSpec) -> NoReturn:
    """Entry point in the forked child; never returns."""
    run_child(f"worker {spec.index}", lambda: _Worker(spec).run())


class BootError(Exception):
    """A forked child cannot start (store, sockets, settings): it exits BOOT_ERROR."""


def run_child(name: str, run: Callable[[], WorkerExit]) -> NoReturn:
    """Run a forked child's main loop and exit the process with its WorkerExit code
    (BOOT_ERROR for a :class:`BootError`, CRASHED for anything else raised)."""
    code = WorkerExit.CRASHED
    try:
        code = run()
    except BootError as exc:
        log.error("%s failed to start: %s", name, exc)
        code = WorkerExit.BOOT_ERROR
    except BaseException:
        log.exception("%s crashed", name)
    finally:
        logging.shutdown()
    os._exit(int(code))


class _BootError(BootError):
    pass


class _Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.draining = False
        self.bad_frames = 0
        self.dropped_replies = 0
        self.forwarded = 0
        self._peers: dict[int, zmq.Socket[bytes]] = {}
        self._fwd: dict[tuple[int, tuple[bytes, ...]], list[bytes]] = defaultdict(list)
        self.view: NodeView | None = None
        self._view_version: bytes | None = None

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
        try:
            self.engine = Engine(
                self.host,
                self.store,
                index=spec.index,
                workers=spec.workers,
                node_id=spec.node_id,
                default_mailbox=spec.mailbox,
                sender_limit=spec.sender_rate,
                dedup_window=spec.dedup_window,
            )
        except StateError as exc:
            raise _BootError(f"cannot load the outbox or subscriptions: {exc}") from exc
        self.gossip = Gossip(spec.index, range(spec.workers))
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
        next_sweep = time.monotonic() + 10.0
        next_view = 0.0
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
                wake = min(next_beat, next_passivate, next_sweep, next_view)
                pending = self._pending_work()
                if pending is not None:
                    wake = min(wake, now + pending)
                timeout_ms = max(0, int((wake - now) * 1000))
                events = dict(self.poller.poll(timeout_ms))
                if spec.parent_fd in events:
                    log.warning("worker %d: supervisor is gone, exiting", spec.index)
                    return WorkerExit.SUPERVISOR_GONE
                if self._wake_r in events:
                    _drain_fd(self._wake_r)
                ran = False
                for sock in events:
                    if isinstance(sock, zmq.Socket):
                        if sock is self.router:
                            self._run_batch()
                            ran = True
                        else:
                            self._from_peer(sock)
                if not ran and (self.engine.ready or self.engine.outbox.pending):
                    self._run_engine()
                if now >= next_view:
                    self._check_view()
                    next_view = now + CHECK_INTERVAL
                if now >= next_sweep:
                    self.engine.sweep_dedup()
                    # anti-entropy for a subscription change whose gossip was lost
                    self.engine.load_subscriptions()
                    next_sweep = now + 10.0
        finally:
            self._close()

    def _check_view(self) -> None:
        """Read the node view the control process published, when it changed: while
        the node is in a cluster, agents' messages to other nodes' agents go there."""
        try:
            version, view = NodeView.load(self.store, self._view_version)
        except StoreError as exc:
            log.warning("worker %d: cannot read the node view: %s", self.spec.index, exc)
            return
        if version == self._view_version:
            return
        self._view_version = version
        self.view = view
        clustered = view is not None and view.clustered()
        self.engine.elsewhere = view.elsewhere if clustered else None  # type: ignore[union-attr]

    def _run_batch(self) -> None:
        """Read up to batch_size messages, run them, commit once, then answer."""
        router, _engine = self.router, self.engine
        for _ in range(self.spec.batch_size):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                self._ingest(frames)
            except Exception:
                # A bug must cost one message, not the worker and every agent on it.
                log.exception("worker %d: unexpected error handling a message", self.spec.index)
                self._bad_frame(frames[:1], ErrorCode.INTERNAL, 0, "internal error")
        self._run_engine()

    def _run_engine(self) -> None:
        engine = self.engine
        engine.run(self.spec.batch_size)
        engine.send_due()
        engine.commit()
        self._send_output(engine.flush())
        self._send_forwards()
        self._heartbeat_if_stale()

    def _ingest(self, frames: list[bytes]) -> None:
        try:
            stack, header, payload = split_envelope(frames)
        except ProtocolError as exc:
            # frames[0] is the id the ROUTER pushed: the sender can still be answered.
            self._bad_frame(frames[:1], exc.code, 0, str(exc))
            return
        try:
            kind, corr, subject, action, delivery, attrs = decode_request(header)
            if attrs:
                check_attrs(attrs)
        except ProtocolError as exc:
            self._bad_frame(stack, exc.code, exc.corr_id, str(exc))
            return
        route = tuple(stack)
        if kind in (ASK, TELL):
            owner = owner_index(subject, self.spec.workers)
            if owner != self.spec.index:
                # queued with the iteration's other forwards: a sender's messages keep
                # their order whether they came alone or in a BATCH
                self._fwd[(owner, route)].append(
                    encode_entry(kind, corr, subject, action, delivery, attrs or None, payload)
                )
                return
            self._accept(kind, corr, subject, action, delivery, attrs, payload, route)
        elif kind == BATCH:
            self._ingest_batch(payload, attrs, route)
        elif kind == PUBLISH:
            try:
                check_topic(subject)
            except ValueError as exc:
                self._refuse(route, corr, ErrorCode.BAD_REQUEST, str(exc))
                return
            self._accept(kind, corr, subject, action, delivery, attrs, payload, route)
        elif kind in (SUBSCRIBE, UNSUBSCRIBE):
            self._subscription(kind, corr, subject, action, attrs, route)
        elif kind == ADMIN:
            self._admin(corr, action, route, payload)
        else:
            self.bad_frames += 1
            self.engine._credits[route] += 1
            self.engine._replies[route].append(
                (corr, ErrorCode.BAD_REQUEST, pack(error_payload(
                    ErrorCode.BAD_REQUEST,
                    "HELLO, STATUS and CLUSTER go to the node endpoint, not a worker",
                )))
            )  # fmt: skip

    def _accept(
        self,
        kind: int,
        corr: int,
        subject: str,
        action: str,
        delivery: int,
        attrs: dict[str, Any],
        payload: bytes,
        route: tuple[bytes, ...],
    ) -> None:
        if attrs and ("phoenixencoding" in attrs or "datacontenttype" in attrs):
            try:
                payload = normalize_payload(attrs, payload)
            except ProtocolError as exc:
                self._refuse(route, corr, exc.code, str(exc))
                return
        self.engine.accept(Msg(kind, corr, subject, action, delivery, attrs, payload, route))

    def _ingest_batch(
        self, payload: bytes, defaults: dict[str, Any], route: tuple[bytes, ...]
    ) -> None:
        try:
            entries = decode_batch(payload, defaults)
        except ProtocolError as exc:
            self._bad_frame(list(route), exc.code, 0, str(exc))
            return
        index, workers = self.spec.index, self.spec.workers
        for entry in entries:
            if isinstance(entry, ProtocolError):
                self.bad_frames += 1
                self._refuse(route, entry.corr_id, entry.code, str(entry))
                continue
            kind, corr, subject, action, delivery, attrs, data = entry
            try:
                if attrs is not defaults:
                    check_attrs(attrs)
                if kind == PUBLISH:
                    check_topic(subject)
            except (ProtocolError, ValueError) as exc:
                self.bad_frames += 1
                self._refuse(route, corr, ErrorCode.BAD_REQUEST, str(exc))
                continue
            if kind != PUBLISH:
                owner = owner_index(subject, workers)
                if owner != index:
                    self._fwd[(owner, route)].append(
                        encode_entry(kind, corr, subject, action, delivery, attrs, data)
                    )
                    continue
            self._accept(kind, corr, subject, action, delivery, attrs, data, route)

    def _refuse(self, route: tuple[bytes, ...], corr: int, code: int, message: str) -> None:
        engine = self.engine
        engine._credits[route] += 1
        engine._replies[route].append((corr, code, pack(error_payload(code, message))))

    def _subscription(
        self,
        kind: int,
        corr: int,
        pattern: str,
        action: str,
        attrs: dict[str, Any],
        route: tuple[bytes, ...],
    ) -> None:
        engine = self.engine
        try:
            check_pattern(pattern)
            agent = attrs.get("phoenixagent")
            if agent is not None:
                if not isinstance(agent, str):
                    raise ValueError("phoenixagent must be an agent id")
                check_agent_id_arg(agent)
                if kind == SUBSCRIBE:
                    check_action_name(action)
                    delivery = attrs.get("phoenixsubdelivery", 1)
                    if type(delivery) is not int or not 0 <= delivery <= 2:
                        raise ValueError(
                            "phoenixsubdelivery must be 0..2 (causal order is not "
                            "available for subscriptions)"
                        )
                    engine.subscribe_agent(pattern, agent, action, delivery)
                else:
                    engine.unsubscribe_agent(pattern, agent)
            elif kind == SUBSCRIBE:
                engine.subscribe_client(route, pattern, corr)
            else:
                engine.unsubscribe_client(route, pattern)
        except (ValueError, TypeError, ProtocolError) as exc:
            self._refuse(route, corr, ErrorCode.BAD_REQUEST, str(exc))
            return
        engine._credits[route] += 1
        engine._replies[route].append((corr, OK, b"\xc0"))

    def _admin(self, corr: int, action: str, route: tuple[bytes, ...], payload: bytes) -> None:
        engine, outbox = self.engine, self.engine.outbox
        result: Any
        if action == "gossip":
            self._on_rumor(payload)
            return  # from another worker: no answer
        if action == "view":
            self._check_view()  # the control process published a new node view
            return
        if action == "dead_letters":
            result = [
                {"id": d.msg_id, "dest": d.dest, "attempts": d.attempts, "reason": d.reason,
                 "time": d.time, "message": _describe_entry(d.data)}
                for d in outbox.dead_letters(1000)
            ]  # fmt: skip
        elif action == "replay_dead_letters":
            result = outbox.replay()
        elif action == "purge_dead_letters":
            result = outbox.purge()
        elif action == "stats":
            result = self._stats()
        else:
            self._refuse(route, corr, ErrorCode.BAD_REQUEST, f"unknown admin operation {action!r}")
            return
        engine._credits[route] += 1
        engine._replies[route].append((corr, OK, pack(result)))

    def _bad_frame(self, stack: list[bytes], code: int, corr: int, message: str) -> None:
        self.bad_frames += 1
        if stack and stack[0]:
            self._reply(stack, corr, code, error_payload(code, message))
            self.engine._credits[tuple(stack)] += 1

    def _send_output(self, out: Output) -> None:
        send = self._send
        for route, items in out.replies.items():
            if len(items) == 1:
                corr, status, body = items[0]
                send([*route, b"", encode_reply(corr, status), body])
            else:
                send([*route, b"", _REPLY_BATCH_HEADER, encode_reply_batch(items)])
        for route, acked in out.acks.items():
            send([*route, b"", _ACKS_HEADER, encode_acks(acked)])
        for route, n in out.credits.items():
            send([*route, b"", encode_reply_kind(CREDIT, n), b""])
        for owner, entries in out.remote.items():
            if owner == OTHER_NODE:
                self.engine.stats["to_other_nodes"] += len(entries)
            self._send_peer(owner, [b"", _BATCH_HEADER, join_entries(entries)])
        for route, events in out.events.items():
            for sub_id, body in events:
                if not self._send([*route, b"", encode_reply_kind(EVENT, sub_id), body], gone=True):
                    self.engine.forget_route(route)
                    break
        for owner, frames in out.forwards:
            self._forward(owner, frames)
        if out.relays:
            self.engine.stats["relayed_out"] += len(out.relays)
            self._send_peer(OTHER_NODE, [b"", _RELAY_HEADER, join_entries(out.relays)])
        if out.subscriptions_changed:
            _, pushes = self.gossip.start("subscriptions", None)
            self._push_rumors(pushes)

    def _push_rumors(self, pushes: list[tuple[Any, Rumor]]) -> None:
        for peer, rumor in pushes:
            note = [b"", encode_request(ADMIN, 0, "", "gossip"), pack(rumor.to_wire())]
            self._send_peer(int(peer), note)

    def _on_rumor(self, payload: bytes) -> None:
        try:
            rumor = Rumor.from_wire(unpack(payload))
        except (ValueError, ProtocolError) as exc:
            self.bad_frames += 1
            log.warning("worker %d: bad gossip frame: %s", self.spec.index, exc)
            return
        new, pushes = self.gossip.receive(rumor)
        if new and rumor.topic == "subscriptions":
            self.engine.load_subscriptions()
        self._push_rumors(pushes)

    def _send_forwards(self) -> None:
        fwd = self._fwd
        if not fwd:
            return
        for (owner, route), entries in fwd.items():
            self._forward(owner, [*route, b"", _BATCH_HEADER, join_entries(entries)])
        fwd.clear()

    def _peer(self, owner: int) -> zmq.Socket[bytes]:
        """The DEALER to worker ``owner`` of this node, or (OTHER_NODE) to the node's
        control process, which routes to other nodes."""
        peer = self._peers.get(owner)
        if peer is None:
            peer = make_dealer(self.ctx, immediate=False)
            if owner == OTHER_NODE:
                peer.connect(control_ipc_endpoint(self.spec.node_id))
            else:
                peer.connect(worker_ipc_endpoint(self.spec.node_id, owner))
            self.poller.register(peer, zmq.POLLIN)
            self._peers[owner] = peer
        return peer

    def _send_peer(self, owner: int, frames: list[bytes]) -> bool:
        try:
            self._peer(owner).send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.Again:
            self.dropped_replies += 1  # outbox entries are sent again; others are lost
            return False

    def _forward(self, owner: int, frames: list[bytes], corr: int = 0) -> None:
        if self._send_peer(owner, frames):
            self.forwarded += 1
            return
        stack, _, _ = split_envelope(frames)
        if stack:
            self.engine._credits[tuple(stack)] += 1
            self._reply(
                stack,
                corr,
                ErrorCode.UNAVAILABLE,
                error_payload(
                    ErrorCode.UNAVAILABLE,
                    f"worker {owner} is not accepting messages (backpressure)",
                ),
            )

    def _from_peer(self, peer: zmq.Socket[bytes]) -> None:
        """From another worker: acks of this worker's outbox messages (no routing
        stack), or replies to forwarded messages (relayed, undecoded)."""
        engine = self.engine
        for _ in range(self.spec.batch_size):
            try:
                frames = peer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if frames[0] != b"":
                self._send(frames)
                continue
            try:
                _, header, payload = split_envelope(frames)
                kind, corr, status = decode_reply_kind(header)
                if kind == REPLY:
                    engine.on_ack(corr, status, payload)
                elif kind == ACKS:
                    engine.on_acks(decode_acks(payload))
                elif kind == REPLY_BATCH:
                    for c, st, body in decode_reply_batch(payload):
                        engine.on_ack(c, st, body)
            except ProtocolError as exc:
                self.bad_frames += 1
                log.warning("worker %d: bad frame from a peer: %s", self.spec.index, exc)

    def _reply(self, stack: list[bytes], corr: int, status: int, result: Any) -> None:
        try:
            body = pack(result)
        except (TypeError, ValueError, OverflowError) as exc:
            status = ErrorCode.BAD_RESULT
            body = pack(error_payload(status, f"result cannot be sent: {exc}"))
        self._send([*stack, b"", encode_reply(corr, status), body])

    def _send(self, frames: list[bytes], gone: bool = False) -> bool:
        try:
            self.router.send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the sender is gone; EAGAIN: it does not read. Count, go on.
            if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                raise
            self.dropped_replies += 1
            return not (gone and exc.errno == errno.EHOSTUNREACH)

    # --- heartbeats, drain, close --------------------------------------------------------

    def _pending_work(self) -> float | None:
        """Seconds until queued work can run (None: nothing queued)."""
        engine = self.engine
        waits = []
        if engine.ready:
            wake = engine.next_wakeup()
            waits.append(0.0 if wake is None else wake)
        if engine.outbox.pending:
            waits.append(0.05)  # re-sends are due at backoff granularity
        return min(waits) if waits else None

    def _stats(self) -> dict[str, Any]:
        engine = self.engine
        return {
            "mailboxes": sum(1 for m in engine.mailboxes.values() if m.pending),
            "queued": sum(m.pending for m in engine.mailboxes.values()),
            "outbox": engine.outbox.pending,
            "dead_lettered": engine.outbox.statistics()["dead_total"],
            "subscriptions": len(engine.topics),
            "view_nodes": 0 if self.view is None else len(self.view.ring),
            **engine.stats,
        }

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
                    "messaging": self._stats(),
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
        for _ in range(100):  # what the mailboxes still hold (spilled messages stay spilled)
            if not any(m.__len__() for m in self.engine.mailboxes.values()):
                break
            self._run_engine()
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


_BATCH_HEADER = encode_batch_header()
#: Publishes this worker handled, to the control process for the other nodes' clients.
_RELAY_HEADER = encode_request(ADMIN, 0, "", RELAY_ACTION)
_REPLY_BATCH_HEADER = encode_reply_kind(REPLY_BATCH, 0)
_ACKS_HEADER = encode_reply_kind(ACKS, 0)


def _describe_entry(data: bytes) -> dict[str, Any]:
    """A dead letter's message, for people: kind, agent, action, delivery."""
    try:
        kind, corr, subject, action, delivery, _, _ = unpack(data)
        return {"kind": kind, "corr": corr, "agent": subject, "action": action,
                "delivery": delivery}  # fmt: skip
    except (ValueError, TypeError, ProtocolError):
        return {"raw": len(data)}


def normalize_payload(attrs: dict[str, Any], payload: bytes) -> bytes:
    """The payload as the agent host takes it (plain msgpack): decompressed when
    ``phoenixencoding`` is zlib, converted when ``datacontenttype`` is JSON."""
    if attrs.get("phoenixencoding") == "zlib":
        payload = decompress_payload(payload)
    if attrs.get("datacontenttype") == "application/json" and payload:
        try:
            payload = pack(orjson.loads(payload))
        except (orjson.JSONDecodeError, TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"payload is not valid JSON: {exc}") from None
    return payload
