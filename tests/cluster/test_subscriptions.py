"""SubscriptionSync (phoenix_node/cluster/subscriptions.py) with real LMDB stores and two
registries joined by hand: a node's subscription table mirrored to the cluster's."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipc.protocol import pack, unpack
from phoenix_node.cluster.registry import Registry
from phoenix_node.cluster.subscriptions import SubscriptionSync
from phoenix_node.state.store import Store
from workers.engine import SUB_PREFIX, SUBS_VERSION, subscription_key


class Node:
    def __init__(self, path: Path, name: str) -> None:
        self.store = Store(path, durability="buffered")
        self.registry = Registry(f"{name}#1", store=self.store)
        self.sync = SubscriptionSync(self.store, self.registry)

    def subscribe(self, pattern: str, agent: str, action: str = "on_event") -> None:
        """What a worker writes when ``agent`` subscribes."""
        batch = self.store.batch()
        batch.put("registry", subscription_key(pattern, agent), pack([pattern, agent, action, 1]))
        batch.put("registry", SUBS_VERSION, os.urandom(8))
        self.store.commit(batch)

    def unsubscribe(self, pattern: str, agent: str) -> None:
        batch = self.store.batch()
        batch.delete("registry", subscription_key(pattern, agent))
        batch.put("registry", SUBS_VERSION, os.urandom(8))
        self.store.commit(batch)

    def table(self) -> dict[tuple[str, str], str]:
        return {
            (p, a): action
            for _, raw in self.store.iter_items("registry", SUB_PREFIX)
            for p, a, action, _d in [unpack(raw)]
        }

    def version(self) -> bytes | None:
        return self.store.get("registry", SUBS_VERSION)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[Node, Node]]:
    a, b = Node(tmp_path / "a", "a"), Node(tmp_path / "b", "b")
    try:
        yield a, b
    finally:
        a.store.close()
        b.store.close()


def gossip(a: Node, b: Node) -> None:
    a.registry.merge(b.registry._encoded)
    b.registry.merge(a.registry._encoded)


def test_a_subscription_made_on_one_node_reaches_the_others_table(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    a.subscribe("news.#", "Sink/1")
    a.sync.tick()
    assert dict(a.registry.subscription_map) == {("news.#", "Sink/1"): ("on_event", 1)}
    before = b.version()
    gossip(a, b)
    b.sync.tick()
    assert b.table() == {("news.#", "Sink/1"): "on_event"}
    assert b.version() != before  # b's workers reload their tables
    assert a.sync.published == 1 and b.sync.published == 0


def test_unsubscribing_on_another_node_removes_it_everywhere(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    a.subscribe("news.#", "Sink/1")
    a.subscribe("sport.*", "Sink/2")
    a.sync.tick()
    gossip(a, b)
    b.sync.tick()
    b.unsubscribe("news.#", "Sink/1")  # the agent now lives on b
    b.sync.tick()
    assert ("news.#", "Sink/1") not in b.registry.subscription_map
    gossip(a, b)
    a.sync.tick()
    assert a.table() == {("sport.*", "Sink/2"): "on_event"}
    assert b.table() == {("sport.*", "Sink/2"): "on_event"}
    assert b.sync.withdrawn == 1


def test_a_changed_action_is_a_new_write(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    a.subscribe("news.#", "Sink/1")
    a.sync.tick()
    gossip(a, b)
    b.sync.tick()
    b.subscribe("news.#", "Sink/1", action="other")
    b.sync.tick()
    gossip(a, b)
    a.sync.tick()
    assert a.table() == {("news.#", "Sink/1"): "other"}


def test_a_restart_does_not_bring_back_a_subscription_removed_meanwhile(
    nodes: tuple[Node, Node], tmp_path: Path
) -> None:
    a, b = nodes
    a.subscribe("news.#", "Sink/1")
    a.sync.tick()
    gossip(a, b)
    b.sync.tick()
    b.unsubscribe("news.#", "Sink/1")
    b.sync.tick()
    # a "restarts" before its table heard of the removal: a fresh sync, the persisted
    # registry (which the removal reached first) decides
    a.registry.merge(b.registry._encoded)
    a.sync = SubscriptionSync(a.store, Registry("a#2", store=a.store))
    a.subscribe("new.#", "Sink/3")  # made while it was alone: the node's own
    a.sync.tick()
    assert a.table() == {("new.#", "Sink/3"): "on_event"}
    assert dict(a.sync.registry.subscription_map) == {("new.#", "Sink/3"): ("on_event", 1)}


def test_unreadable_records_are_dropped_and_counted(nodes: tuple[Node, Node]) -> None:
    a, _ = nodes
    batch = a.store.batch()
    batch.put("registry", SUB_PREFIX + b"junk", b"\xc1")
    batch.put("registry", SUB_PREFIX + b"bad", pack(["", "Sink/1", "x", 1]))
    a.store.commit(batch)
    a.subscribe("ok.#", "Sink/1")
    a.sync.tick()
    assert a.table() == {("ok.#", "Sink/1"): "on_event"}
    assert a.sync.bad == 2
    assert len(list(a.store.iter_items("registry", SUB_PREFIX))) == 1


def test_nothing_changed_means_nothing_written(nodes: tuple[Node, Node]) -> None:
    a, _ = nodes
    a.subscribe("news.#", "Sink/1")
    a.sync.tick()
    syncs, version = a.sync.syncs, a.version()
    for _ in range(3):
        a.sync.tick()
        a.sync.sync()  # even a forced pass writes nothing
    assert (a.sync.syncs, a.version()) == (syncs, version)
