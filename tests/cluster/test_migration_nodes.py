"""Migration and the cluster registry across real node processes: ``migrate`` under
load (no request lost, none handled twice), the registry's gossip, placements that
override the ring and outlive their node's death."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from phoenix_node import Node
from phoenix_node.errors import BadRequestError, InvalidRequestError, UnavailableError

from ..conftest import REPO_ROOT, kill_pids
from .test_cluster_nodes import CLUSTER, StartNode, all_up, start_cluster, wait_for
from .test_replication_nodes import FAST, kill_node, settled


def placement(node: Node, agent: str) -> dict[str, Any]:
    with node.client(timeout=5) as c:
        result: dict[str, Any] = c.placement(agent)
        return result


def owner(node: Node, agent: str) -> str:
    return str(placement(node, agent)["owner"])


@pytest.mark.timeout(120)
def test_migrate_moves_a_live_agent_and_loses_or_repeats_no_request_under_load(
    start_node: StartNode,
) -> None:
    nodes = start_cluster(start_node, 3, **FAST)
    agent = "Tally/hot"
    source = owner(nodes[0], agent)
    targets = [n.endpoint for n in nodes if n.endpoint != source]
    sent = {"n": 0}
    errors: list[Exception] = []
    stop = threading.Event()

    def write(node: Node) -> None:
        # at-most-once asks, never resent: every ok is one increment, no more
        with node.client(timeout=10) as c:
            while not stop.is_set():
                results = c.ask_many([(agent, "inc", {})] * 20, timeout=10)
                for r in results:
                    if isinstance(r, Exception):
                        errors.append(r)
                    else:
                        sent["n"] += 1

    writers = [threading.Thread(target=write, args=(n,)) for n in nodes]
    for t in writers:
        t.start()
    try:
        time.sleep(0.5)
        moves = []
        with nodes[0].client(timeout=10) as c:
            for target in (*targets, source):  # away, on, and back home
                moves.append(c.migrate(agent, target))
                time.sleep(0.3)
    finally:
        stop.set()
        for t in writers:
            t.join(30)
    assert not errors, errors[:3]
    assert [m["to"] for m in moves] == [*targets, source]
    assert all(m["moved"] for m in moves), moves
    assert sum(m["buffered"] for m in moves) > 0, "no request arrived during a move"
    for node in nodes:
        with node.client(timeout=10) as c:
            assert c.ask(agent, "get") == sent["n"], f"via {node.endpoint}"
    wait_for(
        lambda: all(placement(n, agent)["placed"] == source for n in nodes),
        10,
        "every registry copy to place the agent home",
    )


@pytest.mark.timeout(90)
def test_a_placement_overrides_the_ring_and_survives_its_node_dying(
    start_node: StartNode,
) -> None:
    nodes = start_cluster(start_node, 3, **FAST)
    keys = [f"Tally/p{i}" for i in range(30)]
    with nodes[0].client(timeout=10) as c:
        for k in keys:
            c.ask(k, "inc", n=5)
    target = nodes[2]
    agent = next(k for k in keys if owner(nodes[0], k) != target.endpoint)
    with nodes[1].client(timeout=10) as c:
        moved = c.migrate(agent, target.endpoint)  # asked of any node, not the owner
        assert moved["to"] == target.endpoint and moved["moved"]
        c.ask(agent, "inc", n=1)
    for node in nodes:
        wait_for(lambda n=node: owner(n, agent) == target.endpoint, 10, "the placement")
        assert placement(node, agent)["placed"] == target.endpoint
    with target.client(timeout=5) as c:
        assert c.registry()["placements"] == {agent: target.endpoint}
    wait_for(lambda: settled(nodes), 20, "the writes to reach the replicas")
    pids = kill_node(target)
    try:
        wait_for(lambda: owner(nodes[0], agent) != target.endpoint, 20, "a new owner")
    finally:
        kill_pids(pids)
    with nodes[0].client(timeout=10) as c:
        assert c.ask(agent, "get") == 6  # the replicas of the placed agent had it
        assert c.registry()["placements"] == {agent: target.endpoint}  # kept for its return


@pytest.mark.timeout(60)
def test_unpin_registry_metadata_and_bad_requests(start_node: StartNode) -> None:
    nodes = start_cluster(start_node, 2, **FAST)
    agent = "Tally/u"
    home = owner(nodes[0], agent)
    other = next(n.endpoint for n in nodes if n.endpoint != home)
    with nodes[0].client(timeout=10) as c:
        c.ask(agent, "inc", n=2)
        assert c.migrate(agent, other)["to"] == other
        assert c.migrate(agent, other)["moved"] is False  # already there
        result = c.unpin(agent)
        assert result["to"] == home and result["moved"]
        assert c.ask(agent, "get") == 2
        assert c.placement(agent)["placed"] is None
        c.set_meta(agent, {"team": "blue", "tier": 2})
        for bad in (
            lambda: c.migrate("no-slash", other),
            lambda: c.migrate(agent, "tcp://127.0.0.1:1"),
            lambda: c.set_meta(agent, [1, 2]),  # type: ignore[arg-type]
            lambda: c.set_meta(agent, {"big": "x" * 70_000}),
            lambda: c.placement("Tally/"),
        ):
            with pytest.raises(BadRequestError):
                bad()
        with pytest.raises(InvalidRequestError, match="cannot be sent"):
            c.set_meta(agent, {"x": object()})
    with nodes[1].client(timeout=5) as c:
        wait_for(
            lambda: c.registry()["meta"] == {agent: {"team": "blue", "tier": 2}},
            10,
            "the metadata to reach the other node",
        )
        c.set_meta(agent, None)
    with nodes[0].client(timeout=5) as c:
        wait_for(lambda: c.registry()["meta"] == {}, 10, "the removal to spread")


@pytest.mark.timeout(90)
def test_a_move_the_target_cannot_take_is_aborted_and_the_agent_stays(
    start_node: StartNode,
) -> None:
    """The target's worker is stopped (SIGSTOP): its merge is never answered, so the move
    times out; requests that waited are served by the source, nothing is lost, and
    every registry copy agrees the agent stayed."""
    nodes = start_cluster(start_node, 3, **FAST)
    agent = "Tally/stuck"
    source = owner(nodes[0], agent)
    src = next(n for n in nodes if n.endpoint == source)
    target = next(n for n in nodes if n.endpoint != source)
    with target.client(timeout=5) as c:
        worker = c.status()["workers"][0]["pid"]
    with src.client(timeout=10) as c:
        c.ask(agent, "inc", n=3)
    os.kill(worker, signal.SIGSTOP)
    try:
        with src.client(timeout=15) as c, src.client(timeout=15) as writer:
            results: list[Any] = []
            t = threading.Thread(
                target=lambda: (time.sleep(0.5), results.append(writer.ask(agent, "inc")))
            )
            t.start()
            started = time.monotonic()
            with pytest.raises(UnavailableError, match="stays on"):
                c.migrate(agent, target.endpoint)
            assert time.monotonic() - started >= 4.5  # the move's timeout
            t.join(15)
            assert results == [None]  # waited during the move, then served at the source
    finally:
        with contextlib.suppress(ProcessLookupError):  # the supervisor may replace it
            os.kill(worker, signal.SIGCONT)
    for node in nodes:
        wait_for(lambda n=node: owner(n, agent) == source, 10, "the agent to stay home")
        with node.client(timeout=10) as c:
            assert c.ask(agent, "get") == 4
    with src.client(timeout=5) as c:
        migration = c.cluster_status()["migration"]
        assert migration["aborted"] == 1 and migration["moving"] == [], migration


@pytest.mark.timeout(60)
def test_a_node_weight_reaches_every_ring_through_the_registry(start_node: StartNode) -> None:
    nodes = start_cluster(start_node, 2)
    heavy = start_node(**{**CLUSTER, "seeds": [nodes[0].endpoint], "weight": 3.0})
    nodes.append(heavy)
    wait_for(lambda: all_up(nodes), 15, "3 nodes up")

    def shares(node: Node) -> dict[str, tuple[float, float]]:
        with node.client(timeout=5) as c:
            members = c.cluster_status()["members"]
        return {m["address"]: (m["weight"], m["share"]) for m in members}

    for node in nodes:
        wait_for(lambda n=node: shares(n)[heavy.endpoint][0] == 3.0, 10, "the weight")
        seen = shares(node)
        assert 0.5 < seen[heavy.endpoint][1] < 0.7, seen  # 3 / (1 + 1 + 3) = 0.6
    keys = [f"Tally/w{i}" for i in range(200)]
    with nodes[0].client(timeout=10) as c:
        c.ask_many([(k, "inc", {}) for k in keys])
        on_heavy = sum(c.placement(k)["owner"] == heavy.endpoint for k in keys[:60])
    assert 25 <= on_heavy <= 48, on_heavy  # about 0.6 of 60


@pytest.mark.timeout(60)
def test_migrate_and_placement_commands(start_node: StartNode) -> None:
    nodes = start_cluster(start_node, 2)
    agent = "Tally/cli"
    home = owner(nodes[0], agent)
    other = next(n.endpoint for n in nodes if n.endpoint != home)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "phoenix_node", *args, "--endpoint", nodes[0].endpoint]
        return subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=REPO_ROOT)

    out = cli("migrate", agent, other)
    assert out.returncode == 0 and f"moved from {home} to {other}" in out.stdout, out
    out = cli("placement", agent)
    assert out.returncode == 0 and f"owner {other} (placed there)" in out.stdout, out
    out = cli("unpin", agent)
    assert out.returncode == 0 and f"to {home}" in out.stdout, out
    out = cli("migrate", agent, "tcp://127.0.0.1:1")
    assert out.returncode == 1 and "not a live member" in out.stderr, out
