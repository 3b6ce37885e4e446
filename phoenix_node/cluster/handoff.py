"""Handoff: a node serves an agent it did not hold before a ring change only once it
has fetched the agent's state from the nodes that held it.

Run by the control process, next to the :class:`~.replication.Replicator`.
After every change of the ring, and for ``window`` seconds, each request this
node is about to serve (ASK, TELL, or a BATCH: every entry's agent) is checked:
an agent this node was not in the preference list of before the change (the
previous ring; for a node that was alone, joining, the new ring without
itself) is *new here*. A request for a new agent is held while the control
process asks the agent's previous holders that are still alive for its state
(``replica.fetch``, an ADMIN request over the peer DEALERs, answered from the
peer's store). The answers are merged into the local worker (``_merge``, the
same reserved action replication uses) before the held requests go to it, on
the same socket, so the worker merges first. No holder answers within
``timeout``: the requests are served anyway (counted; anti-entropy repairs
the state later, by CRDT merge, so nothing written is lost, a read may be
stale meanwhile).

The window bounds the cost: outside it, requests pass without a look. Within
it, anti-entropy (run 0.2 s after the ring change on every node) has brought
the state already, so ``window`` only needs to cover a round of it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ipc.protocol import (
    ADMIN,
    REPLY,
    ProtocolError,
    decode_reply_kind,
    encode_request,
    pack,
    split_envelope,
    unpack,
)
from phoenix_node.state.store import Store, StoreError

from ._corr import HANDOFF, CorrIds
from .ring import Ring
from .service import ClusterService

__all__ = ["FETCH_ACTION", "Handoff"]

log = logging.getLogger("phoenix.handoff")

#: The ADMIN operation a control process sends a peer for agents' states.
FETCH_ACTION = "replica.fetch"
_MAX_FETCH = 1000  # agent ids per fetch request
_MAX_WAITING = 100_000  # requests held at most; beyond, served without waiting


@dataclass
class _Waiter:
    """Requests held until the agents in ``missing`` have been fetched."""

    missing: set[str]
    run: Callable[[], None]


@dataclass
class _Fetch:
    """Fetch requests for one set of agents: the peers not answered yet."""

    agents: list[str]
    deadline: float
    waiting: set[int] = field(default_factory=set)  # corr ids of holders not answered yet
    states: list[tuple[str, bytes]] = field(default_factory=list)


class Handoff:
    """Holds requests for agents new to this node until their state was fetched."""

    def __init__(
        self,
        store: Store,
        cluster: ClusterService,
        *,
        replicas: int,
        merge_local: Callable[[list[tuple[str, bytes]]], None],
        window: float = 10.0,
        timeout: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.cluster = cluster
        self.replicas = replicas
        self.window = window
        self.timeout = timeout
        self._merge_local = merge_local
        self._clock = clock
        self._ring = cluster.ring
        self._before: Ring | None = None  # the ring whose holders we fetch from
        self._until = 0.0  # end of the window
        self._fetched: set[str] = set()
        self._fetching: dict[str, _Fetch] = {}  # agent id -> its fetch in progress
        self._corrs: dict[int, _Fetch] = {}
        self._waiting: dict[str, list[_Waiter]] = {}
        self._held = 0
        self.ids = CorrIds(HANDOFF)
        self.fetches = 0  # fetch requests sent
        self.fetched = 0  # agents fetched
        self.states = 0  # states received and merged
        self.timeouts = 0  # fetches given up (served without every holder's answer)

    # --- the control's calls --------------------------------------------------------------

    def active(self) -> bool:
        """Whether requests must be checked (a ring change less than ``window`` ago)."""
        if self.cluster.ring is not self._ring:
            self._changed()
        return self._before is not None and self._clock() < self._until

    def hold(self, agent_ids: list[str], run: Callable[[], None]) -> bool:
        """True when the request (``run`` serves it) waits for agents new here; the
        caller checked :meth:`active`."""
        if self._held >= _MAX_WAITING:
            return False
        missing = {a for a in agent_ids if self._new_here(a)}
        if not missing:
            return False
        waiter = _Waiter(missing, run)
        for agent_id in missing:
            self._waiting.setdefault(agent_id, []).append(waiter)
        self._held += 1
        self._fetch([a for a in missing if a not in self._fetching])
        return True

    def on_fetch(self, payload: bytes) -> list[list[Any]]:
        """A peer asks for states (``[agent_id, ...]``): ``[[agent_id, state], ...]`` for
        those this node's store holds."""
        ids = unpack(payload)
        if not isinstance(ids, list) or len(ids) > _MAX_FETCH:
            raise ProtocolError(f"a fetch is an array of at most {_MAX_FETCH} agent ids")
        if not all(isinstance(i, str) and i for i in ids):
            raise ProtocolError("a fetch names agents by their id (non-empty strings)")
        try:
            found = self.store.load_states(ids)
        except StoreError as exc:
            raise ProtocolError(f"cannot read the store: {exc}") from None
        return [[agent_id, state] for agent_id, state in found.items()]

    def on_reply(self, frames: list[bytes]) -> bool:
        """True if the frames answer one of our fetches (consumed)."""
        try:
            _, header, payload = split_envelope(frames)
            kind, corr, status = decode_reply_kind(header)
        except ProtocolError:
            return False
        fetch = self._corrs.pop(corr, None) if kind == REPLY else None
        if fetch is None:
            return self.ids.owns(corr)  # a late answer to a fetch given up: drop it
        fetch.waiting.discard(corr)
        if status == 0:
            try:
                fetch.states.extend(_states(unpack(payload), set(fetch.agents)))
            except ProtocolError as exc:
                log.warning("bad fetch answer: %s", exc)
        if not fetch.waiting:
            self._done(fetch)
        return True

    def next_deadline(self) -> float:
        if not self._corrs:
            return float("inf")
        return min(f.deadline for f in self._corrs.values())

    def tick(self) -> None:
        now = self._clock()
        late = {id(f): f for f in self._corrs.values() if f.deadline <= now}
        for fetch in late.values():
            for corr in fetch.waiting:
                self._corrs.pop(corr, None)
            fetch.waiting.clear()
            self.timeouts += 1
            log.warning("no answer to a handoff fetch of %d agents in time", len(fetch.agents))
            self._done(fetch)

    def status(self) -> dict[str, Any]:
        return {
            "active": self._before is not None and self._clock() < self._until,
            "held": self._held,
            "fetches": self.fetches,
            "fetched": self.fetched,
            "states": self.states,
            "timeouts": self.timeouts,
        }

    # --- internals ------------------------------------------------------------------------

    def _changed(self) -> None:
        before, ring = self._ring, self.cluster.ring
        self._ring = ring
        me = self.cluster.me.address
        if len(ring) <= 1:
            self._before = None  # alone: nothing to fetch from
            return
        if len(before) <= 1:
            # This node was alone (joining, or the cluster's first node): the agents'
            # holders are the others, as the ring places them without this node.
            before = ring.without_member(me)
        self._before = before
        self._until = self._clock() + self.window
        self._fetched.clear()

    def _new_here(self, agent_id: str) -> bool:
        before = self._before
        if before is None or agent_id in self._fetched:
            return False
        me = self.cluster.me.address
        return me not in self.cluster.preference(agent_id, self.replicas + 1, before)

    def _fetch(self, agent_ids: list[str]) -> None:
        before = self._before
        if before is None:
            return
        me = self.cluster.me.address
        alive = self.cluster.ring.members
        by_peers: dict[tuple[str, ...], list[str]] = {}
        for agent_id in agent_ids:
            prefs = self.cluster.preference(agent_id, self.replicas + 1, before)
            holders = tuple(p for p in prefs if p != me and p in alive)
            by_peers.setdefault(holders, []).append(agent_id)
        deadline = self._clock() + self.timeout
        for holders, ids in by_peers.items():
            for i in range(0, len(ids), _MAX_FETCH):
                chunk = ids[i : i + _MAX_FETCH]
                fetch = _Fetch(chunk, deadline)
                for agent_id in chunk:
                    self._fetching[agent_id] = fetch
                for peer in holders:
                    corr = self.ids.next()
                    frames = [b"", encode_request(ADMIN, corr, "", FETCH_ACTION), pack(chunk)]
                    if self.cluster.forward(peer, frames):
                        fetch.waiting.add(corr)
                        self._corrs[corr] = fetch
                        self.fetches += 1
                if not fetch.waiting:
                    self._done(fetch)  # no holder alive or reachable: serve as is

    def _done(self, fetch: _Fetch) -> None:
        if fetch.states:
            self._merge_local(fetch.states)
            self.states += len(fetch.states)
        for agent_id in fetch.agents:
            if self._fetching.get(agent_id) is fetch:
                del self._fetching[agent_id]
            self._fetched.add(agent_id)
            self.fetched += 1
            for waiter in self._waiting.pop(agent_id, ()):
                waiter.missing.discard(agent_id)
                if not waiter.missing:
                    self._held -= 1
                    waiter.run()


def _states(raw: Any, asked: set[str]) -> list[tuple[str, bytes]]:
    if not isinstance(raw, list):
        raise ProtocolError("a fetch answer must be an array")
    out = []
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or item[0] not in asked
            or not isinstance(item[1], bytes)
        ):
            raise ProtocolError("a fetch answer item must be [agent id asked for, bytes]")
        out.append((item[0], item[1]))
    return out
