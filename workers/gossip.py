"""Gossip broadcast: epidemic dissemination of small notices among peers.

The peer that starts a rumor pushes it to every peer when there are at most
``direct`` of them (inside a node: every worker, so without loss everyone hears
it at once), else to ``fanout`` random peers. Each peer that learns it (a new
id) delivers it locally and pushes it on to ``fanout`` random peers while its
hop budget lasts; a peer that already saw the id drops it. The extra pushes
are the redundancy that carries a rumor past lost messages: with 10 % loss
among 16 peers and ``fanout`` 2, about 98.5 % of the peers hear each rumor
against 90 % from the direct push alone (simulated in
``tests/workers/test_gossip.py``), and a peer sends at most ``fanout``
messages per rumor it relays. For the rare miss, callers keep an
anti-entropy path (the workers re-read the subscription table every 10 s).
Rumors are idempotent notices (for example "the subscription table changed:
reload it"), never data that must arrive once.

Inside a node the peers are the other workers (their ipc endpoints); the
cluster extends the same :class:`Gossip` to other nodes by giving it more
peer ids. This module only decides *who* gets *what*: the caller sends.
"""

from __future__ import annotations

import math
import os
import random
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["Gossip", "Rumor"]


@dataclass(frozen=True)
class Rumor:
    """A notice being spread: ``id`` is unique per rumor, ``hops`` what is left."""

    id: str
    topic: str
    data: Any
    hops: int

    def to_wire(self) -> list[Any]:
        return [self.id, self.topic, self.data, self.hops]

    @classmethod
    def from_wire(cls, raw: Any) -> Rumor:
        if (
            not isinstance(raw, list)
            or len(raw) != 4
            or not isinstance(raw[0], str)
            or not isinstance(raw[1], str)
            or type(raw[3]) is not int
            or not 0 <= raw[3] <= 64
        ):
            raise ValueError("a rumor is [id: str, topic: str, data, hops: int 0..64]")
        return cls(raw[0], raw[1], raw[2], raw[3])


class Gossip:
    """Who to push which rumor to. ``me`` never appears among the targets."""

    def __init__(
        self,
        me: Hashable,
        peers: Iterable[Hashable] = (),
        *,
        fanout: int = 2,
        direct: int = 16,
        hops: int | None = None,
        remember: int = 10_000,
        rng: random.Random | None = None,
    ) -> None:
        if fanout < 1:
            raise ValueError(f"fanout must be >= 1, got {fanout}")
        self.me = me
        self.fanout = fanout
        self.direct = direct
        self._hops = hops
        self._peers: list[Hashable] = []
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._remember = remember
        self._rng = rng or random.Random()
        self._counter = 0
        self._prefix = f"{me}-{os.getpid()}-{self._rng.getrandbits(32):08x}"
        self.set_peers(peers)

    def set_peers(self, peers: Iterable[Hashable]) -> None:
        self._peers = [p for p in peers if p != self.me]

    @property
    def peers(self) -> list[Hashable]:
        return list(self._peers)

    def default_hops(self) -> int:
        n = len(self._peers) + 1
        return self._hops if self._hops is not None else math.ceil(math.log(n, self.fanout + 1)) + 2

    def start(self, topic: str, data: Any) -> tuple[Rumor, list[tuple[Hashable, Rumor]]]:
        """A new rumor from this peer: ``(rumor, [(peer, rumor to send)...])``."""
        self._counter += 1
        rumor = Rumor(f"{self._prefix}-{self._counter}", topic, data, self.default_hops())
        self._remember_id(rumor.id)
        if len(self._peers) <= self.direct and rumor.hops > 0:
            onward = Rumor(rumor.id, topic, data, rumor.hops - 1)
            return rumor, [(peer, onward) for peer in self._peers]
        return rumor, self._pushes(rumor)

    def receive(self, rumor: Rumor) -> tuple[bool, list[tuple[Hashable, Rumor]]]:
        """A rumor from a peer: ``(new, pushes)``; deliver it locally only if ``new``."""
        if rumor.id in self._seen:
            self._seen.move_to_end(rumor.id)
            return False, []
        self._remember_id(rumor.id)
        return True, self._pushes(rumor)

    def _pushes(self, rumor: Rumor) -> list[tuple[Hashable, Rumor]]:
        if rumor.hops <= 0 or not self._peers:
            return []
        onward = Rumor(rumor.id, rumor.topic, rumor.data, rumor.hops - 1)
        targets = self._rng.sample(self._peers, min(self.fanout, len(self._peers)))
        return [(peer, onward) for peer in targets]

    def _remember_id(self, rumor_id: str) -> None:
        self._seen[rumor_id] = None
        if len(self._seen) > self._remember:
            self._seen.popitem(last=False)
