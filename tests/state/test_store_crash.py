"""Crash tests of the store with real processes: kill -9 mid-write, concurrent writers.

A child (``_store_child.py writer``) commits batches of BATCH_KEYS keys and
prints each batch number after its commit returned. The parent kills it with
SIGKILL at a random moment, reopens the environment, and checks that every
reported batch is there in full and that no batch is there in part.
"""

from __future__ import annotations

import os
import random
import selectors
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from phoenix_node.state.store import Store

from ._store_child import BATCH_KEYS, batch_items

REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("_store_child.py")


def spawn_writer(
    path: Path, first: int, count: int, durability: str, map_size: int = 256 * 2**20
) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    args = [str(path), str(first), str(count), durability, str(map_size)]
    return subprocess.Popen(
        [sys.executable, str(CHILD), "writer", *args], stdout=subprocess.PIPE, env=env
    )


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def read_until(
    proc: subprocess.Popen[bytes], deadline: float, lines: list[int], pending: bytes
) -> bytes:
    """Collect the batch numbers the child reports until ``deadline`` or EOF.

    ``pending`` is the partial line left by the previous call; returns the new one.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                continue
            data = os.read(fd, 65536)
            if not data:
                break
            *done, pending = (pending + data).split(b"\n")
            lines.extend(int(n) for n in done)
    return pending


def drain(proc: subprocess.Popen[bytes], pending: bytes, lines: list[int]) -> None:
    """After the kill: the lines the child wrote before dying still count."""
    assert proc.stdout is not None
    rest = pending + proc.stdout.read()
    proc.stdout.close()
    *done, _partial = rest.split(b"\n")
    lines.extend(int(n) for n in done)


def stored_batches(store: Store) -> dict[int, dict[tuple[str, bytes], bytes]]:
    """Everything the writer left, grouped by batch number."""
    found: dict[int, dict[tuple[str, bytes], bytes]] = defaultdict(dict)
    for key, value in store.iter_items("events"):
        found[int(key[:8])][("events", key)] = value
    for key, value in store.iter_items("state", b"Crash/"):
        found[int(key[6:14])][("state", key)] = value
    return found


def check_batches(path: Path, reported: list[int]) -> int:
    """Reopen the store; every reported batch is whole, no batch is partial. Returns max batch."""
    with Store(path) as store:
        assert isinstance(store.reader_check(), int)
        found = stored_batches(store)
    for n, items in found.items():
        expected = {(db, key): value for db, key, value in batch_items(n)}
        assert items == expected, f"batch {n} is partial or wrong: {len(items)} keys"
    missing = sorted(set(reported) - set(found))
    assert not missing, f"batches reported committed but lost: {missing[:10]}"
    return max(found, default=-1)


@pytest.mark.parametrize(("durability", "rounds"), [("durable", 5), ("buffered", 2)])
def test_kill_9_loses_no_reported_batch(tmp_path: Path, durability: str, rounds: int) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    path = tmp_path / "db"
    reported: list[int] = []
    next_batch = 0
    for round_no in range(rounds):
        proc = spawn_writer(path, next_batch, 0, durability)
        lines: list[int] = []
        try:
            # Wait for the first report, then kill at a random moment of the loop.
            pending = b""
            start_deadline = time.monotonic() + 15
            while not lines and proc.poll() is None and time.monotonic() < start_deadline:
                pending = read_until(proc, time.monotonic() + 0.02, lines, pending)
            assert lines, f"writer did not start (exit code {proc.poll()})"
            delay = rng.uniform(0.0, 0.3)
            pending = read_until(proc, time.monotonic() + delay, lines, pending)
        finally:
            kill(proc)
        drain(proc, pending, lines)
        assert proc.returncode == -signal.SIGKILL
        assert lines == list(range(next_batch, next_batch + len(lines))), (seed, round_no)
        reported.extend(lines)
        last = check_batches(path, reported)
        assert last in (reported[-1], reported[-1] + 1), (seed, round_no, last)
        next_batch = last + 1


def test_two_processes_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "db"
    count = 150
    small_map = 64 * 1024  # both writers grow the map under each other's feet
    procs = [
        spawn_writer(path, 0, count, "durable", small_map),
        spawn_writer(path, 10_000_000, count, "durable", small_map),
    ]
    outputs: list[bytes] = []
    try:
        with Store(path, map_size=small_map) as watcher:  # reads while they write
            while any(p.poll() is None for p in procs):
                watcher.stats()
                watcher.get("events", b"00000000-00")
                time.sleep(0.005)
        for proc in procs:
            out, _ = proc.communicate(timeout=30)
            outputs.append(out)
    finally:
        for proc in procs:
            kill(proc)
    assert [p.returncode for p in procs] == [0, 0], outputs
    expected = list(range(count)) + list(range(10_000_000, 10_000_000 + count))
    reported = sorted(int(n) for out in outputs for n in out.split())
    assert reported == expected
    with Store(path) as store:
        found = stored_batches(store)
        assert store.stats()["entries"]["events"] == 2 * count * (BATCH_KEYS // 2)
    assert sorted(found) == expected
    for n in expected:
        assert found[n] == {(db, key): value for db, key, value in batch_items(n)}, n
