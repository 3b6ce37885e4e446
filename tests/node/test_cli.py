"""The phoenix-node command line against a running node: status, ask, tell, --version."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import psutil
import pytest

from phoenix_node import Node, __version__
from workers.placement import owner_index

from ..conftest import REPO_ROOT, kill_pids
from .conftest import FAST


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One node for the whole module (the CLI never changes the node's processes)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        n = Node(
            workers=2,
            data=tmp_path_factory.mktemp("cli-node"),
            durability="buffered",
            **FAST,
        )
        pids: list[int] = []
        try:
            n.start()
            pids = [n.pid, *(p.pid for p in psutil.Process(n.pid).children(recursive=True))]
            yield n
        finally:
            if n.proc is not None and not pids:
                pids = [n.proc.pid]
            n.stop(timeout=10)
            kill_pids(pids)


def cli(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phoenix_node", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": REPO_ROOT},
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(node: Node, agent_id: str, action: str, expected: Any, **kwargs: Any) -> None:
    deadline = time.monotonic() + 10
    with node.client(timeout=5.0) as c:
        while (value := c.ask(agent_id, action, **kwargs)) != expected:
            assert time.monotonic() < deadline, f"{agent_id}.{action} is {value!r}"
            time.sleep(0.05)


@pytest.mark.timeout(60)
def test_status_prints_the_node_and_one_line_per_worker(node: Node) -> None:
    proc = cli("status", "--endpoint", node.endpoint)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert node.node_id in lines[0] and node.endpoint in lines[0] and str(node.pid) in lines[0]
    assert "ready" in lines[0]
    assert lines[1].split()[:3] == ["worker", "pid", "cpu"]
    status = node.status()
    rows = [line.split() for line in lines[2:] if line.strip()]
    rows = rows[: rows.index(next(r for r in rows if r[0] == "cluster:"))]
    assert [(int(r[0]), int(r[1])) for r in rows] == [
        (w["index"], w["pid"]) for w in status["workers"]
    ]
    repl = [line for line in lines if line.startswith("replication: ")]
    assert len(repl) == 1 and "deltas" in repl[0] and "whole states" in repl[0], lines


@pytest.mark.timeout(60)
def test_status_json_is_the_node_status(node: Node) -> None:
    proc = cli("status", "--json", "--endpoint", node.endpoint)
    assert proc.returncode == 0, proc.stderr
    data = orjson.loads(proc.stdout)
    assert data["node_id"] == node.node_id and data["state"] == "ready"
    assert data["pid"] == node.pid and data["endpoint"] == node.endpoint
    assert [w["index"] for w in data["workers"]] == [0, 1]
    assert all(w["pid"] and w["endpoint"] for w in data["workers"])
    assert {"pid", "forwarded", "bad_frames"} <= set(data["control"])


@pytest.mark.timeout(60)
def test_ask_prints_the_result_as_json(node: Node) -> None:
    proc = cli("ask", "Counter/cli-ask", "inc", "n=3", "--endpoint", node.endpoint)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "3\n", "")
    proc = cli("ask", "Counter/cli-ask", "inc", "n=-1", "--endpoint", node.endpoint)
    assert proc.stdout == "2\n"
    put = cli(
        "ask",
        "KV/cli",
        "put",
        "key=color",
        'value={"rgb": [0, 0, 255]}',
        "--endpoint",
        node.endpoint,
    )
    assert (put.returncode, put.stdout) == (0, "null\n"), put.stderr
    get = cli("ask", "KV/cli", "get", "key=color", "--endpoint", node.endpoint)
    assert orjson.loads(get.stdout) == {"rgb": [0, 0, 255]}
    # a value that is not JSON is passed as a string
    cli("ask", "KV/cli", "put", "key=word", "value=hello world", "--endpoint", node.endpoint)
    with node.client() as c:
        assert c.ask("KV/cli", "get", key="word") == "hello world"


@pytest.mark.timeout(60)
def test_tell_exits_0_and_the_message_arrives(node: Node) -> None:
    proc = cli("tell", "Counter/cli-tell", "inc", "n=5", "--endpoint", node.endpoint)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    wait_for(node, "Counter/cli-tell", "get", 5)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["ask", "Nope/1", "get"], ["UnknownAgentTypeError", "'Nope'"]),
        (["ask", "Counter/1", "fly"], ["UnknownActionError", "'fly'"]),
        (["ask", "Counter/1", "inc", "wings=2"], ["BadArgumentsError", "wings"]),
        (["ask", "Counter", "get"], ["InvalidRequestError", "<Type>/<key>"]),
        (["ask", "Counter/1", "not-an-action"], ["InvalidRequestError", "not-an-action"]),
    ],
    ids=["unknown type", "unknown action", "bad arguments", "bad agent id", "bad action"],
)
def test_errors_exit_1_with_the_error_on_stderr(
    node: Node, argv: list[str], fragments: list[str]
) -> None:
    proc = cli(*argv, "--endpoint", node.endpoint)
    assert proc.returncode == 1, proc
    assert proc.stdout == ""
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arg", ["n3", "=3", "1n=3", "n-x=3"])
def test_an_argument_that_is_not_key_value_exits_2_and_sends_nothing(node: Node, arg: str) -> None:
    for command in ("ask", "tell"):
        proc = cli(command, "Counter/cli-bad", "inc", arg, "--endpoint", node.endpoint)
        assert proc.returncode == 2, proc
        assert "key=value" in proc.stderr and repr(arg) in proc.stderr
    with node.client() as c:
        assert c.ask("Counter/cli-bad", "get") == 0


@pytest.mark.timeout(60)
def test_an_unreachable_node_exits_1_within_the_timeout() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    for argv in (["status"], ["ask", "Counter/x", "get"]):
        started = time.monotonic()
        proc = cli(*argv, "--endpoint", endpoint, "--timeout", "0.5")
        assert proc.returncode == 1, proc
        assert "phoenix-node:" in proc.stderr and endpoint in proc.stderr
        assert time.monotonic() - started < 10


@pytest.mark.timeout(30)
def test_version() -> None:
    script = os.path.join(os.path.dirname(sys.executable), "phoenix-node")
    for argv in ([script, "--version"], [sys.executable, "-m", "phoenix_node", "--version"]):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        assert (proc.returncode, proc.stdout.strip()) == (0, f"phoenix-node {__version__}")


@pytest.mark.timeout(60)
def test_tells_sent_just_before_close_are_delivered(node: Node) -> None:
    """The owning worker pauses for 1.5 s (SIGSTOP/SIGCONT) while a client tells it
    40 x 1 MiB and closes: close waits (up to the client's timeout) until they leave."""
    agent = "KV/cli-linger"
    value = "x" * 2**20
    with node.client(timeout=10.0) as c:
        c.ask(agent, "keys")  # connected to the owning worker before it pauses
        worker = c.status()["workers"][owner_index(agent, 2)]["pid"]
        resume = threading.Timer(1.5, os.kill, (worker, signal.SIGCONT))
        os.kill(worker, signal.SIGSTOP)
        try:
            resume.start()
            for i in range(40):
                c.tell(agent, "put", key=f"k{i}", value=value)
        finally:
            c.close()
            resume.join()
            os.kill(worker, signal.SIGCONT)
    with node.client(timeout=10.0) as c:
        count, changed = -1, time.monotonic()
        while count < 40:
            now = time.monotonic()
            latest = len(c.ask(agent, "keys"))
            if latest != count:
                count, changed = latest, now
            elif now - changed > 10.0:  # nothing more is coming (each commit rewrites
                # the whole map, up to 40 MiB: slow on a loaded 2-core machine)
                raise AssertionError(f"only {count} of 40 tells arrived")
            time.sleep(0.1)
        assert c.status()["workers"][owner_index(agent, 2)]["pid"] == worker


@pytest.mark.timeout(60)
def test_close_gives_up_on_queued_tells_after_the_client_timeout(node: Node) -> None:
    """A worker that stays stopped does not hold close beyond the client's timeout."""
    agent = "KV/cli-linger-stuck"
    with node.client(timeout=1.0) as c:
        c.ask(agent, "keys")
        worker = c.status()["workers"][owner_index(agent, 2)]["pid"]
        os.kill(worker, signal.SIGSTOP)
        try:
            for i in range(40):
                c.tell(agent, "put", key=f"k{i}", value="x" * 2**20)
            started = time.monotonic()
            c.close()
            elapsed = time.monotonic() - started
        finally:
            os.kill(worker, signal.SIGCONT)
    assert elapsed < 3.0, elapsed
