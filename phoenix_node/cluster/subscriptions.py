"""Agents' topic subscriptions, one table for the whole cluster.

A worker keeps the node's agent subscriptions in LMDB (``registry`` database,
records under :data:`workers.engine.SUB_PREFIX`, a new random
:data:`~workers.engine.SUBS_VERSION` token on each change) and delivers a publish
to every matching subscription of that table, routing each event to the
subscriber wherever it lives. For a publish on one node to reach the
subscribers that subscribed on another, the control process mirrors that table
into the cluster registry (keys ``("sub", pattern\\x00agent)``) and back:

- :meth:`SubscriptionSync.tick` runs every ``interval`` seconds, and does work
  only when the table's version token or the registry's subscriptions changed.
- In one LMDB write transaction (so no worker's subscription commit falls in
  between) it compares the table with the one it last left there: records
  added or changed since are the node's agents' new subscriptions, records gone
  are unsubscribed (a worker deletes the record, also one mirrored from another
  node). The table is then rewritten to the registry's subscriptions with those
  changes applied, with a new version token; after the transaction the changes
  go into the registry, whose gossip takes them to every node.

So every node holds every agent's subscriptions, a publish is delivered once, by
the node it was published on, and a subscriber that moved to another node (a
migration, a failover) keeps its subscription without subscribing again. The
table is eventually consistent: a subscription made on one node reaches the
others within a gossip round trip (pushed at once) plus ``interval``.

At start (``seen`` unknown) a record counts as the node's own new subscription
only when the registry has never had a write for it; otherwise the registry,
persisted with the node, decides, so a subscription removed elsewhere while this
node was down does not come back.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from ipc.protocol import ProtocolError, pack, unpack
from phoenix_node.state.store import Store, StoreError
from workers.engine import SUB_PREFIX, SUBS_VERSION, subscription_key

from .registry import Registry, RegistryError

__all__ = ["SubscriptionSync"]

log = logging.getLogger("phoenix.cluster")

Sub = tuple[str, str]  # (pattern, agent id)


class SubscriptionSync:
    """Mirrors the node's subscription table and the registry's (module docstring)."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        *,
        interval: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.registry = registry
        self.interval = interval
        self._clock = clock
        self._seen: dict[bytes, bytes] | None = None  # the table as last left
        self._token: bytes | None = None
        self._subs: Mapping[Sub, tuple[str, int]] | None = None
        self._next = 0.0
        self.syncs = 0  # passes that changed the table or the registry
        self.published = 0  # subscriptions of this node's agents sent to the registry
        self.withdrawn = 0  # subscriptions removed from the registry
        self.bad = 0  # unreadable table records (dropped)

    def next_deadline(self) -> float:
        return self._next

    def tick(self) -> None:
        self._next = self._clock() + self.interval
        try:
            token = self.store.get("registry", SUBS_VERSION)
        except StoreError as exc:
            log.warning("cannot read the subscription table's version: %s", exc)
            return
        subs = self.registry.subscription_map
        if self._seen is not None and token == self._token and subs is self._subs:
            return
        self.sync()

    def sync(self) -> None:
        """One pass (see the module docstring)."""
        registry = self.registry
        subs = registry.subscription_map
        known = registry.subscription_keys() if self._seen is None else set()
        adds: dict[Sub, tuple[str, int]] = {}
        removes: list[Sub] = []
        want: dict[bytes, bytes] = {}
        unreadable = 0

        def change(current: dict[bytes, bytes]) -> dict[bytes, bytes | None]:
            nonlocal adds, removes, want, unreadable
            adds, removes = {}, []
            records = {k: _record(v) for k, v in current.items()}
            unreadable = sum(1 for r in records.values() if r is None)  # deleted below
            seen = self._seen
            if seen is None:  # at start: what the registry ever wrote, it decides
                seen = {k: v for k, v in current.items() if (r := records[k]) and r[0] in known}
            for key, value in current.items():
                record = records[key]
                if record is None:
                    continue
                if seen.get(key) != value:
                    adds[record[0]] = record[1]
            for key, value in seen.items():
                if key not in current:
                    old = _record(value)
                    if old is not None:
                        removes.append(old[0])
            desired = dict(subs)
            desired.update(adds)
            for sub in removes:
                desired.pop(sub, None)
            want = {
                subscription_key(p, a): pack([p, a, action, delivery])
                for (p, a), (action, delivery) in desired.items()
            }
            writes: dict[bytes, bytes | None] = {
                k: v for k, v in want.items() if current.get(k) != v
            }
            writes.update({k: None for k in current if k not in want})
            if writes:
                writes[SUBS_VERSION] = os.urandom(8)
            return writes

        try:
            writes = self.store.update_prefix("registry", SUB_PREFIX, change)
        except StoreError as exc:
            log.warning("cannot sync the subscription table: %s", exc)
            return
        self.bad += unreadable
        self._seen = want
        self._token = writes.get(SUBS_VERSION) or self.store.get("registry", SUBS_VERSION)
        if adds or removes:
            try:
                registry.update_subscriptions(adds, removes)
            except RegistryError as exc:
                log.error("cannot publish %d subscriptions to the cluster: %s", len(adds), exc)
            self.published += len(adds)
            self.withdrawn += len(removes)
        self._subs = registry.subscription_map
        if writes or adds or removes:
            self.syncs += 1

    def status(self) -> dict[str, Any]:
        return {
            "subscriptions": len(self.registry.subscription_map),
            "syncs": self.syncs,
            "published": self.published,
            "withdrawn": self.withdrawn,
            "bad": self.bad,
        }


def _record(raw: bytes) -> tuple[Sub, tuple[str, int]] | None:
    """A table record as ``((pattern, agent), (action, delivery))``; None if unreadable."""
    try:
        pattern, agent_id, action, delivery = unpack(raw)
    except (ProtocolError, ValueError, TypeError):
        return None
    if not all(isinstance(x, str) for x in (pattern, agent_id, action)) or not isinstance(
        delivery, int
    ):
        return None
    if not pattern or "\x00" in pattern or "/" not in agent_id:
        return None
    return (pattern, agent_id), (action, delivery)
