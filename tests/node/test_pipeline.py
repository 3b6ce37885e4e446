"""Pipelines on a real node: stages on both workers, order per key, error strategies."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from phoenix_node import Node

StartNode = Callable[..., Node]
AGENTS = [f"tests.node.pipeline_agents:{n}" for n in
          ("PFlaky", "PSink", "PipeRetry", "PipeSkip", "PipeStop")]  # fmt: skip


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(60)
def test_items_go_through_every_stage_in_order_per_key(start_node: StartNode) -> None:
    node = start_node(workers=2, agents=AGENTS)
    keys = [f"order{i}" for i in range(8)]  # their stage agents land on both workers
    with node.client() as c:
        for v in range(15):
            c.tell_many([(f"PipeRetry/{k}", "push", {"data": {"v": v}}) for k in keys])
        for k in keys:
            wait_for(lambda k=k: len(c.ask(f"PSink/{k}", "seen")) == 15, 20, f"sink of {k}")
            assert c.ask(f"PSink/{k}", "seen") == [2 * v for v in range(15)]
            status = c.ask(f"PipeRetry/{k}", "status")
            assert status["done"] == 15 and status["queued"] == 0 and status["dead"] == 0


@pytest.mark.timeout(60)
def test_retry_then_dead_letter_keeps_order(start_node: StartNode) -> None:
    node = start_node(workers=2, agents=AGENTS)
    with node.client() as c:
        pipe = "PipeRetry/r"
        c.ask(pipe, "push", data={"v": 1, "fail": 2})  # succeeds at the third run
        c.ask(pipe, "push", data={"v": 2, "fail": -1})  # never: dead after 1 + 3 runs
        c.ask(pipe, "push", data={"v": 3})
        wait_for(lambda: c.ask(pipe, "status")["queued"] == 0, 20, "the pipeline to drain")
        assert c.ask("PSink/r", "seen") == [2, 6]
        assert c.ask("PFlaky/r", "run_count", v=1) == 3
        assert c.ask("PFlaky/r", "run_count", v=2) == 4
        dead = c.ask(pipe, "dead_letters")
        assert list(dead) == ["1"] and dead["1"]["data"] == {"v": 2, "fail": -1}
        assert "stage fails for 2" in dead["1"]["error"]
        # replay once the stage is fixed: the item goes through, at the end
        c.ask("PFlaky/r", "heal")
        c.ask(pipe, "replay", seq=1)
        wait_for(lambda: c.ask("PSink/r", "seen") == [2, 6, 4], 20, "the replayed item")
        assert c.ask(pipe, "dead_letters") == {}


@pytest.mark.timeout(60)
def test_dead_letter_strategy_skips_at_once(start_node: StartNode) -> None:
    node = start_node(workers=2, agents=AGENTS)
    with node.client() as c:
        pipe = "PipeSkip/s"
        for v, fail in ((1, 0), (2, 1), (3, 0)):
            c.ask(pipe, "push", data={"v": v, "fail": fail})
        wait_for(lambda: c.ask(pipe, "status")["queued"] == 0, 20, "the pipeline to drain")
        assert c.ask("PSink/s", "seen") == [2, 6]
        assert c.ask("PFlaky/s", "run_count", v=2) == 1  # not retried
        assert list(c.ask(pipe, "dead_letters")) == ["1"]


@pytest.mark.timeout(60)
def test_stop_strategy_halts_the_key_until_resume(start_node: StartNode) -> None:
    node = start_node(workers=2, agents=AGENTS)
    with node.client() as c:
        pipe = "PipeStop/t"
        for v, fail in ((1, 0), (2, -1), (3, 0)):
            c.ask(pipe, "push", data={"v": v, "fail": fail})
        wait_for(lambda: c.ask(pipe, "status")["stopped"], 20, "the pipeline to stop")
        time.sleep(0.3)
        status = c.ask(pipe, "status")
        assert "stage fails for 2" in status["stopped"] and status["queued"] == 2
        assert c.ask("PSink/t", "seen") == [2]  # item 3 waits behind the failed item 2
        assert c.ask("PFlaky/t", "run_count", v=3) == 0
        assert c.ask(pipe, "resume") is True  # resuming while the stage is broken...
        wait_for(lambda: c.ask(pipe, "status")["stopped"], 20, "the pipeline to stop again")
        assert c.ask("PFlaky/t", "run_count", v=2) == 2  # ...ran it once more, then stopped
        c.ask("PFlaky/t", "heal")
        assert c.ask(pipe, "resume") is True
        wait_for(lambda: c.ask("PSink/t", "seen") == [2, 4, 6], 20, "the rest in order")
