"""A real node: supervisor, pinned workers, crash/hang/stop handling (real signals)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter as Tally
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from phoenix_node import Client, Node
from phoenix_node.errors import (
    ActionFailedError,
    AskTimeoutError,
    BadArgumentsError,
    BadResultError,
    PhoenixError,
    UnknownActionError,
    UnknownAgentTypeError,
)
from workers.placement import owner_index

from ..conftest import REPO_ROOT, kill_pids, wait_dead

CRASHY = "tests.node.sample_agents:Crashy"
StartNode = Callable[..., Node]


def _key_on_worker(index: int, workers: int, prefix: str = "Counter/k") -> str:
    return next(
        f"{prefix}{i}" for i in range(10_000) if owner_index(f"{prefix}{i}", workers) == index
    )


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except PhoenixError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(60)
def test_workers_are_pinned_and_serve_the_demo_agents(start_node: StartNode) -> None:
    node = start_node(workers=2, agents=[CRASHY])
    cpus = sorted(os.sched_getaffinity(0))
    with node.client() as c:
        assert c.ask("Counter/a", "inc", n=5) == 5
        assert c.ask("Counter/a", "inc") == 6
        assert c.ask("Counter/a", "inc", n=-2) == 4
        c.ask("KV/cfg", "put", key="color", value={"rgb": [0, 0, 255]})
        assert c.ask("KV/cfg", "get", key="color") == {"rgb": [0, 0, 255]}
        assert c.ask("KV/cfg", "delete", key="color") is True
        assert c.ask("KV/cfg", "get", key="color") is None
        workers = c.status()["workers"]
        assert [w["index"] for w in workers] == [0, 1]
        for w in workers:
            assert os.sched_getaffinity(w["pid"]) == {w["cpu"]}
            # the agent's own view from inside the worker agrees
            key = _key_on_worker(w["index"], 2, "Crashy/")
            assert c.ask(key, "pid") == w["pid"]
            assert c.ask(key, "cpu") == [w["cpu"]]
        if len(cpus) >= 2:
            assert len({w["cpu"] for w in workers}) == 2, "workers share a CPU needlessly"


@pytest.mark.timeout(60)
def test_errors_name_agent_action_and_exception_and_the_worker_survives(
    start_node: StartNode,
) -> None:
    node = start_node(workers=1, agents=[CRASHY])
    with node.client() as c:
        pid = c.ask("Crashy/x", "pid")
        with pytest.raises(ActionFailedError) as failed:
            c.ask("Crashy/x", "boom", message="kaput")
        assert failed.value.agent == "Crashy/x" and failed.value.action == "boom"
        assert failed.value.remote_type == "RuntimeError" and "kaput" in str(failed.value)
        with pytest.raises(UnknownAgentTypeError, match="Nope"):
            c.ask("Nope/1", "get")
        with pytest.raises(UnknownActionError, match="fly"):
            c.ask("Counter/1", "fly")
        with pytest.raises(BadArgumentsError, match="unexpected keyword"):
            c.ask("Counter/1", "inc", wings=2)
        with pytest.raises(BadResultError):
            c.ask("Crashy/x", "unsendable")
        assert c.ask("Crashy/x", "pid") == pid  # same worker process, still serving


@pytest.mark.timeout(90)
def test_kill_9_of_a_worker_under_load_loses_no_committed_change(start_node: StartNode) -> None:
    node = start_node(workers=2)
    victim_index = 1
    keys = [f"Counter/load{i}" for i in range(40)]
    acked: Tally[str] = Tally()
    unknown: Tally[str] = Tally()
    with node.client(timeout=5.0) as c:
        victim = c.status()["workers"][victim_index]["pid"]
        killed_at = None
        started = time.monotonic()
        rounds = 0
        while time.monotonic() - started < 12 and (killed_at is None or rounds < 60):
            rounds += 1
            t0 = time.monotonic()
            results = c.ask_many([(k, "inc", {}) for k in keys], timeout=5.0)
            assert time.monotonic() - t0 < 5.0 + 1.0, "an ask outlived its timeout"
            for key, result in zip(keys, results, strict=True):
                (unknown if isinstance(result, Exception) else acked)[key] += 1
            if rounds == 20:
                os.kill(victim, signal.SIGKILL)
                killed_at = time.monotonic()
        assert killed_at is not None

        def replaced() -> bool:
            w = c.status()["workers"][victim_index]
            return w["pid"] not in (None, victim) and w["state"] == "ready"

        _wait_for(replaced, 20, "the killed worker to be replaced")
        values = dict(
            zip(keys, c.ask_many([(k, "get", {}) for k in keys], timeout=10), strict=True)
        )
    assert sum(unknown.values()) < sum(acked.values())
    for key in keys:
        assert acked[key] <= values[key] <= acked[key] + unknown[key], key
    assert c.status  # the client object survived the worker's death


@pytest.mark.timeout(60)
def test_sigstop_worker_is_detected_as_hung_and_replaced(start_node: StartNode) -> None:
    node = start_node(workers=2, heartbeat_timeout=1.5)
    key = _key_on_worker(0, 2)
    with node.client(timeout=3.0) as c:
        assert c.ask(key, "inc") == 1
        stopped = c.status()["workers"][0]["pid"]
        os.kill(stopped, signal.SIGSTOP)
        try:
            _wait_for(
                lambda: c.status()["workers"][0]["pid"] not in (None, stopped),
                20,
                "the stopped worker to be replaced",
            )
            assert not wait_dead([stopped], 5), "the hung worker was not killed"
            _wait_for(lambda: c.ask(key, "inc", timeout=1.0) == 2, 10, "service again")
            assert c.status()["workers"][0]["restarts"] == 1
        finally:
            kill_pids([stopped])


@pytest.mark.timeout(60)
def test_sigterm_drains_and_exits_0_leaving_no_process(start_node: StartNode) -> None:
    node = start_node(workers=2)
    with node.client() as c:
        for i in range(50):
            c.tell(f"Counter/t{i % 5}", "inc")
        assert c.ask("Counter/t0", "inc") >= 1
        children = [w["pid"] for w in c.status()["workers"]]
    children += [p.pid for p in psutil.Process(node.pid).children()]
    assert node.stop(timeout=20) == 0
    assert not wait_dead(children, 5)


@pytest.mark.timeout(60)
def test_state_survives_a_node_restart_on_the_same_data_dir(
    start_node: StartNode, tmp_path: Path
) -> None:
    data = tmp_path / "kept"
    node = start_node(workers=2, data=data)
    with node.client() as c:
        assert c.ask("Counter/persist", "inc", n=41) == 41
        c.ask("KV/p", "put", key="a", value=[1, "two"])
    assert node.stop() == 0
    node = start_node(workers=1, data=data)  # another worker count: routing changes too
    with node.client() as c:
        assert c.ask("Counter/persist", "inc") == 42
        assert c.ask("KV/p", "get", key="a") == [1, "two"]


@pytest.mark.timeout(60)
def test_kill_9_of_the_supervisor_leaves_no_orphan(start_node: StartNode) -> None:
    node = start_node(workers=2)
    children = [p.pid for p in psutil.Process(node.pid).children()]
    assert len(children) == 3  # two workers and the control process
    try:
        os.kill(node.pid, signal.SIGKILL)
        survivors = wait_dead(children, 5)
        assert not survivors, f"orphans still running: {survivors}"
    finally:
        kill_pids(children)


@pytest.mark.timeout(60)
def test_idle_agents_are_passivated_and_reactivated_with_their_state(start_node: StartNode) -> None:
    node = start_node(workers=1, idle_timeout=0.5)
    with node.client() as c:
        assert c.ask("Counter/idle", "inc", n=3) == 3
        _wait_for(lambda: c.status()["workers"][0]["agents"] == 0, 10, "passivation")
        assert c.ask("Counter/idle", "get") == 3


@pytest.mark.timeout(60)
def test_restart_intensity_limit_stops_the_node_with_a_clear_message(start_node: StartNode) -> None:
    node = start_node(workers=1, agents=[CRASHY], max_restarts=2, restart_period=60)
    assert node.proc is not None
    proc = node.proc
    with node.client(timeout=2.0) as c:
        for _ in range(3):
            pid = c.status()["workers"][0]["pid"]
            with pytest.raises(PhoenixError):
                c.ask("Crashy/k", "die")

            def restarted_or_stopped(pid: int = pid) -> bool:
                if proc.poll() is not None:
                    return True
                worker = c.status()["workers"][0]
                return worker["pid"] not in (None, pid) and worker["state"] == "ready"

            _wait_for(restarted_or_stopped, 15, "a restart or the stop")
    assert proc.wait(20) == 3
    assert "crashes within" in node.log()


@pytest.mark.timeout(60)
def test_asks_and_tells_through_the_node_endpoint_and_between_agents(start_node: StartNode) -> None:
    node = start_node(workers=2, agents=[CRASHY])
    target = _key_on_worker(1, 2)
    with node.client(route=False) as c:  # every message through the control process
        assert c.ask(target, "inc", n=2) == 2
        c.tell(target, "inc")
        _wait_for(lambda: c.ask(target, "get") == 3, 5, "the tell")
        # an agent on worker 0 tells an agent on worker 1, and one on its own worker
        sender = _key_on_worker(0, 2, "Crashy/")
        local = _key_on_worker(0, 2)
        c.ask(sender, "relay", target=target, n=10)
        c.ask(sender, "relay", target=local, n=7)
        _wait_for(lambda: c.ask(target, "get") == 13, 5, "the remote relay")
        _wait_for(lambda: c.ask(local, "get") == 7, 5, "the local relay")
        workers = c.status()["workers"]
    assert len(workers) == 2
    # a message sent straight to the wrong worker is forwarded once
    with node.client() as c:
        c.topology = {}
        c._connect()
        c.topology["workers"] = list(reversed(c.topology["workers"]))
        c._workers.reverse()
        assert c.ask(target, "inc") == 14  # sent to worker 0, forwarded to worker 1


@pytest.mark.timeout(30)
def test_ask_times_out_instead_of_hanging(start_node: StartNode) -> None:
    node = start_node(workers=1, agents=[CRASHY], heartbeat_timeout=30)
    with node.client() as c:
        t0 = time.monotonic()
        with pytest.raises(AskTimeoutError):
            c.ask("Crashy/slow", "hang", seconds=3.0, timeout=0.5)
        assert time.monotonic() - t0 < 1.5


@pytest.mark.timeout(30)
def test_unreachable_node_is_a_clear_error() -> None:
    from phoenix_node.errors import NodeUnreachableError

    with Client("tcp://127.0.0.1:9", timeout=0.5) as c, pytest.raises(NodeUnreachableError):
        c.ask("Counter/x", "get")


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("tests.node.no_such_module:X", "import failed"),
        ("tests.node.sample_agents:Missing", "has no Missing"),
        ("tests.node.sample_agents:NoActions", "declares no @action"),
        ("tests.node.sample_agents:BadSignature", "must be passable by keyword"),
        ("tests.node.sample_agents:not_an_agent", "not a subclass"),
        ("no-colon", "module:Class"),
    ],
)
def test_a_broken_plugin_stops_the_start_with_a_message_naming_it(
    tmp_path: Path, spec: str, expected: str
) -> None:
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "phoenix_node",
            "run",
            "--data",
            str(tmp_path),
            "--listen",
            "tcp://127.0.0.1:0",
            "--agents",
            spec,
        ],
        capture_output=True,
        text=True,
        timeout=20,
        env=env,
    )
    assert proc.returncode == 2
    assert spec in proc.stderr and expected in proc.stderr, proc.stderr
    assert not (tmp_path / "lmdb").exists(), "a broken plugin must not half-start a node"


@pytest.mark.timeout(30)
def test_a_second_node_on_the_same_data_dir_is_refused(
    start_node: StartNode, tmp_path: Path
) -> None:
    node = start_node(workers=1)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "phoenix_node",
            "run",
            "--data",
            node.data,
            "--listen",
            "tcp://127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert proc.returncode == 4
    assert "used by another node" in proc.stderr
