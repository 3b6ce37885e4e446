"""A deterministic simulated network for sans-IO cluster protocols.

One seeded ``random.Random`` drives everything (latency, loss, duplication, and
the seeds of the nodes' own generators), and a fake clock advances from event
to event, so a run is reproducible and ten simulated minutes take seconds.
Every message goes through ``msgpack`` (as on the real wire), so whatever a
node returns must be msgpack-able.

Faults: per-message loss and duplication probabilities, per-link latency
(a fixed base per directed link, drawn once, plus jitter), partitions between
groups of addresses (checked at send and at delivery, so messages in flight
when a partition starts are lost too), and crashes (a crashed node neither
ticks nor receives, and what was in flight to it is lost).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterable, Sequence

import msgpack

from phoenix_node.cluster.membership import Membership, NodeId, Outgoing, SwimConfig

__all__ = ["SimNetwork"]


class SimNetwork:
    """Nodes, a fake clock and a message queue; see the module docstring."""

    def __init__(
        self,
        seed: int,
        *,
        config: SwimConfig | None = None,
        latency: tuple[float, float] = (0.001, 0.010),
        jitter: float = 0.002,
        loss: float = 0.0,
        duplicate: float = 0.0,
    ) -> None:
        self.rng = random.Random(seed)
        self.config = config if config is not None else SwimConfig()
        self.latency = latency
        self.jitter = jitter
        self.loss = loss
        self.duplicate = duplicate
        self.now = 0.0
        self.nodes: dict[str, Membership] = {}
        self.crashed: set[str] = set()
        self.groups: list[frozenset[str]] = []
        self.one_way: set[tuple[str, str]] = set()  # (src, dst) links that drop everything
        self.sent = 0
        self.dropped = 0
        self._links: dict[tuple[str, str], float] = {}
        self._queue: list[tuple[float, int, str, str, bytes]] = []
        self._counter = itertools.count()

    # ---------------------------------------------------------------- topology

    def add(self, address: str, *, incarnation: int = 1, seeds: Sequence[str] = ()) -> Membership:
        node = Membership(
            NodeId(address, incarnation),
            self.config,
            seeds=seeds,
            rng=random.Random(self.rng.getrandbits(64)),
            now=self.now,
        )
        self.nodes[address] = node
        self.crashed.discard(address)
        return node

    def crash(self, address: str) -> None:
        self.crashed.add(address)

    def partition(self, *groups: Iterable[str]) -> None:
        self.groups = [frozenset(g) for g in groups]

    def heal(self) -> None:
        self.groups = []

    def blocked(self, src: str, dst: str) -> bool:
        if src in self.crashed or dst in self.crashed or dst not in self.nodes:
            return True
        if (src, dst) in self.one_way:
            return True
        return any((src in g) != (dst in g) for g in self.groups)

    def live(self) -> dict[str, Membership]:
        return {a: n for a, n in self.nodes.items() if a not in self.crashed}

    # ---------------------------------------------------------------- traffic

    def send(self, src: str, outgoing: Iterable[Outgoing]) -> None:
        for item in outgoing:
            payload = msgpack.packb(item.message, use_bin_type=True)
            self.sent += 1
            copies = 2 if self.rng.random() < self.duplicate else 1
            for _ in range(copies):
                if self.blocked(src, item.address) or self.rng.random() < self.loss:
                    self.dropped += 1
                    continue
                at = self.now + self._link(src, item.address) + self.rng.uniform(0, self.jitter)
                heapq.heappush(self._queue, (at, next(self._counter), src, item.address, payload))

    def inject(self, src: str, dst: str, message: object) -> None:
        """Deliver a hand-made message now (for hostile-input tests)."""
        payload = msgpack.packb(message, use_bin_type=True)
        heapq.heappush(self._queue, (self.now, next(self._counter), src, dst, payload))

    def _link(self, src: str, dst: str) -> float:
        key = (src, dst)
        if key not in self._links:
            self._links[key] = self.rng.uniform(*self.latency)
        return self._links[key]

    # ---------------------------------------------------------------- the loop

    def run(self, duration: float, until: Callable[[], bool] | None = None) -> bool:
        """Advance ``duration`` simulated seconds, or until ``until()`` holds (checked
        after every step); return whether ``until`` held."""
        end = self.now + duration
        while True:
            if until is not None and until():
                return True
            live = self.live()
            t_tick = min((n.next_deadline() for n in live.values()), default=math.inf)
            t_msg = self._queue[0][0] if self._queue else math.inf
            step = min(t_tick, t_msg)
            if step > end:
                self.now = end
                return until is not None and until()
            self.now = max(self.now, step)
            if t_msg <= t_tick:
                self._deliver()
            else:
                for address, node in live.items():
                    if node.next_deadline() <= self.now:
                        self.send(address, node.tick(self.now))

    def _deliver(self) -> None:
        _, _, src, dst, payload = heapq.heappop(self._queue)
        if self.blocked(src, dst):
            self.dropped += 1
            return
        message = msgpack.unpackb(payload, raw=False, strict_map_key=True)
        self.send(dst, self.nodes[dst].receive(src, message, self.now))

    # ---------------------------------------------------------------- views

    def view(self, observer: str) -> dict[str, str]:
        """``{address: state}`` of every record ``observer`` holds (itself included)."""
        return {str(m.node_id.address): m.state.value for m in self.nodes[observer].members()}

    def all_see(self, addresses: Iterable[str], state: str, about: Iterable[str]) -> bool:
        about = list(about)
        for observer in addresses:
            view = self.view(observer)
            if any(view.get(a) != state for a in about):
                return False
        return True
