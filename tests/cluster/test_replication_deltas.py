"""Replication by deltas: the Replicator ships a logged delta to a replica known to hold
every earlier change of the agent, the whole state otherwise; and, end to end in one
process (two AgentHosts on two stores, the Replicator between them), a replica fed
deltas converges to the owner's state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipc.protocol import (
    BATCH,
    REPLY_BATCH,
    decode_batch,
    decode_header,
    encode_reply_batch,
    encode_reply_kind,
    pack,
    split_envelope,
)
from phoenix_node.cluster.replication import Replicator
from phoenix_node.cluster.ring import Ring
from phoenix_node.state import GCounter, LWWMap, ORSet
from phoenix_node.state.store import Store
from workers.agent import Agent, action
from workers.host import REPLICATE_KEY, REPLICATE_WHOLE, AgentHost
from workers.replog import delta_entry, entry_key, entry_stamp, whole_entry

from .test_replicator import ME, PEER, Clock, FakeCluster, answer, make, reply

STATE = b"S" * 200  # a stored state record (the Replicator never decodes it)
DELTA = b"d" * 20


def log(store: Store, agent_id: str, value: bytes, state: bytes = STATE) -> None:
    """A worker's commit while replicating: the state and its change log entry."""
    batch = store.batch()
    batch.save_state(agent_id, state)
    key = entry_key(agent_id, entry_stamp(value))
    assert key is not None
    batch.put("repl", key, value)
    store.commit(batch)


def sent(cluster: FakeCluster) -> list[tuple[str, int, str, bytes]]:
    """(peer, corr, agent id, record) of every _merge ask sent; clears the record (and
    the anti-entropy digests sent after a ring change)."""
    out = []
    for address, frames in cluster.sent:
        _, header, payload = split_envelope(frames)
        if decode_header(header)[0] != BATCH:
            continue
        for entry in decode_batch(payload, {}):
            assert not isinstance(entry, Exception)
            out.append((address, entry[1], entry[2], entry[-1]))
    cluster.sent.clear()
    return out


def ship(rep: Replicator, cluster: FakeCluster, clock: Clock, ok: bool = True) -> list[bytes]:
    """One shipping turn: the records sent, answered ok (or not at all), flushed."""
    clock.now += 0.1
    rep.tick()
    out = sent(cluster)
    if ok and out:
        answer(rep, [corr for _, corr, _, _ in out])
        clock.now += 0.1
        rep.tick()  # the flush deletes the shipped entries
    return [record for _, _, _, record in out]


@pytest.mark.timeout(30)
def test_the_first_shipment_is_whole_then_deltas_follow(tmp_path: Path) -> None:
    with Store(tmp_path / "db", durability="buffered") as store:
        rep, cluster, clock, _ = make(store)
        log(store, "Tally/a", delta_entry(b"s1", DELTA))
        assert ship(rep, cluster, clock) == [STATE]  # not known in sync yet: whole
        log(store, "Tally/a", delta_entry(b"s2", DELTA))
        assert ship(rep, cluster, clock) == [DELTA]
        log(store, "Tally/a", delta_entry(b"s3", DELTA + b"x"))
        assert ship(rep, cluster, clock) == [DELTA + b"x"]
        status = rep.status()
        assert (status["states_shipped"], status["deltas_shipped"], status["shipped"]) == (1, 2, 3)
        assert status["pending"] == 0 and status["in_sync"] == 1
        entry_overhead = status["bytes_shipped"] - len(STATE) - 2 * len(DELTA) - 1
        assert 0 < entry_overhead < 3 * 60  # corr, agent id, action per entry


@pytest.mark.timeout(30)
def test_commits_between_shipments_ship_as_their_deltas_and_only_shipped_ones_leave(
    tmp_path: Path,
) -> None:
    with Store(tmp_path / "db", durability="buffered") as store:
        rep, cluster, clock, _ = make(store)
        log(store, "Tally/a", delta_entry(b"s1", DELTA))
        ship(rep, cluster, clock)  # whole: now in sync
        deltas = [DELTA + bytes([i]) for i in range(3)]
        for i, d in enumerate(deltas):
            log(store, "Tally/a", delta_entry(b"t%d" % i, d))  # three commits, one turn
        clock.now += 0.1
        rep.tick()
        out = sent(cluster)
        assert [r for _, _, _, r in out] == deltas  # each commit's delta, in order
        log(store, "Tally/a", delta_entry(b"t9", DELTA + b"late"))  # while in flight
        answer(rep, [corr for _, corr, _, _ in out])
        clock.now += 0.1
        rep.tick()  # the three are deleted; the late one ships now, a delta
        assert [r for _, _, _, r in sent(cluster)] == [DELTA + b"late"]
        assert [v for _, v in store.iter_items("repl")] == [delta_entry(b"t9", DELTA + b"late")]


@pytest.mark.timeout(30)
def test_more_entries_than_the_part_limit_ship_the_whole_state(tmp_path: Path) -> None:
    with Store(tmp_path / "db", durability="buffered") as store:
        rep, cluster, clock, _ = make(store)
        log(store, "Tally/a", delta_entry(b"s1", DELTA))
        ship(rep, cluster, clock)
        for i in range(9):  # _MAX_PARTS is 8
            log(store, "Tally/a", delta_entry(b"t%d" % i, b"d"))
        assert ship(rep, cluster, clock) == [STATE]
        assert rep.status()["pending"] == 0


@pytest.mark.timeout(30)
def test_a_flight_that_expired_ships_the_whole_state_again(tmp_path: Path) -> None:
    with Store(tmp_path / "db", durability="buffered") as store:
        rep, cluster, clock, _ = make(store, timeout=1.0)
        log(store, "Tally/a", delta_entry(b"s1", DELTA))
        ship(rep, cluster, clock)
        log(store, "Tally/a", delta_entry(b"s2", DELTA))
        assert ship(rep, cluster, clock, ok=False) == [DELTA]  # lost on the way
        clock.now += 2.0
        rep.tick()  # expired
        assert rep.status()["expired"] == 1
        assert [r for _, _, _, r in sent(cluster)] == [STATE]  # shipped again, whole
        log(store, "Tally/b", delta_entry(b"s3", DELTA))
        assert ship(rep, cluster, clock) == [STATE]


@pytest.mark.timeout(30)
def test_a_refusing_replica_gets_the_whole_state_next(tmp_path: Path) -> None:
    with Store(tmp_path / "db", durability="buffered") as store:
        rep, cluster, clock, _ = make(store)
        log(store, "Tally/a", delta_entry(b"s1", DELTA))
        ship(rep, cluster, clock)
        log(store, "Tally/a", delta_entry(b"s2", DELTA))
        clock.now += 0.1
        rep.tick()
        answer(rep, [c for _, c, _, _ in sent(cluster)], status=1)  # a final error
        assert rep.status()["rejected"] == 1
        log(store, "Tally/a", delta_entry(b"s3", DELTA))
        assert ship(rep, cluster, clock) == [STATE]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("change", ["ring", "membership", "alone"])
def test_a_cluster_change_ships_whole_states_again(tmp_path: Path, change: str) -> None:
    with Store(tmp_path / "db", durability="buffered") as store:
        rep, cluster, clock, _ = make(store)
        log(store, "Tally/a", delta_entry(b"s1", DELTA))
        ship(rep, cluster, clock)
        if change == "ring":  # the same members, a new ring: targets may have changed
            cluster.ring = Ring({ME: 1.0, PEER: 1.0})
        elif change == "membership":  # e.g. the peer restarted faster than detection
            cluster.changes += 1
        else:
            cluster.ring = Ring({ME: 1.0})
            rep.tick()
            cluster.ring = Ring({ME: 1.0, PEER: 1.0})
        log(store, "Tally/a", delta_entry(b"s2", DELTA))
        assert ship(rep, cluster, clock) == [STATE]
        log(store, "Tally/a", delta_entry(b"s3", DELTA))
        assert ship(rep, cluster, clock) == [DELTA]


@pytest.mark.timeout(30)
def test_a_target_that_missed_a_shipment_gets_the_whole_state(tmp_path: Path) -> None:
    """The targets of an agent changed without a ring change (a placement): a node that
    was not sent a delta is not in sync when it is a target again."""
    other = "tcp://127.0.0.1:3"
    with Store(tmp_path / "db", durability="buffered") as store:
        rep, cluster, clock, _ = make(store)
        cluster.ring = Ring({ME: 1.0, PEER: 1.0, other: 1.0})
        rep.tick()
        targets = {"now": [ME, PEER]}
        cluster.preference = lambda key, n, ring=None: targets["now"]  # type: ignore[method-assign]
        log(store, "Tally/a", delta_entry(b"s1", DELTA))
        assert ship(rep, cluster, clock) == [STATE]
        targets["now"] = [ME, other]
        log(store, "Tally/a", delta_entry(b"s2", DELTA))
        assert ship(rep, cluster, clock) == [STATE]  # other: first shipment
        targets["now"] = [ME, PEER]
        log(store, "Tally/a", delta_entry(b"s3", DELTA))
        assert ship(rep, cluster, clock) == [STATE]  # PEER missed s2


@pytest.mark.timeout(30)
def test_whole_marks_big_deltas_and_repairs_ship_the_whole_state(tmp_path: Path) -> None:
    with Store(tmp_path / "db", durability="buffered") as store:
        rep, cluster, clock, _ = make(store)
        log(store, "Tally/a", delta_entry(b"s1", DELTA))
        ship(rep, cluster, clock)
        log(store, "Tally/a", whole_entry(b"s2"))  # the worker did not know the delta
        assert ship(rep, cluster, clock) == [STATE]
        log(store, "Tally/a", delta_entry(b"s3", b"B" * len(STATE)))  # no smaller
        assert ship(rep, cluster, clock) == [STATE]
        log(store, "Tally/a", delta_entry(b"s4", DELTA))
        assert ship(rep, cluster, clock) == [DELTA]
        rep.log_changed(["Tally/a"])  # a repair or a migration: whole to every target
        log(store, "Tally/a", delta_entry(b"s5", DELTA))  # a worker overwrote the mark
        assert ship(rep, cluster, clock) == [STATE]


@pytest.mark.timeout(30)
def test_known_replicas_are_bounded_least_recently_shipped_forgotten(tmp_path: Path) -> None:
    with Store(tmp_path / "db", durability="buffered") as store:
        rep, cluster, clock, _ = make(store, in_sync_limit=2)
        for agent in ("a", "b", "c"):
            log(store, f"Tally/{agent}", delta_entry(b"s1", DELTA))
            ship(rep, cluster, clock)
        assert rep.status()["in_sync"] == 2
        for agent in ("c", "a"):
            log(store, f"Tally/{agent}", delta_entry(b"s2", DELTA))
        assert ship(rep, cluster, clock) == [STATE, DELTA]  # a (forgotten), then c


@pytest.mark.timeout(30)
def test_with_deltas_off_the_flag_asks_for_whole_states_and_only_they_ship(
    tmp_path: Path,
) -> None:
    with Store(tmp_path / "db", durability="buffered") as store:
        rep, cluster, clock, _ = make(store, deltas=False)
        assert store.get("meta", REPLICATE_KEY) == REPLICATE_WHOLE
        for stamp in (b"s1", b"s2"):
            log(store, "Tally/a", delta_entry(stamp, DELTA))
            assert ship(rep, cluster, clock) == [STATE]
        assert rep.status()["deltas_shipped"] == 0


@pytest.mark.timeout(30)
def test_shipped_entries_are_not_shipped_again_while_they_wait_for_the_flush(
    tmp_path: Path,
) -> None:
    with Store(tmp_path / "db", durability="buffered") as store:
        rep, cluster, clock, released = make(store)
        log(store, "Tally/a", delta_entry(b"s1", DELTA))
        rep.hold(reply(1))
        clock.now += 0.01
        rep.tick()
        answer(rep, [c for _, c, _, _ in sent(cluster)])
        assert released == [reply(1)]  # the replicas hold it: the reply leaves
        rep._next_flush = clock.now + 1.0  # the next flush is a while off
        clock.now += 0.01
        rep.tick()
        assert sent(cluster) == [] and rep.status()["pending"] == 0  # not read again
        assert len(list(store.iter_items("repl"))) == 1  # still there: not flushed yet
        clock.now += 1.0
        rep.tick()
        assert list(store.iter_items("repl")) == []


# --- end to end: owner host -> Replicator -> replica host -------------------------------


class Mix(Agent):
    """A field of each family: counter, observed-remove set, last-writer-wins map."""

    hits = GCounter()
    tags = ORSet()
    conf = LWWMap()

    @action
    def inc(self, n: int) -> None:
        self.hits.increment(self.replica, n)

    @action
    def tag(self, tag: str) -> None:
        self.tags.add(self.replica, tag)

    @action
    def untag(self, tag: str) -> None:
        self.tags.remove(tag)

    @action
    def put(self, key: str, value: int) -> None:
        self.conf.put(self.replica, key, value)

    @action
    def drop(self, key: str) -> None:
        self.conf.remove(self.replica, key)


class Pair:
    """An owner node's worker and replicator, and a replica node's worker."""

    def __init__(self, tmp: Path, deltas: bool = True) -> None:
        self.owner_store = Store(tmp / "owner", durability="buffered")
        self.replica_store = Store(tmp / "replica", durability="buffered")
        types: dict[str, type[Agent]] = {"Mix": Mix}
        self.owner = AgentHost(types, self.owner_store, "owner:0")
        self.replica = AgentHost(types, self.replica_store, "replica:0")
        self.rep, self.cluster, self.clock, _ = make(self.owner_store, deltas=deltas)
        # A third replica's state merged into the owner reaches this replica with the
        # owner's next write (a whole state), not before: no check until then.
        self.stale = False
        self.merges = 0

    def close(self) -> None:
        self.owner_store.close()
        self.replica_store.close()

    def run(self, agent_id: str, name: str, **kwargs: Any) -> None:
        code, _ = self.owner.handle(agent_id, name, pack(kwargs))
        assert code == 0

    def commit(self) -> None:
        assert self.owner.commit()

    def ship(self, deliver: bool = True) -> None:
        """One shipping turn; the replica merges what came and answers (or it is lost)."""
        self.clock.now += 0.1
        self.rep.tick()
        items = []
        for _, corr, agent_id, record in sent(self.cluster):
            if deliver:
                items.append(self.replica.handle(agent_id, "_merge", record)[0])
                items[-1] = (corr, items[-1])
        if not deliver:
            self.clock.now += self.rep.timeout + 0.1  # the flights expire
            return
        assert self.replica.commit()
        answers = [(corr, status, b"\xc0") for corr, status in items]
        reply = [b"", encode_reply_kind(REPLY_BATCH, 0), encode_reply_batch(answers)]
        self.rep.on_reply(PEER, reply)
        self.clock.now += 0.1
        self.rep.tick()  # the flush: shipped entries leave the log

    def drained(self) -> bool:
        status = self.rep.status()
        return status["pending"] == 0 and status["in_flight"] == 0

    def check(self, agent_id: str) -> None:
        """Nothing left to ship: the replica holds exactly the owner's committed state."""
        if self.drained() and not self.stale:
            owner = self.owner_store.load_state(agent_id)
            assert self.replica_store.load_state(agent_id) == owner

    def settle(self) -> None:
        self.commit()
        for _ in range(10):
            self.ship()
            status = self.rep.status()
            if status["pending"] == 0 and status["in_flight"] == 0:
                return
        raise AssertionError(f"the log did not drain: {self.rep.status()}")


WRITE = st.one_of(
    st.tuples(st.just("inc"), st.integers(1, 5)),
    st.tuples(st.just("tag"), st.sampled_from("abcd")),
    st.tuples(st.just("untag"), st.sampled_from("abcd")),
    st.tuples(st.just("put"), st.sampled_from("wxyz"), st.integers(0, 99)),
    st.tuples(st.just("drop"), st.sampled_from("wxyz")),
)
#: rounds: some commits (each of some writes), then what happens to the log
ROUNDS = st.lists(
    st.tuples(
        st.lists(st.lists(WRITE, min_size=1, max_size=3), min_size=1, max_size=3),
        st.sampled_from(["ship", "ship", "ship", "lose", "passivate", "ring", "merge"]),
    ),
    min_size=1,
    max_size=8,
)


def _apply(pair: Pair, agent_id: str, op: tuple[Any, ...]) -> None:
    name = op[0]
    if name in ("inc", "tag", "untag", "put", "drop"):
        pair.stale = False  # the next commit logs the merged part too
    if name == "merge":
        pair.merges += 1
        third = Mix.__phoenix_schema__.new_state(track_deltas=False)
        third["tags"].add("third:0", f"m{pair.merges}")
        third["hits"].increment("third:0", pair.merges)
        assert pair.owner.handle(agent_id, "_merge", third.encode())[0] == 0
        pair.stale = True
    elif name == "inc":
        pair.run(agent_id, "inc", n=op[1])
    elif name in ("tag", "untag"):
        pair.run(agent_id, name, tag=op[1])
    elif name == "put":
        pair.run(agent_id, "put", key=op[1], value=op[2])
    elif name == "drop":
        pair.run(agent_id, "drop", key=op[1])
    elif name in ("ship", "lose"):
        pair.commit()
        pair.ship(deliver=name == "ship")
        pair.check(agent_id)
    elif name == "passivate":
        pair.owner.stop_all()
        pair.commit()
    else:
        pair.cluster.ring = Ring({ME: 1.0, PEER: 1.0})


@pytest.mark.timeout(120)
@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ROUNDS)
def test_a_replica_fed_deltas_converges_to_the_owners_state(
    tmp_path_factory: pytest.TempPathFactory,
    rounds: list[tuple[list[list[tuple[Any, ...]]], str]],
) -> None:
    pair = Pair(tmp_path_factory.mktemp("pair"))
    try:
        for commits, then in rounds:
            for writes in commits:
                for write in writes:
                    _apply(pair, "Mix/m", write)
                pair.commit()
            _apply(pair, "Mix/m", (then,))
        _apply(pair, "Mix/m", ("inc", 1))
        pair.settle()
        owner = pair.owner_store.load_state("Mix/m")
        assert pair.replica_store.load_state("Mix/m") == owner
    finally:
        pair.close()


@pytest.mark.timeout(60)
def test_writes_between_shipments_reach_the_replica_as_deltas(tmp_path: Path) -> None:
    """Deterministic: several commits per shipment, a lost shipment, a passivation."""
    pair = Pair(tmp_path)
    try:
        for i in range(40):
            pair.run("Mix/m", "put", key=f"k{i}", value=i)
        pair.settle()  # the first shipment: whole
        for round_ in range(5):
            for i in range(3):  # three commits before each shipment
                pair.run("Mix/m", "put", key=f"k{round_}", value=100 + i)
                pair.run("Mix/m", "tag", tag=f"t{round_}{i}")
                pair.commit()
            pair.ship(deliver=round_ != 2)  # the third shipment is lost
            if round_ != 2:
                assert pair.drained()
                pair.check("Mix/m")  # the three commits, one delta
        pair.settle()
        pair.owner.stop_all()
        pair.commit()
        pair.run("Mix/m", "inc", n=1)  # reactivated: ships whole
        pair.settle()
        assert pair.replica_store.load_state("Mix/m") == pair.owner_store.load_state("Mix/m")
        status = pair.rep.status()
        assert status["deltas_shipped"] >= 4, status
        assert status["states_shipped"] == 3, status  # first, after the loss, reactivated
    finally:
        pair.close()
