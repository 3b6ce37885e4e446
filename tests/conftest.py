"""Suite-wide fixtures: every test must leave no child process behind."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import psutil
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _children() -> list[psutil.Process]:
    try:
        return [
            p
            for p in psutil.Process().children(recursive=True)
            if p.status() != psutil.STATUS_ZOMBIE
        ]
    except psutil.Error:
        return []


def kill_pids(pids: list[int]) -> None:
    """SIGKILL every pid that is still alive (and reap our own children)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def wait_dead(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` runs (zombies count as dead); return the survivors."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _running(p)]
        if alive:
            time.sleep(0.05)
    return alive


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    before = {p.pid for p in _children()}
    yield
    leaked = [p for p in _children() if p.pid not in before]
    if leaked:
        kill_pids([p.pid for p in leaked])
        pytest.fail(f"test leaked processes: {[(p.pid, p.name()) for p in leaked]}")
