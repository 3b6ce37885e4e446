"""Gossip dissemination, simulated: coverage under loss, bounded sends, dedup."""

from __future__ import annotations

import random

import pytest

from workers.gossip import Gossip, Rumor


def spread(n: int, loss: float, seed: int, fanout: int = 2) -> tuple[set[int], int]:
    """Start one rumor at peer 0; returns (peers that delivered it, messages sent)."""
    rng = random.Random(seed)
    peers = {i: Gossip(i, range(n), fanout=fanout, rng=random.Random(seed * 100 + i))
             for i in range(n)}  # fmt: skip
    _, pushes = peers[0].start("t", {"x": 1})
    delivered, sent = {0}, 0
    queue = list(pushes)
    while queue:
        target, rumor = queue.pop(rng.randrange(len(queue)))  # any order
        sent += 1
        if rng.random() < loss:
            continue
        new, onward = peers[int(target)].receive(Rumor.from_wire(rumor.to_wire()))
        if new:
            delivered.add(int(target))
            queue.extend(onward)
        else:
            assert onward == []  # a duplicate is never pushed again
    return delivered, sent


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_every_peer_hears_a_rumor_without_loss(n: int) -> None:
    for seed in range(50):
        delivered, sent = spread(n, 0.0, seed)
        assert delivered == set(range(n)), (n, seed)
        assert sent <= (n - 1) + 2 * n  # the origin's pushes, then fanout per relay


def test_relays_carry_rumors_past_ten_percent_loss() -> None:
    runs = [spread(16, 0.1, seed)[0] for seed in range(200)]
    heard = sum(len(r) - 1 for r in runs) / (200 * 15)
    assert heard >= 0.98  # the origin's direct push alone would give 0.90
    assert sum(r == set(range(16)) for r in runs) >= 140  # the rest: periodic reload


def test_targets_exclude_me_and_ids_are_unique() -> None:
    g = Gossip(3, range(5), fanout=10, direct=0)
    rumor, pushes = g.start("t", None)
    assert sorted(int(p) for p, _ in pushes) == [0, 1, 2, 4]
    assert all(r.hops == rumor.hops - 1 for _, r in pushes)
    assert g.start("t", None)[0].id != rumor.id
    assert g.receive(rumor) == (False, [])  # its own rumor is not taken again


def test_hops_run_out() -> None:
    g = Gossip(0, range(4), hops=0)
    _, pushes = g.start("t", None)
    assert pushes == []


@pytest.mark.parametrize(
    "raw",
    [None, [], ["id", "t", None], [1, "t", None, 2], ["id", 2, None, 2], ["id", "t", None, -1],
     ["id", "t", None, 65], ["id", "t", None, True]],
)  # fmt: skip
def test_malformed_rumors_are_refused(raw: object) -> None:
    with pytest.raises(ValueError):
        Rumor.from_wire(raw)


def test_bad_fanout() -> None:
    with pytest.raises(ValueError):
        Gossip(0, fanout=0)
