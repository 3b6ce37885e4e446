"""Agent types for the pipeline tests (loaded by the node as tests.node.pipeline_agents:X)."""

from __future__ import annotations

from typing import Any

from phoenix_node.state import LWWMap, LWWRegister
from workers.agent import Agent, action
from workers.pipeline import Pipeline, Stage


class PFlaky(Agent):
    """``work(data={"v": v, "fail": n})`` fails the first n runs for that v (n < 0: always,
    until ``heal``), else returns v * 2."""

    runs = LWWMap()
    healed = LWWRegister()

    @action
    def work(self, data: dict[str, Any]) -> dict[str, Any]:
        v, fail = data["v"], data.get("fail", 0)
        done = self.runs.get(v, 0)
        self.runs.put(self.replica, v, done + 1)
        if not self.healed.value and (fail < 0 or done < fail):
            raise RuntimeError(f"stage fails for {v} (run {done + 1})")
        return {"v": v * 2}

    @action
    def heal(self) -> None:
        self.healed.set(self.replica, True)

    @action
    def run_count(self, v: int) -> int:
        return int(self.runs.get(v, 0))


class PSink(Agent):
    """The last stage: keeps what it received, in order."""

    log = LWWRegister()

    @action
    def record(self, data: dict[str, Any]) -> None:
        self.log.set(self.replica, [*(self.log.value or []), data["v"]])

    @action
    def seen(self) -> list[int]:
        return list(self.log.value or [])


class PipeRetry(Pipeline):
    stages = (Stage("PFlaky", "work", on_error="retry", retries=3), Stage("PSink", "record"))


class PipeSkip(Pipeline):
    stages = (Stage("PFlaky", "work", on_error="dead_letter"), Stage("PSink", "record"))


class PipeStop(Pipeline):
    stages = (Stage("PFlaky", "work", on_error="stop"), Stage("PSink", "record"))
