"""The agent host: activation, dispatch, group commit and passivation.

One :class:`AgentHost` lives in each worker process and owns the agents whose
ids hash to that worker. It is driven by the worker loop, one batch at a time:

1. :meth:`AgentHost.handle` runs one message: the agent is activated if needed
   (state loaded from LMDB, ``on_start`` called), then the action runs.
2. :meth:`AgentHost.commit` writes the state of every agent changed during the
   batch in ONE LMDB write transaction (group commit). Only after it returns
   does the worker send the batch's replies, so a reply means "durable".
3. :meth:`AgentHost.passivate_idle` stops agents idle past their timeout
   (``on_stop``, commit, drop from memory; the state stays in LMDB), and the
   number of active agents is capped (least recently used first).

Nothing here touches sockets: messages in and out are plain Python values.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from ipc.protocol import ErrorCode, pack, unpack
from phoenix_node.state import AgentState, DecodeError, StateError, StoreError
from phoenix_node.state.store import Store, WriteBatch

from .agent import Agent
from .replog import delta_entry, entry_key, whole_entry

__all__ = [
    "MERGE_ACTION",
    "RELEASE_ACTION",
    "REPLICATE_DELTAS",
    "REPLICATE_KEY",
    "REPLICATE_OFF",
    "REPLICATE_WHOLE",
    "AgentContext",
    "AgentHost",
    "Outgoing",
]

log = logging.getLogger("phoenix.worker")

#: The reserved action that merges a replica's state record into an agent's (no user
#: action can have this name: action names never start with "_").
MERGE_ACTION = "_merge"
#: The reserved action a migration sends the agent's old owner: the agent is stopped
#: (``on_stop``) and its state record returned (None: no state yet). The reply comes
#: after the commit that holds every earlier message's effect, like every reply.
RELEASE_ACTION = "_release"
#: ``meta`` key the control process sets while the node has peers to replicate to: its
#: value says what commits log (:mod:`workers.replog`).
REPLICATE_KEY = b"cluster.replicate"
REPLICATE_OFF = b"0"  #: alone: commits log nothing
REPLICATE_WHOLE = b"1"  #: commits log "ship the whole state" (replication_deltas off)
REPLICATE_DELTAS = b"2"  #: commits log their deltas, joined with any not shipped yet
_REPL_STAMP = struct.Struct(">IQ")  # pid, commit sequence: tells one logged change from another

OK = 0


#: an outgoing message of an agent: (kind, subject, action, payload, delivery, sender id,
#: extra attrs or None)
Outgoing = tuple[int, str, str, bytes, int, str, dict[str, Any] | None]


class AgentContext:
    """What an agent reaches of its worker: the replica id and outgoing messages."""

    __slots__ = ("_outgoing", "replica", "sender")

    def __init__(self, replica: str, outgoing: deque[Outgoing]) -> None:
        self.replica = replica
        self._outgoing = outgoing
        self.sender = ""  # the agent whose action is running (set by the host)

    def send(
        self,
        kind: int,
        subject: str,
        action: str,
        kwargs: Any,
        delivery: int,
        extra: dict[str, Any] | None = None,
    ) -> None:
        # Packed now: the receiver gets a copy (no state shared between agents), and a
        # value msgpack cannot carry fails in the sending action, where it belongs.
        self._outgoing.append((kind, subject, action, pack(kwargs), delivery, self.sender, extra))


class _ActivationFailed(Exception):
    def __init__(self, code: int, payload: dict[str, Any]) -> None:
        super().__init__(payload["message"])
        self.code = code
        self.payload = payload


def error_payload(
    code: int, message: str, agent: str = "", action: str = "", exc_type: str = ""
) -> dict[str, Any]:
    """The payload of an error reply (see :mod:`ipc.protocol`)."""
    return {
        "code": int(code),
        "message": message,
        "agent": agent,
        "action": action,
        "type": exc_type,
    }


class AgentHost:
    """Hosts the agents of one worker process."""

    def __init__(
        self,
        types: dict[str, type[Agent]],
        store: Store,
        replica: str,
        *,
        idle_timeout: float = 300.0,
        max_active: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.types = types
        self.store = store
        self.idle_timeout = idle_timeout
        self.max_active = max_active
        self.clock = clock
        self.outgoing: deque[Outgoing] = deque()
        self.context = AgentContext(replica, self.outgoing)
        # Insertion order is least-recently-used first: an agent is re-inserted on use.
        self.active: dict[str, Agent] = {}
        self._last_used: dict[str, float] = {}
        self._touched: dict[str, Agent] = {}
        self._timeouts = {
            name: (cls.idle_timeout if cls.idle_timeout is not None else idle_timeout)
            for name, cls in types.items()
        }
        self.handled = 0
        self.failed = 0
        self.activations = 0
        self.passivations = 0
        self.commits = 0
        # Replication (phoenix_node/cluster/replication.py): while the node has peers,
        # each commit also logs the agents it changed into the ``repl`` db, in the
        # same transaction, with their deltas (workers/replog.py); the control process
        # ships them to the agents' replicas. States merged in from a replica are not
        # logged again. Agents track deltas only while deltas are logged.
        self.replicate = False
        self.deltas = False
        # Active agents whose next logged change must be the whole state: activated
        # (what they hold may include merges a replica lacks), or changed by a merge.
        self._whole_next: set[str] = set()
        self._replicate_checked = -1.0
        self._merged: dict[str, AgentState] = {}  # merged into agents not active here
        self._merged_bytes: dict[str, bytes] = {}  # their encodings, saved at the commit
        # Committed states of agents this worker only holds replicas of, decoded, with
        # their stored bytes: the next merge skips the load and decode (only this worker
        # writes them, so an entry stays true; activation takes it).
        self._replicas: OrderedDict[str, tuple[AgentState, bytes]] = OrderedDict()
        self.replica_cache = 10_000
        self._merged_only: set[str] = set()
        self._repl_seq = 0
        self.merges = 0

    # --- one message ---------------------------------------------------------------

    def handle(self, agent_id: str, action: str, payload: bytes) -> tuple[int, Any]:
        """Run ``action`` on ``agent_id`` with the msgpack kwargs in ``payload``.

        Returns ``(0, result)`` or ``(error_code, error_payload)``. Never raises
        for anything a message or an agent can do.
        """
        self.handled += 1
        type_name = agent_id.partition("/")[0]
        cls = self.types.get(type_name)
        if cls is None:
            return self._error(
                ErrorCode.UNKNOWN_AGENT_TYPE,
                f"unknown agent type {type_name!r} (this node has: "
                f"{', '.join(sorted(self.types))})",
                agent_id,
                action,
            )
        if action == MERGE_ACTION:
            return self._merge(agent_id, cls, payload)
        if action == RELEASE_ACTION:
            return self._release(agent_id, cls)
        fn = cls.__phoenix_actions__.get(action)
        if fn is None:
            return self._error(
                ErrorCode.UNKNOWN_ACTION,
                f"{type_name} has no action {action!r} (it has: "
                f"{', '.join(sorted(cls.__phoenix_actions__))})",
                agent_id,
                action,
            )
        try:
            kwargs = unpack(payload) if payload else {}
        except Exception as exc:
            return self._error(ErrorCode.BAD_REQUEST, f"arguments: {exc}", agent_id, action)
        if not isinstance(kwargs, dict):
            return self._error(
                ErrorCode.BAD_REQUEST, "arguments must be a msgpack map", agent_id, action
            )
        agent = self.active.get(agent_id)
        if agent is None:
            try:
                agent = self._activate(agent_id, cls)
            except _ActivationFailed as failed:
                self.failed += 1
                return failed.code, failed.payload
        else:
            del self._last_used[agent_id]
        self._last_used[agent_id] = self.clock()
        self._touched[agent_id] = agent
        # Merged into earlier in this batch, now run: its change is logged for shipping.
        self._merged_only.discard(agent_id)
        self.context.sender = agent_id
        try:
            return OK, fn(agent, **kwargs)
        except TypeError as exc:
            if exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
                # Raised by the call itself: the arguments do not fit the signature.
                return self._error(
                    ErrorCode.BAD_ARGUMENTS,
                    f"{type_name}.{action}: {exc}",
                    agent_id,
                    action,
                    "TypeError",
                )
            return self._action_failed(agent, action, exc)
        except Exception as exc:
            return self._action_failed(agent, action, exc)

    def _merge(self, agent_id: str, cls: type[Agent], payload: bytes) -> tuple[int, Any]:
        """Join a replica's encoded state of ``agent_id`` into this node's (the reserved
        action ``_merge``; its payload is the state record itself, not kwargs).

        The record is a whole state or a delta (some fields, each the join of some
        changes): both decode with the schema and join the same way. The payload is
        only ever compared with the stored state or joined into it; what is cached
        (``_replicas``) and stored is the join, never the payload itself."""
        schema = cls.__phoenix_schema__
        try:
            incoming = schema.decode(payload, track_deltas=False)
        except DecodeError as exc:
            return self._error(ErrorCode.BAD_REQUEST, f"replica state: {exc}", agent_id, "_merge")
        # An agent stopped in this batch is not committed yet: its state is the one.
        agent = self.active.get(agent_id) or self._touched.get(agent_id)
        if agent is not None:
            state = agent._state
            before = state.encode()
        elif agent_id in self._merged:
            state, before = self._merged[agent_id], self._merged_bytes[agent_id]
        else:
            cached = self._replicas.pop(agent_id, None)
            if cached is not None:
                state, before = cached
            else:
                try:
                    before = self.store.load_state(agent_id) or b""
                    if before == payload:
                        return OK, False  # the same state again (no decode needed)
                    state = schema.load(before or None, track_deltas=False)
                except (DecodeError, StoreError) as exc:
                    return self._error(ErrorCode.STORE_FAILED, str(exc), agent_id, "_merge")
            if before == payload:
                self._replicas[agent_id] = (state, before)
                return OK, False
        was_dirty = state.dirty
        try:
            state.merge_in(incoming)
        except StateError as exc:
            if agent is None and agent_id not in self._merged:
                self._replicas.pop(agent_id, None)  # merge_in may have changed it halfway
            return self._error(ErrorCode.BAD_REQUEST, f"replica state: {exc}", agent_id, "_merge")
        after = state.encode()
        if after == before:
            if not was_dirty:
                state.mark_clean()
            if agent is None and agent_id not in self._merged:
                self._remember_replica(agent_id, state, before)
            return OK, False
        self.merges += 1
        if agent is not None:
            if agent_id not in self._touched:
                self._merged_only.add(agent_id)
            self._touched[agent_id] = agent
            # The merged part is in no delta: a replica known to hold every logged
            # delta may lack it, so the next logged change ships the whole state.
            self._whole_next.add(agent_id)
        else:
            self._merged[agent_id] = state
            self._merged_bytes[agent_id] = after
        return OK, True

    def _remember_replica(self, agent_id: str, state: AgentState, encoded: bytes) -> None:
        """Keep a committed replica state decoded for the next merge (LRU, bounded)."""
        replicas = self._replicas
        replicas[agent_id] = (state, encoded)
        replicas.move_to_end(agent_id)
        while len(replicas) > self.replica_cache:
            replicas.popitem(last=False)

    def _release(self, agent_id: str, cls: type[Agent]) -> tuple[int, Any]:
        """Stop ``agent_id`` here and return its state record (the reserved action
        ``_release``, sent by a migration); None when it has no state at all."""
        if agent_id in self.active:
            self._stop(agent_id)
        stopped = self._touched.get(agent_id)
        if stopped is not None:
            return OK, stopped._state.encode()
        merged = self._merged.get(agent_id)
        if merged is not None:
            return OK, self._merged_bytes[agent_id]
        self._replicas.pop(agent_id, None)  # the agent leaves: its copy may change elsewhere
        try:
            stored = self.store.load_state(agent_id)
        except StoreError as exc:
            return self._error(ErrorCode.STORE_FAILED, str(exc), agent_id, RELEASE_ACTION)
        return OK, stored

    def _action_failed(self, agent: Agent, action: str, exc: Exception) -> tuple[int, Any]:
        try:
            agent.on_failure(exc, action)
        except Exception:
            log.exception("%s.on_failure raised while handling a failure of %s", agent.id, action)
        return self._error(
            ErrorCode.ACTION_FAILED,
            f"{agent.id}.{action} raised {type(exc).__name__}: {exc}",
            agent.id,
            action,
            type(exc).__name__,
        )

    def _error(
        self, code: int, message: str, agent: str, action: str, exc_type: str = ""
    ) -> tuple[int, Any]:
        self.failed += 1
        return code, error_payload(code, message, agent, action, exc_type)

    # --- activation and passivation ------------------------------------------------

    def _activate(self, agent_id: str, cls: type[Agent]) -> Agent:
        schema = cls.__phoenix_schema__
        stopped = self._touched.get(agent_id)
        cached = self._replicas.pop(agent_id, None)
        tracking = self.replicate and self.deltas
        try:
            merged = self._merged.pop(agent_id, None)  # a replica's state, not committed yet
            if merged is not None:
                self._merged_only.add(agent_id)
                self._merged_bytes.pop(agent_id, None)
            if stopped is not None:  # stopped in this batch, its state not committed yet
                state = stopped._state  # with its pending delta and whole-state mark
            else:
                if merged is not None:
                    state = merged
                elif cached is not None:
                    state = cached[0]
                else:
                    state = schema.load(self.store.load_state(agent_id), track_deltas=tracking)
                state.set_delta_tracking(tracking)
                if tracking:
                    self._whole_next.add(agent_id)
        except DecodeError as exc:
            raise _ActivationFailed(
                ErrorCode.INTERNAL,
                error_payload(
                    ErrorCode.INTERNAL, f"stored state of {agent_id} is unreadable: {exc}", agent_id
                ),
            ) from None
        except StoreError as exc:
            raise _ActivationFailed(
                ErrorCode.STORE_FAILED,
                error_payload(ErrorCode.STORE_FAILED, f"loading {agent_id}: {exc}", agent_id),
            ) from None
        agent = cls()
        agent._id = agent_id
        agent._ctx = self.context
        agent._state = state
        try:
            agent.on_start()
        except Exception as exc:
            raise _ActivationFailed(
                ErrorCode.ACTION_FAILED,
                error_payload(
                    ErrorCode.ACTION_FAILED,
                    f"{agent_id}.on_start raised {type(exc).__name__}: {exc}",
                    agent_id,
                    "on_start",
                    type(exc).__name__,
                ),
            ) from None
        self.active[agent_id] = agent
        self.activations += 1
        if len(self.active) > self.max_active:
            self._evict_lru()
        return agent

    def _evict_lru(self) -> None:
        excess = len(self.active) - self.max_active
        # Agents used in the current batch are never evicted: their changes are not
        # committed yet, and a reactivation in the same batch would load stale state.
        # The cap may be exceeded until the batch commits.
        victims = [a for a in self._last_used if a not in self._touched][:excess]
        for agent_id in victims:
            self._stop(agent_id)

    def passivate_idle(self) -> int:
        """Stop agents idle past their type's timeout; returns how many stopped."""
        now = self.clock()
        floor = min(self._timeouts.values(), default=self.idle_timeout)
        expired = []
        for agent_id, last in self._last_used.items():
            if now - last <= floor:
                break  # the rest were used more recently
            if now - last > self._timeouts[agent_id.partition("/")[0]]:
                expired.append(agent_id)
        for agent_id in expired:
            self._stop(agent_id)
        return len(expired)

    def _stop(self, agent_id: str) -> None:
        agent = self.active.pop(agent_id)
        self._last_used.pop(agent_id, None)
        try:
            agent.on_stop()
        except Exception:
            log.exception("%s.on_stop raised; passivating it anyway", agent_id)
        if agent._state.dirty:
            self._touched[agent_id] = agent  # committed with the current batch
        else:
            self._whole_next.discard(agent_id)
        self.passivations += 1

    def stop_all(self) -> None:
        """``on_stop`` for every active agent (graceful shutdown); commit afterwards."""
        for agent_id in list(self.active):
            self._stop(agent_id)

    # --- group commit ----------------------------------------------------------------

    def _replicating(self) -> bool:
        """Whether commits log changes for replication (the control's flag, read at most
        every 0.2 s); :attr:`deltas` says whether with their deltas."""
        now = time.monotonic()
        if now - self._replicate_checked >= 0.2:
            self._replicate_checked = now
            try:
                flag = self.store.get("meta", REPLICATE_KEY)
            except StoreError:
                return self.replicate
            self.replicate = flag in (REPLICATE_WHOLE, REPLICATE_DELTAS)
            self.deltas = flag == REPLICATE_DELTAS
        return self.replicate

    def _log_changes(
        self,
        batch: WriteBatch,
        dirty: list[tuple[str, Agent]],
        merged_only: set[str],
        sizes: dict[str, int],
    ) -> None:
        """Stage the change log entries of a commit: one per agent changed by its own
        actions, with the commit's delta, or a whole-state mark when its delta is not
        known or no smaller than the state (``sizes``: the encoded states' lengths; a
        small agent's delta is often all of it) (:mod:`workers.replog`)."""
        self._repl_seq += 1
        stamp = _REPL_STAMP.pack(os.getpid(), self._repl_seq)
        whole = whole_entry(stamp)
        for agent_id, agent in dirty:
            if agent_id in merged_only:
                continue
            delta = self._take_delta(agent_id, agent._state)
            key = entry_key(agent_id, stamp)
            if key is None:  # an id too long for a per-commit key: whole, bare key
                batch.put("repl", agent_id.encode(), whole)
                continue
            value = whole
            if delta is not None:
                try:
                    encoded = delta.encode()
                    if len(encoded) < sizes[agent_id]:
                        value = delta_entry(stamp, encoded)
                except (StateError, ValueError, OverflowError) as exc:
                    log.warning(
                        "cannot log a delta of %s (%s): logging the whole state", agent_id, exc
                    )
            batch.put("repl", key, value)

    def _take_delta(self, agent_id: str, state: AgentState) -> AgentState | None:
        """The delta of ``state`` since its last logged change; None when it is not
        known (then tracking restarts here, for the next commit)."""
        if not state.tracks_deltas or agent_id in self._whole_next:
            self._whole_next.discard(agent_id)
            state.set_delta_tracking(True)  # what is pending is part of the whole state
            return None
        return state.take_delta()

    def commit(self, extra: Callable[[WriteBatch], None] | None = None) -> bool:
        """Write every changed agent's state in one transaction.

        ``extra`` stages more writes into the same transaction (dedup records,
        outbox entries, spilled messages): they commit together with the state
        changes or not at all.

        Returns False when the commit failed: the changed agents are dropped from
        memory (the next message reloads their last committed state) and the
        batch's replies must report STORE_FAILED.
        """
        touched = self._touched
        dirty = [(agent_id, agent) for agent_id, agent in touched.items() if agent._state.dirty]
        touched.clear()
        merged, self._merged = self._merged, {}
        merged_bytes, self._merged_bytes = self._merged_bytes, {}
        merged_only, self._merged_only = self._merged_only, set()
        batch = self.store.batch()
        sizes: dict[str, int] = {}
        for agent_id, agent in dirty:
            encoded = agent._state.encode()
            sizes[agent_id] = len(encoded)
            batch.save_state(agent_id, encoded)
        for agent_id in merged:
            batch.save_state(agent_id, merged_bytes[agent_id])
        if dirty and self._replicating():
            self._log_changes(batch, dirty, merged_only, sizes)
        if dirty and not (self.replicate and self.deltas):
            for _, agent in dirty:  # nothing ships deltas now: stop collecting them
                agent._state.set_delta_tracking(False)
        if extra is not None:
            extra(batch)
        if not len(batch):
            return True
        try:
            self.store.commit(batch)
        except StoreError:
            log.exception("commit of %d agent states failed; reloading them", len(dirty))
            for agent_id, _ in dirty:
                # Their deltas were taken: the reload logs their next change whole.
                self.active.pop(agent_id, None)
                self._last_used.pop(agent_id, None)
                self._whole_next.discard(agent_id)
            return False  # merges are lost too: their senders get no ok and send again
        for agent_id, agent in dirty:
            agent._state.mark_clean()
            if agent_id not in self.active:  # stopped in this batch
                self._whole_next.discard(agent_id)
        for agent_id, state in merged.items():
            state.mark_clean()
            self._remember_replica(agent_id, state, merged_bytes[agent_id])
        self.commits += 1
        return True
