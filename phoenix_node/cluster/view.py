"""The node view a control process publishes to its workers: which node owns an agent.

Workers route the messages their agents send. Inside the node they compute the
owning worker themselves (:func:`workers.placement.owner_index`); across nodes
they need the ring and the registry's placements, which only the control
process holds. The control process writes them into the node's LMDB (``meta``
database, :data:`VIEW_KEY`, with an 8-byte digest under :data:`VERSION_KEY`)
whenever the ring or a placement changes; each worker reads the digest every
:data:`CHECK_INTERVAL` seconds and rebuilds its :class:`NodeView` when it moved.
A worker restarted by the supervisor reads the view at boot, so nothing has to
be re-sent to it.

A worker's view may lag the control's by up to ``CHECK_INTERVAL`` (plus the
membership's own spread). That is safe: a message sent to the wrong node is
served there (the control process routes by its own, newer view), and a state
written on a node that does not own the agent is shipped to the owner and
merged like any replica's (CRDT states join in any order).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

from ipc.protocol import ProtocolError, pack, unpack
from phoenix_node.state.store import Store, StoreError

from .ring import Ring

__all__ = ["CHECK_INTERVAL", "VERSION_KEY", "VIEW_KEY", "NodeView", "ViewPublisher"]

log = logging.getLogger("phoenix.cluster")

VIEW_KEY = b"cluster.view"
VERSION_KEY = b"cluster.view.version"
#: How often a worker looks for a new view (seconds).
CHECK_INTERVAL = 0.1


class NodeView:
    """Which node owns each agent, as the workers of node ``me`` see it."""

    __slots__ = ("me", "placements", "ring")

    def __init__(self, me: str, ring: Ring, placements: Mapping[str, str]) -> None:
        self.me = me
        self.ring = ring
        self.placements = dict(placements)

    def clustered(self) -> bool:
        """True when some agent may live on another node."""
        return len(self.ring) > 1 or any(a != self.me for a in self.placements.values())

    def owner(self, agent_id: str) -> str:
        """The address of the node that owns ``agent_id``."""
        placed = self.placements.get(agent_id)
        if placed is not None:
            return placed
        return self.ring.owner(agent_id)

    def elsewhere(self, agent_id: str) -> bool:
        """True when ``agent_id`` is owned by another node than this one."""
        return self.owner(agent_id) != self.me

    def to_wire(self) -> dict[str, Any]:
        return {
            "me": self.me,
            "vnodes": self.ring.vnodes,
            "members": dict(self.ring.members),
            "placements": self.placements,
        }

    @classmethod
    def from_wire(cls, raw: object) -> NodeView:
        """Rebuild a view; ValueError when ``raw`` is not one."""
        if not isinstance(raw, dict):
            raise ValueError("a node view is a map")
        me, vnodes = raw.get("me"), raw.get("vnodes")
        members, placements = raw.get("members"), raw.get("placements")
        if not isinstance(me, str) or not isinstance(vnodes, int) or isinstance(vnodes, bool):
            raise ValueError("a node view names its node and the ring's vnodes")
        if not isinstance(members, dict) or not isinstance(placements, dict):
            raise ValueError("a node view holds members and placements maps")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in placements.items()):
            raise ValueError("placements map agent ids to node addresses")
        try:
            ring = Ring(members, vnodes=vnodes)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad ring in a node view: {exc}") from None
        return cls(me, ring, placements)

    @staticmethod
    def load(store: Store, version: bytes | None = None) -> tuple[bytes | None, NodeView | None]:
        """The stored view and its version, read only when the version differs from
        ``version`` (then the view is None when none is stored or it is unreadable)."""
        current = store.get("meta", VERSION_KEY)
        if current == version:
            return version, None
        raw = store.get("meta", VIEW_KEY)
        if raw is None:
            return current, None
        try:
            return current, NodeView.from_wire(unpack(raw))
        except (ProtocolError, ValueError) as exc:
            log.error("the stored node view is unreadable: %s", exc)
            return current, None


class ViewPublisher:
    """The control process's side: writes the view when the ring or a placement changed."""

    def __init__(self, store: Store, me: str) -> None:
        self.store = store
        self.me = me
        self._ring: Ring | None = None
        self._placements: Mapping[str, str] | None = None
        self._live: dict[str, str] = {}
        self.published = 0

    def publish(self, ring: Ring, placements: Mapping[str, str]) -> bool:
        """Write the view of ``ring`` and the ``placements`` on its members, if it changed
        since the last call; True when written. Called every loop turn: unchanged
        objects (the registry makes a new placements map on each change) cost two
        identity checks."""
        if ring is self._ring and placements is self._placements:
            return False
        members = ring.members
        live = {a: n for a, n in placements.items() if n in members}
        view = NodeView(self.me, ring, live)
        if self._ring is not None and ring == self._ring and live == self._live:
            self._ring, self._placements = ring, placements
            return False
        encoded = pack(view.to_wire())
        batch = self.store.batch()
        batch.put("meta", VIEW_KEY, encoded)
        batch.put("meta", VERSION_KEY, hashlib.blake2b(encoded, digest_size=8).digest())
        try:
            self.store.commit(batch)
        except StoreError as exc:
            log.error("cannot publish the node view to the workers: %s", exc)
            return False  # tried again at the next change or turn
        self._ring, self._placements, self._live = ring, placements, live
        self.published += 1
        return True
