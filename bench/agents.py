"""Agent types of the messaging bench (``bench/messaging_bench.py``).

The node loads them with ``agents=["bench.agents:Tally", ...]``: the node
process imports ``bench.agents``, so it must run with the repository root on
its import path (the bench starts it from there).

- :class:`Tally`: a grow-only counter, the receiver of the tell scenarios:
  reading it back proves how many messages ran.
- :class:`Listener`: counts the events of its topic subscriptions.
- :class:`Journal`: a grow-only set of entries, for tests that must tell which
  writes are present (not only how many).
- :class:`Catalog`: a last-writer-wins map that grows large (``fill``) while each
  ``put`` changes one key: what replication by deltas is for.
- :class:`Fanout`: sends tells from inside its action (agent-to-agent messages,
  to agents of its own node or of another one).
- :class:`Slow`: an action that sleeps ~1 ms (about 1,000 messages/s per
  worker), the target of the overload scenario. Its mailbox is small on
  purpose, so that the memory bound it sets is easy to see.
"""

from __future__ import annotations

import time
from typing import Any

from phoenix_node.state import GCounter, GSet, LWWMap
from workers.agent import Agent, action

__all__ = ["SLOW_MAILBOX", "Catalog", "Fanout", "Journal", "Listener", "Slow", "Tally"]

#: the mailbox of every Slow agent: reject (BACKPRESSURE) once 1,000 messages wait
SLOW_MAILBOX = {"capacity": 1000, "low_watermark": 500, "strategy": "reject"}

# Seconds each Slow.work sleeps, per worker process. Changed by Slow.set_delay so
# that the bench can drain a backlog quickly once the flood has been measured.
_delay = 0.001


class Tally(Agent):
    """``inc(n=1)`` adds to the count (returns nothing: tells only); ``get()`` reads it."""

    count = GCounter()

    @action
    def inc(self, n: int = 1) -> None:
        self.count.increment(self.replica, n)

    @action
    def get(self) -> int:
        return self.count.value


class Journal(Agent):
    """``add(entry)`` records an entry; ``entries()`` lists every entry, sorted."""

    seen = GSet()

    @action
    def add(self, entry: str) -> None:
        self.seen.add(entry)

    @action
    def entries(self) -> list[str]:
        return sorted(self.seen.value)


class Catalog(Agent):
    """``fill(n, size)`` writes keys ``k0..k<n-1`` (values of ``size`` bytes);
    ``put(key, value)`` writes one; ``size()`` counts the keys."""

    items = LWWMap()

    @action
    def fill(self, n: int, size: int = 20) -> None:
        for i in range(n):
            self.items.put(self.replica, f"k{i}", "v" * size)

    @action
    def put(self, key: str, value: str) -> None:
        self.items.put(self.replica, key, value)

    @action
    def size(self) -> int:
        return len(self.items)


class Fanout(Agent):
    """``send(targets, n, guarantee)`` tells each target ``inc`` ``n`` times."""

    @action
    def send(self, targets: list[str], n: int = 1, guarantee: str = "at_least_once") -> int:
        for _ in range(n):
            for target in targets:
                self.tell(target, "inc", delivery=guarantee)
        return n * len(targets)


class Listener(Agent):
    """Counts the events delivered to ``on_event`` (its subscriptions' action)."""

    events = GCounter()

    @action
    def on_event(self, topic: str, data: Any = None) -> None:
        self.events.increment(self.replica)

    @action
    def get(self) -> int:
        return self.events.value


class Slow(Agent):
    """``work()`` sleeps (1 ms by default) and counts; ``get()`` reads the count."""

    mailbox = SLOW_MAILBOX
    done = GCounter()

    @action
    def work(self) -> None:
        if _delay > 0:
            time.sleep(_delay)
        self.done.increment(self.replica)

    @action
    def get(self) -> int:
        return self.done.value

    @action
    def set_delay(self, seconds: float) -> float:
        """Set the sleep of every Slow agent of this worker process; returns the old one."""
        global _delay
        if not isinstance(seconds, int | float) or not 0 <= seconds <= 1:
            raise ValueError(f"delay must be a number of seconds in [0, 1], got {seconds!r}")
        old, _delay = _delay, float(seconds)
        return old
