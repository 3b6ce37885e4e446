"""Network faults injected inside the transport, for tests of the cluster.

``tc netem`` is not available where Phoenix is tested, so a node started with
``--fault-injection`` lets a test change, at run time, what happens to the
messages it sends to its peers:

- ``drop``: probability that a message is lost;
- ``duplicate``: probability that it is delivered twice;
- ``delay`` / ``jitter``: seconds it is held back (uniform in ``delay ± jitter``);
- ``partition``: peer names (addresses) cut off in both directions: nothing is
  sent to them, and what they send is dropped on arrival.

The injector only decides; the caller holds delayed messages in :meth:`hold`
and sends what :meth:`due` returns. A node without fault injection never
builds one, so the hot path pays nothing. Deterministic with a seeded ``rng``
and an injected clock.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FaultInjector", "FaultPlan"]

_MAX_HELD = 100_000  # delayed messages held at most (beyond: dropped, counted)


def _probability(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    if not (math.isfinite(value) and 0.0 <= value <= 60.0):
        raise ValueError(f"{name} must be in [0, 60] seconds, got {value}")
    return float(value)


@dataclass(frozen=True)
class FaultPlan:
    """What happens to messages to (and from) peers. The default plan does nothing."""

    drop: float = 0.0
    duplicate: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0
    partition: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        _probability("drop", self.drop)
        _probability("duplicate", self.duplicate)
        _seconds("delay", self.delay)
        _seconds("jitter", self.jitter)
        if self.jitter > self.delay:
            raise ValueError(f"jitter ({self.jitter}) must not exceed delay ({self.delay})")
        if not isinstance(self.partition, frozenset) or not all(
            isinstance(p, str) and p for p in self.partition
        ):
            raise TypeError("partition must be a frozenset of peer names")

    @classmethod
    def from_dict(cls, raw: Any) -> FaultPlan:
        """From a msgpack/JSON map (the admin command); unknown keys are an error."""
        if not isinstance(raw, Mapping):
            raise TypeError(f"a fault plan is a map, got {type(raw).__name__}")
        known = {"drop", "duplicate", "delay", "jitter", "partition"}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown fault plan keys {sorted(map(str, unknown))}")
        values = dict(raw)
        if "partition" in values:
            peers = values["partition"]
            if not isinstance(peers, list | tuple) or len(peers) > 1000:
                raise TypeError("partition must be a list of at most 1000 peer names")
            values["partition"] = frozenset(peers)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {
            "drop": self.drop,
            "duplicate": self.duplicate,
            "delay": self.delay,
            "jitter": self.jitter,
            "partition": sorted(self.partition),
        }


class FaultInjector:
    """Applies a :class:`FaultPlan` to messages, and holds the delayed ones."""

    def __init__(
        self,
        plan: FaultPlan | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.plan = plan or FaultPlan()
        self._rng = rng or random.Random()
        self._clock = clock
        self._held: list[tuple[float, int, str, Any]] = []
        self._seq = itertools.count()
        self.stats = {"dropped": 0, "duplicated": 0, "delayed": 0, "cut": 0}

    def cut_off(self, peer: str) -> bool:
        """True if ``peer`` is on the other side of a partition (drop what it sends)."""
        if peer in self.plan.partition:
            self.stats["cut"] += 1
            return True
        return False

    def outgoing(self, peer: str, message: Any) -> list[Any]:
        """The copies of ``message`` to send to ``peer`` now (0, 1 or 2); delayed copies
        are held and come back from :meth:`due`."""
        plan = self.plan
        if peer in plan.partition:
            self.stats["cut"] += 1
            return []
        rng = self._rng
        if plan.drop and rng.random() < plan.drop:
            self.stats["dropped"] += 1
            return []
        copies = 2 if plan.duplicate and rng.random() < plan.duplicate else 1
        if copies == 2:
            self.stats["duplicated"] += 1
        if not plan.delay:
            return [message] * copies
        for _ in range(copies):
            wait = plan.delay + (rng.uniform(-plan.jitter, plan.jitter) if plan.jitter else 0.0)
            if len(self._held) >= _MAX_HELD:
                self.stats["dropped"] += 1
                continue
            heapq.heappush(self._held, (self._clock() + wait, next(self._seq), peer, message))
            self.stats["delayed"] += 1
        return []

    def due(self) -> Iterable[tuple[str, Any]]:
        """Held messages whose delay is over, oldest first, as ``(peer, message)``."""
        now = self._clock()
        held = self._held
        while held and held[0][0] <= now:
            _, _, peer, message = heapq.heappop(held)
            if peer not in self.plan.partition:
                yield peer, message

    def next_due(self) -> float | None:
        """When the next held message is due (monotonic seconds), None if none is held."""
        return self._held[0][0] if self._held else None

    def statistics(self) -> dict[str, Any]:
        return {**self.stats, "held": len(self._held), "plan": self.plan.to_dict()}
