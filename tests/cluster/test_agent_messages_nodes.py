"""Agents' own messages across real node processes: tells with every guarantee,
requests and their replies, to agents another node owns, and at-least-once tells
that outlive a kill -9 of the receiver's node."""

from __future__ import annotations

import time
from typing import Any

import pytest

from phoenix_node import Node
from phoenix_node.cluster.ring import Ring

from ..conftest import kill_pids
from .test_cluster_nodes import AGENTS, StartNode, start_cluster, wait_for
from .test_replication_nodes import FAST, kill_node, wait_down

MESSAGING = {
    "agents": [*AGENTS, "tests.cluster.agents:Sender", "tests.cluster.agents:Sink"],
    **FAST,
}


def on_node(ring: Ring, node: Node, prefix: str, n: int = 1) -> list[str]:
    """``n`` agent ids ``prefix<i>`` that ``ring`` places on ``node``."""
    found = [f"{prefix}{i}" for i in range(500) if ring.owner(f"{prefix}{i}") == node.endpoint]
    assert len(found) >= n, f"too few {prefix} agents on {node.endpoint}"
    return found[:n]


def views_of(nodes: list[Node]) -> None:
    """Wait until every worker routes by a view of all ``nodes`` (its heartbeat says)."""
    for node in nodes:
        wait_for(
            lambda n=node: all(  # type: ignore[misc]
                w["messaging"].get("view_nodes") == len(nodes) for w in workers(n)
            ),
            10,
            f"the workers of {node.endpoint} to see the cluster",
        )


def report(node: Node, sink: str) -> dict[str, Any]:
    with node.client(timeout=10) as c:
        result: dict[str, Any] = c.ask(sink, "report")
        return result


@pytest.mark.timeout(120)
def test_agents_tell_and_request_agents_that_other_nodes_own(start_node: StartNode) -> None:
    nodes = start_cluster(start_node, 3, workers=2, **MESSAGING)
    views_of(nodes)
    ring = Ring(dict.fromkeys((n.endpoint for n in nodes), 1.0))
    seqs = list(range(40))
    pairs = []
    for a in nodes:
        for b in nodes:
            if a is b:
                continue
            sender = on_node(ring, a, f"Sender/from-{nodes.index(a)}-{nodes.index(b)}-")[0]
            sinks = on_node(ring, b, f"Sink/at-{nodes.index(a)}-{nodes.index(b)}-", 3)
            pairs.append((a, sender, sinks))
            with a.client(timeout=10) as c:  # the sender's own node: no client hop
                for sink, delivery in zip(
                    sinks, ("at_most_once", "at_least_once", "exactly_once"), strict=True
                ):
                    c.ask(sender, "send", target=sink, seqs=seqs, guarantee=delivery)
                c.ask(sender, "ask", target=sinks[0], seq=7)
    for a, sender, sinks in pairs:
        for sink in sinks:
            wait_for(
                lambda a=a, s=sink: report(a, s)["seqs"] == seqs,  # type: ignore[misc]
                20,
                f"{sink} to get every message of {sender}",
            )
        # exactly once: each message ran once; at least once: never fewer
        assert report(a, sinks[2])["runs"] == len(seqs)
        assert report(a, sinks[1])["runs"] >= len(seqs)
        with a.client(timeout=10) as c:
            wait_for(
                lambda c=c, s=sender: c.ask(s, "replies") == ["0|70|7"],  # type: ignore[misc]
                20,
                f"the reply to {sender}'s request",
            )
    for node in nodes:  # through the control processes; every outbox entry acknowledged
        wait_for(
            lambda n=node: (  # type: ignore[misc]
                messaging(n, "to_other_nodes") >= 2 * 3 * len(seqs) and messaging(n, "outbox") == 0
            ),
            10,
            "the workers' heartbeats to count the sends to other nodes, acknowledged",
        )


def workers(node: Node) -> list[dict[str, Any]]:
    with node.client(timeout=10) as c:
        found: list[dict[str, Any]] = c.status()["workers"]
        return found


def messaging(node: Node, counter: str) -> int:
    """The sum of a messaging counter over the node's workers."""
    return sum(w["messaging"].get(counter, 0) for w in workers(node))


@pytest.mark.timeout(120)
def test_at_least_once_tells_reach_an_agent_whose_node_was_killed(
    start_node: StartNode,
) -> None:
    nodes = start_cluster(start_node, 3, **MESSAGING)
    views_of(nodes)
    ring = Ring(dict.fromkeys((n.endpoint for n in nodes), 1.0))
    sender = on_node(ring, nodes[0], "Sender/s")[0]
    victim = nodes[1]
    sink = on_node(ring, victim, "Sink/k")[0]
    with nodes[0].client(timeout=10) as c:
        c.ask(sender, "send", target=sink, seqs=list(range(50)), guarantee="at_least_once")
    pids = kill_node(victim)
    try:
        with nodes[0].client(timeout=10) as c:  # sent while the node is dead
            c.ask(sender, "send", target=sink, seqs=list(range(50, 100)), guarantee="at_least_once")
        wait_down([nodes[0], nodes[2]], victim)
    finally:
        kill_pids(pids)
    # the outbox sends again until the agent's new owner (a replica) acknowledges
    wait_for(
        lambda: report(nodes[2], sink)["seqs"] == list(range(100)),
        30,
        "every at-least-once tell at the agent's new owner",
    )


def tables_hold(nodes: list[Node], n: int) -> None:
    """Wait until every node's registry and every worker's table hold ``n`` subscriptions."""
    for node in nodes:
        wait_for(
            lambda node=node: (  # type: ignore[misc]
                _registry_subscriptions(node) == n
                and all(w["messaging"].get("subscriptions") == n for w in workers(node))
            ),
            10,
            f"{node.endpoint} to hold {n} subscriptions",
        )


def _registry_subscriptions(node: Node) -> int:
    with node.client(timeout=10) as c:
        found: int = c.cluster_status()["subscriptions"]["subscriptions"]
        return found


@pytest.mark.timeout(120)
def test_a_publish_on_any_node_reaches_each_subscriber_once_wherever_it_subscribed(
    start_node: StartNode,
) -> None:
    nodes = start_cluster(start_node, 3, **MESSAGING)
    views_of(nodes)
    ring = Ring(dict.fromkeys((n.endpoint for n in nodes), 1.0))
    sinks = [on_node(ring, node, f"Sink/sub{i}-")[0] for i, node in enumerate(nodes)]
    sender = on_node(ring, nodes[0], "Sender/pub")[0]
    with nodes[0].client(timeout=10) as c:
        c.ask(sinks[0], "follow", pattern="news.#")  # subscribed by the agent itself
        c.ask(sinks[1], "follow", pattern="news.#")
    with nodes[2].client(timeout=10) as c:  # subscribed by a client of another node
        c.subscribe_agent("news.#", sinks[2])
    tables_hold(nodes, 3)
    watchers = [node.client(timeout=10) for node in nodes]  # a client's stream on each node
    try:
        for w in watchers:
            w.subscribe("news.#")
        with nodes[0].client(timeout=10) as c:
            c.ask(sender, "announce", topic="news.a", data=1)  # an agent's publish, node 0
        with nodes[2].client(timeout=10) as c:
            c.publish("news.b", 2, delivery="at_least_once")  # a client's publish, node 2
            c.flush(timeout=10)
        for w in watchers:  # each client sees each event once, whichever node handled it
            seen: list[tuple[str, Any]] = []
            deadline = time.monotonic() + 10
            while len(seen) < 2 and time.monotonic() < deadline:
                seen += [(e.topic, e.data) for e in w.events(timeout=0.2)]
            seen += [(e.topic, e.data) for e in w.events(timeout=0.5)]
            assert sorted(seen) == [("news.a", 1), ("news.b", 2)], (
                f"client of node {watchers.index(w)}"
            )
        for w in watchers:
            w.unsubscribe("news.#")
    finally:
        for w in watchers:
            w.close()

    def events(sink: str) -> list[str]:
        return list(report(nodes[1], sink)["events"])

    for sink in sinks:
        wait_for(lambda s=sink: events(s) == ["news.a|1", "news.b|2"], 20, f"{sink}'s events")  # type: ignore[misc]
    time.sleep(0.5)  # a second delivery (one per node holding the subscription) shows now
    assert [report(nodes[0], s)["runs"] for s in sinks] == [2, 2, 2]

    with nodes[1].client(timeout=10) as c:  # unsubscribed on a node it did not subscribe on
        c.unsubscribe_agent("news.#", sinks[2])
    tables_hold(nodes, 2)
    with nodes[1].client(timeout=10) as c:
        c.publish("news.c", 3, delivery="at_least_once")
        c.flush(timeout=10)
    for sink in sinks[:2]:
        wait_for(lambda s=sink: "news.c|3" in events(s), 20, f"{sink}'s last event")  # type: ignore[misc]
    time.sleep(0.5)
    assert events(sinks[2]) == ["news.a|1", "news.b|2"]
