"""Migration: moving a live agent to another node, by hand (``migrate(agent, node)``).

The agent's current owner (the "source") runs the move; a request to migrate that
reaches another node is forwarded to the owner first. The steps:

1. **Drain.** From now on the source's control process buffers every request for
   the agent (a client's, or one a peer forwarded). It asks the worker that hosts
   the agent to release it (reserved action ``_release``): the worker stops the
   agent (``on_stop``) and answers with its state record once every earlier
   message for the agent is handled and committed, since replies leave after the
   commit. The release reply is therefore a barrier: nothing for the agent is
   left in the source's worker, and the state holds every acknowledged write.
2. **Transfer.** The source sends the state to the target's control process
   (ADMIN ``migration.accept``, over the peer DEALER) with the registry write
   that places the agent on the target. The target merges the state into its
   own worker (an ASK of ``_merge``: committed before its answer), logs the agent
   for replication to its new replicas, applies the placement to its registry,
   and answers.
3. **Switch.** The source applies the placement too; the registry's gossip
   spreads it to every node within a round trip. The buffered requests are
   routed again, now to the target (forwarded on the source's peer DEALER; the
   target serves them after the merge). The client gets
   ``{"agent", "from", "to", "buffered", "seconds"}``.

Guarantees: no request is lost or handled twice. A request reaches the source's
worker before the barrier (handled there, its effect in the transferred state) or
is buffered and forwarded after the switch (handled on the target, after the
merge). Requests that still reach the source after the switch, from nodes whose
registry copy has not caught up, are forwarded to the target (at most two hops in
all). Agent states are CRDTs, so a merge never loses what the target held.

Failure: when the worker or the target does not answer within ``timeout``, or the
target refuses, the move is aborted. The client gets an UNAVAILABLE error, and the
buffered requests are served where the agent was. If the target might already have
applied the placement (it answered after the timeout), the source writes the
placement the agent had before again, with a newer timestamp, so that every copy of
the registry agrees on it.

A migrated agent stays placed on its node (a pin) while that node is alive; when it
is not, the ring decides, until it is back. ``unpin`` moves the agent to the node the
ring gives it and removes its placement.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ipc.protocol import (
    ADMIN,
    ASK,
    REPLY,
    ErrorCode,
    ProtocolError,
    decode_reply_kind,
    encode_request,
    pack,
    split_envelope,
    unpack,
)
from workers.host import MERGE_ACTION, RELEASE_ACTION

from ._corr import MIGRATION, CorrIds
from .registry import Registry, RegistryError

__all__ = ["ACCEPT_ACTION", "MigrationError", "Migrator"]

log = logging.getLogger("phoenix.migration")

#: The ADMIN operation a migration's source sends its target with the agent's state.
ACCEPT_ACTION = "migration.accept"
_MAX_BUFFERED = 100_000  # requests buffered per move at most; beyond, refused

#: ``reply(status, body)``: answers the request that started the move
Reply = Callable[[int, Any], None]


class MigrationError(ValueError):
    """A migration that cannot start (bad agent or node, already moving)."""


@dataclass
class _Move:
    agent: str
    target: str
    place: bytes  # the registry write applied once the target holds the state
    before: str | None  # the agent's placement before the move
    reply: Reply
    started: float
    deadline: float
    corr: int
    phase: str = "release"  # then "accept"
    buffered: list[Callable[[], None]] = field(default_factory=list)


@dataclass
class _Accept:
    agent: str
    place: bytes
    reply: Reply
    deadline: float


class Migrator:
    """The moves this node runs as a source, and the states it accepts as a target."""

    def __init__(
        self,
        me: str,
        registry: Registry,
        *,
        alive: Callable[[], Any],
        to_worker: Callable[[str, list[bytes]], bool],
        to_peer: Callable[[str, list[bytes]], bool],
        replicate: Callable[[list[str]], None] | None = None,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.me = me
        self.registry = registry
        self.timeout = timeout
        self._alive = alive
        self._to_worker = to_worker
        self._to_peer = to_peer
        self._replicate = replicate
        self._clock = clock
        self._moves: dict[str, _Move] = {}  # agent id -> its move from here
        self._by_corr: dict[int, _Move] = {}
        self._accepts: dict[int, _Accept] = {}  # corr of our _merge ASK -> the accept
        self.ids = CorrIds(MIGRATION)
        self.moved = 0  # moves completed from here
        self.aborted = 0
        self.accepted = 0  # agents moved here
        self.buffered = 0  # requests buffered during moves
        self.refused = 0  # requests refused: a move's buffer was full

    # --- the source -------------------------------------------------------------------------

    def start(self, agent_id: str, target: str, reply: Reply, *, unpin: bool = False) -> None:
        """Move ``agent_id``, owned here, to the node at ``target``; with ``unpin`` its
        placement is removed instead of set to the target. ``reply`` answers later."""
        if not isinstance(agent_id, str) or "/" not in agent_id:
            raise MigrationError(f"an agent id is '<Type>/<key>', not {agent_id!r:.80}")
        if agent_id in self._moves:
            raise MigrationError(f"{agent_id} is already moving")
        before = self.registry.placement(agent_id)
        if target == self.me:
            if unpin and before is not None:
                self.registry.merge(self.registry.prepare_placement(agent_id, None))
            reply(0, {"agent": agent_id, "from": self.me, "to": self.me, "moved": False})
            return
        if target not in self._alive():
            raise MigrationError(f"{target!r} is not a live member of the cluster")
        try:
            place = self.registry.prepare_placement(agent_id, None if unpin else target)
        except RegistryError as exc:
            raise MigrationError(str(exc)) from None
        now = self._clock()
        corr = self.ids.next()
        move = _Move(agent_id, target, place, before, reply, now, now + self.timeout, corr)
        self._moves[agent_id] = move
        self._by_corr[corr] = move
        frames = [b"", encode_request(ASK, corr, agent_id, RELEASE_ACTION), b""]
        if not self._to_worker(agent_id, frames):
            self._abort(move, "its worker is not accepting messages")

    def has_moves(self) -> bool:
        return bool(self._moves)

    def buffer(
        self, agent_ids: list[str], run: Callable[[], None], refuse: Callable[[], None]
    ) -> bool:
        """True when a request for ``agent_ids`` waits for a move (``run`` routes it again
        once the move ends; ``refuse`` answers it when the buffer is full)."""
        for agent_id in agent_ids:
            move = self._moves.get(agent_id)
            if move is not None:
                if len(move.buffered) >= _MAX_BUFFERED:
                    self.refused += 1
                    refuse()
                else:
                    move.buffered.append(run)
                    self.buffered += 1
                return True
        return False

    # --- the target -------------------------------------------------------------------------

    def on_accept(self, payload: bytes, reply: Reply) -> None:
        """A source's ``migration.accept`` (``{"agent", "state", "place"}``): the state is
        merged into the worker, then the placement applied, then ``reply`` answers."""
        message = unpack(payload)
        if not isinstance(message, dict):
            raise ProtocolError("a migration accept is a map")
        agent_id, state, place = message.get("agent"), message.get("state"), message.get("place")
        if not isinstance(agent_id, str) or "/" not in agent_id:
            raise ProtocolError("a migration accept names an agent '<Type>/<key>'")
        if not isinstance(place, bytes) or not (state is None or isinstance(state, bytes)):
            raise ProtocolError("a migration accept carries bytes: place and state (or nil)")
        Registry.check_placement_write(agent_id, place)
        accept = _Accept(agent_id, place, reply, self._clock() + self.timeout)
        if state is None:  # the agent has no state yet: nothing to merge
            self._accepted(accept)
            return
        corr = self.ids.next()
        frames = [b"", encode_request(ASK, corr, agent_id, MERGE_ACTION), state]
        if not self._to_worker(agent_id, frames):
            reply(ErrorCode.UNAVAILABLE, "the agent's worker here is not accepting messages")
            return
        self._accepts[corr] = accept

    # --- answers ----------------------------------------------------------------------------

    def on_worker_reply(self, frames: list[bytes]) -> bool:
        """True if the frames answer a release or a merge of ours (consumed)."""
        found = _decode(frames)
        if found is None:
            return False
        corr, status, payload = found
        accept = self._accepts.pop(corr, None)
        if accept is not None:
            if status == 0:
                self._accepted(accept)
            else:
                accept.reply(status, f"the merge failed: {_message(payload)}")
            return True
        move = self._by_corr.pop(corr, None)
        if move is None or move.phase != "release":
            return True  # late: the move was aborted
        if status != 0:
            self._abort(move, f"its worker could not release it: {_message(payload)}")
            return True
        try:
            state = unpack(payload) if payload else None
        except ProtocolError:
            state = False
        if not (state is None or isinstance(state, bytes)):
            self._abort(move, "its worker's release answer is unreadable")
            return True
        move.phase = "accept"
        move.corr = self.ids.next()
        self._by_corr[move.corr] = move
        move.deadline = self._clock() + self.timeout
        body = {"agent": move.agent, "state": state, "place": move.place}
        request = [b"", encode_request(ADMIN, move.corr, "", ACCEPT_ACTION), pack(body)]
        if not self._to_peer(move.target, request):
            self._abort(move, "the target node is not reachable")
        return True

    def on_peer_reply(self, frames: list[bytes]) -> bool:
        """True if the frames answer one of our accepts (consumed)."""
        found = _decode(frames)
        if found is None:
            return False
        corr, status, payload = found
        move = self._by_corr.get(corr)
        if move is None or move.phase != "accept":
            return True  # late: the move was aborted (its placement written back)
        del self._by_corr[corr]
        if status != 0:
            self._abort(move, f"the target refused it: {_message(payload)}")
            return True
        self.registry.merge(move.place)
        self.moved += 1
        elapsed = self._clock() - move.started
        log.info("moved %s to %s in %.1f ms", move.agent, move.target, elapsed * 1000)
        self._end(move)
        move.reply(
            0,
            {
                "agent": move.agent,
                "from": self.me,
                "to": move.target,
                "moved": True,
                "buffered": len(move.buffered),
                "seconds": round(elapsed, 6),
            },
        )
        self._release(move)
        return True

    # --- the loop's calls -------------------------------------------------------------------

    def next_deadline(self) -> float:
        deadlines = [m.deadline for m in self._moves.values()]
        deadlines.extend(a.deadline for a in self._accepts.values())
        return min(deadlines, default=float("inf"))

    def tick(self) -> None:
        now = self._clock()
        for move in [m for m in self._moves.values() if m.deadline <= now]:
            self._abort(move, f"no answer within {self.timeout:g} s")
        for corr in [c for c, a in self._accepts.items() if a.deadline <= now]:
            accept = self._accepts.pop(corr)
            accept.reply(ErrorCode.UNAVAILABLE, "the merge was not answered in time")

    def status(self) -> dict[str, Any]:
        return {
            "moving": sorted(self._moves),
            "moved": self.moved,
            "aborted": self.aborted,
            "accepted": self.accepted,
            "buffered": self.buffered,
            "refused": self.refused,
        }

    # --- internals --------------------------------------------------------------------------

    def _accepted(self, accept: _Accept) -> None:
        try:
            self.registry.merge(accept.place)
        except ProtocolError as exc:
            accept.reply(ErrorCode.BAD_REQUEST, f"bad placement: {exc}")
            return
        if self._replicate is not None:
            self._replicate([accept.agent])  # its new replicas get the state
        self.accepted += 1
        accept.reply(0, {"agent": accept.agent, "node": self.me})

    def _abort(self, move: _Move, why: str) -> None:
        self.aborted += 1
        if move.phase == "accept":
            # The target may apply the placement after all: write the old one again,
            # newer, so that every copy of the registry agrees the agent stayed here.
            try:
                self.registry.merge(self.registry.prepare_placement(move.agent, move.before))
            except RegistryError as exc:
                log.error("cannot write the placement of %s back: %s", move.agent, exc)
        self._end(move)
        log.warning("moving %s to %s failed: %s", move.agent, move.target, why)
        move.reply(
            ErrorCode.UNAVAILABLE,
            f"moving {move.agent} to {move.target} failed: {why}; it stays on {self.me}",
        )
        self._release(move)

    def _end(self, move: _Move) -> None:
        self._moves.pop(move.agent, None)
        self._by_corr.pop(move.corr, None)

    def _release(self, move: _Move) -> None:
        for run in move.buffered:
            run()


def _decode(frames: list[bytes]) -> tuple[int, int, bytes] | None:
    """``(corr, status, payload)`` of a reply to one of our requests, else None."""
    try:
        _, header, payload = split_envelope(frames)
        kind, corr, status = decode_reply_kind(header)
    except ProtocolError:
        return None
    if kind != REPLY or not MIGRATION[0] <= corr < MIGRATION[1]:
        return None
    return corr, status, payload


def _message(payload: bytes) -> str:
    try:
        body = unpack(payload)
    except ProtocolError:
        return "unreadable error"
    if isinstance(body, dict):
        return str(body.get("message", body))
    return str(body)
