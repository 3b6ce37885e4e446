"""Agent types used by the node tests (loaded with --agents tests.node.sample_agents:X)."""

from __future__ import annotations

import os
import signal
import time

from phoenix_node.state import GCounter
from workers.agent import Agent, action


class Crashy(Agent):
    """Actions that misbehave on purpose."""

    hits = GCounter()

    @action
    def boom(self, message: str = "boom") -> None:
        self.hits.increment(self.replica)
        raise RuntimeError(message)

    @action
    def die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    @action
    def hang(self, seconds: float = 60.0) -> None:
        time.sleep(seconds)

    @action
    def pid(self) -> int:
        return os.getpid()

    @action
    def cpu(self) -> list[int]:
        return sorted(os.sched_getaffinity(0))

    @action
    def unsendable(self) -> object:
        return object()

    @action
    def relay(self, target: str, n: int = 1) -> None:
        self.tell(target, "inc", n=n)


class NoActions(Agent):
    hits = GCounter()


class BadSignature(Agent):
    @action
    def run(self, *items: int) -> None:
        pass


def not_an_agent() -> None:
    pass
