"""The control process: the node's public endpoint.

Forked by the supervisor like a worker (it is the only process of the node
that binds the public ``listen`` endpoint). It answers

- HELLO: the node's topology, so a client can route each message straight to
  the worker that owns the agent (``{"node_id", "protocol", "workers":
  [tcp endpoint of worker 0, 1, ...]}``);
- STATUS: the supervisor's view of the node (``<data>/run/status.json``);
- ASK/TELL sent to it by clients that do not route by themselves: forwarded,
  undecoded, to the owning worker's ipc endpoint, and the reply relayed back
  (the one extra hop such clients pay).

It heartbeats to the supervisor like a worker, and exits when the supervisor
is gone. In a cluster it also runs the node's cluster duties (``cluster/``):
membership and the ring (:class:`ClusterService`), routing to the owning node,
replication and anti-entropy (:class:`Replicator`, which holds client replies
until the replicas hold their writes) and handoff (:class:`Handoff`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import orjson
import zmq

from ipc import bindable, control_ipc_endpoint, make_dealer, make_router, worker_ipc_endpoint
from ipc.protocol import (
    ADMIN,
    ASK,
    BATCH,
    CLUSTER,
    CREDIT,
    HELLO,
    PROTOCOL_VERSION,
    REPLY_BATCH,
    STATUS,
    SUBSCRIBE,
    TELL,
    UNSUBSCRIBE,
    ErrorCode,
    ProtocolError,
    decode_header,
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
from workers.engine import RELAY_ACTION
from workers.host import MERGE_ACTION, error_payload
from workers.placement import owner_index
from workers.process import BootError, WorkerExit, run_child

from .cluster._corr import reply_corr
from .cluster.handoff import FETCH_ACTION, Handoff
from .cluster.membership import NodeId, SwimConfig
from .cluster.migration import ACCEPT_ACTION, Migrator
from .cluster.registry import REGISTRY_ACTION, Registry
from .cluster.replication import DIGEST_ACTION, Replicator
from .cluster.service import PEER_PREFIX, ClusterService
from .cluster.subscriptions import SubscriptionSync
from .cluster.view import ViewPublisher
from .state.store import Store

__all__ = ["ControlSpec", "run_control"]

log = logging.getLogger("phoenix.control")
#: Tells a worker to read the node view now (no answer).
_VIEW_NOTICE = [b"", encode_request(ADMIN, 0, "", "view"), b""]
_RELAY_BATCH_HEADER = encode_batch_header()


@dataclass(frozen=True)
class ControlSpec:
    node_id: str
    listen: str
    workers: int
    status_path: str
    heartbeat_fd: int
    parent_fd: int
    heartbeat_interval: float = 0.5
    seeds: tuple[str, ...] = ()
    advertise: str = ""
    vnodes: int = 128
    weight: float = 1.0
    probe_interval: float = 0.5
    suspicion_mult: float = 4.0
    fault_injection: bool = False
    leave_timeout: float = 2.0
    store_path: str = ""
    durability: str = "durable"
    replicas: int = 2
    anti_entropy_interval: float = 30.0
    replication_ack: str = "replicas"
    replication_timeout: float = 5.0
    replication_deltas: bool = True


def run_control(spec: ControlSpec) -> NoReturn:
    """Entry point in the forked child; never returns."""
    run_child("control process", lambda: _Control(spec).run())


class _BindError(BootError):
    pass


def _peer_address(routing_id: bytes) -> str:
    """The address in a peer's routing id ``node:<address>#<incarnation>``."""
    return routing_id[len(PEER_PREFIX) :].decode(errors="replace").rpartition("#")[0]


class _Control:
    def __init__(self, spec: ControlSpec) -> None:
        self.spec = spec
        self.stopping = False
        self.bad_frames = 0
        self.forwarded = 0

    def _on_stop(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def run(self) -> WorkerExit:
        spec = self.spec
        for sig in (signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.front = make_router(ctx)
        # The public endpoint first (its bound form is the node's address), then the ipc
        # one where the node's workers send their agents' messages for other nodes.
        self.endpoint = ""
        for endpoint in (bindable(spec.listen), control_ipc_endpoint(spec.node_id)):
            try:
                self.front.bind(endpoint)
            except zmq.ZMQError as exc:
                self.front.close(0)
                ctx.term()
                raise _BindError(f"cannot bind {endpoint}: {exc}") from exc
            self.endpoint = self.endpoint or self.front.getsockopt_string(zmq.LAST_ENDPOINT)
        self.backs = []
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        self.store: Store | None = None
        if spec.store_path:
            self.store = Store(spec.store_path, durability=spec.durability)  # type: ignore[arg-type]
        self.cluster = self._start_cluster(ctx, poller)
        self.registry = self.cluster.registry
        self.view: ViewPublisher | None = None
        self.subs: SubscriptionSync | None = None
        self.replicator: Replicator | None = None
        self.handoff: Handoff | None = None
        if self.store is not None:
            self.view = ViewPublisher(self.store, self.cluster.me.address)
            self.subs = SubscriptionSync(self.store, self.registry)
            self.replicator = Replicator(
                self.store, self.cluster, replicas=spec.replicas,
                anti_entropy_interval=spec.anti_entropy_interval,
                ack=spec.replication_ack, hold_timeout=spec.replication_timeout,
                deltas=spec.replication_deltas, send=self._send,
            )  # fmt: skip
            self.handoff = Handoff(
                self.store, self.cluster, replicas=spec.replicas, merge_local=self._merge_local
            )
        for i in range(spec.workers):
            back = make_dealer(ctx, immediate=False)
            back.connect(worker_ipc_endpoint(spec.node_id, i))
            poller.register(back, zmq.POLLIN)
            self.backs.append(back)
        replicator = self.replicator
        self.migrator = Migrator(
            self.cluster.me.address, self.registry, alive=lambda: self.cluster.ring.members,
            to_worker=self._to_worker, to_peer=self.cluster.forward,
            replicate=None if replicator is None else replicator.log_changed,
        )  # fmt: skip
        poller.register(spec.parent_fd, zmq.POLLIN)
        poller.register(wake_r, zmq.POLLIN)
        self.next_beat = 0.0
        try:
            while not self.stopping:
                if self._step(poller):
                    return WorkerExit.SUPERVISOR_GONE
            self._leave(poller)
            return WorkerExit.OK
        finally:
            self.cluster.close()
            for sock in (self.front, *self.backs):
                sock.close(0)
            ctx.term()
            if self.store is not None:
                self.store.close()

    def _start_cluster(
        self, ctx: zmq.Context[zmq.Socket[bytes]], poller: zmq.Poller
    ) -> ClusterService:
        spec = self.spec
        address = spec.advertise or self.endpoint
        if address.startswith("tcp://0.0.0.0:") or address.startswith("tcp://*:"):
            raise _BindError(f"listening on {address}: set --advertise to an address peers reach")
        # A new incarnation for each start of this process: its peers never see a
        # routing id or a CRDT replica of a previous life again.
        me = NodeId(address, time.time_ns() // 1000)
        swim = SwimConfig(
            probe_interval=spec.probe_interval,
            probe_timeout=min(0.4 * spec.probe_interval, 0.5),
            suspicion_mult=spec.suspicion_mult,
        )
        registry = Registry(str(me), store=self.store)
        registry.announce_weight(address, spec.weight)
        return ClusterService(
            ctx, poller, me, seeds=spec.seeds, swim=swim, vnodes=spec.vnodes,
            fault_injection=spec.fault_injection, registry=registry,
        )  # fmt: skip

    def _step(self, poller: zmq.Poller) -> bool:
        """One loop turn; True when the supervisor is gone."""
        spec = self.spec
        now = time.monotonic()
        if now >= self.next_beat:
            self._heartbeat()
            self.next_beat = now + spec.heartbeat_interval
        deadline = self.cluster.next_deadline()
        if now >= deadline:
            self.cluster.tick()
            deadline = self.cluster.next_deadline()
        replicator = self.replicator
        if replicator is not None:
            if now >= replicator.next_deadline():
                replicator.tick()
            deadline = min(deadline, replicator.next_deadline())
        handoff = self.handoff
        if handoff is not None:
            if now >= handoff.next_deadline():
                handoff.tick()
            deadline = min(deadline, handoff.next_deadline())
        if now >= self.migrator.next_deadline():
            self.migrator.tick()
        registry = self.registry
        if now >= registry.next_deadline():
            me = self.cluster.me.address
            registry.tick([a for a in self.cluster.ring.members if a != me], self.cluster.forward)
        deadline = min(deadline, self.migrator.next_deadline(), registry.next_deadline())
        subs = self.subs
        if subs is not None:
            if now >= subs.next_deadline():
                subs.tick()
            deadline = min(deadline, subs.next_deadline())
        if self.view is not None and self.view.publish(self.cluster.ring, registry.placement_map):
            for back in self.backs:  # read it now, not at the workers' next check
                with contextlib.suppress(zmq.Again):
                    back.send_multipart(_VIEW_NOTICE, zmq.NOBLOCK)
        wake = min(self.next_beat, deadline)
        events = dict(poller.poll(max(1, int((wake - time.monotonic()) * 1000) + 1)))
        if spec.parent_fd in events:
            return True
        peers = self.cluster.peer_sockets()
        for sock in events:
            if sock is self.front:
                self._serve_front()
            elif isinstance(sock, zmq.Socket):
                peer = peers.get(sock)
                self._relay(sock, peer)
        return False

    def _leave(self, poller: zmq.Poller) -> None:
        """Graceful leave: tell the cluster, keep serving a moment while it spreads."""
        cluster = self.cluster
        if cluster.single():
            return
        cluster.leave()
        deadline = time.monotonic() + self.spec.leave_timeout / 2
        while time.monotonic() < deadline:
            if self._step(poller):
                return
        cluster.left()

    def _serve_front(self) -> None:
        for _ in range(1000):
            try:
                frames = self.front.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._handle(frames)
            except Exception:
                # A bug must cost one message, not the node's endpoint.
                log.exception("control: unexpected error handling a message")
                self._bad_frame(frames[:1], ErrorCode.INTERNAL, 0, "internal error")

    def _handle(self, frames: list[bytes]) -> None:
        try:
            stack, header, payload = split_envelope(frames)
        except ProtocolError as exc:
            self._bad_frame(frames[:1], exc.code, 0, str(exc))
            return
        try:
            kind, corr, agent_id, _action = decode_header(header)
        except ProtocolError as exc:
            self._bad_frame(stack, exc.code, exc.corr_id, str(exc))
            return
        if kind == CLUSTER:
            self.cluster.on_message(agent_id, payload)
            return
        from_peer = stack[0].startswith(PEER_PREFIX)
        if from_peer and not self.cluster.accepts_from(_peer_address(stack[0])):
            return  # an injected partition
        if kind == HELLO:
            self._answer(stack, corr, self._topology())
        elif kind == STATUS:
            self._answer(stack, corr, self._status())
        elif kind == ADMIN and _action.startswith("cluster."):
            self._cluster_admin(frames, stack, corr, _action, payload, from_peer)
        elif kind == ADMIN and _action == RELAY_ACTION and not from_peer:
            self._relay_publishes(payload)
        elif kind == ADMIN and _action == REGISTRY_ACTION and from_peer:
            self._replica_admin(stack, corr, payload, self.registry.on_sync)
        elif kind == ADMIN and _action == ACCEPT_ACTION and from_peer:
            self._accept(stack, corr, payload)
        elif kind == ADMIN and _action == DIGEST_ACTION and from_peer:
            rep = self.replicator
            self._replica_admin(stack, corr, payload, None if rep is None else rep.on_digests)
        elif kind == ADMIN and _action == FETCH_ACTION and from_peer:
            handoff = self.handoff
            self._replica_admin(stack, corr, payload, None if handoff is None else handoff.on_fetch)
        elif not from_peer and not self.cluster.single() and kind in (ASK, TELL, BATCH):
            self._route(frames, stack, kind, corr, agent_id, payload, self.cluster.owner)
        elif (
            from_peer
            and kind in (ASK, TELL, BATCH)
            and self.registry.has_placements()
            and len(stack) > 1
            and not stack[1].startswith(PEER_PREFIX)
        ):
            # A client's request forwarded by a peer whose registry copy may be behind:
            # an agent placed on another node is forwarded there (a second hop, never
            # a third). A peer's own requests (replication: its id alone) are served.
            self._route(frames, stack, kind, corr, agent_id, payload, self.cluster.placed_elsewhere)
        elif kind in (SUBSCRIBE, UNSUBSCRIBE) and b"phoenixagent" not in header:
            # A client's own subscription must reach every worker (any of them may
            # handle a publish); the client takes the first answer.
            for back in self.backs:
                try:
                    back.send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:
                    pass
            self.forwarded += 1
        elif kind in (ASK, TELL, BATCH):
            self._serve(frames, stack, kind, corr, agent_id, payload)
        else:
            self._local(frames, stack, kind, corr, agent_id)

    def _serve(
        self, frames: list[bytes], stack: list[bytes], kind: int, corr: int, key: str,
        payload: bytes, entries: list[Any] | None = None,
    ) -> None:  # fmt: skip
        """A request this node serves: to its worker, once the handoff holds the state of
        every agent it names (only checked for a while after a ring change; ``entries``:
        a BATCH's, when the caller decoded them already)."""
        handoff = self.handoff
        migrator = self.migrator
        moving = migrator.has_moves()
        holding = handoff is not None and handoff.active()
        if moving or holding:
            if kind != BATCH:
                subjects = [key]
            else:
                subjects = _subjects(_batch_entries(payload) if entries is None else entries)
            if moving and migrator.buffer(
                subjects,
                lambda: self._route(
                    frames, stack, kind, corr, key, payload, self.cluster.owner, entries
                ),
                lambda: self._refuse(stack, kind, corr, "the agent is moving; its buffer is full"),
            ):
                return
            if (
                holding
                and subjects
                and handoff.hold(  # type: ignore[union-attr]
                    subjects, lambda: self._local(frames, stack, kind, corr, key)
                )
            ):
                return
        self._local(frames, stack, kind, corr, key)

    def _relay_publishes(self, entries: bytes) -> None:
        """Publishes a worker of this node handled, sent on (at most once) to every other
        live node for the clients subscribed there; their answers are credits only."""
        me = self.cluster.me.address
        frames = [b"", _RELAY_BATCH_HEADER, entries]
        for address in self.cluster.ring.members:
            if address != me:
                self.cluster.forward(address, frames)

    def _to_worker(self, agent_id: str, frames: list[bytes]) -> bool:
        """A request of this process's own (a migration's) to the worker of ``agent_id``."""
        try:
            self.backs[owner_index(agent_id, self.spec.workers)].send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def _accept(self, stack: list[bytes], corr: int, payload: bytes) -> None:
        """A migration's source sends this node an agent's state (its new owner)."""
        try:
            self.migrator.on_accept(payload, self._replier(stack, corr))
        except ProtocolError as exc:
            self._bad_frame(stack, ErrorCode.BAD_REQUEST, corr, str(exc))

    def _replier(self, stack: list[bytes], corr: int) -> Callable[[int, Any], None]:
        """A function answering the request (``stack``, ``corr``) later: ``(0, result)``
        or ``(error code, message)``."""

        def reply(code: int, body: Any) -> None:
            if code != 0:
                body = error_payload(code, str(body))
            self._send([*stack, b"", encode_reply(corr, code), pack(body)])

        return reply

    def _merge_local(self, states: list[tuple[str, bytes]]) -> None:
        """States fetched by the handoff, merged into the owning workers (no replies)."""
        per_worker: dict[int, list[bytes]] = {}
        for agent_id, state in states:
            entry = encode_entry(TELL, 0, agent_id, MERGE_ACTION, 0, None, state)
            per_worker.setdefault(owner_index(agent_id, self.spec.workers), []).append(entry)
        for index, entries in per_worker.items():
            hint = next(a for a, _ in states if owner_index(a, self.spec.workers) == index)
            frames = [b"", encode_batch_header(None, hint), join_entries(entries)]
            try:
                self.backs[index].send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                log.warning("worker %d refused %d handed-off states", index, len(entries))

    def _local(
        self, frames: list[bytes], stack: list[bytes], kind: int, corr: int, key: str
    ) -> None:
        """ASK/TELL go to the owning worker; a BATCH to the owner of its routing hint (the
        subject of the header: the worker re-forwards entries it does not own)."""
        back = self.backs[owner_index(key, self.spec.workers) if key else 0]
        try:
            back.send_multipart(frames, zmq.NOBLOCK)
            self.forwarded += 1
        except zmq.Again:
            if kind != TELL:
                self._unavailable(
                    stack, corr, "the owning worker is not accepting messages "
                    "(restarting or overloaded)",
                )  # fmt: skip

    def _refuse(self, stack: list[bytes], kind: int, corr: int, message: str) -> None:
        if kind != TELL:  # a BATCH's client resends what is not acknowledged
            self._unavailable(stack, corr, message)

    def _unavailable(self, stack: list[bytes], corr: int, message: str) -> None:
        code = ErrorCode.UNAVAILABLE
        self._send([*stack, b"", encode_reply(corr, code), pack(error_payload(code, message))])

    def _route(
        self, frames: list[bytes], stack: list[bytes], kind: int, corr: int, key: str,
        payload: bytes, owner_of: Callable[[str], str | None],
        entries: list[Any] | None = None,
    ) -> None:  # fmt: skip
        """A request in a cluster: served here or forwarded to the node ``owner_of`` names
        for its agent (None: this node); a BATCH split by owner. ``entries``: a BATCH's,
        when the caller decoded them already."""
        cluster = self.cluster
        if kind != BATCH:
            owner = owner_of(key)
            if owner is None:
                self._serve(frames, stack, kind, corr, key, payload)
            elif not cluster.forward(owner, frames) and kind != TELL:
                self._unavailable(stack, corr, f"the owning node {owner} is not reachable")
            return
        try:
            if entries is None:
                entries = unpack(payload)
            if not isinstance(entries, list):
                raise ProtocolError("BATCH payload must be an array")
            groups: dict[str | None, list[Any]] = {}
            for entry in entries:
                subject = entry[2] if isinstance(entry, list) and len(entry) == 7 else ""
                owner = owner_of(subject) if isinstance(subject, str) and subject else None
                groups.setdefault(owner, []).append(entry)
        except ProtocolError:
            self._local(frames, stack, kind, corr, key)  # the worker answers the errors
            return
        if len(groups) == 1 and None in groups:
            self._serve(frames, stack, kind, corr, key, payload, groups[None])
            return
        head = frames[: len(stack) + 2]
        for owner, group in groups.items():
            part = [*head, pack(group)]
            if owner is None:
                self._serve(part, stack, kind, corr, key, b"", group)
            elif not cluster.forward(owner, part):
                self._unreachable_batch(stack, group, owner)

    def _unreachable_batch(self, stack: list[bytes], group: list[Any], owner: str) -> None:
        code = int(ErrorCode.UNAVAILABLE)
        body = pack(error_payload(code, f"the owning node {owner} is not reachable"))
        items = [(e[1], code, body) for e in group if e[0] != TELL and type(e[1]) is int]
        self._send([*stack, b"", encode_reply_kind(CREDIT, len(group)), b""])
        if items:
            self._send([*stack, b"", encode_reply_kind(REPLY_BATCH, 0), encode_reply_batch(items)])

    def _cluster_admin(
        self, frames: list[bytes], stack: list[bytes], corr: int, action: str, payload: bytes,
        from_peer: bool,
    ) -> None:  # fmt: skip
        code, result = 0, None
        try:
            if action in ("cluster.migrate", "cluster.unpin"):
                self._migrate(frames, stack, corr, action, payload, from_peer)
                return
            if action == "cluster.status":
                result = self._cluster_status()
            elif action == "cluster.placement":
                result = self._placement(_agent_arg(_args(payload)))
            elif action == "cluster.registry":
                result = self.registry.view()
            elif action == "cluster.meta":
                args = _args(payload)
                agent_id = _agent_arg(args)
                self.registry.set_meta(agent_id, args.get("meta"))
                result = {"agent": agent_id, "meta": self.registry.meta(agent_id)}
            elif action == "cluster.leave":
                # The supervisor stops the node; this process leaves on its SIGTERM.
                result = {"leaving": str(self.cluster.me)}
                os.kill(os.getppid(), signal.SIGTERM)
            elif action == "cluster.faults":
                result = self.cluster.set_faults(unpack(payload) if payload else {})
            else:
                raise ValueError(f"unknown cluster operation {action!r}")
        except (PermissionError, ValueError, TypeError, ProtocolError) as exc:
            code, result = ErrorCode.BAD_REQUEST, error_payload(ErrorCode.BAD_REQUEST, str(exc))
        self._send([*stack, b"", encode_reply(corr, code), pack(result)])

    def _migrate(
        self, frames: list[bytes], stack: list[bytes], corr: int, action: str, payload: bytes,
        from_peer: bool,
    ) -> None:  # fmt: skip
        """``migrate`` / ``unpin``: run by the agent's owner; forwarded to it from
        elsewhere (one hop; the owner answers through this node)."""
        args = _args(payload)
        agent_id = _agent_arg(args)
        owner = self.cluster.owner(agent_id)
        if owner is not None:
            if from_peer:
                raise ValueError(f"{agent_id} is not owned by this node; try again")
            if not self.cluster.forward(owner, frames):
                self._unavailable(stack, corr, f"the owning node {owner} is not reachable")
            return
        reply = self._replier(stack, corr)
        if action == "cluster.unpin":
            self.migrator.start(agent_id, self.cluster.ring.owner(agent_id), reply, unpin=True)
            return
        node = args.get("node")
        if not isinstance(node, str) or not node:
            raise ValueError("migrate needs the target node's address ('node')")
        self.migrator.start(agent_id, node, reply)  # MigrationError: a ValueError

    def _placement(self, agent_id: str) -> dict[str, Any]:
        owner = self.cluster.owner(agent_id)
        return {
            "agent": agent_id,
            "owner": self.cluster.me.address if owner is None else owner,
            "placed": self.registry.placement(agent_id),
            "ring_owner": self.cluster.ring.owner(agent_id),
            "preference": self.cluster.preference(agent_id, self.spec.replicas + 1),
            "moving": agent_id in self.migrator.status()["moving"],
        }

    def _bad_frame(self, stack: list[bytes], code: int, corr: int, message: str) -> None:
        self.bad_frames += 1
        if stack and stack[0]:
            self._send([*stack, b"", encode_reply(corr, code), pack(error_payload(code, message))])

    def _relay(self, back: zmq.Socket[bytes], peer: str | None = None) -> None:
        """Replies from a worker, or from a peer node that served a forwarded request
        (or one of this process's own replication requests: no routing stack)."""
        drop = peer is not None and not self.cluster.accepts_from(peer)
        replicator = self.replicator
        # A worker's replies to clients wait for the replicas (replication_ack); not
        # those to a peer's own replication requests (stack: that peer's id alone).
        hold = peer is None and replicator is not None and replicator.holds()
        for _ in range(1000):
            try:
                frames = back.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if drop:
                continue
            if frames and frames[0] == b"":  # answers to this process's own requests
                self._own_reply(peer, frames)
                continue
            if (
                hold
                and len(frames) > 3
                and not (frames[1] == b"" and frames[0].startswith(PEER_PREFIX))
            ):
                replicator.hold(frames)  # type: ignore[union-attr]
                continue
            self._send(frames)

    def _own_reply(self, peer: str | None, frames: list[bytes]) -> None:
        """An answer to this process's own request, to the requester whose corr id range
        holds it (``peer``: the node that answered; None: a worker)."""
        corr = reply_corr(frames)
        if corr is None:
            log.debug("unreadable answer from %s", peer or "a worker")
        elif self.migrator.ids.owns(corr):
            if peer is None:
                self.migrator.on_worker_reply(frames)
            else:
                self.migrator.on_peer_reply(frames)
        elif peer is None:
            pass  # a worker's, to a handed-off merge (sent as TELLs: none expected)
        elif self.registry.ids.owns(corr):
            self.registry.on_reply(peer, frames)
        elif self.handoff is not None and self.handoff.ids.owns(corr):
            self.handoff.on_reply(frames)
        elif self.replicator is not None:
            self.replicator.on_reply(peer, frames)

    def _replica_admin(
        self, stack: list[bytes], corr: int, payload: bytes, handler: Callable[[bytes], Any] | None
    ) -> None:
        """A peer's replica operation (state digests, a state fetch), answered here from
        the store; UNAVAILABLE on a node that keeps no agent state."""
        if handler is None:
            self._unavailable(stack, corr, "this node keeps no agent state")
            return
        try:
            result = handler(payload)
        except ProtocolError as exc:
            self._bad_frame(stack, ErrorCode.BAD_REQUEST, corr, str(exc))
            return
        self._send([*stack, b"", encode_reply(corr, 0), pack(result)])

    def _answer(self, stack: list[bytes], corr: int, body: dict[str, Any]) -> None:
        self._send([*stack, b"", encode_reply(corr, 0), pack(body)])

    def _send(self, frames: list[bytes]) -> None:
        try:
            self.front.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                raise

    def _status(self) -> dict[str, Any]:
        try:
            with open(self.spec.status_path, "rb") as f:
                status: dict[str, Any] = orjson.loads(f.read())
        except (OSError, orjson.JSONDecodeError):
            status = {"state": "starting", "workers": []}
        status["control"] = {
            "pid": os.getpid(),
            "forwarded": self.forwarded,
            "bad_frames": self.bad_frames,
        }
        status["cluster"] = self._cluster_status()
        return status

    def _cluster_status(self) -> dict[str, Any]:
        status = self.cluster.status()
        if self.replicator is not None:
            status["replication"] = self.replicator.status()
        if self.handoff is not None:
            status["handoff"] = self.handoff.status()
        status["registry"] = self.registry.status()
        status["migration"] = self.migrator.status()
        if self.subs is not None:
            status["subscriptions"] = self.subs.status()
        return status

    def _topology(self) -> dict[str, Any]:
        workers = {w["index"]: w.get("endpoint") for w in self._status().get("workers", [])}
        return {
            "node_id": self.spec.node_id,
            "protocol": PROTOCOL_VERSION,
            "endpoint": self.endpoint,
            "workers": [workers.get(i) for i in range(self.spec.workers)],
            # Clients route straight to the workers only while this node is alone in
            # its cluster; else through this endpoint, which routes by the ring.
            "direct": self.cluster.single(),
            "cluster": {"me": str(self.cluster.me), "members": len(self.cluster.ring)},
        }

    def _heartbeat(self) -> None:
        line = (
            orjson.dumps(
                {
                    "pid": os.getpid(),
                    "index": -1,
                    "state": "ready",
                    "endpoint": self.endpoint,
                    "forwarded": self.forwarded,
                    "bad_frames": self.bad_frames,
                }
            )
            + b"\n"
        )
        try:
            os.write(self.spec.heartbeat_fd, line)
        except BlockingIOError:
            pass
        except BrokenPipeError:
            self.stopping = True


def _args(payload: bytes) -> dict[str, Any]:
    args = unpack(payload) if payload else {}
    if not isinstance(args, dict):
        raise ValueError("the operation's arguments must be a map")
    return args


def _agent_arg(args: dict[str, Any]) -> str:
    agent_id = args.get("agent")
    if not isinstance(agent_id, str) or "/" not in agent_id or not agent_id.partition("/")[2]:
        raise ValueError(f"'agent' must be an agent id '<Type>/<key>', not {agent_id!r:.80}")
    return agent_id


def _subjects(entries: list[Any]) -> list[str]:
    """The agents a BATCH's entries are for, replication's own merges left out."""
    return [
        e[2]
        for e in entries
        if isinstance(e, list) and len(e) == 7 and isinstance(e[2], str) and e[3] != MERGE_ACTION
    ]


def _batch_entries(payload: bytes) -> list[Any]:
    try:
        entries = unpack(payload)
    except ProtocolError:
        return []  # the worker answers the errors
    return entries if isinstance(entries, list) else []
