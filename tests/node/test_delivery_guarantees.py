"""Delivery guarantees against real crashes: a real node, real SIGKILLs and SIGSTOPs.

Every test drives a durable node with two workers and checks what a user of the
guarantee would check: after ``flush`` an ``exactly_once`` message ran exactly
once, an ``at_least_once`` one at least once, an ``at_most_once`` one never
twice; a crashed client's durable outbox is sent again by the next client on the
same directory; agents' own guaranteed tells survive the death of either worker;
messages that fail for good end in the dead letters and can be replayed.

Messages go to :class:`tests.node.sample_agents.Recorder` agents with a unique
``seq`` each, so a lost message shows as a missing seq and a message that ran
twice as ``runs > len(seqs)``. Kill points come from a seeded RNG (the seed is in
the assertion messages), so a failure can be replayed.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from phoenix_node import Client, Node
from phoenix_node.errors import NotAcknowledgedError, PhoenixError
from workers.placement import owner_index

from ..conftest import kill_pids

RECORDER = "tests.node.sample_agents:Recorder"
FORWARDER = "tests.node.sample_agents:Forwarder"
GATE = "tests.node.sample_agents:Gate"
AGENTS = [RECORDER, FORWARDER, GATE]
WORKERS = 2
StartNode = Callable[..., Node]


# --- helpers ------------------------------------------------------------------------------


def _keys_on(index: int, prefix: str, count: int) -> list[str]:
    """``count`` agent ids of ``prefix`` owned by worker ``index``."""
    keys = (f"{prefix}{i}" for i in range(100_000))
    picked = [k for k in keys if owner_index(k, WORKERS) == index]
    return picked[:count]


def _spread_keys(prefix: str, per_worker: int) -> list[str]:
    """Agent ids on every worker, interleaved."""
    columns = [_keys_on(i, prefix, per_worker) for i in range(WORKERS)]
    return [k for row in zip(*columns, strict=True) for k in row]


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except PhoenixError:
            pass  # a worker restarting: ask again
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _worker_pid(client: Client, index: int) -> int:
    pid = client.status()["workers"][index]["pid"]
    assert isinstance(pid, int), f"worker {index} has no pid"
    return pid


def _wait_replaced(client: Client, index: int, old_pid: int) -> None:
    def replaced() -> bool:
        worker = client.status()["workers"][index]
        return worker["pid"] not in (None, old_pid) and worker["state"] == "ready"

    _wait_for(replaced, 20, f"worker {index} (pid {old_pid}) to be replaced")


def _kill_worker(client: Client, index: int, killed: list[int]) -> None:
    """SIGKILL worker ``index`` once it runs (a replacement of an earlier victim counts
    only when ready); appends the pid to ``killed``."""
    pids: list[int] = []

    def running() -> bool:
        worker = client.status()["workers"][index]
        pids[:] = [worker["pid"]] if worker["state"] == "ready" else []
        return bool(pids) and pids[0] not in (None, *killed)

    _wait_for(running, 20, f"worker {index} to run")
    os.kill(pids[0], signal.SIGKILL)
    killed.append(pids[0])


def _reports(client: Client, keys: Iterable[str]) -> tuple[int, list[int]]:
    """Total runs and the recorded seqs of the Recorder ``keys`` (each seq was sent to
    one key only, so a seq that ran twice adds a run, not a seq)."""
    runs, seqs = 0, []
    for key in keys:
        report = client.ask(key, "report", timeout=10)
        runs += report["runs"]
        seqs += report["seqs"]
    return runs, seqs


def _record_calls(keys: list[str], seqs: range) -> list[tuple[str, str, dict[str, Any]]]:
    return [(keys[seq % len(keys)], "record", {"seq": seq}) for seq in seqs]


def _send_with_kills(
    client: Client, keys: list[str], n: int, delivery: str, kills: int, seed: int
) -> list[int]:
    """Send ``n`` record tells in chunks; SIGKILL a worker (alternating) right after
    ``kills`` randomly chosen chunks, while that worker still works on a backlog.

    The next chunk to the dead worker waits in the client until the replacement
    is connected, so messages are sent before, during and after every crash.
    Returns the killed pids."""
    chunk = 50
    starts = range(0, n, chunk)
    rng = random.Random(seed)
    kill_after = set(rng.sample(range(len(starts) - 1), kills))
    killed: list[int] = []
    for i, start in enumerate(starts):
        client.tell_many(
            _record_calls(keys, range(start, min(start + chunk, n))), delivery=delivery
        )
        if i in kill_after:
            _kill_worker(client, len(killed) % WORKERS, killed)
    return killed


# --- client guarantees under worker crashes -----------------------------------------------


@pytest.mark.timeout(90)
def test_exactly_once_survives_repeated_kill_9_of_the_owning_workers(
    start_node: StartNode,
) -> None:
    node = start_node(workers=WORKERS, agents=AGENTS, durability="durable")
    keys = _spread_keys("Recorder/eo", 4)
    n, seed = 2000, random.randrange(2**32)
    with node.client(timeout=20.0) as c:
        t0 = time.monotonic()
        killed = _send_with_kills(c, keys, n, "exactly_once", kills=3, seed=seed)
        c.flush(timeout=40)
        elapsed = time.monotonic() - t0
        assert c.unacknowledged == 0 and c.dead_letters() == []
        runs, seqs = _reports(c, keys)
        duplicates = sum(w.get("duplicates", 0) for w in c.worker_stats())
    print(f"\nexactly_once: {n} msgs, 3 kills, flushed in {elapsed:.2f} s, dups {duplicates}")
    assert len(killed) == 3
    assert sorted(seqs) == list(range(n)), f"a message was lost or ran twice (seed {seed})"
    assert runs == n, f"{runs} runs for {n} exactly_once messages (seed {seed})"


@pytest.mark.timeout(90)
def test_at_least_once_loses_nothing_acknowledged_across_kill_9(start_node: StartNode) -> None:
    node = start_node(workers=WORKERS, agents=AGENTS, durability="durable")
    keys = _spread_keys("Recorder/al", 4)
    n, seed = 2000, random.randrange(2**32)
    with node.client(timeout=20.0) as c:
        t0 = time.monotonic()
        _send_with_kills(c, keys, n, "at_least_once", kills=3, seed=seed)
        c.flush(timeout=40)  # every message acknowledged: each one's effect is committed
        elapsed = time.monotonic() - t0
        assert c.unacknowledged == 0 and c.dead_letters() == []
        runs, seqs = _reports(c, keys)
    print(f"\nat_least_once: {n} msgs, 3 kills, flushed in {elapsed:.2f} s, {runs} runs")
    assert set(seqs) == set(range(n)), f"acknowledged messages are missing (seed {seed})"
    assert runs >= n


@pytest.mark.timeout(60)
def test_at_most_once_is_never_sent_twice_even_when_a_worker_dies(start_node: StartNode) -> None:
    """Tells in flight when their worker dies may be lost, never re-sent; once the
    workers are back, at_most_once delivers again."""
    node = start_node(workers=WORKERS, agents=AGENTS, durability="durable")
    keys = _spread_keys("Recorder/am", 4)
    n, after, seed = 2000, 100, random.randrange(2**32)
    with node.client(timeout=20.0) as c:
        killed = _send_with_kills(c, keys, n, "at_most_once", kills=2, seed=seed)
        for index, pid in enumerate(killed):
            _wait_replaced(c, index, pid)
        c.tell_many(_record_calls(keys, range(n, n + after)))
        assert c.unacknowledged == 0  # nothing was kept for a re-send
        runs, seqs = _reports(c, keys)  # asks queue behind the tells on the same sockets
    print(f"\nat_most_once: {n} sent, {runs - after} ran across 2 kills")
    assert runs == len(seqs), f"a message ran twice (seed {seed})"
    assert set(seqs) <= set(range(n + after))
    assert set(range(n, n + after)) <= set(seqs), "tells after the recovery were lost"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("delivery", ["exactly_once", "at_least_once"])
def test_copies_resent_to_a_stopped_worker_run_once_with_exactly_once(
    start_node: StartNode, delivery: str
) -> None:
    """A SIGSTOPped worker gets the original and re-sent copies of every message (the
    first retry comes after 1 s, before any round trip was measured) in its socket;
    once it runs again, a copy that finds its original still queued is dropped
    (``resends_dropped``) and one that comes after it ran is answered from the dedup log
    (``duplicates``, exactly_once) or runs again (at_least_once): exactly_once runs
    each message once, at_least_once at least once."""
    node = start_node(workers=WORKERS, agents=AGENTS, heartbeat_timeout=30)
    keys = _keys_on(0, "Recorder/st", 4)
    n = 200
    with node.client(timeout=10.0) as c:
        c.ask(keys[0], "report")  # connected before the stop
        pid = _worker_pid(c, 0)
        os.kill(pid, signal.SIGSTOP)
        try:
            c.tell_many(_record_calls(keys, range(n)), delivery=delivery)
            with pytest.raises(NotAcknowledgedError, match=f"{n} message"):
                c.flush(timeout=1.6)
            assert c.unacknowledged == n  # kept for the next flush
        finally:
            os.kill(pid, signal.SIGCONT)
        c.flush(timeout=20)
        runs, seqs = _reports(c, keys)
        stats = c.worker_stats()[0]
    copies = stats["duplicates"] + stats["resends_dropped"] + (runs - n)
    assert copies >= n, "the copies never reached the worker: nothing was tested"
    assert sorted(set(seqs)) == list(range(n))
    if delivery == "exactly_once":
        assert runs == n == len(seqs), f"{runs} runs: re-sent copies ran again"
    else:
        assert runs >= n


# --- the client's durable outbox across a client crash ------------------------------------

_CLIENT_SCRIPT = """
import sys
from phoenix_node import Client

endpoint, outbox, delivery, n, route, *warm = sys.argv[1:]
client = Client(endpoint, outbox=outbox, route=route == "route", timeout=20)
for key in warm:  # connected to every worker before they are stopped
    client.ask(key, "report")
print("ready", flush=True)
sys.stdin.readline()
keys = [f"Recorder/ob{i}" for i in range(4)]
client.tell_many(
    [(keys[s % 4], "record", {"seq": s}) for s in range(int(n))], delivery=delivery
)
print("sent", client.unacknowledged, flush=True)
sys.stdin.readline()  # SIGKILLed here, before any acknowledgement was read
"""


def _free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _start_crashing_client(args: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CLIENT_SCRIPT, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == "ready\n", f"client subprocess failed: {line!r}"
    return proc


def _send_and_kill(proc: subprocess.Popen[str], n: int) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    assert line == f"sent {n}\n", f"client subprocess: {line!r}"
    proc.kill()
    proc.wait(10)


@pytest.mark.timeout(60)
def test_durable_outbox_of_a_killed_client_is_resent_exactly_once(
    start_node: StartNode, tmp_path: Path
) -> None:
    """The workers are stopped while the client sends, the client is SIGKILLed before
    any ack, then the workers run every message (acks to a dead peer). The next client
    on the same outbox sends all of them again: exactly_once drops every copy."""
    node = start_node(workers=WORKERS, agents=AGENTS, heartbeat_timeout=30)
    keys = [f"Recorder/ob{i}" for i in range(4)]
    outbox, n = str(tmp_path / "outbox"), 400
    proc = _start_crashing_client([node.endpoint, outbox, "exactly_once", str(n), "route", *keys])
    stopped: list[int] = []
    try:
        with node.client() as c:
            stopped = [_worker_pid(c, i) for i in range(WORKERS)]
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        _send_and_kill(proc, n)
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        stopped = []
        with node.client() as c:
            # the first copies ran: only the acknowledgements were lost
            _wait_for(lambda: _reports(c, keys)[0] == n, 20, f"{n} runs of the first copies")
        with Client(node.endpoint, outbox=outbox) as again:
            assert again.unacknowledged == n
            t0 = time.monotonic()
            again.flush(timeout=20)
            elapsed = time.monotonic() - t0
            runs, seqs = _reports(again, keys)
            duplicates = sum(w.get("duplicates", 0) for w in again.worker_stats())
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        kill_pids([proc.pid])
    print(f"\noutbox re-send of {n} exactly_once msgs flushed in {elapsed:.2f} s")
    assert sorted(seqs) == list(range(n))
    assert runs == n, f"{runs} runs: the re-sent copies ran again"
    assert duplicates == n, "the re-sent copies did not reach the workers"


@pytest.mark.timeout(60)
def test_durable_outbox_written_before_the_node_started_is_delivered(
    start_node: StartNode, tmp_path: Path
) -> None:
    """A client with a durable outbox sends at_least_once tells to a node that is not
    running yet and is SIGKILLed; the next client on that outbox delivers them all."""
    endpoint, outbox, n = _free_endpoint(), str(tmp_path / "outbox"), 400
    keys = [f"Recorder/ob{i}" for i in range(4)]
    proc = _start_crashing_client([endpoint, outbox, "at_least_once", str(n), "front"])
    try:
        _send_and_kill(proc, n)
    finally:
        kill_pids([proc.pid])
    node = start_node(workers=WORKERS, agents=AGENTS, listen=endpoint)
    with Client(node.endpoint, outbox=outbox) as again:
        assert again.unacknowledged == n
        again.flush(timeout=20)
        assert again.unacknowledged == 0 and again.dead_letters() == []
        runs, seqs = _reports(again, keys)
    assert set(seqs) == set(range(n))
    assert runs >= n


# --- agents' own guaranteed tells (the worker's transactional outbox) ---------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_agent_to_agent_guaranteed_tells_survive_kill_9_of_either_worker(
    start_node: StartNode, guarantee: str
) -> None:
    """Forwarders on worker 0 tell Counters on worker 1 (both hops with ``guarantee``).
    Worker 1 (the receiver) is SIGKILLed three times and worker 0 (the sender, holding
    the outbox) once; no forward is lost, and with exactly_once none counts twice."""
    node = start_node(workers=WORKERS, agents=AGENTS)
    forwarders = _keys_on(0, "Forwarder/f", 4)
    counters = _keys_on(1, "Counter/c", 4)
    n, chunk, seed = 600, 50, random.randrange(2**32)
    rng = random.Random(seed)
    kill_after = dict(zip(rng.sample(range(n // chunk - 1), 4), [1, 1, 0, 1], strict=True))
    with node.client(timeout=20.0) as c:
        t0 = time.monotonic()
        killed: list[int] = []
        for i, start in enumerate(range(0, n, chunk)):
            calls = [
                (forwarders[s % 4], "forward", {"target": counters[s % 4], "guarantee": guarantee})
                for s in range(start, start + chunk)
            ]
            c.tell_many(calls, delivery=guarantee)
            if i in kill_after:
                _kill_worker(c, kill_after[i], killed)
        c.flush(timeout=40)

        def delivered() -> bool:
            stats = c.worker_stats()
            return all(w["outbox"] == 0 and w["queued"] == 0 for w in stats)

        _wait_for(delivered, 40, "the workers' outboxes to drain")
        elapsed = time.monotonic() - t0
        total = sum(c.ask(key, "get") for key in counters)
        assert c.node_dead_letters() == []
    print(
        f"\nagent-to-agent {guarantee}: {n} forwards, 4 kills, {total} counted in {elapsed:.2f} s"
    )
    assert total >= n, f"{n - total} of {n} forwards lost (seed {seed})"
    if guarantee == "exactly_once":
        assert total == n, f"{total} increments for {n} exactly_once forwards (seed {seed})"


# --- dead letters -------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_client_dead_letters_name_the_reason_and_replay_after_the_fix(
    start_node: StartNode,
) -> None:
    node = start_node(workers=WORKERS, agents=AGENTS)
    with node.client() as c:
        c.tell("Counter/dl", "fly", delivery="at_least_once")
        c.tell("Gate/dl", "enter", delivery="at_least_once")
        c.flush(timeout=10)  # refused for good: dead, not pending
        assert c.unacknowledged == 0
        dead = {d["action"]: d for d in c.dead_letters()}
        assert set(dead) == {"fly", "enter"}
        assert dead["fly"]["agent"] == "Counter/dl"
        assert "UnknownAction" in dead["fly"]["reason"] and "fly" in dead["fly"]["reason"]
        assert "gate is closed" in dead["enter"]["reason"]
        # fix the cause, replay just that letter: it runs once and leaves the dead letters
        c.ask("Gate/dl", "open")
        assert c.replay_dead_letters([dead["enter"]["id"]]) == 1
        c.flush(timeout=10)
        assert c.ask("Gate/dl", "count") == 1
        assert [d["action"] for d in c.dead_letters()] == ["fly"]
        # a replay of what still cannot succeed ends in the dead letters again
        assert c.replay_dead_letters() == 1
        c.flush(timeout=10)
        assert [d["action"] for d in c.dead_letters()] == ["fly"]


@pytest.mark.timeout(60)
def test_an_agent_message_that_fails_ends_in_the_node_dead_letters(
    start_node: StartNode,
) -> None:
    node = start_node(workers=WORKERS, agents=AGENTS)
    sender = _keys_on(0, "Forwarder/d", 1)[0]
    gate = _keys_on(1, "Gate/d", 1)[0]
    with node.client() as c:
        c.ask(sender, "forward", target=gate, action_name="enter", guarantee="at_least_once")
        letters: list[dict[str, Any]] = []

        def dead_lettered() -> bool:
            letters[:] = c.node_dead_letters()
            return bool(letters)

        _wait_for(dead_lettered, 10, "the node's dead letter")
        assert len(letters) == 1
        assert "gate is closed" in letters[0]["reason"]
        assert gate in str(letters[0]["message"]) and "enter" in str(letters[0]["message"])
        assert c.ask(gate, "count") == 0
        c.ask(gate, "open")
        assert c.replay_node_dead_letters() == 1
        _wait_for(lambda: c.ask(gate, "count") == 1, 10, "the replayed message")
        _wait_for(lambda: not c.node_dead_letters(), 10, "the dead letters to empty")
        assert c.ask(gate, "count") == 1
