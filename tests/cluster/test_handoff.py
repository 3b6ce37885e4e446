"""The Handoff in isolation: a real Store, a fake cluster recording what would go to the
peers, an injected clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ipc.protocol import ProtocolError, encode_reply, pack, split_envelope, unpack
from phoenix_node.cluster.handoff import FETCH_ACTION, Handoff
from phoenix_node.cluster.membership import NodeId
from phoenix_node.cluster.ring import Ring
from phoenix_node.state.store import Store

from .test_replicator import Clock

ME, P1, P2 = "tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "tcp://127.0.0.1:3"


class FakeCluster:
    def __init__(self, members: list[str]) -> None:
        self.me = NodeId(ME, 1)
        self.ring = Ring(dict.fromkeys(members, 1.0))
        self.sent: list[tuple[str, list[bytes]]] = []

    def preference(self, key: str, n: int, ring: Ring | None = None) -> list[str]:
        return (self.ring if ring is None else ring).preference(key, n)

    def forward(self, address: str, frames: list[bytes]) -> bool:
        self.sent.append((address, frames))
        return True


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with Store(tmp_path / "db", durability="buffered") as s:
        yield s


def make(store: Store, members: list[str], replicas: int = 0) -> tuple[Handoff, Any, Clock, list]:
    cluster, clock, merged = FakeCluster(members), Clock(), []
    handoff = Handoff(
        store, cluster, replicas=replicas, merge_local=merged.append, window=5.0,
        timeout=1.0, clock=clock,  # type: ignore[arg-type]
    )  # fmt: skip
    return handoff, cluster, clock, merged


def fetches(cluster: FakeCluster) -> list[tuple[str, int, list[str]]]:
    out = []
    for address, frames in cluster.sent:
        _, header, payload = split_envelope(frames)
        fields = unpack(header)
        assert fields[4] == FETCH_ACTION
        out.append((address, fields[2], unpack(payload)))
    cluster.sent.clear()
    return out


def answer(handoff: Handoff, corr: int, items: list[list[Any]]) -> bool:
    return handoff.on_reply([b"", encode_reply(corr, 0), pack(items)])


def new_key(before: Ring, after: Ring) -> str:
    """An agent id that ``ME`` owns in ``after`` and does not hold in ``before``."""
    for i in range(10_000):
        key = f"Tally/k{i}"
        if after.owner(key) == ME and ME not in before.preference(key, 1):
            return key
    raise AssertionError("no such key")


def test_a_node_that_joined_fetches_an_agent_before_serving_it(store: Store) -> None:
    handoff, cluster, _, merged = make(store, [ME])  # joining: alone until up
    assert not handoff.active()
    cluster.ring = Ring(dict.fromkeys([ME, P1, P2], 1.0))
    assert handoff.active()
    key = new_key(Ring(dict.fromkeys([P1, P2], 1.0)), cluster.ring)
    served: list[str] = []
    assert handoff.hold([key], lambda: served.append(key))
    sent = fetches(cluster)
    assert [(p, ids) for p, _, ids in sent] == [(Ring({P1: 1, P2: 1}).owner(key), [key])]
    assert served == [] and handoff.status()["held"] == 1
    assert answer(handoff, sent[0][1], [[key, b"\x91\x05"]])
    assert merged == [[(key, b"\x91\x05")]] and served == [key]  # merged first, then served
    assert not handoff.hold([key], lambda: None)  # fetched once: served at once from now
    assert handoff.status()["fetched"] == 1 and handoff.status()["held"] == 0


def test_an_agent_this_node_held_before_is_served_at_once(store: Store) -> None:
    handoff, cluster, _, _ = make(store, [ME, P1], replicas=1)  # every node holds all
    cluster.ring = Ring(dict.fromkeys([ME, P1, P2], 1.0))
    assert handoff.active()
    assert not handoff.hold([f"Tally/k{i}" for i in range(50)], lambda: None)
    assert cluster.sent == []


def test_no_answer_in_time_serves_the_request_anyway(store: Store) -> None:
    handoff, cluster, clock, merged = make(store, [ME])
    cluster.ring = Ring(dict.fromkeys([ME, P1], 1.0))
    key = new_key(Ring({P1: 1.0}), cluster.ring)
    served: list[str] = []
    assert handoff.active() and handoff.hold([key], lambda: served.append(key))
    ((_, corr, _),) = fetches(cluster)
    clock.now += 1.5
    assert handoff.next_deadline() <= clock.now
    handoff.tick()
    assert served == [key] and merged == [] and handoff.status()["timeouts"] == 1
    assert answer(handoff, corr, [[key, b"\x90"]])  # a late answer: consumed, ignored
    assert merged == []


def test_the_window_ends(store: Store) -> None:
    handoff, cluster, clock, _ = make(store, [ME])
    cluster.ring = Ring(dict.fromkeys([ME, P1], 1.0))
    assert handoff.active()
    clock.now += 6.0
    assert not handoff.active()


def test_a_fetch_is_answered_from_the_store_and_bad_ones_refused(store: Store) -> None:
    handoff, _, _, _ = make(store, [ME, P1])
    batch = store.batch()
    batch.save_state("Tally/a", b"\x91\x01")
    store.commit(batch)
    assert handoff.on_fetch(pack(["Tally/a", "Tally/b"])) == [["Tally/a", b"\x91\x01"]]
    for bad in (pack("Tally/a"), pack([1]), pack([""]), pack(["x"] * 1001)):
        with pytest.raises(ProtocolError):
            handoff.on_fetch(bad)


def test_an_answer_for_agents_not_asked_is_refused(store: Store) -> None:
    handoff, cluster, _, merged = make(store, [ME])
    cluster.ring = Ring(dict.fromkeys([ME, P1], 1.0))
    key = new_key(Ring({P1: 1.0}), cluster.ring)
    served: list[str] = []
    assert handoff.active() and handoff.hold([key], lambda: served.append(key))
    ((_, corr, _),) = fetches(cluster)
    assert answer(handoff, corr, [["Tally/other", b"\x90"]])
    assert merged == [] and served == [key]  # the bad answer is dropped, the request served
