"""Replication of agent state between nodes, run by the control process.

Each agent's state lives on its owner and on the next ``replicas`` distinct
nodes clockwise on the ring (its preference list). Agent states are CRDT
records, so a replica never needs to know which copy is newer: it merges
what it gets (the worker's reserved action ``_merge``), and merging the same
state twice, or in any order, changes nothing.

Shipping (eventual; the change log is a transactional outbox)
    While the node has peers, every worker commit also writes an entry per
    agent it changed into the ``repl`` db, in the same LMDB transaction as the
    states, under its own key (:mod:`workers.replog`: the agent id and the
    commit's stamp), holding that commit's delta of the agent or a mark "ship
    the whole state". Each loop turn the :class:`Replicator` reads every entry
    of up to ``batch`` agents not in flight (an agent's entries are contiguous),
    reads the agents' committed states and sends each alive member of the
    preference list (except this node) one BATCH of ``_merge`` ASKs, over the
    peer DEALER the membership protocol already uses. The receiving control
    process hands the batch to its workers like any request; a worker merges
    and commits before it answers. When every target answered ok, exactly the
    entries shipped are deleted (compare-and-delete), by one write transaction
    every ``_FLUSH_INTERVAL`` (reads skip them until then); entries logged
    meanwhile ship at a later turn. No answer within
    ``timeout`` seconds: shipped again. A final error (the target does not
    know the agent type): counted and given up for that target.

Deltas or whole states (``deltas``, the node option ``replication_deltas``)
    A target gets the logged deltas (one ``_merge`` each, in commit order) only
    when it is known to hold every change of the agent logged before them: it
    answered ok to a shipment of the agent (whole or delta) and, since, no
    shipment to it failed (no answer in time, an error), it was a target of
    every shipment of the agent, the ring and the membership (a node
    restarted, left, came back) did not change, and this control process did
    not restart. Anything else gets the whole committed state: a first
    shipment, a whole-state mark among the entries (a worker logs one when it
    does not know the delta: the first change after an activation, or after a
    merge changed the agent, whose merged part is in no delta; a failed commit
    reloads its agents, so theirs too), more than ``_MAX_PARTS`` entries,
    deltas no smaller than the state together, and the ids that anti-entropy
    or a migration logs (under the bare agent id). What is known is kept for
    ``in_sync_limit`` agents (least recently acknowledged forgotten).
    Re-shipping a part a target holds is harmless (a join is idempotent).

When a write is acknowledged (``replication_ack``)
    ``replicas`` (the default): the control process holds every reply a worker
    sends to a client (REPLY, REPLY_BATCH, ACKS; not CREDIT or events) until
    the replicas hold what was committed before it. Held replies form a group
    at the next shipping turn, which reads the change log: the group waits for
    each logged agent until a shipment of every entry of it logged then, or one
    read after the group was formed, has been answered by every alive replica
    of the agent. The worker logs a change in the commit transaction, before it
    sends the reply, so the log read after the reply came holds every commit
    the reply stands for. A group that is not through in ``hold_timeout``
    seconds (a replica unreachable but not yet declared down) is released as
    UNAVAILABLE errors: the write stays committed on its owner and is shipped
    later; an at-least-once sender sends it again. Replies to a peer's own
    replication requests are never held (two nodes would wait on each other).
    So an acknowledged write is on every alive replica of its agent: it
    survives a kill -9 of its owner provided one replica survives.

    ``owner``: a write is acknowledged after the owner's commit, before it is
    shipped: a node that dies within the shipping delay (one loop turn plus a
    round trip) takes its last writes with it until it comes back; the
    ``pending`` figure of the status is that window.

    The barrier is one per node, not per agent: while a replica is unreachable
    but not yet down, every write of the node waits (at most the failure
    detector's time to declare it down; then the replica leaves the targets).

Anti-entropy (repairs what shipping missed)
    Every ``anti_entropy_interval`` seconds, and soon after each change of the
    ring (a node joined, left, came back after a partition), the control
    process digests its stored states (8 bytes of BLAKE2b per state) and
    sends each peer the digests of the agents that peer should hold. The peer
    answers with the ids whose state differs from its own or that it lacks,
    and logs for shipping those it has (so its version comes back); the
    sender logs the ids it got back. Both then ship through the path above,
    and the merges converge every replica to the join of all of them. A
    joining node gets the state it now owns or replicates this way.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ipc.protocol import (
    ACKS,
    ADMIN,
    ASK,
    REPLY,
    REPLY_BATCH,
    RETRYABLE,
    ErrorCode,
    ProtocolError,
    decode_reply_kind,
    encode_batch_header,
    encode_entry,
    encode_reply_batch,
    encode_reply_kind,
    encode_request,
    join_entries,
    pack,
    reply_items,
    split_envelope,
    unpack,
)
from phoenix_node.state.store import Store, StoreError
from workers.host import (
    MERGE_ACTION,
    REPLICATE_DELTAS,
    REPLICATE_KEY,
    REPLICATE_OFF,
    REPLICATE_WHOLE,
    error_payload,
)
from workers.replog import entry_agent, entry_stamp, read_entry, whole_entry

from ._corr import REPLICATOR, CorrIds
from .service import ClusterService

__all__ = ["ACKS_REPLICAS", "DIGEST_ACTION", "Replicator", "state_digest"]

log = logging.getLogger("phoenix.replication")

#: The ADMIN operation a control process sends a peer with state digests.
DIGEST_ACTION = "replica.digest"
_DIGESTS_PER_MESSAGE = 2000
_SHIP_INTERVAL = 0.01  # seconds between shipping turns while changes wait
_FLUSH_INTERVAL = 0.05  # seconds between deletions of replicated log entries
_MAX_PARTS = 8  # an agent's entries shipped as deltas at most; more: its whole state
#: ``replication_ack`` value: replies wait until the replicas hold the write
ACKS_REPLICAS = "replicas"
_HELD_KINDS = frozenset((REPLY, REPLY_BATCH, ACKS))


def state_digest(state: bytes) -> bytes:
    """8 bytes that differ, but for a 2**-64 chance, when two state records differ."""
    return hashlib.blake2b(state, digest_size=8).digest()


@dataclass
class _Flight:
    """An agent's logged changes being shipped: their log entries (compare-and-deleted
    once every target answered) and stamps, the corr ids not answered."""

    stamps: frozenset[bytes]
    parts: list[tuple[bytes, bytes]]
    deadline: float
    turn: int
    waiting: set[int] = field(default_factory=set)


@dataclass
class _Outbox:
    """The ``_merge`` entries of one shipping turn for one target."""

    hint: str = ""
    entries: list[bytes] = field(default_factory=list)
    deltas: int = 0
    size: int = 0


@dataclass
class _Group:
    """Replies held until the changes logged when they were grouped reached the replicas."""

    replies: list[list[bytes]]
    turn: int
    deadline: float
    waits: dict[str, frozenset[bytes]]  # agent id -> the stamps logged when it was formed
    done: bool = False


class Replicator:
    """Ships logged state changes to replicas and runs anti-entropy (module docstring)."""

    def __init__(
        self,
        store: Store,
        cluster: ClusterService,
        *,
        replicas: int = 2,
        anti_entropy_interval: float = 30.0,
        ack: str = ACKS_REPLICAS,
        hold_timeout: float = 5.0,
        send: Callable[[list[bytes]], None] | None = None,
        batch: int = 256,
        timeout: float = 2.0,
        deltas: bool = True,
        in_sync_limit: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.cluster = cluster
        self.replicas = replicas
        self.ack = ack
        self.sync = ack == ACKS_REPLICAS and replicas > 0
        self.hold_timeout = hold_timeout
        self._send = send
        self.anti_entropy_interval = anti_entropy_interval
        self.batch = batch
        self.timeout = timeout
        self.deltas = deltas
        self._clock = clock
        self._flag: bool | None = None
        self._flights: dict[str, _Flight] = {}
        self._corrs: dict[int, tuple[str, str]] = {}  # corr of a _merge ASK -> agent, target
        # agent id -> the targets known to hold every change of it logged so far (they
        # answered ok to a shipment, and every later one): they get deltas. LRU, bounded;
        # forgotten on a ring or membership change (module docstring).
        self._in_sync: OrderedDict[str, set[str]] = OrderedDict()
        self.in_sync_limit = in_sync_limit
        self._view = cluster.changes
        self._digest_corrs: dict[int, str] = {}  # corr of a digest ADMIN -> peer address
        self.ids = CorrIds(REPLICATOR)
        self._ring = cluster.ring
        self._next_anti_entropy = clock() + anti_entropy_interval
        self._next_ship = 0.0
        self._turn = 0
        # Log entries shipped to every target, deleted (if unchanged) at the next flush:
        # one write transaction per _FLUSH_INTERVAL, not per answer; reads skip them.
        self._done: dict[bytes, bytes] = {}
        self._next_flush = 0.0
        self._open: list[list[bytes]] = []  # replies not grouped yet
        self._groups: deque[_Group] = deque()  # by age, for the hold timeout
        self._waiting: dict[str, list[_Group]] = {}  # agent id -> groups waiting on it
        self.held = 0  # replies held now
        self.hold_timeouts = 0  # replies released as UNAVAILABLE
        self.shipped = 0  # records sent (one per target): deltas + whole states
        self.deltas_shipped = 0
        self.states_shipped = 0
        self.bytes_shipped = 0  # of the _merge entries sent (records and entry headers)
        self.acked = 0  # logged changes on every target
        self.rejected = 0  # final errors from a target
        self.expired = 0  # flights without every answer in time
        self.anti_entropy_rounds = 0
        self.repairs_sent = 0  # ids a peer reported different, shipped from here
        self.repairs_asked = 0  # ids this node reported different to a peer

    # --- the loop's calls -----------------------------------------------------------------

    def next_deadline(self) -> float:
        """When :meth:`tick` has work: now while changes wait, else the next anti-entropy."""
        logging_wanted = not self.cluster.single()
        if self._open or self._flag is not logging_wanted:
            return 0.0  # now: held replies are grouped and shipped; the log switched
        if self.cluster.ring is not self._ring:
            return 0.0  # now: schedule the anti-entropy round of a ring change
        deadline = self._next_anti_entropy
        if self._done:
            deadline = min(deadline, self._next_flush)
        if self._flag and (self._flights or self._groups or self._has_log()):
            deadline = min(deadline, self._next_ship)
        return deadline

    def holds(self) -> bool:
        """Whether client replies must go through :meth:`hold` now."""
        return self.sync and bool(self._flag)

    def hold(self, frames: list[bytes]) -> None:
        """A worker's reply to a client: sent once the replicas hold what it stands for.
        The caller checked :meth:`holds`; replies to a peer's own requests (a routing
        stack of one peer id) must not come here."""
        if len(frames) >= 3:
            try:
                kind = decode_reply_kind(frames[-2])[0]
            except ProtocolError:
                kind = -1
            if kind in _HELD_KINDS:
                self._open.append(frames)
                self.held += 1
                return
        self._release_frames(frames)

    def tick(self) -> None:
        now = self._clock()
        self._next_ship = now + _SHIP_INTERVAL
        self._turn += 1
        if self._done and (now >= self._next_flush or len(self._done) >= 10_000):
            self._flush_done(now)
        alone = self.cluster.single()
        self._set_flag(not alone)
        if alone:
            self._release_all()  # no replica to wait for
            self._in_sync.clear()
            return
        if self.cluster.ring is not self._ring:
            self._ring = self.cluster.ring
            self._next_anti_entropy = min(self._next_anti_entropy, now + 0.2)
            # The targets changed: a flight to a node now gone would hold its replies
            # until it times out. Ship every one again, now, to the new targets.
            self._expire(math.inf, count=False)
            self._in_sync.clear()
        if self.cluster.changes != self._view:
            self._view = self.cluster.changes  # a node restarted, left, came back
            self._in_sync.clear()
        self._expire(now)
        self._expire_groups(now)
        if self._open:
            self._group(now)
        self._ship(now)
        if now >= self._next_anti_entropy:
            self._next_anti_entropy = now + self.anti_entropy_interval
            self._anti_entropy()

    def on_reply(self, peer: str, frames: list[bytes]) -> None:
        """A reply addressed to this control process (no routing stack) from ``peer``."""
        try:
            _, header, payload = split_envelope(frames)
            kind, corr, status = decode_reply_kind(header)
            if kind == REPLY and corr in self._digest_corrs:
                self._on_digest_reply(self._digest_corrs.pop(corr), status, payload)
                return
            for c, st, _ in reply_items(kind, corr, status, payload):
                self._on_result(c, st)
        except ProtocolError as exc:
            log.warning("bad replication reply from %s: %s", peer, exc)

    def on_digests(self, payload: bytes) -> Any:
        """A peer's digests (``[[agent_id, digest], ...]``): the ids whose state here
        differs or is missing (returned), those we hold logged for shipping back."""
        items = unpack(payload)
        if not isinstance(items, list):
            raise ProtocolError("replica digests must be an array")
        differ: list[str] = []
        ours: list[str] = []
        for item in items:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not isinstance(item[0], str)
                or not isinstance(item[1], bytes)
            ):
                raise ProtocolError("a replica digest must be [agent_id, bytes]")
            agent_id, digest = item
            mine = self.store.load_state(agent_id)
            if mine is None or state_digest(mine) != digest:
                differ.append(agent_id)
                if mine is not None:
                    ours.append(agent_id)
        self._log(ours)
        self.repairs_asked += len(differ)
        return differ

    def log_changed(self, agent_ids: list[str]) -> None:
        """Ship the states of ``agent_ids`` to their replicas (a migrated agent's)."""
        self._log(agent_ids)

    def status(self) -> dict[str, Any]:
        return {
            "replicas": self.replicas,
            "pending": self._log_size(),
            "in_flight": len(self._flights),
            "shipped": self.shipped,
            "deltas_shipped": self.deltas_shipped,
            "states_shipped": self.states_shipped,
            "bytes_shipped": self.bytes_shipped,
            "in_sync": len(self._in_sync),
            "acked": self.acked,
            "rejected": self.rejected,
            "expired": self.expired,
            "ack": self.ack if self.sync else "owner",
            "held": self.held,
            "hold_timeouts": self.hold_timeouts,
            "anti_entropy_rounds": self.anti_entropy_rounds,
            "repairs_sent": self.repairs_sent,
            "repairs_asked": self.repairs_asked,
        }

    # --- shipping -------------------------------------------------------------------------

    def _targets(self, agent_id: str) -> list[str]:
        me = self.cluster.me.address
        prefs = self.cluster.preference(agent_id, self.replicas + 1)
        return [address for address in prefs if address != me]

    def _ship(self, now: float) -> None:
        taken = self._pending(self.batch)
        if not taken:
            return
        states = self.store.load_states(list(taken))
        outboxes: dict[str, _Outbox] = {}
        for agent_id, parts in taken.items():
            state = states.get(agent_id)
            targets = self._targets(agent_id)
            stamps = frozenset(entry_stamp(value) for _, value in parts)
            if state is None or not targets:
                # nothing to ship, or no one to ship to
                self._delete(parts)
                self._covered(agent_id, stamps, self._turn)
                continue
            deltas = self._deltas(parts, len(state))
            known = self._known(agent_id, targets) if deltas else set()
            flight = _Flight(stamps, parts, now + self.timeout, self._turn)
            self._flights[agent_id] = flight
            for target in targets:
                records = deltas if target in known else [state]
                box = outboxes.setdefault(target, _Outbox(agent_id))
                for record in records:
                    corr = self.ids.next()
                    flight.waiting.add(corr)
                    self._corrs[corr] = (agent_id, target)
                    entry = encode_entry(ASK, corr, agent_id, MERGE_ACTION, 0, None, record)
                    box.entries.append(entry)
                    box.deltas += record is not state
                    box.size += len(entry)
        self._send_outboxes(outboxes)

    def _pending(self, limit: int) -> dict[str, list[tuple[bytes, bytes]]]:
        """The logged entries of up to ``limit`` agents not in flight, each agent's all
        (its per-commit entries are contiguous in key order; none is left behind)."""
        taken: dict[str, list[tuple[bytes, bytes]]] = {}
        for key, value in self._read_log():
            agent_id = entry_agent(key)
            if agent_id in self._flights:
                continue
            parts = taken.get(agent_id)
            if parts is None:
                if len(taken) >= limit:
                    break
                parts = taken[agent_id] = []
            parts.append((key, value))
        return taken

    def _deltas(self, parts: list[tuple[bytes, bytes]], state_size: int) -> list[bytes]:
        """The deltas of ``parts`` to ship where the target holds everything before them;
        empty when the whole state must go: deltas off, a whole-state mark among them,
        more than _MAX_PARTS, or not smaller than the state together."""
        if not self.deltas or len(parts) > _MAX_PARTS:
            return []
        deltas = []
        for _, value in parts:
            delta = read_entry(value)[1]
            if delta is None:
                return []
            deltas.append(delta)
        return deltas if sum(map(len, deltas)) < state_size else []

    def _known(self, agent_id: str, targets: list[str]) -> set[str]:
        """The targets of ``agent_id`` that hold every change of it logged so far: a
        delta is all they lack. A node that is no longer a target misses this shipment
        and is forgotten (it gets the whole state when it is one again)."""
        known = self._in_sync.get(agent_id)
        if known is None:
            return set()
        known.intersection_update(targets)
        return known

    def _send_outboxes(self, outboxes: dict[str, _Outbox]) -> None:
        for target, box in outboxes.items():
            header = encode_batch_header(None, box.hint)
            if self.cluster.forward(target, [b"", header, join_entries(box.entries)]):
                self.shipped += len(box.entries)
                self.deltas_shipped += box.deltas
                self.states_shipped += len(box.entries) - box.deltas
                self.bytes_shipped += box.size

    def _on_result(self, corr: int, status: int) -> None:
        """One answer of a replica; a flight answered by every target is done: its log
        entry is deleted at the next flush if unchanged (:meth:`_flush_done`)."""
        pair = self._corrs.pop(corr, None)
        if pair is None:
            return  # a late answer to an expired flight
        agent_id, target = pair
        flight = self._flights.get(agent_id)
        if flight is None:
            return
        if status in RETRYABLE:
            return  # shipped again once the flight expires (and the target forgotten)
        if status != 0:
            self.rejected += 1
            self._forget(agent_id, target)
            log.warning("a replica refused the state of %s (status %d)", agent_id, status)
        else:
            self._learn(agent_id, target)
        flight.waiting.discard(corr)
        if not flight.waiting:
            del self._flights[agent_id]
            self.acked += 1
            self._done.update(flight.parts)
            self._covered(agent_id, flight.stamps, flight.turn)

    def _learn(self, agent_id: str, target: str) -> None:
        """``target`` merged a shipment of ``agent_id``: it holds every logged change."""
        known = self._in_sync.get(agent_id)
        if known is None:
            known = self._in_sync[agent_id] = set()
            while len(self._in_sync) > self.in_sync_limit:
                self._in_sync.popitem(last=False)
        else:
            self._in_sync.move_to_end(agent_id)
        known.add(target)

    def _forget(self, agent_id: str, target: str | None = None) -> None:
        """``target`` (None: every node) may lack a change of ``agent_id``: whole state next."""
        known = self._in_sync.get(agent_id)
        if known is None:
            return
        if target is None:
            del self._in_sync[agent_id]
        else:
            known.discard(target)

    def _expire(self, now: float, count: bool = True) -> None:
        late = [a for a, f in self._flights.items() if f.deadline <= now]
        for agent_id in late:
            flight = self._flights.pop(agent_id)
            for corr in flight.waiting:
                pair = self._corrs.pop(corr, None)
                if pair is not None:
                    self._forget(*pair)  # it may have missed this shipment
        if count:
            self.expired += len(late)

    # --- held replies -----------------------------------------------------------------------

    def _group(self, now: float) -> None:
        """Close the open replies into a group waiting for everything logged now."""
        replies, self._open = self._open, []
        logged: dict[str, set[bytes]] = {}
        for key, value in self._read_log():
            logged.setdefault(entry_agent(key), set()).add(entry_stamp(value))
        waits = {agent_id: frozenset(stamps) for agent_id, stamps in logged.items()}
        group = _Group(replies, self._turn, now + self.hold_timeout, waits)
        if not waits:
            self._release(group)
            return
        self._groups.append(group)
        for agent_id in waits:
            self._waiting.setdefault(agent_id, []).append(group)

    def _covered(self, agent_id: str, stamps: frozenset[bytes], turn: int) -> None:
        """A shipment of ``agent_id`` read at ``turn`` of the entries with ``stamps``
        reached every replica (or needed none): the groups it covers stop waiting for
        that agent (those that wait for those entries only, or formed before the read,
        which took every entry of the agent logged then)."""
        groups = self._waiting.pop(agent_id, None)
        if not groups:
            return
        still = []
        for group in groups:
            if group.done:
                continue
            if group.waits[agent_id] <= stamps or turn >= group.turn:
                del group.waits[agent_id]
                if not group.waits:
                    self._release(group)
            else:
                still.append(group)
        if still:
            self._waiting[agent_id] = still

    def _release(self, group: _Group) -> None:
        group.done = True
        self.held -= len(group.replies)
        for frames in group.replies:
            self._release_frames(frames)

    def _release_frames(self, frames: list[bytes]) -> None:
        if self._send is not None:
            self._send(frames)

    def _release_all(self) -> None:
        for group in self._groups:
            if not group.done:
                self._release(group)
        self._groups.clear()
        self._waiting.clear()
        open_, self._open = self._open, []
        self.held -= len(open_)
        for frames in open_:
            self._release_frames(frames)

    def _expire_groups(self, now: float) -> None:
        groups = self._groups
        while groups and (groups[0].done or groups[0].deadline <= now):
            group = groups.popleft()
            if group.done:
                continue
            group.done = True
            self.held -= len(group.replies)
            self.hold_timeouts += len(group.replies)
            log.warning(
                "%d replies waited %.1f s for the replicas of %d agents; answered UNAVAILABLE",
                len(group.replies), self.hold_timeout, len(group.waits),
            )  # fmt: skip
            for frames in group.replies:
                self._release_frames(_unavailable(frames))
        if not groups:
            self._waiting.clear()

    # --- anti-entropy ---------------------------------------------------------------------

    def _anti_entropy(self) -> None:
        self.anti_entropy_rounds += 1
        per_peer: dict[str, list[list[Any]]] = {}
        for key, state in self.store.iter_items("state"):
            agent_id = key.decode(errors="replace")
            digest = state_digest(state)
            for target in self._targets(agent_id):
                per_peer.setdefault(target, []).append([agent_id, digest])
        for peer, items in per_peer.items():
            for i in range(0, len(items), _DIGESTS_PER_MESSAGE):
                corr = self.ids.next()
                self._digest_corrs[corr] = peer
                header = encode_request(ADMIN, corr, "", DIGEST_ACTION)
                payload = pack(items[i : i + _DIGESTS_PER_MESSAGE])
                if not self.cluster.forward(peer, [b"", header, payload]):
                    self._digest_corrs.pop(corr, None)
        if len(self._digest_corrs) > 10_000:  # answers that never came
            self._digest_corrs.clear()

    def _on_digest_reply(self, peer: str, status: int, payload: bytes) -> None:
        if status != 0:
            log.warning("anti-entropy with %s failed (status %d)", peer, status)
            return
        ids = unpack(payload)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ProtocolError("a digest answer must be an array of agent ids")
        self.repairs_sent += len(ids)
        self._log(ids)

    # --- the change log -------------------------------------------------------------------

    def _set_flag(self, on: bool) -> None:
        if self._flag is on:
            return
        batch = self.store.batch()
        flag = (REPLICATE_DELTAS if self.deltas else REPLICATE_WHOLE) if on else REPLICATE_OFF
        batch.put("meta", REPLICATE_KEY, flag)
        try:
            self.store.commit(batch)
            self._flag = on
        except StoreError as exc:
            log.error("cannot switch replication logging %s: %s", "on" if on else "off", exc)

    def _log(self, agent_ids: list[str]) -> None:
        """Log ``agent_ids`` for a whole-state shipment to every target (a repair, a
        migrated agent): a worker that commits one of them meanwhile may overwrite the
        mark with a delta, so the targets are forgotten here too."""
        if not agent_ids:
            return
        batch = self.store.batch()
        value = whole_entry(b"ae%d" % self.ids.next())
        for agent_id in agent_ids:
            self._forget(agent_id)
            batch.put("repl", agent_id.encode(), value)
        try:
            self.store.commit(batch)
        except StoreError as exc:
            log.error("cannot log %d agents for replication: %s", len(agent_ids), exc)

    def _read_log(self) -> Iterator[tuple[bytes, bytes]]:
        """The logged (agent id, log value) entries not yet replicated."""
        done = self._done
        for key, stamp in self.store.iter_items("repl"):
            if done.get(key) != stamp:
                yield key, stamp

    def _flush_done(self, now: float) -> None:
        self._next_flush = now + _FLUSH_INTERVAL
        done, self._done = self._done, {}
        self._delete(list(done.items()))

    def _has_log(self) -> bool:
        return next(iter(self._read_log()), None) is not None

    def _log_size(self) -> int:
        return sum(1 for _ in itertools.islice(self._read_log(), 100_000))

    def _delete(self, items: list[tuple[bytes, bytes]]) -> None:
        if not items:
            return
        try:
            self.store.delete_if("repl", items)
        except StoreError as exc:
            log.error("cannot clear %d replication log entries: %s", len(items), exc)


def _unavailable(frames: list[bytes]) -> list[bytes]:
    """A held reply turned into UNAVAILABLE errors for each answer that was ok (the
    write is committed on its owner, not known to be on its replicas)."""
    try:
        kind, corr, status = decode_reply_kind(frames[-2])
        items = reply_items(kind, corr, status, frames[-1])
    except ProtocolError:
        return frames
    code = int(ErrorCode.UNAVAILABLE)
    body = pack(
        error_payload(code, "the write was committed on its owner but its replicas did "
                      "not confirm it in time (replication_timeout)")
    )  # fmt: skip
    answers = [(c, st, b) if st != 0 else (c, code, body) for c, st, b in items]
    return [*frames[:-2], encode_reply_kind(REPLY_BATCH, 0), encode_reply_batch(answers)]
