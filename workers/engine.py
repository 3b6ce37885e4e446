"""The message engine of a worker: mailboxes, delivery guarantees, pub/sub, flow.

The worker process (:mod:`workers.process`) owns the sockets; this module owns
what happens to a message between the socket and the reply, and never touches a
socket, so all of it can be driven (and tested) in one process.

One loop iteration, as the worker drives it::

    engine.accept(msg)        # for every message read this iteration
    engine.run(budget)        # execute queued messages, mailboxes round-robin
    engine.commit()           # ONE LMDB transaction: agent state, dedup records,
                              # outbox entries, spilled messages, subscriptions
    out = engine.flush()      # replies, credits, messages for other workers, events

- **Mailboxes.** Every agent has a bounded :class:`~workers.mailbox.Mailbox`
  with its type's policy (or the node default). ``run`` takes at most
  ``quantum`` messages from one mailbox before moving to the next, so a flood
  to one agent delays the others of the worker by at most one quantum per
  turn. Agents with a token-bucket ``rate_limit`` keep their excess queued.
- **Delivery.** ``at_most_once``: run once or never, no ack. ``at_least_once``:
  the ack (a reply, also for a tell) is sent only after the commit that holds
  the effect. ``exactly_once``: a dedup record of ``(source, corr)`` with the
  reply is written in the same transaction as the state change; a duplicate
  gets the stored reply. ``causal``: at-least-once plus a causal stamp; a
  message waits in the agent's causal inbox until the messages it depends on
  were delivered (and duplicates are dropped).
- **Agents' own messages** leave after the commit of the action that sent them.
  With a guarantee they are written to the worker's outbox in that same
  transaction (a transactional outbox: sent if and only if the sender's state
  change is durable), re-sent with backoff until acked, then dead-lettered.
- **Credits.** Every message taken from a socket is credited back to its
  sender once it was consumed (run, refused or dropped), not when it was
  read: a sender with a window of W uncredited messages can never put more
  than W messages into this worker's memory.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ipc.protocol import (
    ASK,
    AT_LEAST_ONCE,
    AT_MOST_ONCE,
    CAUSAL,
    EXACTLY_ONCE,
    PUBLISH,
    RETRYABLE,
    SUBSCRIBE,
    TELL,
    UNSUBSCRIBE,
    ErrorCode,
    encode_entry,
    encode_request,
    pack,
    unpack,
)
from phoenix_node.state import StateError
from phoenix_node.state.delivery import DedupLog, Outbox, OutboxFullError, RetryPolicy
from phoenix_node.state.store import Store, WriteBatch

from .causal import CausalClock, CausalError, CausalInbox
from .host import OK, AgentHost, error_payload
from .mailbox import Mailbox, MailboxPolicy, Outcome, SpillStore, Strategy
from .placement import owner_index
from .ratelimit import BucketTable, RateLimit, TokenBucket
from .topics import TopicTable

__all__ = [
    "OTHER_NODE",
    "RELAYED_ATTR",
    "RELAY_ACTION",
    "SUBS_VERSION",
    "SUB_PREFIX",
    "Engine",
    "Msg",
    "Output",
    "subscription_key",
]

log = logging.getLogger("phoenix.worker")

Route = tuple[bytes, ...]
#: The node's agent subscriptions: ``registry`` db records under this prefix (key:
#: :func:`subscription_key`, value: ``[pattern, agent, action, delivery]``); every
#: change writes a new random token under :data:`SUBS_VERSION` (workers reload).
SUB_PREFIX = b"sub/"
_SUB_PREFIX = SUB_PREFIX
_CAUSAL_PREFIX = b"causal/"
SUBS_VERSION = b"subs-version"
_SUBS_VERSION = SUBS_VERSION
_MAX_QUEUED_KEYS = 1_000_000
_MAX_RAN_KEYS = 200_000
#: The destination "another node": sent to the node's control process, which routes
#: it to the owning node like a client's request.
OTHER_NODE = -1
#: The attribute marking a publish another node handled, sent on for its clients.
RELAYED_ATTR = "phoenixrelayed"
#: The ADMIN operation carrying them from a worker to its control process.
RELAY_ACTION = "relay.publish"


class Msg:
    """One message inside a worker. ``route``: the ROUTER stack to answer on (None
    for messages of this worker's own agents); ``ack_id``: for a message from this
    worker's outbox, the outbox id to ack once its effect is committed."""

    __slots__ = (
        "ack_id",
        "action",
        "attrs",
        "corr",
        "data",
        "delivery",
        "kind",
        "route",
        "subject",
    )

    def __init__(
        self,
        kind: int,
        corr: int,
        subject: str,
        action: str,
        delivery: int,
        attrs: dict[str, Any],
        data: bytes,
        route: Route | None,
        ack_id: int | None = None,
    ) -> None:
        self.kind = kind
        self.corr = corr
        self.subject = subject
        self.action = action
        self.delivery = delivery
        self.attrs = attrs
        self.data = data
        self.route = route
        self.ack_id = ack_id

    def encode(self) -> bytes:
        """For the spill store (a spilled message outlives this process)."""
        route = list(self.route) if self.route is not None else None
        return pack(
            [self.kind, self.corr, self.subject, self.action, self.delivery, self.attrs,
             self.data, route, self.ack_id]
        )  # fmt: skip

    @classmethod
    def decode(cls, raw: bytes) -> Msg:
        k, corr, subject, action, delivery, attrs, data, route, ack_id = unpack(raw)
        return cls(
            k, corr, subject, action, delivery, attrs, data,
            tuple(route) if route is not None else None, ack_id,
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"<Msg kind={self.kind} {self.subject}.{self.action} corr={self.corr}>"


@dataclass
class Output:
    """What one iteration produced, for the worker to send."""

    #: route -> [(corr, status, body)]: one REPLY or REPLY_BATCH frame per route
    replies: dict[Route, list[tuple[int, int, bytes]]]
    #: route -> corr ids of guaranteed tells/publishes that succeeded: one ACKS frame
    acks: dict[Route, list[int]]
    #: route -> number of that sender's messages consumed (a CREDIT frame each)
    credits: dict[Route, int]
    #: worker index (or OTHER_NODE: through the control process) -> encoded BATCH
    #: entries for that worker
    remote: dict[int, list[bytes]]
    #: client route -> [(subscription id, EVENT payload)]
    events: dict[Route, list[tuple[int, bytes]]]
    #: True when the subscription table changed (tell the other workers)
    subscriptions_changed: bool
    #: whole messages for other workers, with the original sender's route
    forwards: list[tuple[int, list[bytes]]]
    #: publishes handled here, encoded PUBLISH entries for the other nodes' clients
    relays: list[bytes] = field(default_factory=list)


@dataclass
class _AgentSub:
    pattern: str
    agent: str
    action: str
    delivery: int


@dataclass
class _ClientSub:
    pattern: str
    route: Route
    sub_id: int


class Engine:
    """The message engine of one worker (see the module docstring)."""

    def __init__(
        self,
        host: AgentHost,
        store: Store,
        *,
        index: int,
        workers: int,
        node_id: str,
        default_mailbox: MailboxPolicy | None = None,
        sender_limit: RateLimit | None = None,
        quantum: int = 64,
        retry: RetryPolicy | None = None,
        dedup_window: float = 86400.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.store = store
        self.index = index
        self.workers = workers
        self.quantum = quantum
        self.clock = clock
        self.source = f"phoenix://{node_id}/worker/{index}"
        self.default_mailbox = default_mailbox or MailboxPolicy(capacity=10_000)
        self.spill = SpillStore(store)
        self.outbox = Outbox(store, b"w%d" % index, retry, clock)
        self.outbox.load()
        self.dedup = DedupLog(store, b"w%d" % index, window=dedup_window)
        self.sender_limits = BucketTable(sender_limit, clock=clock) if sender_limit else None
        #: True for an agent owned by another node (set while the node is in a cluster:
        #: see :mod:`phoenix_node.cluster.view`); None: every agent is this node's.
        self.elsewhere: Callable[[str], bool] | None = None
        self.mailboxes: dict[str, Mailbox[Msg]] = {}
        self.ready: dict[str, None] = {}  # agents with queued messages, in turn order
        self.buckets: dict[str, TokenBucket] = {}
        self.inboxes: dict[str, CausalInbox[Msg]] = {}
        self.clocks: dict[str, CausalClock] = {}
        self._causal_dirty: set[str] = set()
        self.topics: TopicTable[_AgentSub | _ClientSub] = TopicTable()
        self.client_subs: dict[tuple[Route, str], _ClientSub] = {}
        self._sub_writes: dict[bytes, bytes | None] = {}
        self._subs_changed = False
        self._subs_token: bytes | None = None
        self._replies: dict[Route, list[tuple[int, int, bytes]]] = defaultdict(list)
        self._acks: dict[Route, list[int]] = defaultdict(list)
        self._credits: dict[Route, int] = defaultdict(int)
        self._remote: dict[int, list[bytes]] = defaultdict(list)
        self._forwards: list[tuple[int, list[bytes]]] = []
        self._relays: list[bytes] = []
        self._events: dict[Route, list[tuple[int, bytes]]] = defaultdict(list)
        self._local_acks: list[tuple[int, str]] = []
        # Guaranteed messages from other processes now waiting in a mailbox: a re-send
        # of one (its sender's timer fired while it queued) is credited and dropped
        # instead of running twice. Keyed like the dedup log: (source, corr).
        self._queued: set[tuple[str, int]] = set()
        self._local_queued: set[int] = set()  # the same for this worker's own outbox ids
        self._ran: dict[tuple[str, int], None] = {}  # see _remember_ran, oldest first
        self._ran_now: list[tuple[str, int]] = []  # ran in this iteration, not committed
        self._next_corr = 0
        self.stats: dict[str, int] = defaultdict(int)
        for counter in ("refused", "duplicates", "redirected", "published", "fanout",
                        "outbox_full", "resends_dropped", "to_other_nodes",
                        "relayed_in", "relayed_out"):  # fmt: skip
            self.stats[counter] = 0
        self._resume_spilled()
        self.load_subscriptions()

    # --- intake ------------------------------------------------------------------------

    def accept(self, msg: Msg) -> None:
        """Take one message this worker owns (routing was checked by the caller)."""
        if msg.kind == PUBLISH:
            self._publish(msg)
            return
        route = msg.route
        limits = self.sender_limits
        if route is not None and limits is not None and not limits.try_take(route[0]):
            self._refuse(msg, ErrorCode.RATE_LIMITED, "sender is over its rate limit")
            return
        if msg.delivery == AT_LEAST_ONCE or msg.delivery == EXACTLY_ONCE:
            key = self._queue_key(msg)
            if key is not None:
                if key in self._queued:
                    self.stats["resends_dropped"] += 1
                    self._credits[route] += 1  # type: ignore[index]
                    return  # the queued copy is answered when it runs
                if len(self._queued) >= _MAX_QUEUED_KEYS:
                    self._queued.clear()  # only costs duplicates the dedup log catches
                self._queued.add(key)
        self._enqueue(msg)

    @staticmethod
    def _queue_key(msg: Msg) -> tuple[str, int] | None:
        source = msg.attrs.get("source")
        if msg.route is None or not isinstance(source, str):
            return None
        return (source, msg.corr)

    def _enqueue(self, msg: Msg) -> None:
        agent_id = msg.subject
        mailbox = self.mailboxes.get(agent_id)
        if mailbox is None:
            mailbox = self._new_mailbox(agent_id)
        offer = mailbox.offer(msg)
        outcome = offer.outcome
        if outcome is Outcome.ACCEPTED or outcome is Outcome.SPILLED:
            self.ready[agent_id] = None
            return
        if outcome is Outcome.REJECTED:
            self._refuse(msg, ErrorCode.BACKPRESSURE, f"mailbox of {agent_id} is full")
        elif outcome is Outcome.DROPPED:
            if offer.queued:
                self.ready[agent_id] = None
            if offer.dropped is not None:
                self._refuse(
                    offer.dropped,
                    ErrorCode.BACKPRESSURE,
                    f"dropped: mailbox of {agent_id} is full ({mailbox.policy.strategy})",
                )
        elif outcome is Outcome.REDIRECTED and offer.redirect_to:
            self.stats["redirected"] += 1
            if self._queued:
                key = self._queue_key(msg)
                if key is not None:
                    self._queued.discard(key)  # it may be forwarded to another worker
            if msg.ack_id is not None:
                self._local_queued.discard(msg.ack_id)
            msg.subject = offer.redirect_to
            self._route(msg)

    def _new_mailbox(self, agent_id: str) -> Mailbox[Msg]:
        cls = self.host.types.get(agent_id.partition("/")[0])
        policy = (cls.__phoenix_mailbox__ if cls is not None else None) or self.default_mailbox
        if policy.strategy is Strategy.SPILL_TO_DISK:
            mailbox: Mailbox[Msg] = Mailbox(
                policy, spill=self.spill, key=agent_id.encode(), encode=Msg.encode,
                decode=Msg.decode,
            )  # fmt: skip
        else:
            mailbox = Mailbox(policy)
        self.mailboxes[agent_id] = mailbox
        rate = cls.__phoenix_rate__ if cls is not None else None
        if rate is not None and agent_id not in self.buckets:
            self.buckets[agent_id] = TokenBucket(rate.rate, rate.burst, clock=self.clock)
        return mailbox

    def _resume_spilled(self) -> None:
        """Spilled messages left by an earlier run of this worker are delivered again."""
        for key in self.spill.backlog():
            try:
                agent_id = key.decode()
            except UnicodeDecodeError:
                continue
            if owner_index(agent_id, self.workers) == self.index and agent_id not in self.mailboxes:
                self._new_mailbox(agent_id)
                self.ready[agent_id] = None

    def _dest(self, agent_id: str) -> int:
        """The worker of this node that owns ``agent_id``, or :data:`OTHER_NODE`."""
        elsewhere = self.elsewhere
        if elsewhere is not None and elsewhere(agent_id):
            return OTHER_NODE
        return owner_index(agent_id, self.workers)

    def _route(self, msg: Msg) -> None:
        """Deliver here or send to the owning worker or node (redirects, agents'
        messages)."""
        owner = self._dest(msg.subject)
        if owner == self.index:
            self._enqueue(msg)
            return
        if msg.route is not None:
            # (a redirect) the owner answers the original sender through this worker
            header = encode_request(
                msg.kind, msg.corr, msg.subject, msg.action, msg.delivery, msg.attrs
            )
            self._forwards.append((owner, [*msg.route, b"", header, msg.data]))
            return
        if msg.ack_id is not None:
            self._local_acks.append((msg.ack_id, ""))  # handed on, at most once from here
        self._next_corr += 1
        self._remote[owner].append(
            encode_entry(TELL, self._next_corr, msg.subject, msg.action, 0, None, msg.data)
        )

    # --- running -----------------------------------------------------------------------

    def run(self, budget: int, max_seconds: float = 0.02) -> int:
        """Run up to ``budget`` queued messages, round-robin over agents, for at most
        about ``max_seconds`` (so slow actions cannot hold every reply of the
        iteration back: the rest runs next iteration); returns how many ran.
        Messages the actions send are queued or staged as they go."""
        done = 0
        host = self.host
        deadline = time.monotonic() + max_seconds
        while self.ready and done < budget:
            if done and time.monotonic() >= deadline:
                break
            for agent_id in list(self.ready):
                mailbox = self.mailboxes[agent_id]
                n = min(self.quantum, budget - done)
                bucket = self.buckets.get(agent_id)
                if bucket is not None:
                    n = min(n, int(bucket.tokens))
                    if n <= 0:
                        continue
                msgs = mailbox.take(n)
                if bucket is not None:
                    bucket.try_take(len(msgs))
                for msg in msgs:
                    try:
                        self._execute(msg)
                    except Exception:
                        # A bug must cost one message, not the worker and its agents.
                        log.exception("unexpected error running %r", msg)
                        self._refuse(msg, ErrorCode.INTERNAL, "internal error (see the log)")
                done += len(msgs)
                del self.ready[agent_id]
                if mailbox.pending:
                    self.ready[agent_id] = None  # to the back of the line: round-robin
                if host.outgoing:
                    self._drain_outgoing()
                if done >= budget or time.monotonic() >= deadline:
                    break
            if self.ready and all(self._throttled(a) for a in self.ready):
                break
        return done

    def _throttled(self, agent_id: str) -> bool:
        bucket = self.buckets.get(agent_id)
        return bucket is not None and bucket.tokens < 1

    def next_wakeup(self) -> float | None:
        """Seconds until a rate-limited mailbox may run again (None: nothing waits)."""
        delays = [self.buckets[a].delay(1) for a in self.ready if a in self.buckets]
        if self.ready and len(delays) < len(self.ready):
            return 0.0
        return min(delays) if delays else None

    def _execute(self, msg: Msg) -> None:
        if msg.delivery == CAUSAL:
            for ready in self._causal_gate(msg):
                self._execute_one(ready)
            return
        self._execute_one(msg)

    def _execute_one(self, msg: Msg) -> None:
        source = msg.attrs.get("source") if msg.delivery else None
        if source is not None and self._queued:
            self._queued.discard((source, msg.corr))
        dedup = msg.delivery == EXACTLY_ONCE and isinstance(source, str)
        key = None
        if msg.delivery == AT_LEAST_ONCE and msg.kind == TELL and isinstance(source, str):
            key = (source, msg.corr)
            if key in self._ran:
                # A re-send of a tell that ran and was committed here (its sender's
                # timer fired before the ack came): acknowledged, not run again.
                self.stats["resends_dropped"] += 1
                self._answer(msg, OK, b"\xc0")
                return
        if dedup:
            hit = self.dedup.lookup(source, msg.corr)  # type: ignore[arg-type]
            if hit is not None:
                self.stats["duplicates"] += 1
                self._answer(msg, hit[0], hit[1])
                return
        status, result = self.host.handle(msg.subject, msg.action, msg.data)
        if msg.kind == ASK or msg.delivery or status != OK:
            try:
                body = pack(result)
            except (TypeError, ValueError, OverflowError) as exc:
                status = ErrorCode.BAD_RESULT
                body = pack(error_payload(status, f"result cannot be sent: {exc}"))
        else:
            body = b"\xc0"
        if dedup and status not in RETRYABLE:
            self.dedup.record(source, msg.corr, status, body)  # type: ignore[arg-type]
        if key is not None and status == OK and "phoenixreplyto" not in msg.attrs:
            self._ran_now.append(key)
        reply_to = msg.attrs.get("phoenixreplyto")
        if reply_to is not None and status not in RETRYABLE:
            self._reply_by_message(msg, reply_to, status, body)
        self._answer(msg, status, body)

    def _reply_by_message(self, msg: Msg, reply_to: Any, status: int, body: bytes) -> None:
        """The result of an agent's :meth:`~workers.agent.Agent.request`: a message to
        the requester's reply action, staged in this commit (with the effect)."""
        action = msg.attrs.get("phoenixreplyaction")
        context = msg.attrs.get("phoenixcontext", b"\xc0")
        if not (isinstance(reply_to, str) and isinstance(action, str)
                and isinstance(context, bytes)):  # fmt: skip
            log.warning("request %r has a malformed reply address; reply dropped", msg)
            return
        kwargs = b"\x83\xa6status" + pack(status) + b"\xa6result" + body + b"\xa7context" + context
        delivery = msg.delivery if msg.delivery != CAUSAL else EXACTLY_ONCE
        self._stage_outbox(reply_to, action, delivery, {"source": self.source}, kwargs)

    def _answer(self, msg: Msg, status: int, body: bytes) -> None:
        if msg.ack_id is not None:
            self._local_queued.discard(msg.ack_id)
            if status in RETRYABLE:
                return  # not acked: the outbox sends it again after a backoff
            self._local_acks.append((msg.ack_id, "" if status == OK else _error_text(body)))
            return
        route = msg.route
        if route is None:
            if status != OK and status not in RETRYABLE:
                log.warning("message %r failed: %s", msg, _error_text(body))
            return
        self._credits[route] += 1
        if msg.kind == ASK or (msg.delivery and status != OK):
            self._replies[route].append((msg.corr, status, body))
        elif msg.delivery:
            self._acks[route].append(msg.corr)  # a tell's result is not sent back

    def _refuse(self, msg: Msg, code: int, message: str) -> None:
        self.stats["refused"] += 1
        if msg.delivery and self._queued:
            key = self._queue_key(msg)
            if key is not None:
                self._queued.discard(key)
        body = pack(error_payload(code, message, msg.subject, msg.action))
        self._answer(msg, code, body)

    # --- causal order ------------------------------------------------------------------

    def _causal_gate(self, msg: Msg) -> list[Msg]:
        stamp = msg.attrs.get("phoenixcausal")
        if not isinstance(stamp, bytes):
            self._refuse(msg, ErrorCode.BAD_REQUEST, "delivery causal needs a phoenixcausal stamp")
            return []
        agent_id = msg.subject
        inbox = self.inboxes.get(agent_id)
        if inbox is None:
            inbox = self._load_inbox(agent_id)
        try:
            if inbox.was_delivered(stamp):
                self.stats["duplicates"] += 1
                self._answer(msg, OK, b"\xc0")  # acknowledged again, not run again
                return []
            ready: list[Msg] = inbox.offer(stamp, msg)
        except CausalError as exc:
            self._refuse(msg, ErrorCode.BAD_REQUEST, f"causal stamp: {exc}")
            return []
        if ready:
            self._causal_dirty.add(agent_id)
        return ready

    def _load_inbox(self, agent_id: str) -> CausalInbox[Msg]:
        clock = self.clocks.get(agent_id)
        if clock is None:
            clock = self._load_clock(agent_id)
        raw = self.store.get("dedup", _CAUSAL_PREFIX + agent_id.encode())
        inbox: CausalInbox[Msg] = (
            CausalInbox.decode(raw, clock) if raw is not None else CausalInbox(agent_id, clock)
        )
        self.inboxes[agent_id] = inbox
        return inbox

    # --- agents' own messages -----------------------------------------------------------

    def _drain_outgoing(self) -> None:
        outgoing = self.host.outgoing
        while outgoing:
            kind, subject, action, payload, delivery, sender, extra = outgoing.popleft()
            if kind in (TELL, ASK):
                self._send_tell(subject, action, payload, delivery, sender, kind, extra)
            elif kind == PUBLISH:
                self._publish(Msg(PUBLISH, 0, subject, "", delivery, {}, payload, None))
            elif kind == SUBSCRIBE:
                self._add_agent_sub(subject, sender, action, delivery)
            elif kind == UNSUBSCRIBE:
                self._remove_agent_sub(subject, sender)

    def _send_tell(
        self,
        agent_id: str,
        action: str,
        payload: bytes,
        delivery: int,
        sender: str,
        kind: int = TELL,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if delivery == AT_MOST_ONCE:
            self._route(Msg(TELL, 0, agent_id, action, 0, {}, payload, None))
            return
        attrs: dict[str, Any] = {"source": self.source, **(extra or {})}
        if delivery == CAUSAL:
            clock = self.clocks.get(sender)
            if clock is None:
                clock = self._load_clock(sender)
            attrs["phoenixcausal"] = clock.stamp(agent_id)
            self._causal_dirty.add(sender)
        self._stage_outbox(agent_id, action, delivery, attrs, payload, kind)

    def _stage_outbox(
        self,
        agent_id: str,
        action: str,
        delivery: int,
        attrs: dict[str, Any],
        payload: bytes,
        kind: int = TELL,
    ) -> None:
        msg_id = self.outbox.next_id()
        owner = self._dest(agent_id)
        entry = encode_entry(kind, msg_id, agent_id, action, delivery, attrs, payload)
        try:
            # Sent now (it leaves after this iteration's commit, like every send); the
            # outbox only times its retries.
            self.outbox.add(msg_id, str(owner), entry, sending=True)
        except OutboxFullError:
            self.stats["outbox_full"] += 1
            log.error("outbox full: message to %s.%s dropped", agent_id, action)
            return
        if owner == self.index:
            self._local_queued.add(msg_id)
            self._enqueue(
                Msg(kind, msg_id, agent_id, action, delivery, attrs, payload, None, msg_id)
            )
        else:
            self._remote[owner].append(entry)

    def _load_clock(self, agent_id: str) -> CausalClock:
        raw = self.store.get("dedup", b"clock/" + agent_id.encode())
        clock = CausalClock.decode(raw) if raw is not None else CausalClock(agent_id)
        self.clocks[agent_id] = clock
        return clock

    def send_due(self) -> None:
        """Outbox entries due for a (re)send: to other workers, or queued here."""
        for entry in self.outbox.due():
            owner = int(entry.dest)
            if owner < 0 or owner >= self.workers or self.elsewhere is not None:
                # Routed again: the node restarted with fewer workers, or the agent's
                # node may have changed since the first send.
                kind, corr, subject, *_ = unpack(entry.data)
                owner = self._dest(subject)
            if owner == self.index:
                if entry.msg_id in self._local_queued:
                    # Still in a mailbox here: it runs (and is acked) once. Not counted as
                    # an attempt, so a long queue never dead-letters what it holds.
                    continue
                kind, corr, subject, action, delivery, attrs, data = unpack(entry.data)
                self._local_queued.add(corr)
                self._enqueue(Msg(kind, corr, subject, action, delivery, attrs, data, None, corr))
            else:
                self._remote[owner].append(entry.data)
            self.outbox.sent(entry)

    def on_acks(self, corrs: list[int]) -> None:
        """Another worker acknowledged these outbox messages (an ACKS frame)."""
        self.outbox.ack_many(corrs)

    def on_ack(self, corr: int, status: int, body: bytes) -> None:
        """A reply from another worker to one of this worker's outbox messages."""
        if status in RETRYABLE:
            return  # the outbox sends it again after the backoff
        if status == OK:
            self.outbox.ack(corr)
        else:
            self.outbox.reject(corr, _error_text(body))

    # --- pub/sub -----------------------------------------------------------------------

    def _publish(self, msg: Msg) -> None:
        source = msg.attrs.get("source")
        if msg.attrs.get(RELAYED_ATTR):
            self._publish_relayed(msg, source)
            return
        if msg.delivery == EXACTLY_ONCE and isinstance(source, str):
            hit = self.dedup.lookup(source, msg.corr)
            if hit is not None:
                self._answer(msg, hit[0], hit[1])
                return
        token = self.store.get("registry", _SUBS_VERSION)
        if token != self._subs_token:
            self.load_subscriptions()  # another worker changed them: read your writes
        topic = msg.subject
        kwargs = _event_kwargs(topic, msg.data)
        delivered = 0
        for _, sub in self.topics.match(topic):
            delivered += 1
            if isinstance(sub, _AgentSub):
                if sub.delivery == AT_MOST_ONCE:
                    self._route(Msg(TELL, 0, sub.agent, sub.action, 0, {}, kwargs, None))
                else:
                    attrs = {"source": self.source}
                    self._stage_outbox(sub.agent, sub.action, sub.delivery, attrs, kwargs)
            else:
                self._to_client(sub, topic, source, msg)
        self.stats["published"] += 1
        self.stats["fanout"] += delivered
        if self.elsewhere is not None:
            # Clients of the other nodes get it too (agents' subscriptions are the whole
            # cluster's, so they were served above, once).
            relay: dict[str, Any] = {RELAYED_ATTR: 1}
            if isinstance(source, str) and source:
                relay["source"] = source
            self._relays.append(encode_entry(PUBLISH, msg.corr, topic, "", 0, relay, msg.data))
        body = pack(delivered)
        if msg.delivery == EXACTLY_ONCE and isinstance(source, str):
            self.dedup.record(source, msg.corr, OK, body)
        self._answer(msg, OK, body)

    def _publish_relayed(self, msg: Msg, source: Any) -> None:
        """A publish handled on another node: for the clients subscribed here only."""
        topic = msg.subject
        delivered = 0
        for _, sub in self.topics.match(topic):
            if isinstance(sub, _ClientSub):
                delivered += 1
                self._to_client(sub, topic, source, msg)
        self.stats["relayed_in"] += 1
        self.stats["fanout"] += delivered
        if msg.route is not None:
            self._credits[msg.route] += 1

    def _to_client(self, sub: _ClientSub, topic: str, source: Any, msg: Msg) -> None:
        """An EVENT for a client's subscription (sent with the iteration's output)."""
        event = pack([topic, source or "", str(msg.corr), msg.data])
        self._events[sub.route].append((sub.sub_id, event))

    def subscribe_client(self, route: Route, pattern: str, sub_id: int) -> None:
        key = (route, pattern)
        old = self.client_subs.pop(key, None)
        if old is not None:
            self.topics.remove(pattern, _client_sub_id(route, old.sub_id))
        sub = _ClientSub(pattern, route, sub_id)
        self.client_subs[key] = sub
        self.topics.add(pattern, _client_sub_id(route, sub_id), sub)

    def unsubscribe_client(self, route: Route, pattern: str | None = None) -> int:
        """Drop a client's subscription to ``pattern`` (None: all of that client's)."""
        keys = [
            k for k in self.client_subs if k[0] == route and (pattern is None or k[1] == pattern)
        ]
        for key in keys:
            sub = self.client_subs.pop(key)
            self.topics.remove(sub.pattern, _client_sub_id(route, sub.sub_id))
        return len(keys)

    def subscribe_agent(self, pattern: str, agent_id: str, action: str, delivery: int) -> None:
        """A subscription of an agent made by a client (stored with the node)."""
        self._add_agent_sub(pattern, agent_id, action, delivery)

    def unsubscribe_agent(self, pattern: str, agent_id: str) -> None:
        self._remove_agent_sub(pattern, agent_id)

    def _add_agent_sub(self, pattern: str, agent_id: str, action: str, delivery: int) -> None:
        key = subscription_key(pattern, agent_id)
        self._sub_writes[key] = pack([pattern, agent_id, action, delivery])
        self.topics.remove(pattern, agent_id)
        self.topics.add(pattern, agent_id, _AgentSub(pattern, agent_id, action, delivery))
        self._subs_changed = True

    def _remove_agent_sub(self, pattern: str, agent_id: str) -> None:
        self._sub_writes[subscription_key(pattern, agent_id)] = None
        self.topics.remove(pattern, agent_id)
        self._subs_changed = True

    def load_subscriptions(self) -> int:
        """(Re)load the agents' subscriptions stored with the node; clients' stay."""
        table: TopicTable[_AgentSub | _ClientSub] = TopicTable()
        self._subs_token = self.store.get("registry", _SUBS_VERSION)
        n = 0
        for _, raw in self.store.iter_items("registry", _SUB_PREFIX):
            try:
                pattern, agent_id, action, delivery = unpack(raw)
                table.add(pattern, agent_id, _AgentSub(pattern, agent_id, action, delivery))
                n += 1
            except (ValueError, TypeError) as exc:
                log.error("unreadable subscription record skipped: %s", exc)
        for sub in self.client_subs.values():
            table.add(sub.pattern, _client_sub_id(sub.route, sub.sub_id), sub)
        self.topics = table
        return n

    # --- commit and output ---------------------------------------------------------------

    def _stage(self, batch: WriteBatch) -> None:
        self.outbox.stage(batch)
        self.dedup.stage(batch)
        self.spill.stage(batch)
        for key, value in self._sub_writes.items():
            if value is None:
                batch.delete("registry", key)
            else:
                batch.put("registry", key, value)
        if self._sub_writes:
            # A new token per change: a worker whose cached token differs reloads. This
            # worker too: another worker's change may have committed since its last
            # reload, and adopting its own new token would hide that one for good.
            self._subs_token = None
            batch.put("registry", _SUBS_VERSION, os.urandom(8))
        for agent_id in self._causal_dirty:
            inbox = self.inboxes.get(agent_id)
            if inbox is not None:
                batch.put("dedup", _CAUSAL_PREFIX + agent_id.encode(), inbox.encode())
            clock = self.clocks.get(agent_id)
            if clock is not None:
                batch.put("dedup", b"clock/" + agent_id.encode(), clock.encode())

    def commit(self) -> bool:
        """Commit everything of this iteration in one transaction; on failure the
        replies become STORE_FAILED and nothing is acked."""
        ok = self.host.commit(extra=self._stage)
        ran, self._ran_now = self._ran_now, []
        if ok:
            self._remember_ran(ran)
            self.outbox.committed()
            self.dedup.committed()
            self.spill.committed()
            for msg_id, error in self._local_acks:
                if error:
                    self.outbox.reject(msg_id, error)
                else:
                    self.outbox.ack(msg_id)
        else:
            self.outbox.abort()
            self.dedup.abort()
            failed = pack(
                error_payload(
                    ErrorCode.STORE_FAILED,
                    "state commit failed; the effect was not stored (see the worker log)",
                )
            )
            for items in self._replies.values():
                for i, (corr, status, _) in enumerate(items):
                    if status == OK:
                        items[i] = (corr, ErrorCode.STORE_FAILED, failed)
            for route, acked in self._acks.items():
                self._replies[route].extend((c, ErrorCode.STORE_FAILED, failed) for c in acked)
            self._acks.clear()
            self.inboxes.clear()  # reloaded from their last committed state
            self.clocks.clear()
        self._local_acks.clear()
        self._sub_writes.clear()
        self._causal_dirty.clear()
        return ok

    def _remember_ran(self, keys: list[tuple[str, int]]) -> None:
        """At-least-once tells from other processes that ran and are committed: a
        re-send of one is acknowledged without running again (bounded, oldest
        forgotten: a re-send older than that runs again, as at-least-once allows)."""
        ran = self._ran
        for key in keys:
            ran[key] = None
        excess = len(ran) - _MAX_RAN_KEYS
        if excess > 0:
            for key in list(itertools.islice(ran, excess)):
                del ran[key]

    def flush(self) -> Output:
        out = Output(
            dict(self._replies),
            dict(self._acks),
            dict(self._credits),
            dict(self._remote),
            dict(self._events),
            self._subs_changed,
            self._forwards,
            self._relays,
        )
        self._forwards = []
        self._relays = []
        self._replies.clear()
        self._acks.clear()
        self._credits.clear()
        self._remote.clear()
        self._events.clear()
        self._subs_changed = False
        return out

    def sweep_dedup(self) -> int:
        """Forget dedup records past the window (its own small transaction)."""
        batch = self.store.batch()
        n = self.dedup.sweep(batch)
        if n:
            try:
                self.store.commit(batch)
                self.dedup.committed()
            except StateError:
                log.exception("dedup sweep failed")
                self.dedup.abort()
        return n

    def forget_route(self, route: Route) -> None:
        """A client went away: drop its subscriptions."""
        self.unsubscribe_client(route)


def subscription_key(pattern: str, agent_id: str) -> bytes:
    """The ``registry`` db key of ``agent_id``'s subscription to ``pattern``."""
    digest = hashlib.blake2b(f"{pattern}\x00{agent_id}".encode(), digest_size=16).digest()
    return _SUB_PREFIX + digest


def _client_sub_id(route: Route, sub_id: int) -> str:
    return f"client:{b'/'.join(route).hex()}:{sub_id}"


def _event_kwargs(topic: str, data: bytes) -> bytes:
    """``{"topic": topic, "data": <data>}`` as msgpack, splicing the data bytes in."""
    return b"\x82\xa5topic" + pack(topic) + b"\xa4data" + (data or b"\xc0")


def _error_text(body: bytes) -> str:
    try:
        payload = msgpack.unpackb(body, raw=False)
        return str(payload.get("message")) if isinstance(payload, dict) else repr(payload)
    except Exception:
        return "<unreadable error>"
