from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from phoenix_node import Node

from ..conftest import REPO_ROOT, kill_pids

FAST = {
    "heartbeat_interval": 0.2,
    "heartbeat_timeout": 3.0,
    "drain_timeout": 5.0,
    "restart_backoff_max": 0.5,
}


@pytest.fixture
def start_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Node]]:
    """Start real nodes (child processes); every process is killed by pid afterwards."""
    monkeypatch.setenv("PYTHONPATH", REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nodes: list[Node] = []

    def start(**kwargs: Any) -> Node:
        for key, value in FAST.items():
            kwargs.setdefault(key, value)
        kwargs.setdefault("workers", 2)
        kwargs.setdefault("data", tmp_path / f"node{len(nodes)}")
        node = Node(**kwargs)
        nodes.append(node)
        return node.start()

    yield start
    for node in nodes:
        pids = []
        if node.proc is not None:
            pids.append(node.proc.pid)
            try:
                pids += [p.pid for p in psutil.Process(node.proc.pid).children(recursive=True)]
            except psutil.Error:
                pass
        node.stop(timeout=10)
        kill_pids(pids)
