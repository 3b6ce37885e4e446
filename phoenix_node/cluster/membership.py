"""Cluster membership and failure detection: SWIM with Lifeguard's refinements.

After Das, Gupta and Motivala, "SWIM: Scalable Weakly-consistent Infection-style
Process Group Membership Protocol" (2002), HashiCorp's memberlist, and Dadgar et
al., "Lifeguard: Local Health Awareness for More Accurate Failure Detection"
(2017).

Sans-IO
-------
:class:`Membership` owns no socket, thread or clock. The caller's loop feeds it
time (``time.monotonic()``, never the wall clock) and decoded messages, and sends
what it returns::

    out = membership.tick(now)                       # timers; call at next_deadline()
    out = membership.receive(sender_address, message, now)   # one decoded message
    for o in out: transport.send(o.address, msgpack.packb(o.message))

``sender_address`` must be the address the sender advertises in its NodeId
(the transport identifies peers by that address); a message whose ``from``
disagrees is refused. The wire format is documented in :mod:`._swim_wire`.

Protocol
--------
- **Probing.** Every ``probe_interval`` a member pings the next member of a
  shuffled round-robin list (so every member is probed by each other member at
  least once per ``n - 1`` periods). No ack within ``probe_timeout``: it asks
  ``indirect_probes`` other members to ping the target (ping-req) and relay the
  ack, and pings the target once more itself. No ack by the end of the period:
  the target becomes ``suspect``.
- **Suspicion.** Every node that learns of a suspicion starts its own timer of
  :meth:`SwimConfig.suspicion_timeout`; at expiry the member becomes ``down``.
  Each period a node also pings up to ``indirect_probes`` of the members it
  holds suspect, with the suspicion attached: a live one answers with its
  refutation, so each holder gets it in time even when gossip misses it (this
  is what keeps a lossy network from turning suspicions into downs).
- **Refutation.** A node that hears itself suspect or down (or anything that
  beats its own record) bumps its ``version`` and gossips its real state. So a
  healed partition merges back to all-up: each side hears it is down and refutes.
- **Gossip.** Every change a node learns is piggybacked on its next messages,
  each update :meth:`SwimConfig.retransmit_limit` times, at most ``max_piggyback``
  per message (the least transmitted first). A message to a member we hold
  suspect or down always carries that record (Lifeguard's "buddy system").
  Every message also carries its sender's own record.
- **Push-pull.** Every ``sync_interval`` a node sends its full list to a random
  live member, which merges it and answers with its own. Every
  ``reconnect_interval`` it does the same with a random ``down`` member or an
  unreachable seed: this is how the two sides of a healed partition find each
  other again (``down`` records are kept for ``tombstone_ttl``, after which only
  the seeds are tried).
- **Joining.** With seeds, a node starts ``joining`` and sends ``join`` to every
  seed (and to one live member it has heard of by gossip, if any), again after
  ``join_retry`` seconds, doubling up to ``join_retry_max``. A seed answers
  with a sync-reply; the first full list makes the joiner ``up``.
  After ``join_timeout`` with no answer it becomes ``up`` alone (and keeps
  trying the seeds through reconnect, merging when they answer). Without seeds
  it is ``up`` at once. A seed answers joins in any state of its own, so nodes
  that all start together and name each other as seeds do not wait forever.
- **Leaving.** :meth:`Membership.leave` makes the node ``leaving`` (it still
  serves and is still probed); :meth:`Membership.left` makes it ``removed``
  after the hand-off: it stops probing and nobody probes or suspects it again.
  Both notify every live member at once and gossip the change.
- **Restarts.** A record of a higher incarnation of an address supersedes the
  record of the lower one, which becomes ``removed`` (one record per address).

Merge rules
-----------
For one address: a higher node incarnation wins. For one NodeId: ``removed``
is final; otherwise a higher version wins; at the same version the state with
the higher precedence wins: ``joining < up < leaving < suspect < down``. So
down and suspect stand until the node itself refutes with a higher version,
suspect and leaving beat up, and a suspicion of a leaving node can lead to
down (a node that crashes while handing off is still detected). A node bumps
its own version on each of its own state changes, so they always win.

Queries
-------
:meth:`Membership.alive` is up + suspect + leaving (and this node, when in one
of those states): the members that the hash ring should hold. Suspect members
stay on the ring because most suspicions are false and a ring rebuild moves
agents; leaving members stay until they are removed because they still serve
while handing off; joining members are not on it yet.

Bounds: at most ``max_members`` records (this node included; when full, the
oldest tombstone makes room, else a new member is refused and counted), at most
``max_relays`` pending indirect probes, at most 10,000 undrained events (the
oldest are dropped and counted), incoming lists bounded by the wire limits.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ._swim_wire import (
    MAX_VERSION,
    InvalidNodeIdError,
    Member,
    MembershipError,
    MembershipEvent,
    MembershipProtocolError,
    MemberState,
    Message,
    NodeId,
    Outgoing,
    Record,
    SwimConfig,
    beats,
    check_address,
    decode,
    encode,
)

__all__ = [
    "MAX_EVENTS",
    "InvalidNodeIdError",
    "Member",
    "MemberState",
    "Membership",
    "MembershipError",
    "MembershipEvent",
    "MembershipProtocolError",
    "MembershipStatistics",
    "NodeId",
    "Outgoing",
    "SwimConfig",
    "beats",
]

JOINING, UP, SUSPECT = MemberState.JOINING, MemberState.UP, MemberState.SUSPECT
DOWN, LEAVING, REMOVED = MemberState.DOWN, MemberState.LEAVING, MemberState.REMOVED
_ALIVE = frozenset((UP, SUSPECT, LEAVING))
_PROBED = frozenset((JOINING, UP, SUSPECT, LEAVING))
_HELPERS = frozenset((UP, LEAVING))
_DEAD = frozenset((DOWN, REMOVED))
#: undrained events kept; older ones are dropped (and counted)
MAX_EVENTS = 10_000


@dataclass(slots=True)
class MembershipStatistics:
    """Counters since the start (a snapshot: :meth:`Membership.statistics` copies).

    ``suspicions``: members this node declared suspect after its own failed
    probe. ``refuted_suspicions``: suspect members that came back with a higher
    version, as seen by this node (false suspicions, whoever raised them).
    ``refutations``: times this node refuted a suspicion or a down of itself.
    ``downs``: members this node saw become down (its own timer or gossip).
    """

    probes: int = 0
    acks: int = 0
    indirect_probes: int = 0
    indirect_acks: int = 0
    suspicions: int = 0
    refuted_suspicions: int = 0
    refutations: int = 0
    downs: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    bad_messages: int = 0
    members_refused: int = 0
    relays_refused: int = 0
    events_dropped: int = 0


@dataclass(slots=True)
class _Entry:
    node: NodeId
    state: MemberState
    version: int
    since: float

    def record(self) -> Record:
        return Record(self.node, self.state, self.version)


@dataclass(slots=True)
class _Update:
    record: Record
    remaining: int


@dataclass(slots=True)
class _Probe:
    target: NodeId
    seq: int
    indirect_at: float
    indirect_sent: bool = False
    acked: bool = False


class _Relay(NamedTuple):
    prober: str
    seq: int
    target: NodeId
    expires: float


class Membership:
    """The membership state machine of one node (see the module docstring)."""

    def __init__(
        self,
        me: NodeId,
        config: SwimConfig = SwimConfig(),  # noqa: B008 - frozen: one shared default is safe
        *,
        seeds: Sequence[str] = (),
        rng: random.Random | None = None,
        now: float = 0.0,
    ) -> None:
        if not isinstance(me, NodeId):
            raise TypeError(f"me must be a NodeId, got {type(me).__name__}")
        if not isinstance(config, SwimConfig):
            raise TypeError(f"config must be a SwimConfig, got {type(config).__name__}")
        if isinstance(seeds, str) or len(seeds) > config.max_members:
            raise ValueError(f"seeds must be a sequence of at most {config.max_members} addresses")
        checked = [check_address(seed) for seed in seeds]
        self._config = config
        self._rng = rng if rng is not None else random.Random()
        self._now = _check_time(now)
        self._me = me
        self._seeds = tuple(dict.fromkeys(s for s in checked if s != me.address))
        self._state = JOINING if self._seeds else UP
        self._version = 0
        self._since = now
        self._table: dict[str, _Entry] = {}
        self._suspects: dict[str, float] = {}
        self._updates: dict[str, _Update] = {}
        self._events: deque[MembershipEvent] = deque(maxlen=MAX_EVENTS)
        self._stats = MembershipStatistics()
        self._seq = 0
        self._probe: _Probe | None = None
        self._order: list[str] = []
        self._order_index = 0
        self._relays: dict[int, _Relay] = {}
        rnd = self._rng.uniform
        # Random phases, so that nodes started together do not probe and sync in lockstep.
        self._next_probe = now + rnd(0.0, config.probe_interval)
        self._next_sync = now + rnd(0.5, 1.0) * config.sync_interval
        self._next_reconnect = now + rnd(0.5, 1.0) * config.reconnect_interval
        self._next_join = now
        self._join_delay = config.join_retry
        self._join_deadline = now + config.join_timeout
        self._purge_every = config.tombstone_ttl / 10
        self._next_purge = now + self._purge_every
        self._event(me, None, self._state, now)
        self._enqueue(self._self_record())

    # ------------------------------------------------------------------ queries

    @property
    def me(self) -> NodeId:
        return self._me

    @property
    def state(self) -> MemberState:
        """This node's own state."""
        return self._state

    @property
    def config(self) -> SwimConfig:
        return self._config

    def members(self) -> list[Member]:
        """Every record this node holds (itself first, then by address), tombstones included."""
        mine = Member(self._me, self._state, self._version, self._since)
        others = (self._table[a] for a in sorted(self._table))
        return [mine, *(Member(e.node, e.state, e.version, e.since) for e in others)]

    def member(self, address: str) -> Member | None:
        """The record of the member at ``address`` (this node's own included), or None."""
        check_address(address)
        if address == self._me.address:
            return Member(self._me, self._state, self._version, self._since)
        entry = self._table.get(address)
        if entry is None:
            return None
        return Member(entry.node, entry.state, entry.version, entry.since)

    def alive(self) -> list[NodeId]:
        """Up, suspect and leaving members, this node included: what the ring should hold."""
        nodes = [e.node for e in self._table.values() if e.state in _ALIVE]
        if self._state in _ALIVE:
            nodes.append(self._me)
        return sorted(nodes)

    def events(self) -> list[MembershipEvent]:
        """The state changes seen since the last call, oldest first (drains the queue)."""
        drained = list(self._events)
        self._events.clear()
        return drained

    def statistics(self) -> MembershipStatistics:
        return dataclasses.replace(self._stats)

    def next_deadline(self) -> float:
        """When :meth:`tick` next has something to do (call it then, or on any message)."""
        deadlines = [self._next_purge]
        if self._state is not REMOVED:
            deadlines += [self._next_probe, self._next_sync, self._next_reconnect]
            deadlines.extend(self._suspects.values())
            probe = self._probe
            if probe is not None and not probe.acked and not probe.indirect_sent:
                deadlines.append(probe.indirect_at)
        if self._state is JOINING:
            deadlines += [self._next_join, self._join_deadline]
        return min(deadlines)

    # ------------------------------------------------------------------ inputs

    def tick(self, now: float) -> list[Outgoing]:
        """Run the timers due at ``now``; return the messages to send."""
        now = self._advance(now)
        out: list[Outgoing] = []
        self._expire_relays(now)
        if self._state is not REMOVED:
            self._run_probe(now, out)
            self._run_suspicions(now)
            self._run_join(now, out)
            self._run_sync(now, out)
            self._run_reconnect(now, out)
        self._purge(now)
        return out

    def receive(self, sender_address: str, raw: Any, now: float) -> list[Outgoing]:
        """Handle one decoded message from ``sender_address``; return the messages to send.

        A malformed or hostile message raises :class:`MembershipProtocolError` and
        changes nothing but the ``bad_messages`` counter.
        """
        if not isinstance(sender_address, str):
            raise TypeError(f"sender_address must be a str, got {type(sender_address).__name__}")
        now = self._advance(now)
        try:
            message = decode(raw)
            self._check_origin(sender_address, message)
        except MembershipProtocolError:
            self._stats.bad_messages += 1
            raise
        self._stats.messages_received += 1
        self._merge(message.sender, now)
        for record in message.gossip:
            self._merge(record, now)
        return self._dispatch(message, now)

    def leave(self, now: float) -> list[Outgoing]:
        """Become ``leaving``: still serving, handing off. Idempotent."""
        now = self._advance(now)
        if self._state in (LEAVING, REMOVED):
            return []
        self._set_self(LEAVING, now)
        return self._announce()

    def left(self, now: float) -> list[Outgoing]:
        """Become ``removed`` (after the hand-off); stop probing. Idempotent."""
        now = self._advance(now)
        if self._state is REMOVED:
            return []
        self._set_self(REMOVED, now)
        self._probe = None
        self._relays.clear()
        return self._announce()

    # ------------------------------------------------------------------ receiving

    def _check_origin(self, sender_address: str, message: Message) -> None:
        sender = message.sender.node
        if sender.address != sender_address:
            raise MembershipProtocolError(
                f"{message.kind} from {sender_address!r} claims to come from {str(sender)!r}"
            )
        if sender == self._me:
            raise MembershipProtocolError(f"{message.kind} claims to come from this node")
        target = message.target
        if message.kind == "ping" and target is not None and target.address != self._me.address:
            raise MembershipProtocolError(f"ping for {str(target)!r} reached {self._me.address!r}")

    def _dispatch(self, message: Message, now: float) -> list[Outgoing]:
        kind = message.kind
        sender = message.sender.node.address
        if kind == "ping":
            # Also for a ping meant for an older incarnation of this address: the ack
            # names this incarnation, so the prober's probe fails to match while the
            # ack's sender record supersedes the old one.
            return [self._send(sender, "ack", seq=message.seq, target=self._me)]
        if kind == "ack":
            return self._on_ack(message)
        if kind == "ping-req":
            return self._on_ping_req(message, now)
        for record in message.members:
            self._merge(record, now)
        if kind in ("sync", "sync-reply") and self._state is JOINING:
            self._set_self(UP, now)
        if kind == "sync-reply":
            return []
        return [self._send(sender, "sync-reply", members=self._full_list())]

    def _on_ack(self, message: Message) -> list[Outgoing]:
        probe, target = self._probe, message.target
        if probe is not None and message.seq == probe.seq and target == probe.target:
            if not probe.acked:
                probe.acked = True
                self._stats.acks += 1
                if message.sender.node != target:
                    self._stats.indirect_acks += 1
            return []
        relay = self._relays.get(message.seq)
        if relay is not None and relay.target == target:
            del self._relays[message.seq]
            return [self._send(relay.prober, "ack", seq=relay.seq, target=relay.target)]
        return []  # late, duplicate or unsolicited (e.g. the ack of a notification ping)

    def _on_ping_req(self, message: Message, now: float) -> list[Outgoing]:
        target, prober = message.target, message.sender.node.address
        if target is None:  # decode never lets a ping-req through without one
            return []
        if target.address == self._me.address:
            return [self._send(prober, "ack", seq=message.seq, target=self._me)]
        if len(self._relays) >= self._config.max_relays:
            self._stats.relays_refused += 1
            return []
        seq = self._next_seq()
        self._relays[seq] = _Relay(prober, message.seq, target, now + self._config.probe_interval)
        return [self._send(target.address, "ping", seq=seq, target=target)]

    # ------------------------------------------------------------------ merging

    def _merge(self, record: Record, now: float) -> None:
        address = record.node.address
        if address == self._me.address:
            self._maybe_refute(record)
            return
        entry = self._table.get(address)
        if entry is None or record.node.incarnation > entry.node.incarnation:
            self._admit(record, entry, now)
        elif record.node.incarnation == entry.node.incarnation and beats(record, entry.record()):
            self._change(entry, record.state, record.version, now)
            self._enqueue(entry.record())

    def _admit(self, record: Record, old: _Entry | None, now: float) -> None:
        """A member first heard of, or a higher incarnation superseding ``old``."""
        address = record.node.address
        if old is None:
            if record.state in _DEAD:
                return  # news of the death of a node we never knew: nothing to keep
            if len(self._table) >= self._config.max_members - 1 and not self._evict_tombstone():
                self._stats.members_refused += 1
                return
        else:
            self._suspects.pop(address, None)
            if old.state is not REMOVED:
                self._event(old.node, old.state, REMOVED, now)
        entry = _Entry(record.node, record.state, record.version, now)
        self._table[address] = entry
        self._event(record.node, None, record.state, now)
        if record.state is SUSPECT:
            self._suspects[address] = now + self._suspicion_timeout()
        if record.state in _PROBED:  # probe it this round, at a random place
            self._order.insert(self._rng.randint(self._order_index, len(self._order)), address)
        self._enqueue(entry.record())

    def _change(self, entry: _Entry, state: MemberState, version: int, now: float) -> None:
        old, address = entry.state, entry.node.address
        entry.version = version
        if state is old:
            if state is SUSPECT:  # suspected again after a refutation: a fresh timer
                self._suspects[address] = now + self._suspicion_timeout()
            return
        entry.state, entry.since = state, now
        self._event(entry.node, old, state, now)
        if old is SUSPECT:
            del self._suspects[address]
            if state is not DOWN:
                self._stats.refuted_suspicions += 1
        if state is SUSPECT:
            self._suspects[address] = now + self._suspicion_timeout()
        elif state is DOWN:
            self._stats.downs += 1
        if old in _DEAD and state in _PROBED:  # back from the dead: probe it this round
            self._order.insert(self._rng.randint(self._order_index, len(self._order)), address)

    def _maybe_refute(self, record: Record) -> None:
        """Someone holds a record of this node that beats ours: outbid it."""
        if record.node.incarnation != self._me.incarnation or self._state is REMOVED:
            return  # another life of this address, or nothing left to defend
        if record.state is REMOVED or not beats(record, self._self_record()):
            return
        if record.version >= MAX_VERSION:
            return  # only a hostile peer gets here; nothing can outbid it
        self._version = record.version + 1
        if record.state in (SUSPECT, DOWN):
            self._stats.refutations += 1
        self._enqueue(self._self_record())

    def _set_self(self, state: MemberState, now: float) -> None:
        old = self._state
        self._version = min(self._version + 1, MAX_VERSION)
        self._state, self._since = state, now
        self._event(self._me, old, state, now)
        self._enqueue(self._self_record())

    def _evict_tombstone(self) -> bool:
        dead = [e for e in self._table.values() if e.state in _DEAD]
        if not dead:
            return False
        self._forget(min(dead, key=lambda e: e.since).node.address)
        return True

    def _forget(self, address: str) -> None:
        del self._table[address]
        self._updates.pop(address, None)
        self._suspects.pop(address, None)

    # ------------------------------------------------------------------ timers

    def _run_probe(self, now: float, out: list[Outgoing]) -> None:
        probe = self._probe
        if probe and not probe.acked and not probe.indirect_sent and now >= probe.indirect_at:
            probe.indirect_sent = True
            self._send_indirect(probe, out)
        if now < self._next_probe:
            return
        step = self._config.probe_interval
        self._next_probe = self._next_probe + step if self._next_probe + step > now else now + step
        if probe is not None:
            self._probe = None
            if not probe.acked:
                self._suspect(probe.target, now)
        if self._state in (UP, LEAVING):
            self._start_probe(now, out)
            self._remind_suspects(out)

    def _start_probe(self, now: float, out: list[Outgoing]) -> None:
        target = self._next_target()
        if target is None:
            return
        seq = self._next_seq()
        self._probe = _Probe(target, seq, now + self._config.probe_timeout)
        self._stats.probes += 1
        out.append(self._send(target.address, "ping", seq=seq, target=target))

    def _next_target(self) -> NodeId | None:
        """Round-robin over a shuffled list, reshuffled each round (SWIM's bounded detection)."""
        for _ in range(2):
            while self._order_index < len(self._order):
                entry = self._table.get(self._order[self._order_index])
                self._order_index += 1
                if entry is not None and entry.state in _PROBED:
                    return entry.node
            self._order = [a for a, e in self._table.items() if e.state in _PROBED]
            self._rng.shuffle(self._order)
            self._order_index = 0
        return None

    def _send_indirect(self, probe: _Probe, out: list[Outgoing]) -> None:
        helpers = [
            a for a, e in self._table.items() if e.state in _HELPERS and e.node != probe.target
        ]
        chosen = self._rng.sample(helpers, min(self._config.indirect_probes, len(helpers)))
        for address in chosen:
            out.append(self._send(address, "ping-req", seq=probe.seq, target=probe.target))
        self._stats.indirect_probes += len(chosen)
        # And a second direct ping (memberlist's fallback): a single lost ping or ack
        # is the commonest failure, and this retry costs one message per failed probe.
        out.append(self._send(probe.target.address, "ping", seq=probe.seq, target=probe.target))

    def _suspect(self, target: NodeId, now: float) -> None:
        entry = self._table.get(target.address)
        if entry is None or entry.node != target or entry.state not in (JOINING, UP, LEAVING):
            return  # gone, superseded or already suspected/down meanwhile
        self._stats.suspicions += 1
        self._change(entry, SUSPECT, entry.version, now)
        self._enqueue(entry.record())

    def _remind_suspects(self, out: list[Outgoing]) -> None:
        """Ping up to ``indirect_probes`` suspect members a period, with the suspicion attached.

        Every holder of a suspicion starts its own timer, so every holder needs the
        refutation in time: under loss, gossip alone sometimes misses one holder.
        A live suspect answers the reminder with its refuted record (in the ack's
        ``from``), giving each holder a fresh chance every period, at a bounded cost.
        """
        suspects = list(self._suspects)
        if len(suspects) > self._config.indirect_probes:
            suspects = self._rng.sample(suspects, self._config.indirect_probes)
        for address in suspects:
            target = self._table[address].node
            out.append(self._send(address, "ping", seq=self._next_seq(), target=target))

    def _run_suspicions(self, now: float) -> None:
        for address in [a for a, deadline in self._suspects.items() if deadline <= now]:
            entry = self._table[address]
            self._change(entry, DOWN, entry.version, now)
            self._enqueue(entry.record())

    def _run_join(self, now: float, out: list[Outgoing]) -> None:
        if self._state is not JOINING:
            return
        if now >= self._join_deadline:
            self._set_self(UP, now)  # no seed answered: start alone, reconnect keeps trying
            return
        if now < self._next_join:
            return
        targets = list(self._seeds)
        # Also one live member heard of meanwhile (gossip names them before any seed
        # answers): its answer is as good as a seed's, and a seed whose channel to this
        # node does not work yet does not keep it joining until join_timeout.
        others = sorted(a for a, e in self._table.items() if e.state in _HELPERS)
        others = [a for a in others if a not in targets]
        if others:
            targets.append(self._rng.choice(others))
        out.extend(self._send(target, "join") for target in targets)
        self._next_join = now + self._join_delay
        self._join_delay = min(self._join_delay * 2, self._config.join_retry_max)

    def _run_sync(self, now: float, out: list[Outgoing]) -> None:
        if now < self._next_sync:
            return
        self._next_sync = now + self._config.sync_interval
        peers = [a for a, e in self._table.items() if e.state in _HELPERS]
        if self._state in (UP, LEAVING) and peers:
            out.append(self._send(self._rng.choice(peers), "sync", members=self._full_list()))

    def _run_reconnect(self, now: float, out: list[Outgoing]) -> None:
        if now < self._next_reconnect:
            return
        self._next_reconnect = now + self._config.reconnect_interval
        if self._state not in (UP, LEAVING):
            return
        candidates = {a for a, e in self._table.items() if e.state is DOWN}
        for seed in self._seeds:
            entry = self._table.get(seed)
            if entry is None or entry.state in _DEAD:
                candidates.add(seed)
        if candidates:
            address = self._rng.choice(sorted(candidates))
            out.append(self._send(address, "sync", members=self._full_list()))

    def _expire_relays(self, now: float) -> None:
        for seq in [s for s, relay in self._relays.items() if relay.expires <= now]:
            del self._relays[seq]

    def _purge(self, now: float) -> None:
        if now < self._next_purge:
            return
        self._next_purge = now + self._purge_every
        ttl = self._config.tombstone_ttl
        for address in [a for a, e in self._table.items() if e.state in _DEAD]:
            if self._table[address].since + ttl <= now:
                self._forget(address)

    # ------------------------------------------------------------------ sending

    def _send(
        self,
        to: str,
        kind: str,
        *,
        seq: int = 0,
        target: NodeId | None = None,
        members: tuple[Record, ...] = (),
    ) -> Outgoing:
        gossip = tuple(self._piggyback(to))
        message = Message(kind, self._self_record(), gossip, seq, target, members)
        self._stats.messages_sent += 1
        return Outgoing(to, encode(message))

    def _piggyback(self, to: str) -> list[Record]:
        limit = self._config.max_piggyback
        out: list[Record] = []
        buddy = self._table.get(to)
        if limit and buddy is not None and buddy.state in (SUSPECT, DOWN):
            out.append(buddy.record())  # the buddy system: tell a suspect it is suspected
        ranked = sorted(self._updates.items(), key=lambda item: -item[1].remaining)
        for address, update in ranked:
            if len(out) >= limit:
                break
            if out and address == to and out[0].node.address == to:
                continue
            out.append(update.record)
            update.remaining -= 1
            if update.remaining <= 0:
                del self._updates[address]
        return out

    def _announce(self) -> list[Outgoing]:
        """Tell every live member of our own new state at once (leave, left)."""
        return [
            self._send(a, "ping", seq=self._next_seq(), target=e.node)
            for a, e in self._table.items()
            if e.state in _PROBED
        ]

    def _enqueue(self, record: Record) -> None:
        limit = self._config.retransmit_limit(len(self._table) + 1)
        self._updates[record.node.address] = _Update(record, limit)

    def _full_list(self) -> tuple[Record, ...]:
        return (self._self_record(), *(e.record() for e in self._table.values()))

    # ------------------------------------------------------------------ helpers

    def _self_record(self) -> Record:
        return Record(self._me, self._state, self._version)

    def _suspicion_timeout(self) -> float:
        live = sum(1 for e in self._table.values() if e.state in _ALIVE)
        return self._config.suspicion_timeout(live + (self._state in _ALIVE))

    def _next_seq(self) -> int:
        self._seq = self._seq + 1 if self._seq < MAX_VERSION else 1
        return self._seq

    def _event(self, node: NodeId, old: MemberState | None, new: MemberState, now: float) -> None:
        if len(self._events) == MAX_EVENTS:
            self._stats.events_dropped += 1
        self._events.append(MembershipEvent(node, old, new, now))

    def _advance(self, now: float) -> float:
        now = _check_time(now)
        if now < self._now:
            raise ValueError(f"time went backwards: {now} < {self._now} (use a monotonic clock)")
        self._now = now
        return now


def _check_time(now: Any) -> float:
    if not isinstance(now, int | float) or isinstance(now, bool):
        raise TypeError(f"now must be a number, got {type(now).__name__}")
    if not math.isfinite(now):
        raise ValueError(f"now must be finite, got {now}")
    return float(now)
