"""The cluster-wide registry: explicit placements and agent metadata, as one CRDT.

The registry is an :class:`~phoenix_node.state.LWWMap` that every node holds a
copy of. Its keys are ``("placement", agent_id)`` (value: the address of the node
the agent is placed on, which overrides the ring), ``("meta", agent_id)``
(value: a map of the agent's metadata, set by users) and ``("weight", address)``
(value: the node's ring weight, written by the node itself at start) and
``("sub", "<pattern>\\x00<agent_id>")`` (value: ``[action, delivery]``, an agent's
topic subscription, see :mod:`.subscriptions`). Each write carries a
hybrid-logical-clock timestamp and the writing node's replica id
(``<address>#<incarnation>``, never reused), so two copies join to the same map
whatever the order in which they saw the writes; a removed key leaves a tombstone.

Gossip (push-pull anti-entropy between control processes, ADMIN ``registry.sync``
over the peer DEALERs):

- Every ``interval`` seconds a node sends one random live peer the digest of its
  copy (8 bytes of blake2b over the canonical encoding). A peer whose digest
  differs answers with its whole copy; the asker merges it and, when its own copy
  still differs from the peer's, pushes its copy back at its next turn.
- A local write, or a merge that changed the copy, pushes the whole copy to every
  live peer at the next turn, so a placement spreads in one round trip.

Copies are small (hand-made placements and metadata, at most ``MAX_ENTRIES``
keys), so whole copies are exchanged rather than deltas. Each change is persisted
in the node's LMDB (``registry`` database), so a restarted node starts from its
last copy; newer writes of its peers win over what it had.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
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
from phoenix_node.state import LWWMap, StateError
from phoenix_node.state.store import Store, StoreError

from ._corr import REGISTRY, CorrIds

__all__ = ["MAX_ENTRIES", "REGISTRY_ACTION", "Registry", "RegistryError"]

log = logging.getLogger("phoenix.registry")

#: The ADMIN operation one control process sends another with its registry copy.
REGISTRY_ACTION = "registry.sync"
#: Keys (live or removed) a registry holds at most; writes past it are refused.
MAX_ENTRIES = 100_000
MAX_META_BYTES = 64 * 1024
_STORE_KEY = b"lww"
PLACEMENT = "placement"
META = "meta"
WEIGHT = "weight"
SUB = "sub"


class RegistryError(ValueError):
    """A registry write that cannot be made (bad value, registry full)."""


class Registry:
    """This node's copy of the registry, with its gossip (see the module docstring)."""

    def __init__(
        self,
        replica: str,
        *,
        store: Store | None = None,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.replica = replica
        self.store = store
        self.interval = interval
        self._clock = clock
        self._rng = rng or random.Random()
        self._map = LWWMap()
        self._placements: dict[str, str] = {}
        self._weights: dict[str, float] = {}
        self._subs: dict[tuple[str, str], tuple[str, int]] = {}
        #: called after a change of the node weights (the cluster rebuilds its ring)
        self.on_weights: Callable[[], None] | None = None
        self._digest = b""
        self._encoded = b""
        self.ids = CorrIds(REGISTRY)
        self._corrs: dict[int, str] = {}  # corr of a sync -> peer address
        self._push_all = False  # a change not pushed to every peer yet
        self._push_to: set[str] = set()  # peers whose copy differs from ours
        self._next_round = clock() + interval
        self.syncs = 0  # sync messages sent
        self.merges = 0  # peers' copies that changed ours
        self.bad = 0  # sync messages refused
        self._load()

    # --- reading ----------------------------------------------------------------------------

    def placement(self, agent_id: str) -> str | None:
        """The node address ``agent_id`` is placed on, or None (the ring decides)."""
        return self._placements.get(agent_id)

    def weight(self, address: str) -> float:
        """The ring weight the node at ``address`` announced (1.0 if none)."""
        return self._weights.get(address, 1.0)

    def has_placements(self) -> bool:
        return bool(self._placements)

    def placements(self) -> dict[str, str]:
        return dict(self._placements)

    @property
    def placement_map(self) -> Mapping[str, str]:
        """The placements, not copied: a new mapping after each change (so an unchanged
        one is recognised by identity)."""
        return self._placements

    @property
    def subscription_map(self) -> Mapping[tuple[str, str], tuple[str, int]]:
        """The agents' subscriptions, ``(pattern, agent) -> (action, delivery)``, not
        copied: a new mapping after each change of the registry."""
        return self._subs

    def subscription_keys(self) -> set[tuple[str, str]]:
        """Every ``(pattern, agent)`` the registry has a write for, removed ones too."""
        return {_split_sub(k[1]) for k in self._map.all_keys() if _valid_key(k) and k[0] == SUB}

    def meta(self, agent_id: str) -> dict[str, Any] | None:
        value = self._map.get((META, agent_id))
        return value if isinstance(value, dict) else None

    def view(self) -> dict[str, Any]:
        """The live entries: ``{"placements": {agent: node}, "meta": {agent: {...}}}``."""
        meta = {
            key[1]: value
            for key, value in self._map.value.items()
            if isinstance(key, tuple) and key[0] == META
        }
        return {"placements": self.placements(), "meta": meta, "weights": dict(self._weights)}

    def digest(self) -> bytes:
        return self._digest

    def status(self) -> dict[str, Any]:
        return {
            "placements": len(self._placements),
            "entries": self._map.entry_count(),
            "digest": self._digest.hex(),
            "syncs": self.syncs,
            "merges": self.merges,
            "bad": self.bad,
        }

    # --- writing ----------------------------------------------------------------------------

    def prepare_placement(self, agent_id: str, address: str | None) -> bytes:
        """The write placing ``agent_id`` on ``address`` (None: removing its placement),
        newer than this copy's, as an encoded one-entry registry; not applied: a
        migration applies it (:meth:`merge`) once the new owner holds the state."""
        key = (PLACEMENT, _check_agent(agent_id))
        self._check_room(key)
        scratch = self._map.copy()  # the write's timestamp must pass the current one
        if address is None:
            delta = scratch.remove(self.replica, key)
        else:
            if not isinstance(address, str) or not address:
                raise RegistryError("a placement names a node by its address")
            delta = scratch.put(self.replica, key, address)
        return delta.encode()

    def announce_weight(self, address: str, weight: float) -> None:
        """This node's ring weight (a node writes only its own, at start)."""
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not 0.0 < weight <= 1000.0
        ):
            raise RegistryError(f"a ring weight is in (0, 1000], not {weight!r}")
        if self._weights.get(address) == float(weight) and (WEIGHT, address) in self._map:
            return
        self._map.put(self.replica, (WEIGHT, address), float(weight))
        self._changed()

    def set_meta(self, agent_id: str, meta: dict[str, Any] | None) -> None:
        """Set (None: remove) the metadata map of ``agent_id``."""
        key = (META, _check_agent(agent_id))
        self._check_room(key)
        if meta is None:
            self._map.remove(self.replica, key)
        else:
            if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
                raise RegistryError("agent metadata must be a map with string keys")
            try:
                size = len(pack(meta))
            except (TypeError, ValueError, OverflowError) as exc:
                raise RegistryError(f"agent metadata cannot be encoded: {exc}") from None
            if size > MAX_META_BYTES:
                raise RegistryError(f"agent metadata is {size} bytes, over {MAX_META_BYTES}")
            try:
                self._map.put(self.replica, key, meta)
            except StateError as exc:
                raise RegistryError(f"agent metadata: {exc}") from None
        self._changed()

    def update_subscriptions(
        self,
        adds: dict[tuple[str, str], tuple[str, int]],
        removes: Iterable[tuple[str, str]],
    ) -> None:
        """Add (or change) and remove agents' subscriptions, as one change."""
        removes = list(removes)
        if not adds and not removes:
            return
        for (pattern, agent_id), (action, delivery) in adds.items():
            key = (SUB, _sub_name(pattern, agent_id))
            self._check_room(key)
            self._map.put(self.replica, key, [action, delivery])
        for pattern, agent_id in removes:
            self._map.remove(self.replica, (SUB, _sub_name(pattern, agent_id)))
        self._changed()

    def merge(self, encoded: bytes) -> bool:
        """Join another copy (or one write) into this one; True when this one changed."""
        try:
            other = LWWMap.decode(encoded)
        except StateError as exc:
            raise ProtocolError(f"bad registry copy: {exc}") from None
        for key in other.all_keys():
            if not _valid_key(key):
                raise ProtocolError(f"bad registry key {key!r:.80}")
        before = self._digest
        self._map.merge_in(other)
        if self._map.entry_count() > MAX_ENTRIES:
            log.warning("the registry holds more than %d keys", MAX_ENTRIES)
        self._refresh()
        if self._digest == before:
            return False
        self.merges += 1
        self._persist()
        self._push_all = True
        return True

    @staticmethod
    def check_placement_write(agent_id: str, encoded: bytes) -> None:
        """ProtocolError unless ``encoded`` is one write of ``agent_id``'s placement."""
        try:
            keys = LWWMap.decode(encoded).all_keys()
        except StateError as exc:
            raise ProtocolError(f"bad placement write: {exc}") from None
        if keys != [(PLACEMENT, agent_id)]:
            raise ProtocolError(f"a placement write must hold the placement of {agent_id} only")

    # --- gossip -----------------------------------------------------------------------------

    def next_deadline(self) -> float:
        if self._push_all or self._push_to:
            return 0.0
        return self._next_round

    def tick(self, peers: Iterable[str], send: Callable[[str, list[bytes]], bool]) -> None:
        """One gossip turn over the live ``peers`` (addresses); ``send`` forwards frames
        to one (False: not sent)."""
        now = self._clock()
        alive = sorted(peers)
        if self._push_all:
            targets = set(alive)
            self._push_all = False
        else:
            targets = self._push_to & set(alive)
        self._push_to.clear()
        for peer in targets:
            self._sync(peer, send, with_copy=True)
        if now >= self._next_round:
            self._next_round = now + self.interval
            rest = [p for p in alive if p not in targets]
            if rest:
                self._sync(self._rng.choice(rest), send, with_copy=False)
        if len(self._corrs) > 10_000:  # answers that never came
            self._corrs.clear()

    def on_sync(self, payload: bytes) -> dict[str, Any]:
        """A peer's sync (``{"digest": bytes, "copy": bytes or None}``): merges its copy
        if any; answers with ours when they still differ."""
        try:
            message = unpack(payload)
            if not isinstance(message, dict) or not isinstance(message.get("digest"), bytes):
                raise ProtocolError("a registry sync is a map with a digest")
            copy = message.get("copy")
            if copy is not None:
                if not isinstance(copy, bytes):
                    raise ProtocolError("a registry copy is bytes")
                self.merge(copy)
        except ProtocolError:
            self.bad += 1
            raise
        if message["digest"] == self._digest:
            return {"digest": self._digest, "copy": None}
        return {"digest": self._digest, "copy": self._encoded}

    def on_reply(self, peer: str, frames: list[bytes]) -> bool:
        """True if the frames answer one of our syncs (consumed)."""
        try:
            _, header, payload = split_envelope(frames)
            kind, corr, status = decode_reply_kind(header)
        except ProtocolError:
            return False
        if not self.ids.owns(corr):
            return False
        self._corrs.pop(corr, None)
        if kind != REPLY or status != 0:
            return True
        try:
            answer = unpack(payload)
            if not isinstance(answer, dict):
                raise ProtocolError("a registry sync answer is a map")
            copy = answer.get("copy")
            if isinstance(copy, bytes):
                self.merge(copy)
                if self._digest != answer.get("digest"):
                    self._push_to.add(peer)  # we hold writes the peer lacks
        except ProtocolError as exc:
            self.bad += 1
            log.warning("bad registry answer from %s: %s", peer, exc)
        return True

    # --- internals --------------------------------------------------------------------------

    def _sync(
        self, peer: str, send: Callable[[str, list[bytes]], bool], *, with_copy: bool
    ) -> None:
        corr = self.ids.next()
        body = {"digest": self._digest, "copy": self._encoded if with_copy else None}
        frames = [b"", encode_request(ADMIN, corr, "", REGISTRY_ACTION), pack(body)]
        if send(peer, frames):
            self._corrs[corr] = peer
            self.syncs += 1
        elif with_copy:
            self._push_to.add(peer)  # not connected yet: push again at the next turn

    def _check_room(self, key: tuple[str, str]) -> None:
        if self._map.entry_count() >= MAX_ENTRIES and key not in self._map.all_keys():
            raise RegistryError(f"the registry is full ({MAX_ENTRIES} keys)")

    def _changed(self) -> None:
        self._refresh()
        self._persist()
        self._push_all = True

    def _refresh(self) -> None:
        self._encoded = self._map.encode()
        self._digest = hashlib.blake2b(self._encoded, digest_size=8).digest()
        placements: dict[str, str] = {}
        weights: dict[str, float] = {}
        subs: dict[tuple[str, str], tuple[str, int]] = {}
        for key, value in self._map.value.items():
            if not _valid_key(key):
                continue
            if key[0] == PLACEMENT and isinstance(value, str):
                placements[key[1]] = value
            elif key[0] == SUB and _valid_sub(value):
                subs[_split_sub(key[1])] = (value[0], value[1])
            elif key[0] == WEIGHT and isinstance(value, float) and 0.0 < value <= 1000.0:
                weights[key[1]] = value
        self._placements = placements
        self._subs = subs
        if weights != self._weights:
            self._weights = weights
            if self.on_weights is not None:
                self.on_weights()

    def _persist(self) -> None:
        if self.store is None:
            return
        batch = self.store.batch()
        batch.put("registry", _STORE_KEY, self._encoded)
        try:
            self.store.commit(batch)
        except StoreError as exc:
            log.error("cannot persist the registry: %s", exc)

    def _load(self) -> None:
        stored = None
        if self.store is not None:
            try:
                stored = self.store.get("registry", _STORE_KEY)
            except StoreError as exc:
                log.error("cannot read the registry: %s", exc)
        if stored:
            try:
                self._map = LWWMap.decode(stored)
            except StateError as exc:
                log.error("the stored registry is unreadable (%s); starting empty", exc)
        self._refresh()


def _check_agent(agent_id: Any) -> str:
    if not isinstance(agent_id, str) or not agent_id or "/" not in agent_id:
        raise RegistryError(f"an agent id is '<Type>/<key>', not {agent_id!r:.80}")
    return agent_id


def _valid_key(key: Any) -> bool:
    return (
        isinstance(key, tuple)
        and len(key) == 2
        and key[0] in (PLACEMENT, META, WEIGHT, SUB)
        and isinstance(key[1], str)
        and (key[0] != SUB or key[1].count("\x00") == 1)
    )


def _sub_name(pattern: str, agent_id: str) -> str:
    if not isinstance(pattern, str) or "\x00" in pattern or not pattern:
        raise RegistryError(f"a subscription pattern is a non-empty string, not {pattern!r:.80}")
    return f"{pattern}\x00{_check_agent(agent_id)}"


def _split_sub(name: str) -> tuple[str, str]:
    pattern, _, agent_id = name.partition("\x00")
    return pattern, agent_id


def _valid_sub(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )
