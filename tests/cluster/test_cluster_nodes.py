"""Real node processes forming a cluster on loopback: join, routing, failure
detection, graceful leave, partitions injected in the transport."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from phoenix_node import Client, Node
from phoenix_node.cluster.ring import Ring
from phoenix_node.errors import BadRequestError

from ..conftest import REPO_ROOT, kill_pids

StartNode = Callable[..., Node]
AGENTS = ["bench.agents:Tally", "bench.agents:Journal"]
# Fast failure detection for tests: probes every 0.1 s, down 0.4 s after a suspicion.
CLUSTER = {"workers": 1, "agents": AGENTS, "entry_points": False, "probe_interval": 0.1}


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def states(node: Node) -> dict[str, str]:
    """address -> state, as ``node`` sees its cluster."""
    with node.client(timeout=5) as c:
        return {m["address"]: m["state"] for m in c.cluster_status()["members"]}


def all_up(nodes: list[Node]) -> bool:
    want = {n.endpoint for n in nodes}
    return all({a for a, s in states(n).items() if s == "up"} == want for n in nodes)


def start_cluster(start_node: StartNode, n: int, **settings: Any) -> list[Node]:
    settings = {**CLUSTER, **settings}
    first = start_node(**settings)
    nodes = [first]
    for _ in range(n - 1):
        nodes.append(start_node(seeds=[first.endpoint], **settings))
    wait_for(lambda: all_up(nodes), 15, f"{n} nodes to see each other up")
    return nodes


def node_pids(node: Node) -> list[int]:
    proc = psutil.Process(node.pid)
    return [node.pid, *(p.pid for p in proc.children(recursive=True))]


# --- join and routing -------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_nodes_join_through_one_seed_and_every_node_reaches_every_agent(
    start_node: StartNode,
) -> None:
    nodes = start_cluster(start_node, 3)
    keys = [f"Tally/join{i}" for i in range(90)]
    ring = Ring(dict.fromkeys((n.endpoint for n in nodes), 1.0))
    owners = {ring.owner(k) for k in keys}
    assert owners == {n.endpoint for n in nodes}, "the keys do not spread over the nodes"
    for node in nodes:  # every node sends to every key: 2/3 of them live elsewhere
        with node.client() as c:
            c.tell_many([(k, "inc", {}) for k in keys])
            assert c.ask_many([(k, "get", {}) for k in keys[:1]])  # FIFO: tells ran
    for node in nodes:
        with node.client() as c:
            values = c.ask_many([(k, "get", {}) for k in keys])
            assert values == [3] * len(keys), f"via {node.endpoint}: {values}"
            cluster = c.cluster_status()
            assert cluster["forwarded"] > 0
            assert c.topology["direct"] is False
            shares = {m["address"]: m["share"] for m in cluster["members"]}
            assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
            assert all(0.15 < s < 0.55 for s in shares.values()), shares


@pytest.mark.timeout(60)
def test_a_single_node_keeps_direct_routing_until_a_second_one_joins(
    start_node: StartNode,
) -> None:
    first = start_node(**CLUSTER)
    with first.client() as c:
        c.ask("Tally/alone", "get")
        assert c.topology["direct"] is True
        second = start_node(**CLUSTER, seeds=[first.endpoint])
        wait_for(lambda: all_up([first, second]), 15, "two nodes up")
        time.sleep(2.2)  # the client re-checks the topology every 2 s
        keys = [f"Tally/later{i}" for i in range(40)]
        c.tell_many([(k, "inc", {}) for k in keys])
        assert c.ask_many([(k, "get", {}) for k in keys]) == [1] * len(keys)
        assert c.topology["direct"] is False
    with second.client() as c2:  # the same agents, reached through the other node
        assert c2.ask_many([(k, "get", {}) for k in keys]) == [1] * len(keys)


# --- failure detection --------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_a_killed_node_is_detected_down_and_its_agents_are_served_elsewhere(
    start_node: StartNode,
) -> None:
    nodes = start_cluster(start_node, 3)
    victim = nodes[2]
    pids = node_pids(victim)
    try:
        t0 = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        for observer in nodes[:2]:
            wait_for(
                lambda o=observer: states(o).get(victim.endpoint) == "down",  # type: ignore[misc]
                10,
                "the dead node to be declared down",
            )
        detected = time.monotonic() - t0
        print(f"\nkill -9 detected down by both survivors after {detected:.2f} s")
        assert detected < 5.0
    finally:
        kill_pids(pids)
    old = Ring(dict.fromkeys((n.endpoint for n in nodes), 1.0))
    orphans = [
        k for k in (f"Tally/orphan{i}" for i in range(200)) if old.owner(k) == victim.endpoint
    ]
    assert orphans
    for node in nodes[:2]:
        with node.client() as c:
            assert c.ask_many([(k, "get", {}) for k in orphans]) == [0] * len(orphans)


@pytest.mark.timeout(90)
def test_a_graceful_stop_leaves_the_cluster_and_is_never_suspected(
    start_node: StartNode,
) -> None:
    nodes = start_cluster(start_node, 3)
    leaver = nodes[1]
    before = [_stats(n) for n in (nodes[0], nodes[2])]
    assert leaver.stop(timeout=20) == 0  # SIGTERM: leave, then stop
    for observer in (nodes[0], nodes[2]):
        wait_for(
            lambda o=observer: states(o).get(leaver.endpoint) == "removed",  # type: ignore[misc]
            10,
            "the leaver to be removed",
        )
    after = [_stats(n) for n in (nodes[0], nodes[2])]
    for b, a in zip(before, after, strict=True):
        assert a["downs"] == b["downs"], "a node that left was declared down"


def _stats(node: Node) -> dict[str, int]:
    with node.client() as c:
        stats: dict[str, int] = c.cluster_status()["membership"]
        return stats


@pytest.mark.timeout(60)
def test_phoenix_node_leave_command_stops_the_node_gracefully(start_node: StartNode) -> None:
    nodes = start_cluster(start_node, 2)
    out = subprocess.run(
        [sys.executable, "-m", "phoenix_node", "status", "--endpoint", nodes[0].endpoint],
        capture_output=True, text=True, timeout=30, cwd=REPO_ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "cluster:" in out.stdout and nodes[1].endpoint in out.stdout
    assert out.stdout.count(" up ") >= 2
    leave = subprocess.run(
        [sys.executable, "-m", "phoenix_node", "leave", "--endpoint", nodes[1].endpoint],
        capture_output=True, text=True, timeout=30, cwd=REPO_ROOT,
    )  # fmt: skip
    assert leave.returncode == 0, leave.stderr
    assert nodes[1].proc is not None
    assert nodes[1].proc.wait(timeout=20) == 0
    wait_for(lambda: states(nodes[0]).get(nodes[1].endpoint) == "removed", 10, "removed")


# --- partitions -------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_partition_is_seen_on_both_sides_and_heals_to_all_up(start_node: StartNode) -> None:
    nodes = start_cluster(start_node, 3, fault_injection=True)
    a, b, c = nodes
    with a.client() as ca, b.client() as cb, c.client() as cc:
        ca.inject_faults(partition=[c.endpoint])
        cb.inject_faults(partition=[c.endpoint])
        cc.inject_faults(partition=[a.endpoint, b.endpoint])
        wait_for(lambda: states(a).get(c.endpoint) == "down", 15, "A to see C down")
        wait_for(lambda: states(b).get(c.endpoint) == "down", 15, "B to see C down")
        wait_for(
            lambda: {states(c).get(a.endpoint), states(c).get(b.endpoint)} == {"down"},
            15,
            "C to see A and B down",
        )
        # Both sides keep serving the agents they can reach.
        keys = [f"Tally/split{i}" for i in range(30)]
        ca.tell_many([(k, "inc", {}) for k in keys])
        assert ca.ask_many([(k, "get", {}) for k in keys]) == [1] * len(keys)
        cc.tell_many([(k, "inc", {}) for k in keys])
        assert cc.ask_many([(k, "get", {}) for k in keys]) == [1] * len(keys)
        t0 = time.monotonic()
        for client in (ca, cb, cc):
            client.inject_faults()  # heal
        wait_for(lambda: all_up(nodes), 30, "the healed cluster to be all up")
        print(f"\nmembership converged {time.monotonic() - t0:.2f} s after the heal")


@pytest.mark.timeout(60)
def test_fault_injection_needs_the_flag_and_a_valid_plan(start_node: StartNode) -> None:
    plain = start_node(**CLUSTER)
    with plain.client() as c, pytest.raises(BadRequestError, match="fault-injection"):
        c.inject_faults(drop=0.5)
    armed = start_node(**CLUSTER, fault_injection=True)
    with armed.client() as c:
        with pytest.raises(BadRequestError, match="drop"):
            c.inject_faults(drop=1.5)
        with pytest.raises(BadRequestError, match="jitter"):
            c.inject_faults(delay=0.1, jitter=0.5)
        stats = c.inject_faults(drop=0.25, partition=["tcp://127.0.0.1:9"])
        assert stats["plan"]["drop"] == 0.25 and stats["plan"]["partition"] == ["tcp://127.0.0.1:9"]
        assert c.ask("Tally/still", "get") == 0  # the node kept serving


def test_bad_cluster_settings_are_refused_with_a_clear_message(tmp_path: Any) -> None:
    for flag, value, words in (
        ("--seeds", "tcp://127.0.0.1", "tcp://HOST:PORT"),
        ("--advertise", "ipc://@x", "tcp://HOST:PORT"),
        ("--vnodes", "0", "minimum"),
        ("--probe-interval", "0", "minimum"),
        ("--weight", "0", "(0, 1000]"),
        ("--weight", "nan", "(0, 1000]"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "phoenix_node", "run", "--data", str(tmp_path), flag, value],
            capture_output=True, text=True, timeout=30, cwd=REPO_ROOT,
        )  # fmt: skip
        assert out.returncode == 2, (flag, out.stdout, out.stderr)
        assert words in out.stderr, (flag, out.stderr)


def test_client_of_a_closed_cluster_call_fails_clearly() -> None:
    c = Client("tcp://127.0.0.1:9", timeout=0.2)
    c.close()
    with pytest.raises(Exception, match="closed"):
        c.cluster_status()
