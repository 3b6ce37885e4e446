"""Agents of the cross-node messaging tests (loaded by the node processes)."""

from __future__ import annotations

from typing import Any

from phoenix_node.state import GCounter, GSet
from workers import Agent, action


class Sender(Agent):
    """Sends from inside its actions: tells, requests, publishes, subscriptions."""

    answers = GSet()

    @action
    def send(self, target: str, seqs: list[int], guarantee: str = "exactly_once") -> None:
        for seq in seqs:
            self.tell(target, "record", delivery=guarantee, seq=seq)

    @action
    def ask(self, target: str, seq: int) -> None:
        self.request(target, "echo", reply_to="answered", context=seq, seq=seq)

    @action
    def answered(self, status: int, result: Any = None, context: Any = None) -> None:
        self.answers.add(f"{status}|{result}|{context}")

    @action
    def replies(self) -> list[str]:
        return sorted(self.answers.value)

    @action
    def announce(self, topic: str, data: Any = None, guarantee: str = "at_least_once") -> None:
        self.publish(topic, data, delivery=guarantee)


class Sink(Agent):
    """Records every ``seq`` and counts its runs: a duplicate shows as runs > seqs."""

    runs = GCounter()
    seqs = GSet()
    events = GSet()

    @action
    def record(self, seq: int) -> None:
        self.runs.increment(self.replica)
        self.seqs.add(seq)

    @action
    def echo(self, seq: int) -> int:
        return seq * 10

    @action
    def report(self) -> dict[str, object]:
        return {"runs": self.runs.value, "seqs": sorted(self.seqs.value),
                "events": sorted(self.events.value)}  # fmt: skip

    @action
    def follow(self, pattern: str) -> None:
        self.subscribe(pattern, "on_event")

    @action
    def unfollow(self, pattern: str) -> None:
        self.unsubscribe(pattern)

    @action
    def on_event(self, topic: str, data: Any = None) -> None:
        self.runs.increment(self.replica)
        self.events.add(f"{topic}|{data}")
