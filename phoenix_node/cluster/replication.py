"""Replication of agent state between nodes, run by the control process.

Each agent's state lives on its owner and on the next ``replicas`` distinct
nodes clockwise on the ring (its preference list). Agent states are CRDT
records, so a replica never needs to know which copy is newer: it merges
what it gets (the worker's reserved action ``_merge``), and merging the same
state twice, or in any order, changes nothing.

Shipping (eventual; the change log is a transactional outbox)
    While the node has peers, every worker commit also writes the ids of the
    agents it changed into the ``repl`` db, in the same LMDB transaction as
    the states (value: a stamp unique to that commit). Each loop turn the
    :class:`Replicator` reads up to ``batch`` logged ids, reads their
    committed states and sends each alive member of the preference list
    (except this node) one BATCH of ``_merge`` ASKs, over the peer DEALER the
    membership protocol already uses. The receiving control process hands
    the batch to its workers like any request; a worker merges and commits
    before it answers. When every target answered ok, the log entry is
    deleted if its stamp is unchanged (compare-and-delete: a commit made
    meanwhile logged the agent again and is shipped again). No answer within
    ``timeout`` seconds: shipped again. A final error (the target does not
    know the agent type): counted and given up for that target.

    A write is acknowledged to its client after the owner's commit, before it
    is shipped: a node that dies within the shipping delay (one loop turn plus
    a round trip, milliseconds when the peers are up) takes its last writes
    with it until it comes back; the ``pending`` figure of the status is that
    window. Synchronous replication is the strong-consistency issue's job.

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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ipc.protocol import (
    ADMIN,
    ASK,
    REPLY,
    RETRYABLE,
    ProtocolError,
    decode_reply_kind,
    encode_batch_header,
    encode_entry,
    encode_request,
    join_entries,
    pack,
    reply_items,
    split_envelope,
    unpack,
)
from phoenix_node.state.store import Store, StoreError
from workers.host import MERGE_ACTION, REPLICATE_KEY

from .service import ClusterService

__all__ = ["DIGEST_ACTION", "Replicator", "state_digest"]

log = logging.getLogger("phoenix.replication")

#: The ADMIN operation a control process sends a peer with state digests.
DIGEST_ACTION = "replica.digest"
_DIGESTS_PER_MESSAGE = 2000
_SHIP_INTERVAL = 0.01  # seconds between shipping turns while changes wait


def state_digest(state: bytes) -> bytes:
    """8 bytes that differ, but for a 2**-64 chance, when two state records differ."""
    return hashlib.blake2b(state, digest_size=8).digest()


@dataclass
class _Flight:
    """One logged change being shipped: the stamp read with it, the corr ids not answered."""

    stamp: bytes
    deadline: float
    waiting: set[int] = field(default_factory=set)
    failed: bool = False


class Replicator:
    """Ships logged state changes to replicas and runs anti-entropy (module docstring)."""

    def __init__(
        self,
        store: Store,
        cluster: ClusterService,
        *,
        replicas: int = 2,
        anti_entropy_interval: float = 30.0,
        batch: int = 256,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.cluster = cluster
        self.replicas = replicas
        self.anti_entropy_interval = anti_entropy_interval
        self.batch = batch
        self.timeout = timeout
        self._clock = clock
        self._flag: bool | None = None
        self._flights: dict[str, _Flight] = {}
        self._corrs: dict[int, str] = {}  # corr of a _merge ASK -> agent id
        self._digest_corrs: dict[int, str] = {}  # corr of a digest ADMIN -> peer address
        self._ids = itertools.count(1)
        self._ring = cluster.ring
        self._next_anti_entropy = clock() + anti_entropy_interval
        self._next_ship = 0.0
        self.shipped = 0  # states sent (one per target)
        self.acked = 0  # logged changes on every target
        self.rejected = 0  # final errors from a target
        self.expired = 0  # flights without every answer in time
        self.anti_entropy_rounds = 0
        self.repairs_sent = 0  # ids a peer reported different, shipped from here
        self.repairs_asked = 0  # ids this node reported different to a peer

    # --- the loop's calls -----------------------------------------------------------------

    def next_deadline(self) -> float:
        """When :meth:`tick` has work: now while changes wait, else the next anti-entropy."""
        if self._flag and (self._flights or self._has_log()):
            return min(self._next_ship, self._next_anti_entropy)
        return self._next_anti_entropy

    def tick(self) -> None:
        now = self._clock()
        self._next_ship = now + _SHIP_INTERVAL
        alone = self.cluster.single()
        self._set_flag(not alone)
        if alone:
            return
        if self.cluster.ring is not self._ring:
            self._ring = self.cluster.ring
            self._next_anti_entropy = min(self._next_anti_entropy, now + 0.2)
        self._expire(now)
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

    def status(self) -> dict[str, Any]:
        return {
            "replicas": self.replicas,
            "pending": self._log_size(),
            "in_flight": len(self._flights),
            "shipped": self.shipped,
            "acked": self.acked,
            "rejected": self.rejected,
            "expired": self.expired,
            "anti_entropy_rounds": self.anti_entropy_rounds,
            "repairs_sent": self.repairs_sent,
            "repairs_asked": self.repairs_asked,
        }

    # --- shipping -------------------------------------------------------------------------

    def _targets(self, agent_id: str) -> list[str]:
        me = self.cluster.me.address
        prefs = self.cluster.ring.preference(agent_id, self.replicas + 1)
        return [address for address in prefs if address != me]

    def _ship(self, now: float) -> None:
        groups: dict[str, list[bytes]] = {}
        hints: dict[str, str] = {}
        finished: list[tuple[bytes, bytes]] = []
        taken = 0
        for key, stamp in self._read_log():
            agent_id = key.decode(errors="replace")
            if agent_id in self._flights:
                continue
            if taken >= self.batch:
                break
            taken += 1
            state = self.store.load_state(agent_id)
            targets = self._targets(agent_id)
            if state is None or not targets:
                finished.append((key, stamp))  # nothing to ship, or no one to ship to
                continue
            flight = self._flights[agent_id] = _Flight(stamp, now + self.timeout)
            for target in targets:
                corr = next(self._ids)
                flight.waiting.add(corr)
                self._corrs[corr] = agent_id
                entry = encode_entry(ASK, corr, agent_id, MERGE_ACTION, 0, None, state)
                groups.setdefault(target, []).append(entry)
                hints[target] = agent_id
        for target, entries in groups.items():
            frames = [b"", encode_batch_header(None, hints[target]), join_entries(entries)]
            if self.cluster.forward(target, frames):
                self.shipped += len(entries)
        self._delete(finished)

    def _on_result(self, corr: int, status: int) -> None:
        agent_id = self._corrs.pop(corr, None)
        if agent_id is None:
            return  # a late answer to an expired flight
        flight = self._flights.get(agent_id)
        if flight is None:
            return
        if status in RETRYABLE:
            return  # shipped again once the flight expires
        if status != 0:
            self.rejected += 1
            log.warning("a replica refused the state of %s (status %d)", agent_id, status)
        flight.waiting.discard(corr)
        if not flight.waiting:
            del self._flights[agent_id]
            self.acked += 1
            self._delete([(agent_id.encode(), flight.stamp)])

    def _expire(self, now: float) -> None:
        late = [a for a, f in self._flights.items() if f.deadline <= now]
        for agent_id in late:
            flight = self._flights.pop(agent_id)
            for corr in flight.waiting:
                self._corrs.pop(corr, None)
            self.expired += 1

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
                corr = next(self._ids)
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
        batch.put("meta", REPLICATE_KEY, b"1" if on else b"0")
        try:
            self.store.commit(batch)
            self._flag = on
        except StoreError as exc:
            log.error("cannot switch replication logging %s: %s", "on" if on else "off", exc)

    def _log(self, agent_ids: list[str]) -> None:
        if not agent_ids:
            return
        batch = self.store.batch()
        stamp = b"ae%d" % next(self._ids)
        for agent_id in agent_ids:
            batch.put("repl", agent_id.encode(), stamp)
        try:
            self.store.commit(batch)
        except StoreError as exc:
            log.error("cannot log %d agents for replication: %s", len(agent_ids), exc)

    def _read_log(self) -> Iterator[tuple[bytes, bytes]]:
        return self.store.iter_items("repl")

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
