"""Agent types used by the node tests (loaded with --agents tests.node.sample_agents:X)."""

from __future__ import annotations

import os
import signal
import time

from phoenix_node.state import RGA, GCounter, GSet
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


class Recorder(Agent):
    """Records every ``seq`` it was sent and how many messages ran: a message that ran
    twice shows as ``runs > len(seqs)``, a lost one as a missing seq (delivery tests)."""

    runs = GCounter()
    seqs = GSet()

    @action
    def record(self, seq: int) -> None:
        self.runs.increment(self.replica)
        self.seqs.add(seq)

    @action
    def report(self) -> dict[str, object]:
        return {"runs": self.runs.value, "seqs": sorted(self.seqs.value)}


class Forwarder(Agent):
    """Tells another agent from inside an action (the worker's transactional outbox)."""

    @action
    def forward(
        self, target: str, action_name: str = "inc", guarantee: str = "exactly_once"
    ) -> None:
        self.tell(target, action_name, delivery=guarantee)


class Gate(Agent):
    """``enter`` fails until ``open`` was called: a message that fails now and can be
    replayed from the dead letters once the cause is fixed."""

    opened = GCounter()
    entered = GCounter()

    @action
    def open(self) -> None:
        self.opened.increment(self.replica)

    @action
    def enter(self) -> int:
        if not self.opened.value:
            raise RuntimeError("the gate is closed")
        self.entered.increment(self.replica)
        return self.entered.value

    @action
    def count(self) -> int:
        return self.entered.value


# --- messaging (tests/node/test_messaging.py) -----------------------------------------------

#: calls per agent id in this worker process: lets an agent on the same worker report
#: another's progress without queueing behind it in that agent's mailbox
_MSG_CALLS: dict[str, int] = {}


class MsgSubscriber(Agent):
    """Records every event it gets as ``"topic|data"``."""

    seen = GSet()

    @action
    def on_event(self, topic: str, data: object = None) -> None:
        self.seen.add(f"{topic}|{data}")

    @action
    def events(self) -> list[str]:
        return sorted(self.seen.value)

    @action
    def follow(self, pattern: str) -> None:
        self.subscribe(pattern)

    @action
    def unfollow(self, pattern: str) -> None:
        self.unsubscribe(pattern)

    @action
    def announce(self, topic: str, data: object = None) -> None:
        self.publish(topic, data)


class _MsgSlow(Agent):
    """A slow ``work``: the mailbox fills while it runs."""

    done = GSet()
    order = RGA()

    @action
    def work(self, seq: int) -> list[object]:
        time.sleep(0.002)
        self.done.add(seq)
        self.order.append(self.replica, seq)
        return [self.id, seq]

    @action
    def got(self) -> list[int]:
        return sorted(self.done.value)

    @action
    def seen_order(self) -> list[int]:
        return list(self.order.value)


class MsgDropOldest(_MsgSlow):
    mailbox = {"capacity": 4, "low_watermark": 2, "strategy": "drop_oldest"}


class MsgDropNewest(_MsgSlow):
    mailbox = {"capacity": 4, "low_watermark": 2, "strategy": "drop_newest"}


class MsgReject(_MsgSlow):
    mailbox = {"capacity": 4, "low_watermark": 2, "strategy": "reject"}


class MsgSpill(_MsgSlow):
    mailbox = {"capacity": 4, "low_watermark": 2, "strategy": "spill_to_disk"}


class MsgSink(_MsgSlow):
    """Where MsgRedirect's overflow goes (a large mailbox)."""


class MsgRedirect(_MsgSlow):
    mailbox = {
        "capacity": 4,
        "low_watermark": 2,
        "strategy": "redirect",
        "redirect_to": "MsgSink/0",
    }


class MsgBusy(Agent):
    """Counts its calls in the worker process; ``spin`` keeps the worker busy."""

    @action
    def spin(self, ms: float = 0.0) -> None:
        _MSG_CALLS[self.id] = _MSG_CALLS.get(self.id, 0) + 1
        if ms:
            time.sleep(ms / 1000)

    @action
    def calls(self, agent: str) -> int:
        return _MSG_CALLS.get(agent, 0)


class MsgRated(MsgBusy):
    rate_limit = "50/s"
