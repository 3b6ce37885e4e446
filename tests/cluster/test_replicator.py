"""The Replicator in isolation: a real Store, a fake cluster that records what would go
to the peers, and an injected clock. Mostly the replies held until the replicas hold
the writes they stand for (``replication_ack=replicas``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ipc.protocol import (
    ACKS,
    CREDIT,
    REPLY_BATCH,
    ErrorCode,
    decode_batch,
    decode_reply_kind,
    encode_acks,
    encode_reply,
    encode_reply_batch,
    encode_reply_kind,
    reply_items,
    split_envelope,
)
from phoenix_node.cluster.membership import NodeId
from phoenix_node.cluster.replication import Replicator
from phoenix_node.cluster.ring import Ring
from phoenix_node.state.store import Store
from workers.host import MERGE_ACTION

ME, PEER = "tcp://127.0.0.1:1", "tcp://127.0.0.1:2"


class FakeCluster:
    """What the Replicator uses of ClusterService: me, ring, single(), forward()."""

    def __init__(self) -> None:
        self.me = NodeId(ME, 1)
        self.ring = Ring({ME: 1.0, PEER: 1.0})
        self.sent: list[tuple[str, list[bytes]]] = []
        self.changes = 0  # membership events

    def single(self) -> bool:
        return len(self.ring) <= 1

    def preference(self, key: str, n: int, ring: Ring | None = None) -> list[str]:
        return (self.ring if ring is None else ring).preference(key, n)

    def forward(self, address: str, frames: list[bytes]) -> bool:
        self.sent.append((address, frames))
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with Store(tmp_path / "db", durability="buffered") as s:
        yield s


def make(store: Store, **kw: Any) -> tuple[Replicator, FakeCluster, Clock, list[list[bytes]]]:
    cluster, clock, released = FakeCluster(), Clock(), []
    rep = Replicator(
        store, cluster, replicas=1, anti_entropy_interval=1000.0, clock=clock,  # type: ignore[arg-type]
        send=released.append, **kw,
    )  # fmt: skip
    rep.tick()  # switches the change log on (the node has a peer)
    assert rep.holds()
    return rep, cluster, clock, released


def commit(store: Store, agent_id: str, state: bytes, stamp: bytes) -> None:
    """What a worker's commit does while replicating: the state and its log entry."""
    batch = store.batch()
    batch.save_state(agent_id, state)
    batch.put("repl", agent_id.encode(), stamp)
    store.commit(batch)


def reply(corr: int) -> list[bytes]:
    """A worker's reply to a client's ask (routing stack: the client's id)."""
    return [b"client", b"", encode_reply(corr, 0), b"\xc0"]


def shipped(cluster: FakeCluster) -> list[tuple[str, int, str]]:
    """(peer, corr, agent id) of every _merge ask sent so far; clears the record."""
    out = []
    for address, frames in cluster.sent:
        _, _, payload = split_envelope(frames)
        for entry in decode_batch(payload, {}):
            assert not isinstance(entry, Exception)
            assert entry[3] == MERGE_ACTION
            out.append((address, entry[1], entry[2]))
    cluster.sent.clear()
    return out


def answer(rep: Replicator, corrs: list[int], status: int = 0) -> None:
    items = [(c, status, b"\xc0") for c in corrs]
    rep.on_reply(PEER, [b"", encode_reply_kind(REPLY_BATCH, 0), encode_reply_batch(items)])


def test_a_reply_waits_until_the_replica_answered_the_shipment_of_the_change(
    store: Store,
) -> None:
    rep, cluster, _, released = make(store)
    commit(store, "Tally/a", b"\x91\x01", b"s1")
    rep.hold(reply(7))
    rep.tick()  # groups the reply with what is logged now, ships it
    ships = shipped(cluster)
    assert [(p, a) for p, _, a in ships] == [(PEER, "Tally/a")]
    assert released == [] and rep.status()["held"] == 1
    answer(rep, [ships[0][1]])
    assert released == [reply(7)]
    assert rep.status()["held"] == 0 and rep.status()["acked"] == 1


def test_a_reply_with_nothing_logged_is_released_at_the_next_turn(store: Store) -> None:
    rep, _, _, released = make(store)
    rep.hold(reply(1))
    assert released == [] and rep.next_deadline() == 0.0
    rep.tick()
    assert released == [reply(1)]


def test_credit_and_other_frames_are_not_held(store: Store) -> None:
    rep, _, _, released = make(store)
    credit = [b"client", b"", encode_reply_kind(CREDIT, 5), b""]
    rep.hold(credit)
    assert released == [credit]


def test_a_change_logged_again_during_a_shipment_needs_the_next_shipment(
    store: Store,
) -> None:
    rep, cluster, _, released = make(store)
    commit(store, "Tally/a", b"\x91\x01", b"s1")
    rep.tick()  # ships s1 (no reply held yet)
    first = shipped(cluster)
    commit(store, "Tally/a", b"\x91\x02", b"s2")  # a second write while s1 is in flight
    rep.hold(reply(2))
    rep.tick()  # the group waits for s2; the agent is in flight: not shipped again yet
    assert shipped(cluster) == []
    answer(rep, [first[0][1]])  # s1 answered: it does not cover the write of s2
    assert released == []
    rep.tick()  # the entry changed (s2): shipped again, with the newer state
    second = shipped(cluster)
    assert [a for _, _, a in second] == ["Tally/a"]
    answer(rep, [second[0][1]])
    assert released == [reply(2)]


def test_a_flight_in_progress_with_the_logged_stamp_covers_the_reply(store: Store) -> None:
    rep, cluster, _, released = make(store)
    commit(store, "Tally/a", b"\x91\x01", b"s1")
    rep.tick()
    ships = shipped(cluster)
    rep.hold(reply(3))  # its write is s1, already on its way
    rep.tick()
    assert released == []
    answer(rep, [ships[0][1]])
    assert released == [reply(3)]


def test_a_reply_not_covered_in_time_becomes_unavailable_errors(store: Store) -> None:
    rep, cluster, clock, released = make(store, hold_timeout=2.0)
    commit(store, "Tally/a", b"\x91\x01", b"s1")
    acks = [b"client", b"", encode_reply_kind(ACKS, 0), encode_acks([11, 12])]
    failed = [b"client", b"", encode_reply(13, int(ErrorCode.BAD_REQUEST)), b"\xc0"]
    for frames in (reply(10), acks, failed):
        rep.hold(frames)
    rep.tick()
    shipped(cluster)  # the replica never answers
    clock.now += 2.5
    rep.tick()
    assert len(released) == 3 and rep.status()["hold_timeouts"] == 3
    answers = []
    for frames in released:
        stack, header, payload = split_envelope(frames)
        assert stack == [b"client"]
        kind, corr, status = decode_reply_kind(header)
        assert kind == REPLY_BATCH
        answers += [(c, st) for c, st, _ in reply_items(kind, corr, status, payload)]
    unavailable = int(ErrorCode.UNAVAILABLE)
    assert answers == [(10, unavailable), (11, unavailable), (12, unavailable), (13, 1)]


def test_held_replies_are_released_when_the_node_is_alone_again(store: Store) -> None:
    rep, cluster, _, released = make(store)
    commit(store, "Tally/a", b"\x91\x01", b"s1")
    rep.hold(reply(4))
    rep.tick()
    assert released == []
    cluster.ring = Ring({ME: 1.0})  # the peer left: no replica to wait for
    rep.tick()
    assert released == [reply(4)] and not rep.holds()


def test_a_replicated_entry_leaves_the_log_at_the_next_flush(store: Store) -> None:
    rep, cluster, clock, _ = make(store)
    commit(store, "Tally/a", b"\x91\x01", b"s1")
    rep.tick()
    answer(rep, [c for _, c, _ in shipped(cluster)])
    assert rep.status()["pending"] == 0  # replicated: no longer counted
    assert store.get("repl", b"Tally/a") == b"s1"  # deleted at the flush, in one txn
    clock.now += 1.0
    rep.tick()
    assert store.get("repl", b"Tally/a") is None
    assert shipped(cluster) == []


def test_owner_acks_never_hold(store: Store) -> None:
    cluster, clock = FakeCluster(), Clock()
    rep = Replicator(store, cluster, replicas=1, ack="owner", clock=clock)  # type: ignore[arg-type]
    rep.tick()
    assert not rep.holds() and rep.status()["ack"] == "owner"


def test_a_ring_change_ships_the_flights_again_to_the_new_targets(store: Store) -> None:
    rep, cluster, _, released = make(store)
    commit(store, "Tally/a", b"\x91\x01", b"s1")
    rep.hold(reply(5))
    rep.tick()
    assert [p for p, _, _ in shipped(cluster)] == [PEER]  # PEER never answers
    other = "tcp://127.0.0.1:3"
    cluster.ring = Ring({ME: 1.0, other: 1.0})  # PEER is gone, another node took its place
    rep.tick()
    ships = shipped(cluster)
    assert [(p, a) for p, _, a in ships] == [(other, "Tally/a")]
    answer(rep, [ships[0][1]])
    assert released == [reply(5)]
    assert rep.status()["expired"] == 0  # shipped again by choice, not timed out
