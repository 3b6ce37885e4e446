"""The Phoenix client: ``tell`` and ``ask`` agents of a node.

A client first sends HELLO to the node's public endpoint and learns its
topology (the tcp endpoint of every worker); from then on it sends each
message straight to the worker that owns the agent (jump hash of the agent
id, as the node computes it), so no process of the node is a hop that every
message crosses. Pipelined calls (:meth:`Client.ask_many`) keep many asks in
flight for throughput.

Delivery guarantees are chosen per call (``delivery=`` beside ``timeout``):
``at_most_once`` (the default), ``at_least_once`` (the message is kept in the
client's outbox until the worker acknowledges it after its commit, re-sent
with exponential backoff and jitter, then dead-lettered), ``exactly_once``
(the same, and the worker drops duplicates by ``(source, corr)``) and
``causal``. The outbox lives in memory unless ``outbox=`` names a directory:
then it is an LMDB store, and messages a crashed client had not seen
acknowledged are sent again by the next client opened on that directory.
Guaranteed messages are re-sent only while the client is being called:
:meth:`Client.flush` waits until every one was acknowledged.

Flow control: the client keeps at most ``window`` messages per worker that
the worker has not yet credited back (a worker credits a message once it ran,
refused or dropped it), so a fast client slows down instead of filling a slow
worker's memory.

A client is not thread-safe: use one per thread. It must not cross a fork.
Pending asks never outlive their timeout; an ask held by a worker that
disconnects fails early with :class:`WorkerLostError` (the action may or may
not have run: ``ask`` is at-most-once).
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from ipc import make_dealer
from ipc.protocol import (
    ACKS,
    ADMIN,
    ASK,
    AT_MOST_ONCE,
    CAUSAL,
    CREDIT,
    EVENT,
    HELLO,
    MAX_ACTION,
    PUBLISH,
    REPLY,
    REPLY_BATCH,
    RETRYABLE,
    STATUS,
    SUBSCRIBE,
    TELL,
    UNSUBSCRIBE,
    ProtocolError,
    check_agent_id,
    decode_acks,
    decode_reply_batch,
    decode_reply_kind,
    encode_batch_header,
    encode_entry,
    encode_request,
    join_entries,
    pack,
    split_envelope,
    unpack,
)
from workers.causal import CausalClock
from workers.placement import owner_index
from workers.topics import check_pattern, check_topic

from .errors import (
    AskTimeoutError,
    BackpressureError,
    ClientClosedError,
    InvalidRequestError,
    NodeUnreachableError,
    NotAcknowledgedError,
    PhoenixError,
    WorkerLostError,
    error_from_reply,
)
from .state.delivery import Outbox, OutboxEntry, RetryPolicy, parse_delivery
from .state.store import Store

__all__ = ["Client", "Event"]

_MISSING = object()
_PLAIN_CORR = 2**63  # corr ids of unguaranteed messages; outbox ids stay below
_FRONT = -1
_MAX_CACHED_OWNERS = 1_000_000
_TOPOLOGY_REFRESH = 2.0  # seconds between HELLOs that check the node is still alone


@dataclass(frozen=True)
class Event:
    """An event delivered to a subscribed client."""

    topic: str
    data: Any
    source: str
    id: str
    subscription: str


class Client:
    """A connection to one node. Use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        endpoint: str,
        *,
        timeout: float = 10.0,
        route: bool = True,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        outbox: str | None = None,
        retry: RetryPolicy | None = None,
        window: int = 10_000,
        batch_size: int = 1000,
    ) -> None:
        """``route=False`` sends everything through the node endpoint (one extra hop).
        ``outbox``: a directory for a durable outbox (LMDB); None keeps it in memory.
        ``window``: messages per worker not yet credited back before sends wait."""
        if not isinstance(window, int) or window < 1:
            raise InvalidRequestError(f"window must be a positive int, got {window!r}")
        self.endpoint = endpoint
        self.timeout = timeout
        self.route = route
        self.window = window
        # a batch never holds more than the window allows in flight
        self.batch_size = min(batch_size, window)
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._pid = os.getpid()
        self._corr = itertools.count(_PLAIN_CORR)
        self._front: zmq.Socket[bytes] | None = None
        self._workers: list[zmq.Socket[bytes]] = []
        self._monitors: dict[zmq.Socket[bytes], int] = {}
        self._poller = zmq.Poller()
        self._pending: dict[int, int] = {}  # corr -> worker index (-1: via the node endpoint)
        self._results: dict[int, tuple[int, Any]] = {}
        self._lost: set[int] = set()
        self._inflight: dict[int, int] = {}  # worker index -> messages not credited back
        self._owners: dict[str, int] = {}  # routing key -> worker index, for this topology
        self._topology_expires = float("inf")  # set by the first HELLO
        self._events: deque[Event] = deque()
        self._subscriptions: dict[int, str] = {}  # subscription corr -> pattern
        self.topology: dict[str, Any] = {}
        self.late_replies = 0
        self._closed = False
        self._store = Store(outbox) if outbox is not None else None
        self.source = self._load_source()
        self._outbox = Outbox(self._store, b"client", retry)
        self._fresh: list[OutboxEntry] = []  # added, to be sent after the next commit
        self._outbox.load()
        self._clock = CausalClock(self.source)
        self._batch_header = encode_batch_header({"source": self.source})

    def _load_source(self) -> str:
        """The CloudEvents ``source`` of this client's messages: it scopes their ids for
        the receivers' dedup, so a durable outbox keeps it across restarts."""
        if self._store is not None:
            raw = self._store.get("meta", b"client.source")
            if raw is not None:
                return raw.decode()
        source = f"phoenix://client/{uuid.uuid4().hex}"
        if self._store is not None:
            batch = self._store.batch()
            batch.put("meta", b"client.source", source.encode())
            self._store.commit(batch)
        return source

    # --- public API -------------------------------------------------------------------

    def tell(
        self, agent_id: str, action: str, *, delivery: str = "at_most_once", **kwargs: Any
    ) -> None:
        """Send ``action`` to ``agent_id`` without waiting for its result.

        ``at_most_once`` returns once the message is handed to the transport; with a
        guarantee it returns once the message is in the outbox (and sent): call
        :meth:`flush` to wait for the acknowledgements.
        """
        self.tell_many([(agent_id, action, kwargs)], delivery=delivery)

    def tell_many(
        self, calls: Iterable[tuple[str, str, Mapping[str, Any]]], *, delivery: str = "at_most_once"
    ) -> int:
        """Send many tells, batched per worker (one frame per worker per ``batch_size``
        messages); returns how many were sent."""
        code = self._delivery(delivery)
        n = 0
        if code == AT_MOST_ONCE:
            per_worker: dict[int, list[bytes]] = {}
            hints: dict[int, str] = {}
            for agent_id, action, kw in calls:
                index = self._target(agent_id)
                entry = encode_entry(
                    TELL, next(self._corr), agent_id, _check_action(action), 0, None,
                    _pack_kwargs(kw),
                )  # fmt: skip
                entries = per_worker.setdefault(index, [])
                entries.append(entry)
                n += 1
                if len(entries) >= self.batch_size:
                    self._send_batch(index, entries, agent_id)
                    per_worker[index] = []
                hints[index] = agent_id
            for index, entries in per_worker.items():
                if entries:
                    self._send_batch(index, entries, hints[index])
            return n
        for agent_id, action, kw in calls:
            self._stage(TELL, agent_id, _check_action(action), code, _pack_kwargs(kw))
            n += 1
            if n % self.batch_size == 0:
                self._commit_and_send()
        self._commit_and_send()
        return n

    def ask(
        self,
        agent_id: str,
        action: str,
        *,
        timeout: float | None = None,
        delivery: str = "at_most_once",
        **kwargs: Any,
    ) -> Any:
        """Run ``action`` on ``agent_id`` and return its result, or raise its error.

        With a guarantee the ask is re-sent (same id) until a reply arrives or the
        timeout passes; with ``exactly_once`` a re-sent ask that already ran gets the
        stored reply instead of running again.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        code = self._delivery(delivery)
        if code == AT_MOST_ONCE:
            corr = self._send_ask(agent_id, action, kwargs)
        else:
            corr = self._stage(ASK, agent_id, _check_action(action), code, _pack_kwargs(kwargs))
            self._commit_and_send()
        return self._take(corr, deadline, agent_id, action)

    def ask_many(
        self,
        calls: Iterable[tuple[str, str, Mapping[str, Any]]],
        *,
        timeout: float | None = None,
        delivery: str = "at_most_once",
    ) -> list[Any]:
        """Pipelined asks: every call is sent before any reply is awaited.

        Returns one entry per call, in order: the result, or the exception
        (a :class:`PhoenixError`) for that call. Nothing is raised for one call's
        failure; the timeout covers the whole batch.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        code = self._delivery(delivery)
        sent: list[tuple[int, str, str]] = []
        if code == AT_MOST_ONCE:
            per_worker: dict[int, list[bytes]] = {}
            hints: dict[int, str] = {}
            for agent_id, action, kw in calls:
                index = self._target(agent_id)
                corr = next(self._corr)
                entries = per_worker.setdefault(index, [])
                entries.append(
                    encode_entry(ASK, corr, agent_id, _check_action(action), 0, None,
                                 _pack_kwargs(kw))
                )  # fmt: skip
                self._pending[corr] = index
                sent.append((corr, agent_id, action))
                hints[index] = agent_id
                if len(entries) >= self.batch_size:
                    self._send_batch(index, entries, agent_id)
                    per_worker[index] = []
            for index, entries in per_worker.items():
                if entries:
                    self._send_batch(index, entries, hints[index])
        else:
            for agent_id, action, kw in calls:
                corr = self._stage(ASK, agent_id, _check_action(action), code, _pack_kwargs(kw))
                sent.append((corr, agent_id, action))
            self._commit_and_send()
        out: list[Any] = []
        for corr, agent_id, action in sent:
            try:
                out.append(self._take(corr, deadline, agent_id, action))
            except PhoenixError as exc:
                out.append(exc)
        return out

    def publish(self, topic: str, data: Any = None, *, delivery: str = "at_most_once") -> None:
        """Publish ``data`` on ``topic``; every matching subscription of the node gets
        it. With a guarantee the publish is acknowledged once the node stored the
        fan-out in its outbox (each subscription then gets it with its own guarantee)."""
        try:
            check_topic(topic)
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(str(exc)) from None
        code = self._delivery(delivery)
        if code == AT_MOST_ONCE:
            index = self._target_topic(topic)
            entry = encode_entry(PUBLISH, next(self._corr), topic, "", 0, None, _pack_value(data))
            self._send_batch(index, [entry], topic)
            return
        self._stage(PUBLISH, topic, "", code, _pack_value(data))
        self._commit_and_send()

    def subscribe(self, pattern: str, *, timeout: float | None = None) -> str:
        """Subscribe this client to ``pattern`` (``*`` one segment, ``#`` any tail) on
        every worker; events arrive through :meth:`events`. At most once: events
        published while the client does not read are dropped at the publisher when
        its queue towards this client is full."""
        self._check_pattern(pattern)
        self._ensure_topology()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        corrs = []
        for index in self._indices():
            corr = next(self._corr)
            self._subscriptions[corr] = pattern
            self._request(index, SUBSCRIBE, corr, pattern, "", {})
            corrs.append(corr)
        for corr in corrs:
            self._take(corr, deadline, pattern, "subscribe")
        return pattern

    def unsubscribe(self, pattern: str, *, timeout: float | None = None) -> None:
        """Stop this client's subscription to ``pattern``."""
        self._check_pattern(pattern)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        corrs = []
        for index in self._indices():
            corr = next(self._corr)
            self._request(index, UNSUBSCRIBE, corr, pattern, "", {})
            corrs.append(corr)
        for corr in corrs:
            self._take(corr, deadline, pattern, "unsubscribe")
        for corr in [c for c, p in self._subscriptions.items() if p == pattern]:
            del self._subscriptions[corr]

    def subscribe_agent(
        self,
        pattern: str,
        agent_id: str,
        action: str = "on_event",
        *,
        delivery: str = "at_least_once",
        timeout: float | None = None,
    ) -> None:
        """Subscribe an agent: each matching event calls ``action(topic=, data=)`` on it
        with the given guarantee. Stored with the node (survives restarts)."""
        self._check_pattern(pattern)
        self._target(agent_id)
        code = self._delivery(delivery)
        attrs = {"phoenixagent": agent_id, "phoenixsubdelivery": code}
        self._admin_call(SUBSCRIBE, pattern, _check_action(action), attrs, timeout)

    def unsubscribe_agent(
        self, pattern: str, agent_id: str, *, timeout: float | None = None
    ) -> None:
        self._check_pattern(pattern)
        self._target(agent_id)
        self._admin_call(UNSUBSCRIBE, pattern, "", {"phoenixagent": agent_id}, timeout)

    def events(self, timeout: float = 0.0) -> Iterator[Event]:
        """Events received for this client's subscriptions: those already here, then
        those that arrive within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            while self._events:
                yield self._events.popleft()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._poll(0)
                if not self._events:
                    return
                continue
            self._poll(remaining)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every guaranteed message was acknowledged (re-sending as needed);
        raises :class:`NotAcknowledgedError` if some are still waiting at the timeout
        (they stay in the outbox)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while self._outbox.pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NotAcknowledgedError(
                    f"{self._outbox.pending} message(s) not acknowledged within the timeout"
                )
            self._poll(min(remaining, 0.05))
            self._commit_and_send()

    @property
    def unacknowledged(self) -> int:
        """Guaranteed messages sent and not yet acknowledged."""
        return self._outbox.pending

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """Messages this client gave up on after the maximum retries, or that failed at
        the receiver for good (for example an unknown action)."""
        return [_describe_dead(d) for d in self._outbox.dead_letters(limit)]

    def replay_dead_letters(self, ids: Iterable[int] | None = None) -> int:
        """Put dead letters back into the outbox (attempts reset); returns how many."""
        n = self._outbox.replay(None if ids is None else list(ids))
        self._commit_and_send()
        return n

    def node_dead_letters(self, *, timeout: float | None = None) -> list[dict[str, Any]]:
        """The dead letters of the node's agents (messages they sent that were never
        acknowledged), from every worker."""
        out: list[dict[str, Any]] = []
        for result in self._admin_all("dead_letters", timeout):
            out.extend(result)
        return out

    def replay_node_dead_letters(self, *, timeout: float | None = None) -> int:
        """Send the node's dead letters again; returns how many were replayed."""
        return sum(self._admin_all("replay_dead_letters", timeout))

    def worker_stats(self, *, timeout: float | None = None) -> list[dict[str, Any]]:
        """Each worker's messaging counters (queued, outbox, refused, duplicates...)."""
        return self._admin_all("stats", timeout)

    def status(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The node's status: workers (pid, CPU, state, agents, messages, restarts)."""
        front = self._ensure_front()
        corr = next(self._corr)
        self._pending[corr] = _FRONT
        self._send(front, [b"", encode_request(STATUS, corr), b""])
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        result: dict[str, Any] = self._take(corr, deadline, "", "status", unreachable=True)
        return result

    def cluster_status(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The cluster as this node sees it: members (address, incarnation, state,
        ring share), failure-detector counters, forwarded requests."""
        result: dict[str, Any] = self._cluster_call("cluster.status", None, timeout)
        return result

    def leave(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Make the node leave its cluster gracefully and stop (what ``phoenix-node
        leave`` does). Returns once the node accepted; it stops right after."""
        result: dict[str, Any] = self._cluster_call("cluster.leave", None, timeout)
        return result

    def migrate(self, agent_id: str, node: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Move the live agent ``agent_id`` to the node at address ``node`` (a member's
        ``address`` in :meth:`cluster_status`): its state is transferred, requests that
        arrive meanwhile wait and follow it. The agent stays placed there (pinned) until
        :meth:`unpin`. Returns ``{"agent", "from", "to", "moved", "buffered",
        "seconds"}``; UNAVAILABLE when the move failed (the agent stays where it was)."""
        args = {"agent": agent_id, "node": node}
        result: dict[str, Any] = self._cluster_call("cluster.migrate", args, timeout)
        return result

    def unpin(self, agent_id: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Remove the placement of ``agent_id``: it moves to the node the ring gives it."""
        result: dict[str, Any] = self._cluster_call("cluster.unpin", {"agent": agent_id}, timeout)
        return result

    def placement(self, agent_id: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Where the node asked places ``agent_id``: ``{"agent", "owner", "placed" (its
        explicit placement or None), "ring_owner", "preference" (owner, then replicas),
        "moving"}``."""
        result: dict[str, Any] = self._cluster_call(
            "cluster.placement", {"agent": agent_id}, timeout
        )
        return result

    def registry(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The node's copy of the cluster registry: ``{"placements": {agent: node},
        "meta": {agent: {...}}}``."""
        result: dict[str, Any] = self._cluster_call("cluster.registry", None, timeout)
        return result

    def set_meta(
        self, agent_id: str, meta: dict[str, Any] | None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Set the metadata map of ``agent_id`` in the cluster registry (None removes it);
        every node's copy has it within a gossip round or two."""
        result: dict[str, Any] = self._cluster_call(
            "cluster.meta", {"agent": agent_id, "meta": meta}, timeout
        )
        return result

    def inject_faults(
        self,
        *,
        drop: float = 0.0,
        duplicate: float = 0.0,
        delay: float = 0.0,
        jitter: float = 0.0,
        partition: Iterable[str] = (),
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Set what the node does to its messages to peers (tests; the node must run with
        ``--fault-injection``): drop / duplicate probabilities, delay ± jitter seconds,
        and the peer addresses cut off by a partition. All zero and empty: no faults."""
        plan = {"drop": drop, "duplicate": duplicate, "delay": delay, "jitter": jitter,
                "partition": list(partition)}  # fmt: skip
        result: dict[str, Any] = self._cluster_call("cluster.faults", plan, timeout)
        return result

    def _cluster_call(self, operation: str, data: Any, timeout: float | None) -> Any:
        self._check_open()
        front = self._ensure_front()
        corr = next(self._corr)
        header = encode_request(ADMIN, corr, "", operation, 0, None)
        payload = b"" if data is None else _pack_value(data)
        self._pending[corr] = _FRONT
        self._send(front, [b"", header, payload])
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        return self._take(corr, deadline, "", operation, unreachable=True)

    @contextmanager
    def batch(self) -> Iterator[Client]:
        """Hold guaranteed messages and send them together when the block ends."""
        self._holding = getattr(self, "_holding", 0) + 1
        try:
            yield self
        finally:
            self._holding -= 1
            if not self._holding:
                self._commit_and_send()

    def close(self) -> None:
        """Close every socket. Tells still queued get up to the client's `timeout` to
        leave (returning at once when nothing is queued); pending asks are abandoned;
        unacknowledged guaranteed messages stay in a durable outbox for the next client
        on that directory."""
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._pid:
            return  # inherited across fork: the sockets are not ours to close
        # Tells still queued get the client's timeout to leave (a tell followed by
        # close, as `phoenix-node tell` does, must not be dropped because the owning
        # worker is briefly busy); asks are abandoned.
        linger_ms = int(self.timeout * 1000)
        for monitor in self._monitors:
            monitor.close(linger=0)
        for sock in self._workers:
            sock.close(linger=linger_ms)
        if self._front is not None:
            self._front.close(linger=linger_ms)
        if self._own_ctx:
            self._ctx.term()
        if self._store is not None:
            self._commit()
            self._store.close()

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

    def _ensure_topology(self) -> None:
        if self.route and not self.topology:
            self._connect()

    def _hello(self) -> dict[str, Any]:
        front = self._ensure_front()
        corr = next(self._corr)
        self._pending[corr] = _FRONT
        self._send(front, [b"", encode_request(HELLO, corr), b""])
        hello = self._take(corr, time.monotonic() + self.timeout, "", "hello", unreachable=True)
        if not isinstance(hello, dict) or not isinstance(hello.get("workers"), list):
            raise NodeUnreachableError(f"{self.endpoint} did not answer HELLO with a topology")
        self._topology_expires = time.monotonic() + _TOPOLOGY_REFRESH
        return hello

    def _refresh_topology(self) -> None:
        """Whether the node is still alone in its cluster changes over time (a node
        joins): ask again now and then, so direct routing stops when it must."""
        self._topology_expires = time.monotonic() + _TOPOLOGY_REFRESH
        if not self.topology:
            return
        hello = self._hello()
        if hello.get("direct", True) != self.topology.get("direct", True):
            self._owners.clear()
        self.topology["direct"] = hello.get("direct", True)
        self.topology["cluster"] = hello.get("cluster")

    def _connect(self) -> None:
        hello = self._hello()
        self.topology = hello
        self._owners.clear()
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

    def _indices(self) -> list[int]:
        """Every socket a subscription must reach: each worker, or the node endpoint."""
        if not self.route or not self.topology:
            return [_FRONT]
        return [i if w is not None else _FRONT for i, w in enumerate(self.topology["workers"])]

    def _target(self, agent_id: str) -> int:
        """The index of the worker that owns ``agent_id`` (-1: the node endpoint).
        The caller checked that the client is open (see :meth:`_delivery`)."""
        if not isinstance(agent_id, str):
            raise InvalidRequestError(f"agent id must be a str, got {type(agent_id).__name__}")
        try:
            check_agent_id(agent_id)
        except ProtocolError as exc:
            raise InvalidRequestError(str(exc)) from None
        return self._index_for(agent_id)

    def _target_topic(self, topic: str) -> int:
        self._check_open()
        return self._index_for(topic)

    def _index_for(self, key: str) -> int:
        index = self._owners.get(key)
        if index is not None:
            return index
        if not self.route:
            return _FRONT
        if not self.topology:
            self._connect()
        if not self.topology.get("direct", True):
            return _FRONT  # a node of a cluster: it routes by the ring (one hop at most)
        workers = self.topology["workers"]
        index = owner_index(key, len(workers))
        if workers[index] is None:
            return _FRONT  # that worker has not reported yet: go via the node
        if len(self._owners) >= _MAX_CACHED_OWNERS:
            self._owners.clear()
        self._owners[key] = index
        return index

    def _socket(self, index: int) -> zmq.Socket[bytes]:
        return self._ensure_front() if index == _FRONT else self._workers[index]

    def _delivery(self, delivery: str) -> int:
        """Every messaging call starts here: also the closed / forked check, and, now
        and then, whether the node is still alone (once per call, not per message)."""
        self._check_open()
        try:
            code = int(parse_delivery(delivery))
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(str(exc)) from None
        if self.route and time.monotonic() >= self._topology_expires:
            self._refresh_topology()
        return code

    def _check_pattern(self, pattern: str) -> None:
        self._check_open()
        try:
            check_pattern(pattern)
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(str(exc)) from None

    # --- sending ----------------------------------------------------------------------

    def _send_ask(self, agent_id: str, action: str, kwargs: Mapping[str, Any]) -> int:
        index = self._target(agent_id)
        corr = next(self._corr)
        header = encode_request(ASK, corr, agent_id, _check_action(action))
        self._send_counted(index, [b"", header, _pack_kwargs(kwargs)], 1)
        self._pending[corr] = index
        return corr

    def _request(
        self, index: int, kind: int, corr: int, subject: str, action: str, attrs: dict[str, Any]
    ) -> None:
        self._pending[corr] = index
        header = encode_request(kind, corr, subject, action, 0, attrs)
        self._send_counted(index, [b"", header, b""], 1)

    def _admin_call(
        self, kind: int, subject: str, action: str, attrs: dict[str, Any], timeout: float | None
    ) -> Any:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        index = self._index_for(attrs.get("phoenixagent", subject)) if self.route else _FRONT
        corr = next(self._corr)
        self._request(index, kind, corr, subject, action, attrs)
        return self._take(corr, deadline, subject, action or "admin")

    def _admin_all(self, operation: str, timeout: float | None) -> list[Any]:
        self._ensure_topology()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        corrs = []
        for index in self._indices():
            corr = next(self._corr)
            self._request(index, ADMIN, corr, "", operation, {})
            corrs.append(corr)
        return [self._take(c, deadline, "", operation) for c in corrs]

    def _send_batch(self, index: int, entries: list[bytes], hint: str = "") -> None:
        if index == _FRONT:
            header = encode_batch_header({"source": self.source}, hint)
        else:
            header = self._batch_header
        frames = [b"", header, join_entries(entries)]
        self._send_counted(index, frames, len(entries))

    def _stage(self, kind: int, subject: str, action: str, delivery: int, data: bytes) -> int:
        """Put a guaranteed message into the outbox (sent by :meth:`_commit_and_send`)."""
        if kind == PUBLISH:
            self._target_topic(subject)  # checks the topic
        corr = self._outbox.next_id()
        attrs = None
        if delivery == CAUSAL and kind != PUBLISH:
            attrs = {"phoenixcausal": self._clock.stamp(subject)}
        entry = encode_entry(kind, corr, subject, action, delivery, attrs, data)
        # dest: the routing key (agent id or topic), so a send re-routes by the topology
        # of the moment without decoding the entry. Sent by _commit_and_send, after
        # the commit; later due() returns it only for its retries.
        self._fresh.append(self._outbox.add(corr, subject, entry, sending=True))
        if kind == ASK:
            self._pending[corr] = self._target(subject)
        return corr

    def _commit(self) -> None:
        if self._store is None:
            return
        batch = self._store.batch()
        self._outbox.stage(batch)
        if len(batch):
            self._store.commit(batch)
            self._outbox.committed()

    def _commit_and_send(self) -> None:
        """Make staged outbox changes durable, then send what is due, batched."""
        if getattr(self, "_holding", 0):
            return
        self._commit()
        fresh, self._fresh = self._fresh, []
        if self._outbox.pending > len(fresh):
            self._poll(0)  # acks already here must not be re-sent as "overdue"
        due = self._outbox.due()
        if not due and not fresh:
            return
        per_worker: dict[int, list[bytes]] = {}
        hints: dict[int, str] = {}
        for entry in due:
            subject = entry.dest
            index = self._index_for(subject)
            per_worker.setdefault(index, []).append(entry.data)
            hints[index] = subject
            self._outbox.sent(entry)
        if fresh:
            now = time.monotonic()
            index_for = self._index_for
            for entry in fresh:
                entry.sent_at = now  # the round trip is timed from the send, not the commit
                subject = entry.dest
                index = index_for(subject)
                per_worker.setdefault(index, []).append(entry.data)
                hints[index] = subject
        for index, entries in per_worker.items():
            for i in range(0, len(entries), self.batch_size):
                self._send_batch(index, entries[i : i + self.batch_size], hints[index])
        self._commit()  # dead letters moved by due()

    def _send_counted(self, index: int, frames: list[bytes], n: int) -> None:
        """Send, keeping at most ``window`` uncredited messages per socket."""
        inflight = self._inflight.get(index, 0)
        if inflight and inflight + n > self.window:
            deadline = time.monotonic() + self.timeout
            while self._inflight.get(index, 0) and self._inflight.get(index, 0) + n > self.window:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BackpressureError(
                        f"{self.window} messages to worker {index} not consumed within "
                        f"{self.timeout} s: the node is overloaded"
                    )
                self._poll(remaining)
        self._send(self._socket(index), frames)
        self._inflight[index] = self._inflight.get(index, 0) + n

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
        guaranteed = corr < _PLAIN_CORR
        while corr not in self._results:
            if corr in self._lost:
                self._lost.discard(corr)
                if not guaranteed:
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
            if guaranteed:
                self._poll(min(remaining, 0.05))
                self._commit_and_send()  # re-sends what is due
            else:
                self._poll(remaining)
        status, payload = self._results.pop(corr)
        if status != 0:
            raise error_from_reply(status, payload)
        return payload

    def _poll(self, remaining: float) -> None:
        for sock, _ in self._poller.poll(max(0, int(remaining * 1000))):
            assert isinstance(sock, zmq.Socket)
            if sock in self._monitors:
                self._on_monitor(sock)
                continue
            index = _FRONT if sock is self._front else self._workers.index(sock)
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_reply(index, frames)

    def _on_reply(self, index: int, frames: list[bytes]) -> None:
        try:
            _, header, payload = split_envelope(frames)
            kind, corr, status = decode_reply_kind(header)
            if kind == REPLY:
                self._on_result(corr, status, payload)
            elif kind == ACKS:
                acked = decode_acks(payload)
                if self._pending:  # a guaranteed ask is never acked this way, but be sure
                    for c in acked:
                        self._on_result(c, 0, b"\xc0")
                else:
                    self._outbox.ack_many(acked)
            elif kind == REPLY_BATCH:
                for c, st, body in decode_reply_batch(payload):
                    self._on_result(c, st, body)
            elif kind == CREDIT:
                self._inflight[index] = max(0, self._inflight.get(index, 0) - corr)
            elif kind == EVENT:
                self._on_event(corr, payload)
        except ProtocolError:
            self.late_replies += 1

    def _on_result(self, corr: int, status: int, payload: bytes) -> None:
        if corr < _PLAIN_CORR:
            if status in RETRYABLE:
                return  # stays in the outbox: sent again after the backoff
            if status == 0 or corr in self._pending:
                self._outbox.ack(corr)  # an ask's caller gets the error itself
            else:
                error = error_from_reply(status, _unpack_body(payload))
                self._outbox.reject(corr, f"{type(error).__name__}: {error}")
        if self._pending.pop(corr, _MISSING) is _MISSING:
            if corr >= _PLAIN_CORR:
                self.late_replies += 1  # its ask already timed out
            return
        self._results[corr] = (status, _unpack_body(payload))

    def _on_event(self, sub_corr: int, payload: bytes) -> None:
        pattern = self._subscriptions.get(sub_corr)
        if pattern is None:
            self.late_replies += 1
            return
        topic, source, event_id, data = unpack(payload)
        self._events.append(Event(topic, unpack(data) if data else None, source, event_id, pattern))

    def _on_monitor(self, monitor: zmq.Socket[bytes]) -> None:
        index = self._monitors[monitor]
        while monitor.poll(0):
            event = recv_monitor_message(monitor)
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._lost.update(c for c, i in self._pending.items() if i == index)
                self._inflight[index] = 0  # what it held will never be credited


def _describe_dead(dead: Any) -> dict[str, Any]:
    kind, _corr, subject, action, delivery, *_ = unpack(dead.data)
    return {"id": dead.msg_id, "agent": subject, "action": action, "kind": kind,
            "delivery": delivery, "attempts": dead.attempts, "reason": dead.reason,
            "time": dead.time}  # fmt: skip


def _unpack_body(payload: bytes) -> Any:
    try:
        return unpack(payload) if payload else None
    except ProtocolError:
        return None


def _check_action(action: str) -> str:
    if not isinstance(action, str) or not action.isidentifier() or len(action) > MAX_ACTION:
        raise InvalidRequestError(f"action {action!r} is not an identifier of <= 128 chars")
    return action


def _pack_kwargs(kwargs: Mapping[str, Any]) -> bytes:
    try:
        return pack(dict(kwargs))
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequestError(f"arguments cannot be sent: {exc}") from None


def _pack_value(value: Any) -> bytes:
    try:
        return pack(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequestError(f"data cannot be sent: {exc}") from None
