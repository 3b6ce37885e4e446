"""The cluster duties of a node's control process: membership, the ring, the peers.

The control process owns the node's public ROUTER. This module adds, inside
that process and its one loop:

- **Membership**: a :class:`~.membership.Membership` (SWIM) state machine, fed
  with the CLUSTER messages the ROUTER receives and ticked by the loop.
- **Peers**: one DEALER per member, connected to the member's public endpoint,
  with the routing id ``b"node:" + "<address>#<incarnation>"`` (a restarted node
  has a new incarnation, so it never reuses its predecessor's routing id; the
  peer's ROUTER would refuse a duplicate). Membership messages go one way,
  each over the sender's own DEALER; a client request forwarded to the owner
  travels on the same DEALER, and its reply comes back on it.
- **Ring**: a :class:`~.ring.Ring` over the addresses of the live members
  (up, suspect, leaving), rebuilt on every membership change. A request
  reaches the owner in at most one extra hop: the node a client talks to
  forwards it, undecoded, to the owner's control process, which serves it
  locally whatever its own view of the ring (no second hop, no loops).
- **Placements**: the cluster-wide :class:`~.registry.Registry` may place an agent
  on a node explicitly (a migrated or pinned agent). A placement on a live member
  overrides the ring: that node owns the agent and its replicas are the ring's
  preference list without it. A placement on a node that is not alive is ignored
  (the ring decides) until the node is back.
- **Faults** (``--fault-injection`` only): a :class:`~ipc.faults.FaultInjector`
  applied to every message to a peer, and partitions also drop what
  partitioned peers send.

CLUSTER frames (kind 10), over a peer's DEALER into this node's ROUTER::

    [routing id: "node:<address>#<incarnation>"][empty][header][payload]
    header  = [1, 10, 0, <sender address>, "", 0, {}]
    payload = msgpack of one SWIM message (see :mod:`._swim_wire`)
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import zmq

from ipc import make_dealer
from ipc.faults import FaultInjector, FaultPlan
from ipc.protocol import CLUSTER, ProtocolError, encode_request, pack, unpack

from .membership import (
    Membership,
    MembershipProtocolError,
    MemberState,
    NodeId,
    Outgoing,
    SwimConfig,
)
from .registry import Registry
from .ring import Ring

__all__ = ["PEER_PREFIX", "ClusterService"]

log = logging.getLogger("phoenix.cluster")

#: routing ids of peer nodes start with this (a request from one was forwarded already)
PEER_PREFIX = b"node:"


class ClusterService:
    """Membership, ring and peer sockets of one node (see the module docstring)."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        poller: zmq.Poller,
        me: NodeId,
        *,
        seeds: tuple[str, ...] = (),
        swim: SwimConfig | None = None,
        vnodes: int = 128,
        fault_injection: bool = False,
        registry: Registry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ctx = ctx
        self._poller = poller
        self._clock = clock
        self.me = me
        self.routing_id = PEER_PREFIX + str(me).encode()
        self.membership = Membership(me, swim or SwimConfig(), seeds=seeds, now=clock())
        self.vnodes = vnodes
        self.ring = Ring({me.address: 1.0}, vnodes=vnodes)
        self.registry = registry if registry is not None else Registry(str(me), clock=clock)
        self.registry.on_weights = self._rebuild
        self.faults = FaultInjector(rng=random.Random()) if fault_injection else None
        self._peers: dict[str, zmq.Socket[bytes]] = {}
        self._peer_of: dict[zmq.Socket[bytes], str] = {}
        self._header = encode_request(CLUSTER, 0, me.address, "", 0, None)
        self.forwarded = 0
        self.unreachable = 0
        self.bad_messages = 0
        #: membership events so far (a node joined, changed state, left, restarted):
        #: whoever keeps facts about other nodes' data compares it to see a change
        self.changes = 0
        self._rebuild()

    # --- the loop's calls -----------------------------------------------------------------

    def next_deadline(self) -> float:
        """Monotonic time of the next :meth:`tick` (fault-delayed messages included)."""
        deadline = self.membership.next_deadline()
        if self.faults is not None:
            held = self.faults.next_due()
            if held is not None:
                deadline = min(deadline, held)
        return deadline

    def tick(self) -> None:
        self._send_all(self.membership.tick(self._clock()))
        if self.faults is not None:
            for address, frames in list(self.faults.due()):
                self._send_raw(address, frames)
        self._after_change()

    def on_message(self, sender: str, payload: bytes) -> None:
        """A CLUSTER frame from the peer at ``sender`` (the header's subject)."""
        if self.faults is not None and self.faults.cut_off(sender):
            return
        try:
            raw = unpack(payload)
            out = self.membership.receive(sender, raw, self._clock())
        except (ProtocolError, MembershipProtocolError, TypeError, ValueError) as exc:
            self.bad_messages += 1
            log.debug("bad cluster message from %s: %s", sender, exc)
            return
        self._send_all(out)
        self._after_change()

    def owner(self, key: str) -> str | None:
        """The address of the node that owns ``key``; None when it is this node."""
        address = self.registry.placement(key)
        if address is None or address not in self.ring.members:
            address = self.ring.owner(key)
        return None if address == self.me.address else address

    def placed_elsewhere(self, key: str) -> str | None:
        """The live node other than this one that ``key`` is explicitly placed on."""
        address = self.registry.placement(key)
        if address is None or address == self.me.address or address not in self.ring.members:
            return None
        return address

    def preference(self, key: str, n: int, ring: Ring | None = None) -> list[str]:
        """The ``n`` nodes that hold ``key`` on ``ring`` (default: the current one), owner
        first: its placement when it is a member of that ring, then the ring's order."""
        ring = self.ring if ring is None else ring
        prefs = ring.preference(key, n)
        placed = self.registry.placement(key)
        if placed is None or placed not in ring.members or (prefs and prefs[0] == placed):
            return prefs
        return [placed, *[p for p in prefs if p != placed]][:n]

    def single(self) -> bool:
        """True while this node is the only live member (no routing needed)."""
        return len(self.ring) <= 1

    def forward(self, address: str, frames: list[bytes]) -> bool:
        """Send a client's request (its routing stack first) to the owner at ``address``;
        False when that peer cannot take it now (not connected, or at its HWM)."""
        ok = self._send_raw(address, frames)
        if ok:
            self.forwarded += 1
        else:
            self.unreachable += 1
        return ok

    def peer_sockets(self) -> dict[zmq.Socket[bytes], str]:
        return self._peer_of

    def accepts_from(self, address: str) -> bool:
        """False for a peer on the other side of an injected partition."""
        return self.faults is None or address not in self.faults.plan.partition

    def leave(self) -> None:
        self._send_all(self.membership.leave(self._clock()))
        self._after_change()

    def left(self) -> None:
        self._send_all(self.membership.left(self._clock()))
        self._after_change()

    def set_faults(self, raw: Any) -> dict[str, Any]:
        if self.faults is None:
            raise PermissionError("this node was not started with --fault-injection")
        self.faults.plan = FaultPlan.from_dict(raw)
        return self.faults.statistics()

    def close(self) -> None:
        for sock in self._peers.values():
            self._poller.unregister(sock)
            sock.close(0)
        self._peers.clear()
        self._peer_of.clear()

    # --- the view -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self._clock()
        shares = self.ring.shares()
        members = [
            {
                "node": str(m.node_id),
                "address": m.node_id.address,
                "incarnation": m.node_id.incarnation,
                "state": m.state.value,
                "version": m.version,
                "since_s": round(max(0.0, now - m.since), 3),
                "share": round(shares.get(m.node_id.address, 0.0), 4),
                "weight": self.registry.weight(m.node_id.address),
                "self": m.node_id == self.me,
            }
            for m in self.membership.members()
        ]
        stats = self.membership.statistics()
        return {
            "me": str(self.me),
            "state": self.membership.state.value,
            "members": members,
            "ring": {"vnodes": self.vnodes, "members": len(self.ring)},
            "forwarded": self.forwarded,
            "unreachable": self.unreachable,
            "bad_messages": self.bad_messages,
            "membership": dataclasses.asdict(stats),
            "faults": None if self.faults is None else self.faults.statistics(),
        }

    # --- internals ------------------------------------------------------------------------

    def _after_change(self) -> None:
        events = self.membership.events()
        if not events:
            return
        self.changes += len(events)
        for event in events:
            log.info("member %s: %s -> %s", event.node, event.old, event.new)
        self._rebuild()

    def _rebuild(self) -> None:
        alive = {n.address: n for n in self.membership.alive()}
        if self.membership.state is not MemberState.REMOVED:
            alive.setdefault(self.me.address, self.me)  # joining: serve alone until up
        members = {address: self.registry.weight(address) for address in alive}
        if members != dict(self.ring.members):
            self.ring = Ring(members, vnodes=self.vnodes)
        # A peer socket per member we may talk to; drop those of forgotten members.
        known = {m.node_id.address: m for m in self.membership.members()}
        for address in list(self._peers):
            member = known.get(address)
            if member is None or member.state is MemberState.REMOVED:
                self._close_peer(address)

    def _send_all(self, out: list[Outgoing]) -> None:
        for item in out:
            try:
                payload = pack(item.message)
            except (TypeError, ValueError, OverflowError):
                log.exception("cannot encode a membership message")
                continue
            self._send_raw(item.address, [b"", self._header, payload])

    def _send_raw(self, address: str, frames: list[bytes]) -> bool:
        if address == self.me.address:
            return False
        copies = [frames] if self.faults is None else self.faults.outgoing(address, frames)
        sock = self._peer(address)
        ok = True
        for copy in copies:
            try:
                sock.send_multipart(copy, zmq.NOBLOCK)
            except zmq.Again:
                ok = False  # not connected yet (IMMEDIATE) or at the HWM
        return ok

    def _peer(self, address: str) -> zmq.Socket[bytes]:
        sock = self._peers.get(address)
        if sock is None:
            sock = make_dealer(self._ctx, identity=self.routing_id)
            sock.connect(address)
            self._peers[address] = sock
            self._peer_of[sock] = address
            self._poller.register(sock, zmq.POLLIN)
        return sock

    def _close_peer(self, address: str) -> None:
        sock = self._peers.pop(address)
        del self._peer_of[sock]
        self._poller.unregister(sock)
        sock.close(0)
