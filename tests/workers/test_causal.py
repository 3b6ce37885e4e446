"""Causal delivery (workers/causal.py): Raynal-Schiper-Toueg matrix clocks.

The simulation checks the inbox against ground truth kept by independent vector
clocks: a message is delivered only after every message to the same receiver whose
send happened before its send, it is never held back longer than that, and every
message is delivered exactly once despite reordering, duplication and restarts.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.causal import (
    CausalClock,
    CausalDecodeError,
    CausalInbox,
    InboxFullError,
    StampError,
)

# --- randomized simulation ----------------------------------------------------------


@dataclass
class Msg:
    id: int
    sender: str
    dest: str
    stamp: bytes
    vc: dict[str, int]  # ground truth: the sender's vector clock at the send


def happened_before(m1: Msg, m2: Msg) -> bool:
    """send(m1) -> send(m2), from the vector clocks (which tick on sends only)."""
    return m1.id != m2.id and m2.vc.get(m1.sender, 0) >= m1.vc[m1.sender]


@dataclass
class Proc:
    pid: str
    clock: CausalClock
    inbox: CausalInbox[int]
    vc: dict[str, int] = field(default_factory=dict)
    delivered: list[int] = field(default_factory=list)
    delivered_set: set[int] = field(default_factory=set)
    held: set[int] = field(default_factory=set)  # offered to the inbox, not yet delivered

    @classmethod
    def new(cls, pid: str) -> Proc:
        clock = CausalClock(pid)
        return cls(pid, clock, CausalInbox(pid, clock))


class Simulation:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        ids = [f"p{i}" for i in range(self.rng.randint(3, 6))]
        self.procs = {pid: Proc.new(pid) for pid in ids}
        self.msgs: list[Msg] = []
        self.network: list[Msg] = []

    def send(self) -> None:
        sender = self.procs[self.rng.choice(list(self.procs))]
        dest = self.rng.choice(list(self.procs))
        sender.vc[sender.pid] = sender.vc.get(sender.pid, 0) + 1
        msg = Msg(len(self.msgs), sender.pid, dest, sender.clock.stamp(dest), dict(sender.vc))
        self.msgs.append(msg)
        self.network.append(msg)

    def deliver_one(self) -> None:
        i = self.rng.randrange(len(self.network))
        msg = self.network[i]
        if self.rng.random() < 0.7:  # otherwise the network keeps a copy: a duplicate
            self.network[i] = self.network[-1]
            self.network.pop()
        proc = self.procs[msg.dest]
        out = proc.inbox.offer(msg.stamp, msg.id)
        if msg.id not in proc.delivered_set:
            proc.held.add(msg.id)
        for mid in out:
            self.record_delivery(proc, self.msgs[mid])
        self.check_nothing_waits_needlessly(proc)

    def record_delivery(self, proc: Proc, msg: Msg) -> None:
        assert msg.dest == proc.pid
        assert msg.id not in proc.delivered_set, f"message {msg.id} delivered twice"
        for earlier in self.msgs:
            if earlier.dest == proc.pid and happened_before(earlier, msg):
                assert earlier.id in proc.delivered_set, (
                    f"{proc.pid} delivered {msg.id} before {earlier.id}, which causally precedes it"
                )
        proc.delivered.append(msg.id)
        proc.delivered_set.add(msg.id)
        proc.held.discard(msg.id)
        for pid, n in msg.vc.items():
            proc.vc[pid] = max(proc.vc.get(pid, 0), n)

    def check_nothing_waits_needlessly(self, proc: Proc) -> None:
        assert proc.inbox.waiting == len(proc.held)
        for mid in proc.held:
            msg = self.msgs[mid]
            assert any(
                m.dest == proc.pid and m.id not in proc.delivered_set and happened_before(m, msg)
                for m in self.msgs
            ), f"{proc.pid} holds back {mid} although all its causal predecessors arrived"

    def restart(self) -> None:
        """Save and reload one process; what its inbox held is lost and retransmitted."""
        proc = self.procs[self.rng.choice(list(self.procs))]
        proc.clock = CausalClock.decode(proc.clock.encode())
        proc.inbox = CausalInbox.decode(proc.inbox.encode(), proc.clock)
        self.network.extend(self.msgs[mid] for mid in proc.held)
        proc.held.clear()

    def run(self) -> None:
        for _ in range(self.rng.randint(100, 400)):
            roll = self.rng.random()
            if self.network and roll < 0.55:
                self.deliver_one()
            elif roll < 0.58:
                self.restart()
            else:
                self.send()
        while self.network:
            self.deliver_one()


@pytest.mark.parametrize("seed", range(60))
def test_simulation_causal_exactly_once(seed: int) -> None:
    sim = Simulation(seed)
    sim.run()
    for proc in sim.procs.values():
        expected = sorted(m.id for m in sim.msgs if m.dest == proc.pid)
        assert sorted(proc.delivered) == expected
        assert proc.inbox.waiting == 0
        stats = proc.inbox.statistics()
        assert stats.waiting == 0 and stats.stale == 0


def test_simulation_exercises_reordering() -> None:
    """The simulation is only worth something if messages really wait and get duplicated."""
    waited = dups = 0
    for seed in range(20):
        sim = Simulation(seed)
        sim.run()
        for proc in sim.procs.values():
            stats = proc.inbox.statistics()
            dups += stats.duplicates
            delivered = proc.delivered
            waited += sum(1 for a, b in zip(delivered, sorted(delivered), strict=True) if a != b)
    assert waited > 50 and dups > 50


# --- scenarios ----------------------------------------------------------------------


def make(*pids: str, max_waiting: int = 10_000) -> dict[str, tuple[CausalClock, CausalInbox[str]]]:
    out: dict[str, tuple[CausalClock, CausalInbox[str]]] = {}
    for pid in pids:
        clock = CausalClock(pid)
        out[pid] = (clock, CausalInbox(pid, clock, max_waiting=max_waiting))
    return out


def test_missing_dependency_is_never_delivered() -> None:
    p = make("a", "b", "c", "d")
    m1 = p["a"][0].stamp("c")  # lost for now
    m2 = p["a"][0].stamp("b")
    assert p["b"][1].offer(m2, "m2") == ["m2"]
    m3 = p["b"][0].stamp("c")  # a -> c (m1) happened before b -> c (m3)
    assert p["c"][1].offer(m3, "m3") == []
    # Unrelated traffic to c flows, but m3 and what follows it on b's channel stay put.
    for i in range(20):
        assert p["c"][1].offer(p["d"][0].stamp("c"), f"d{i}") == [f"d{i}"]
    later = p["b"][0].stamp("c")
    assert p["c"][1].offer(later, "m4") == []
    assert p["c"][1].offer(m3, "m3") == []  # a retransmission is still held
    assert p["c"][1].waiting == 2
    # The dependency arrives: everything it held back follows, in causal order.
    assert p["c"][1].offer(m1, "m1") == ["m1", "m3", "m4"]
    assert p["c"][1].waiting == 0


def test_fifo_per_channel() -> None:
    p = make("a", "b")
    stamps = [p["a"][0].stamp("b") for _ in range(5)]
    inbox = p["b"][1]
    assert inbox.offer(stamps[4], "4") == []
    assert inbox.offer(stamps[2], "2") == []
    assert inbox.offer(stamps[1], "1") == []
    assert inbox.offer(stamps[0], "0") == ["0", "1", "2"]
    assert inbox.offer(stamps[3], "3") == ["3", "4"]
    assert inbox.delivered("a") == 5


def test_concurrent_messages_are_not_delayed() -> None:
    p = make("a", "b", "c")
    from_a, from_b = p["a"][0].stamp("c"), p["b"][0].stamp("c")
    assert p["c"][1].offer(from_b, "b") == ["b"]
    assert p["c"][1].offer(from_a, "a") == ["a"]


def test_only_predecessors_to_the_same_receiver_block() -> None:
    p = make("a", "b", "c")
    to_b = p["a"][0].stamp("b")  # in flight
    to_c = p["a"][0].stamp("c")
    assert p["c"][1].offer(to_c, "to_c") == ["to_c"]  # to_b is for b: no reason to wait
    c_to_b = p["c"][0].stamp("b")  # to_b happened before this, and both go to b
    assert p["b"][1].offer(c_to_b, "c_to_b") == []
    assert p["b"][1].offer(to_b, "to_b") == ["to_b", "c_to_b"]


def test_self_messages() -> None:
    p = make("a")
    clock, inbox = p["a"]
    first, second = clock.stamp("a"), clock.stamp("a")
    assert inbox.offer(second, "2") == []
    assert inbox.offer(first, "1") == ["1", "2"]


def test_duplicates_are_dropped() -> None:
    p = make("a", "b")
    s1, s2 = p["a"][0].stamp("b"), p["a"][0].stamp("b")
    inbox = p["b"][1]
    assert inbox.offer(s2, "2") == []
    assert inbox.offer(s2, "2 again") == []  # duplicate of a waiting item
    assert inbox.waiting == 1
    assert inbox.offer(s1, "1") == ["1", "2"]
    assert inbox.offer(s1, "1 again") == []  # duplicate of a delivered item
    assert inbox.offer(s2, "2 again") == []
    stats = inbox.statistics()
    assert (stats.duplicates, stats.delivered, stats.waiting) == (3, 2, 0)


def test_max_waiting_refuses_only_items_that_would_wait() -> None:
    p = make("a", "b", "c", max_waiting=2)
    a_stamps = [p["a"][0].stamp("c") for _ in range(4)]
    inbox = p["c"][1]
    assert inbox.offer(a_stamps[1], "a1") == []
    assert inbox.offer(a_stamps[2], "a2") == []
    with pytest.raises(InboxFullError, match="max_waiting"):
        inbox.offer(a_stamps[3], "a3")
    assert inbox.waiting == 2
    # Deliverable items are accepted even when full.
    assert inbox.offer(p["b"][0].stamp("c"), "b0") == ["b0"]
    assert inbox.offer(a_stamps[0], "a0") == ["a0", "a1", "a2"]
    # The refused message was not remembered: its retransmission is delivered.
    assert inbox.offer(a_stamps[3], "a3") == ["a3"]


def test_stamp_for_another_process_is_refused() -> None:
    p = make("a", "b", "c")
    stamp = p["a"][0].stamp("b")
    with pytest.raises(StampError, match="addressed to 'b'"):
        p["c"][1].offer(stamp, "x")
    with pytest.raises(StampError):
        p["c"][0].deliver(stamp)
    assert p["c"][1].waiting == 0


def test_clock_deliver_without_inbox_carries_knowledge() -> None:
    p = make("a", "b", "c")
    lost = p["a"][0].stamp("c")
    p["b"][0].deliver(p["a"][0].stamp("b"))  # b learns that a sent one message to c
    assert p["b"][0].sent("a", "c") == 1
    b_to_c = p["b"][0].stamp("c")
    assert p["c"][1].offer(b_to_c, "b") == []
    assert p["c"][1].offer(lost, "a") == ["a", "b"]


# --- persistence --------------------------------------------------------------------


def test_clock_round_trip_and_canonical_bytes() -> None:
    p = make("a", "b", "c")
    stamps = [p["a"][0].stamp("b"), p["c"][0].stamp("b"), p["a"][0].stamp("b")]
    x, y = CausalClock("b"), CausalClock("b")
    for s in stamps:
        x.deliver(s)
    for s in reversed(stamps):
        y.deliver(s)
    assert x.encode() == y.encode()
    z = CausalClock.decode(x.encode())
    assert z.me == "b" and z.encode() == x.encode()
    assert (z.sent("a", "b"), z.sent("c", "b"), z.known_pairs) == (2, 1, 2)


def test_restored_sender_does_not_reuse_sequence_numbers() -> None:
    p = make("a", "b")
    inbox = p["b"][1]
    assert inbox.offer(p["a"][0].stamp("b"), "1") == ["1"]
    restored = CausalClock.decode(p["a"][0].encode())
    assert inbox.offer(restored.stamp("b"), "2") == ["2"]


def test_restored_inbox_remembers_what_it_delivered() -> None:
    p = make("a", "b")
    s1, s2, s3 = (p["a"][0].stamp("b") for _ in range(3))
    _, inbox = p["b"]
    assert inbox.offer(s1, "1") == ["1"]
    assert inbox.offer(s3, "3") == []  # waiting: not saved
    clock = CausalClock.decode(p["b"][0].encode())
    restored: CausalInbox[str] = CausalInbox.decode(inbox.encode(), clock)
    assert restored.waiting == 0
    assert restored.offer(s1, "1") == []  # duplicate
    assert restored.offer(s2, "2") == ["2"]
    assert restored.offer(s3, "3") == ["3"]
    assert restored.encode() == msgpack.packb([1, "b", ["a", 3]])


def test_inbox_decode_needs_the_matching_clock() -> None:
    data = CausalInbox("b", CausalClock("b")).encode()
    with pytest.raises(ValueError, match="clock belongs to 'a'"):
        CausalInbox.decode(data, CausalClock("a"))


# --- pruning ------------------------------------------------------------------------


def test_prune_releases_items_waiting_for_a_removed_process() -> None:
    p = make("a", "b", "c")
    p["a"][0].stamp("c")  # never arrives: a is removed
    p["b"][0].deliver(p["a"][0].stamp("b"))
    b_to_c = p["b"][0].stamp("c")
    from_a_later = p["a"][0].stamp("c")
    clock, inbox = p["c"]
    assert inbox.offer(b_to_c, "b") == []
    assert inbox.offer(from_a_later, "a later") == []
    assert inbox.waiting == 2
    assert inbox.prune(["a"]) == ["b"]  # a's own message is discarded
    assert inbox.waiting == 0
    assert clock.retired == {"a"}
    assert all("a" not in pair for pair in _pairs(clock))
    # Stamps still naming a neither bring its pairs back nor block.
    clock.deliver(p["b"][0].stamp("c"))
    assert all("a" not in pair for pair in _pairs(clock))
    assert inbox.offer(p["a"][0].stamp("c"), "a late") == []
    assert inbox.statistics().stale == 2
    with pytest.raises(ValueError, match="pruned"):
        clock.stamp("a")
    restored = CausalClock.decode(clock.encode())
    assert restored.retired == {"a"}


def _pairs(clock: CausalClock) -> list[tuple[str, str]]:
    obj = msgpack.unpackb(clock.encode())
    names, flat = obj[2], obj[3]
    return [(names[flat[i]], names[flat[i + 1]]) for i in range(0, len(flat), 3)]


def test_prune_shrinks_knowledge_and_stamps() -> None:
    a = CausalClock("a")
    for pid in ("b", "c", "d"):
        other = CausalClock(pid)
        for dst in ("b", "c", "d"):
            other.stamp(dst)
        a.deliver(other.stamp("a"))
    assert a.known_pairs == 12
    size_before = len(a.stamp("d"))
    a.prune(["b", "c"])
    assert a.known_pairs == 3
    assert _pairs(a) == [("a", "d"), ("d", "a"), ("d", "d")]
    assert len(a.stamp("d")) < size_before / 2


def test_prune_argument_checks() -> None:
    clock = CausalClock("a")
    with pytest.raises(ValueError, match="cannot prune itself"):
        clock.prune(["a"])
    with pytest.raises(TypeError, match="not a single str"):
        clock.prune("b")
    with pytest.raises(TypeError):
        clock.prune([3])  # type: ignore[list-item]


# --- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "x" * 257, "\ud800"])
def test_bad_ids(bad: str) -> None:
    with pytest.raises(ValueError):
        CausalClock(bad)
    with pytest.raises(ValueError):
        CausalClock("a").stamp(bad)


def test_bad_constructor_arguments() -> None:
    with pytest.raises(TypeError):
        CausalClock(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="clock belongs"):
        CausalInbox("a", CausalClock("b"))
    with pytest.raises(TypeError, match="CausalClock"):
        CausalInbox("a", object())  # type: ignore[arg-type]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_waiting"):
            CausalInbox("a", CausalClock("a"), max_waiting=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bytes"):
        CausalInbox("a", CausalClock("a")).offer("not bytes", 1)  # type: ignore[arg-type]


_GOOD = msgpack.packb([1, ["a", "b"], 0, 1, [0, 1, 1]])


@pytest.mark.parametrize(
    "stamp",
    [
        b"",
        b"\xc1",
        _GOOD + b"\x00",  # trailing bytes
        _GOOD[:-1],
        msgpack.packb({"v": 1}),
        msgpack.packb([2, ["a", "b"], 0, 1, [0, 1, 1]]),  # unknown version
        msgpack.packb([True, ["a", "b"], 0, 1, [0, 1, 1]]),
        msgpack.packb([1, ["a", "b"], 0, 1, [0, 1, 1], "extra"]),
        msgpack.packb([1, [], 0, 0, []]),
        msgpack.packb([1, ["a", "a"], 0, 1, [0, 1, 1]]),  # duplicate ids
        msgpack.packb([1, ["a", ""], 0, 1, [0, 1, 1]]),
        msgpack.packb([1, ["a", b"b"], 0, 1, [0, 1, 1]]),
        msgpack.packb([1, ["a", "b"], 0, 2, [0, 1, 1]]),  # index out of range
        msgpack.packb([1, ["a", "b"], -1, 1, [0, 1, 1]]),
        msgpack.packb([1, ["a", "b"], 0, 1, [0, 1]]),  # not triples
        msgpack.packb([1, ["a", "b"], 0, 1, [0, 1, 0]]),  # zero count
        msgpack.packb([1, ["a", "b"], 0, 1, [0, 1, 1, 0, 1, 2]]),  # pair twice
        msgpack.packb([1, ["a", "b"], 0, 1, [1, 0, 1]]),  # does not count itself
        msgpack.packb([1, ["a", "b"], 0, 1, [0, 1, 1.0]]),
        msgpack.packb([1, ["a", "b"], 0, 1, "flat"]),
        msgpack.packb([1, ["a", "b"], 0, 1, [0, 1, msgpack.ExtType(5, b"x")]]),
        b"\x91" * 100_000,  # deep nesting
    ],
)
def test_malformed_stamps_are_refused(stamp: bytes) -> None:
    clock = CausalClock("b")
    inbox: CausalInbox[str] = CausalInbox("b", clock)
    with pytest.raises(CausalDecodeError):
        inbox.offer(stamp, "x")
    with pytest.raises(CausalDecodeError):
        clock.deliver(stamp)
    assert inbox.waiting == 0 and clock.known_pairs == 0


def test_the_reference_stamp_is_valid() -> None:
    assert CausalInbox[str]("b", CausalClock("b")).offer(_GOOD, "x") == ["x"]


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    clock = CausalClock("b")
    decoders: tuple[Callable[[], object], ...] = (
        lambda: CausalInbox[str]("b", clock).offer(data, "x"),
        lambda: CausalClock.decode(data),
        lambda: CausalInbox.decode(data, clock),
    )
    for decode in decoders:
        try:
            decode()
        except (CausalDecodeError, StampError):
            pass


@pytest.mark.parametrize(
    "data",
    [
        msgpack.packb([1, "a", ["a", "b"], [0, 1, 1], ["a"]]),  # own id retired
        msgpack.packb([1, "a", ["a", "b"], [0, 1, 1], ["b"]]),  # retired id has counters
        msgpack.packb([1, "a", ["a", "b"], [0, 1, 1], ["c", "c"]]),
        msgpack.packb([1, "", [], [], []]),
        msgpack.packb([1, "a", [], []]),
    ],
)
def test_malformed_saved_clocks_are_refused(data: bytes) -> None:
    with pytest.raises(CausalDecodeError):
        CausalClock.decode(data)


@pytest.mark.parametrize(
    "data",
    [
        msgpack.packb([1, "b", ["a"]]),
        msgpack.packb([1, "b", ["a", 0]]),
        msgpack.packb([1, "b", ["a", 1, "a", 2]]),
        msgpack.packb([1, "b", [3, 1]]),
        msgpack.packb([1, "b", ["a", -1]]),
        msgpack.packb([1, "b", {"a": 1}]),
    ],
)
def test_malformed_saved_inboxes_are_refused(data: bytes) -> None:
    with pytest.raises(CausalDecodeError):
        CausalInbox.decode(data, CausalClock("b"))
