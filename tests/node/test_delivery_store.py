"""Tests of the delivery stores: Outbox and DedupLog over a real LMDB store, and in memory."""

from __future__ import annotations

import os
import random
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from phoenix_node.state.delivery import (
    MAX_MSG_ID,
    DeadLetter,
    DedupLog,
    Delivery,
    DeliveryError,
    Outbox,
    OutboxFullError,
    RetryPolicy,
    parse_delivery,
)
from phoenix_node.state.store import Store

REPO = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "db")
    try:
        yield s
    finally:
        s.close()


def commit(store: Store, *parts: Outbox | DedupLog) -> None:
    """One loop iteration's group commit."""
    batch = store.batch()
    for part in parts:
        part.stage(batch)
    store.commit(batch)
    for part in parts:
        part.committed()


NO_JITTER = RetryPolicy(initial=1.0, multiplier=2.0, max_delay=5.0, max_retries=3, jitter=0.0)


# ---------------------------------------------------------------- delivery


def test_parse_delivery_accepts_enum_int_and_names() -> None:
    assert parse_delivery(Delivery.CAUSAL) is Delivery.CAUSAL
    assert parse_delivery(2) is Delivery.EXACTLY_ONCE
    assert parse_delivery("at_least_once") is Delivery.AT_LEAST_ONCE
    assert parse_delivery("At-Most-Once") is Delivery.AT_MOST_ONCE
    assert [d.wire_name for d in Delivery] == [
        "at_most_once",
        "at_least_once",
        "exactly_once",
        "causal",
    ]


@pytest.mark.parametrize("bad", ["twice", 4, -1, ""])
def test_parse_delivery_rejects_unknown_values_listing_the_names(bad: object) -> None:
    with pytest.raises(ValueError, match="at_most_once, at_least_once, exactly_once, causal"):
        parse_delivery(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [True, 1.0, None, b"causal"])
def test_parse_delivery_rejects_other_types(bad: object) -> None:
    with pytest.raises(TypeError, match="delivery must be"):
        parse_delivery(bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------- retry


def test_backoff_grows_exponentially_and_is_capped() -> None:
    assert [NO_JITTER.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert NO_JITTER.delay(10_000) == 5.0  # no overflow


def test_backoff_jitter_stays_within_bounds_and_varies() -> None:
    policy = RetryPolicy(initial=1.0, multiplier=2.0, max_delay=100.0, jitter=0.2)
    rng = random.Random(7)
    for attempt in (1, 2, 3, 4):
        base = 2.0 ** (attempt - 1)
        delays = [policy.delay(attempt, rng) for _ in range(300)]
        assert all(base * 0.8 <= d <= base * 1.2 for d in delays)
        assert max(delays) - min(delays) > base * 0.3  # really jittered
    capped = [policy.delay(40, rng) for _ in range(300)]
    assert all(80.0 <= d <= 100.0 for d in capped)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"initial": 0}, ValueError),
        ({"multiplier": 0.5}, ValueError),
        ({"max_delay": 0.1}, ValueError),
        ({"jitter": 1.0}, ValueError),
        ({"jitter": -0.1}, ValueError),
        ({"max_retries": -1}, ValueError),
        ({"max_retries": 2.0}, TypeError),
        ({"initial": float("nan")}, ValueError),
        ({"initial": "1"}, TypeError),
    ],
)
def test_retry_policy_validation(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error, match="RetryPolicy"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_delay_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError, match="attempt"):
        RetryPolicy().delay(0)


# ------------------------------------------------------------------ outbox


def test_add_is_due_now_and_ack_removes(store: Store) -> None:
    clock = FakeClock()
    box = Outbox(store, b"w0", NO_JITTER, clock)
    box.load()
    box.add(1, "Counter/a", b"one")
    box.add(2, "Counter/b", b"two")
    assert [(e.msg_id, e.dest, e.data) for e in box.due()] == [
        (1, "Counter/a", b"one"),
        (2, "Counter/b", b"two"),
    ]
    assert box.ack(1) is True
    assert box.ack(1) is False
    assert box.ack(99) is False
    assert box.pending == 1 and 1 not in box and 2 in box
    commit(store, box)
    assert [k for k, _ in store.iter_items("outbox", b"\x02w0m")] == [
        b"\x02w0m" + bytes(7) + b"\x02"
    ]


def test_resend_waits_for_the_backoff(store: Store) -> None:
    clock = FakeClock()
    box = Outbox(store, b"w0", NO_JITTER, clock)
    box.add(1, "d", b"x")
    (entry,) = box.due()
    box.sent(entry)
    assert entry.attempts == 1
    clock.now += 0.99
    assert box.due() == []
    clock.now += 0.01
    (again,) = box.due()
    box.sent(again)
    assert again is entry and entry.attempts == 2
    clock.now += 1.99
    assert box.due() == []
    clock.now += 0.01
    assert box.due() == [entry]


def test_added_for_sending_is_not_due_until_its_retry(store: Store) -> None:
    clock = FakeClock()
    box = Outbox(store, b"w0", NO_JITTER, clock)
    box.load()
    first = box.add(1, "d", b"x", sending=True)
    clock.now += 0.0005  # within a millisecond: the same timer
    second = box.add(2, "d", b"y", sending=True)
    assert first.attempts == second.attempts == 1
    assert box.due() == [] and len(box._heap) == 1
    clock.now += 0.999
    assert box.due() == []
    clock.now += 0.001
    assert box.due() == [first, second]
    commit(store, box)  # they were persisted like any add, with the high-water mark
    reopened = Outbox(store, b"w0", NO_JITTER, clock)
    assert reopened.load() == 2 and reopened.next_id() == 3


def test_a_due_limit_splits_a_shared_timer_without_losing_entries(store: Store) -> None:
    clock = FakeClock()
    box = Outbox(store, b"w0", NO_JITTER, clock)
    entries = [box.add(i, "d", b"", sending=True) for i in range(1, 6)]
    clock.now += 1.0
    assert box.due(limit=2) == entries[:2]
    assert box.due(limit=2) == entries[2:4]
    assert box.due() == entries[4:]


def test_ack_many_forgets_the_pending_and_ignores_the_rest(store: Store) -> None:
    clock = FakeClock()
    box = Outbox(store, b"w0", NO_JITTER, clock)
    box.load()
    for i in range(1, 5):
        box.add(i, "d", b"", sending=True)
    commit(store, box)
    clock.now += 0.3
    assert box.ack_many([1, 3, 99, 3]) == 2
    assert box.pending == 2 and 1 not in box and 2 in box
    assert box.rto == pytest.approx(max(NO_JITTER.initial, 0.3 + 4 * 0.15))
    commit(store, box)
    keys = [k for k, _ in store.iter_items("outbox", b"\x02w0m")]
    assert keys == [b"\x02w0m" + bytes(7) + b"\x02", b"\x02w0m" + bytes(7) + b"\x04"]
    clock.now += 5.0
    assert [e.msg_id for e in box.due()] == [2, 4]  # acked entries leave no retry behind


def test_a_compaction_keeps_the_open_shared_timer(store: Store) -> None:
    """Entries added for sending after a compaction still join the timer in the heap."""
    clock = FakeClock()
    box = Outbox(None, b"w0", NO_JITTER, clock)
    first = box.add(1, "d", b"", sending=True)
    for i in range(2, 10_002):  # stale timers pile up until a compaction runs
        box.add(i, "d", b"")
        (entry,) = box.due()
        box.sent(entry)
        box.ack(i)
    assert len(box._heap) < 10_000
    second = box.add(10_002, "d", b"", sending=True)  # same millisecond: the open timer
    clock.now += 1.0
    assert box.due() == [first, second]


def test_stale_timers_of_acked_entries_are_compacted_away(store: Store) -> None:
    clock = FakeClock()
    box = Outbox(None, b"w0", NO_JITTER, clock)
    for i in range(1, 20_001):
        box.add(i, "d", b"")
        (entry,) = box.due()
        box.sent(entry)
        box.ack(i)
    assert box.pending == 0 and len(box._heap) <= 4096 + 2


def test_due_without_sent_comes_back_later_without_counting(store: Store) -> None:
    clock = FakeClock()
    box = Outbox(store, b"w0", NO_JITTER, clock)
    box.add(1, "d", b"x")
    assert len(box.due()) == 1  # the caller could not send it (backpressure)
    assert box.due() == []
    clock.now += 1.0
    (entry,) = box.due()
    assert entry.attempts == 0


def _drain_sends(policy: RetryPolicy, store: Store, n: int, per_ack: float) -> int:
    """Sends of ``n`` messages to a receiver that acks one every ``per_ack`` seconds, in
    order (a deep queue), while the sender polls every 10 ms: how many sends it took."""
    clock = FakeClock()
    box = Outbox(store, b"w0", policy, clock)
    for i in range(1, n + 1):
        box.add(i, "d", b"")
    sends, acked, start = 0, 0, clock.now
    while acked < n:
        for e in box.due():
            box.sent(e)
            sends += 1
        clock.now += 0.01
        while acked < n and clock.now - start >= (acked + 1) * per_ack:
            acked += 1
            box.ack(acked)
    return sends


def test_slow_acks_stretch_the_retry_delay_so_queued_messages_are_not_resent(
    store: Store,
) -> None:
    """A receiver that needs 4 s to drain a burst must not see it several times over."""
    policy = RetryPolicy(initial=0.2, multiplier=2.0, max_delay=30.0, max_retries=8, jitter=0.0)
    sends = _drain_sends(policy, store, 200, 0.02)
    # The fixed policy alone would re-send message k at 0.2, 0.6, 1.4, 3.0 s ...: about
    # 3.5 sends per message here. With the round-trip estimate almost none is re-sent: at most
    # the messages sent before the first ack came back.
    assert sends <= 200 * 1.25, sends


def test_the_first_retry_waits_one_second_until_an_ack_was_timed(store: Store) -> None:
    """RFC 6298's initial RTO: a burst's first messages are not re-sent at the policy's
    0.2 s before any round trip is known; fast acks bring it down to ``initial``."""
    policy = RetryPolicy(initial=0.2, multiplier=2.0, max_delay=30.0, max_retries=8, jitter=0.0)
    clock = FakeClock()
    box = Outbox(store, b"w1", policy, clock)
    assert box.rto == 1.0
    first = box.add(1, "d", b"", sending=True)
    clock.now += 0.99
    assert box.due() == []
    clock.now += 0.01
    assert box.due() == [first]
    for i in range(2, 12):
        box.add(i, "d", b"", sending=True)
        clock.now += 0.005
        box.ack_many([i])
    assert box.rto == 0.2
    assert Outbox(store, b"w2", RetryPolicy(initial=0.05, max_delay=0.5), clock).rto == 0.5


def test_round_trip_samples_come_only_from_messages_sent_once(store: Store) -> None:
    clock = FakeClock()
    box = Outbox(store, b"w0", NO_JITTER, clock)
    box.add(1, "d", b"")
    (e,) = box.due()
    box.sent(e)
    clock.now += 1.0
    (e,) = box.due()
    box.sent(e)  # attempt 2: its ack could answer either send (Karn)
    clock.now += 1.9
    box.ack(1)
    assert box.rto == NO_JITTER.initial
    box.add(2, "d", b"")
    (e,) = box.due()
    box.sent(e)
    clock.now += 2.5
    box.ack(2)
    assert 2.5 < box.rto <= NO_JITTER.max_delay
    assert box.statistics()["rto"] == box.rto


def test_due_respects_limit_and_order(store: Store) -> None:
    clock = FakeClock()
    box = Outbox(store, b"w0", NO_JITTER, clock)
    for i in range(1, 6):
        box.add(i, "d", b"%d" % i)
        clock.now += 0.001
    assert [e.msg_id for e in box.due(limit=2)] == [1, 2]
    assert [e.msg_id for e in box.due()] == [3, 4, 5]


def test_jittered_resend_times_stay_in_bounds(store: Store) -> None:
    clock = FakeClock()
    policy = RetryPolicy(initial=1.0, multiplier=2.0, max_delay=10.0, max_retries=50, jitter=0.2)
    box = Outbox(store, b"w0", policy, clock, random.Random(3))
    for i in range(1, 101):
        box.add(i, "d", b"")
    for attempt in (1, 2, 3):
        entries = box.due()
        assert len(entries) == 100
        for e in entries:
            box.sent(e)
        low, high = 2.0 ** (attempt - 1) * 0.8, 2.0 ** (attempt - 1) * 1.2
        gaps = [e.next_due - clock.now for e in entries]
        assert all(low <= g <= high for g in gaps), (attempt, min(gaps), max(gaps))
        assert len(set(gaps)) > 50
        clock.now += high


def test_max_retries_dead_letter_replay_purge(store: Store) -> None:
    clock = FakeClock()
    wall = FakeClock(1_700_000_000.0)
    box = Outbox(store, b"w0", NO_JITTER, clock, wall_clock=wall)
    box.add(1, "Agent/x", b"payload")
    box.add(2, "Agent/y", b"other")
    box.ack(2)
    sends = 0
    for _ in range(10):
        for e in box.due():
            box.sent(e)
            sends += 1
        clock.now += 10
    assert sends == 1 + NO_JITTER.max_retries
    assert box.pending == 0
    expected = DeadLetter(1, "Agent/x", b"payload", 4, "max_retries", wall.now)
    assert box.expired() == [expected]
    assert box.expired() == []
    assert box.statistics()["dead_total"] == 1
    assert box.dead_letters() == [expected]  # staged, not committed yet
    commit(store, box)
    assert Outbox(store, b"w0").dead_letters() == [expected]  # on disk
    assert box.replay() == 1
    assert box.dead_letters() == []
    (entry,) = box.due()
    assert (entry.msg_id, entry.data, entry.attempts) == (1, b"payload", 0)
    commit(store, box)
    fresh = Outbox(store, b"w0")
    assert fresh.load() == 1 and fresh.dead_letters() == []
    # Dead again, then purged.
    for _ in range(10):
        for e in box.due():
            box.sent(e)
        clock.now += 10
    assert [d.msg_id for d in box.dead_letters()] == [1]
    assert box.purge([5, 6]) == 0
    assert box.purge() == 1
    commit(store, box)
    assert Outbox(store, b"w0").dead_letters() == []
    assert box.replay() == 0


def test_replay_and_dead_letters_select_by_id_and_limit(store: Store) -> None:
    clock = FakeClock()
    policy = RetryPolicy(initial=1.0, max_delay=1.0, max_retries=0, jitter=0.0)
    box = Outbox(store, b"w0", policy, clock)
    for i in range(1, 6):
        box.add(i, "d", b"%d" % i)
    for e in box.due():
        box.sent(e)
    commit(store, box)
    clock.now += 1
    assert box.due() == []
    commit(store, box)
    assert [d.msg_id for d in box.dead_letters(limit=3)] == [1, 2, 3]
    assert box.replay([2, 4, 42]) == 2
    assert sorted(e.msg_id for e in box.due()) == [2, 4]
    assert [d.msg_id for d in box.dead_letters()] == [1, 3, 5]
    assert box.purge([1]) == 1
    commit(store, box)
    assert [d.msg_id for d in Outbox(store, b"w0").dead_letters()] == [3, 5]


def test_persistence_across_reopen_and_next_id_never_reused(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with Store(path) as store:
        box = Outbox(store, b"client-1", NO_JITTER, FakeClock())
        assert box.load() == 0
        ids = [box.next_id() for _ in range(5)]
        assert ids == [1, 2, 3, 4, 5]
        for i in ids:
            box.add(i, f"Agent/{i}", b"data-%d" % i)
        box.ack(2)
        commit(store, box)
        box.ack(5)  # acked: the last ids are not pending any more
        box.ack(4)
        box.next_id()  # handed out (6), never added
        commit(store, box)
        box.add(box.next_id(), "lost", b"not committed")  # 7: the process dies here
    with Store(path) as store:
        box = Outbox(store, b"client-1", NO_JITTER, FakeClock())
        assert box.load() == 2
        assert [(e.msg_id, e.dest, e.data, e.attempts) for e in box.due()] == [
            (1, "Agent/1", b"data-1", 0),
            (3, "Agent/3", b"data-3", 0),
        ]
        assert box.next_id() == 7
        with pytest.raises(DeliveryError, match="load"):
            box.load()


def test_load_restores_high_water_mark_from_added_ids(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with Store(path) as store:
        box = Outbox(store, b"o", NO_JITTER)
        box.add(1000, "d", b"")
        box.ack(1000)
        commit(store, box)
    with Store(path) as store:
        box = Outbox(store, b"o", NO_JITTER)
        assert box.load() == 0
        assert box.next_id() == 1001


def test_staged_writes_are_invisible_until_the_caller_commits(store: Store) -> None:
    box = Outbox(store, b"w1", NO_JITTER)
    box.add(1, "d", b"x")
    box.add(2, "d", b"y")
    batch = store.batch()
    box.stage(batch)
    assert len(batch) > 0
    assert list(store.iter_items("outbox")) == []
    reader = Outbox(store, b"w1")
    assert reader.load() == 0
    store.commit(batch)
    box.committed()
    assert Outbox(store, b"w1").load() == 2
    box.ack(1)
    box.stage(batch := store.batch())
    assert Outbox(store, b"w1").load() == 2  # the ack is not committed yet
    store.commit(batch)
    box.committed()
    assert Outbox(store, b"w1").load() == 1


def test_abort_stages_the_changes_again(store: Store) -> None:
    box = Outbox(store, b"w1", NO_JITTER)
    box.add(1, "d", b"x")
    failed = store.batch()
    box.stage(failed)
    failed.clear()  # the commit failed and the caller gave up on this batch
    box.abort()
    box.add(2, "d", b"y")
    commit(store, box)
    assert Outbox(store, b"w1").load() == 2


def test_owners_do_not_see_each_other(store: Store) -> None:
    a, ab = Outbox(store, b"a", NO_JITTER), Outbox(store, b"ab", NO_JITTER)
    a.add(1, "d", b"a1")
    ab.add(1, "d", b"ab1")
    ab.add(2, "d", b"ab2")
    commit(store, a, ab)
    assert Outbox(store, b"a").load() == 1
    assert Outbox(store, b"ab").load() == 2
    assert Outbox(store, b"").load() == 0


def test_outbox_full_raises_until_acked(store: Store) -> None:
    box = Outbox(store, b"w0", NO_JITTER, max_pending=3)
    for i in range(1, 4):
        box.add(i, "d", b"")
    with pytest.raises(OutboxFullError, match="max_pending=3"):
        box.add(4, "d", b"")
    assert box.pending == 3
    box.ack(2)
    box.add(4, "d", b"")
    assert box.pending == 3


def test_oldest_age(store: Store) -> None:
    clock = FakeClock()
    box = Outbox(store, b"w0", NO_JITTER, clock)
    assert box.oldest_age == 0.0
    box.add(1, "d", b"")
    clock.now += 2
    box.add(2, "d", b"")
    clock.now += 3
    assert box.oldest_age == 5.0
    box.ack(1)
    assert box.oldest_age == 3.0


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((-1, "d", b""), ValueError, "msg_id"),
        ((MAX_MSG_ID + 1, "d", b""), ValueError, "msg_id"),
        ((True, "d", b""), TypeError, "msg_id"),
        (("1", "d", b""), TypeError, "msg_id"),
        ((1, "", b""), ValueError, "dest"),
        ((1, b"d", b""), ValueError, "dest"),
        ((1, "d", "text"), TypeError, "data"),
    ],
)
def test_add_rejects_bad_input(
    store: Store, args: tuple[object, ...], error: type[Exception], match: str
) -> None:
    box = Outbox(store, b"w0")
    with pytest.raises(error, match=match):
        box.add(*args)  # type: ignore[arg-type]
    assert box.pending == 0


def test_add_rejects_a_pending_id_and_bad_construction(store: Store) -> None:
    box = Outbox(store, b"w0")
    box.add(1, "d", b"")
    with pytest.raises(ValueError, match="already pending"):
        box.add(1, "d", b"")
    with pytest.raises(ValueError, match="owner"):
        Outbox(store, b"x" * 65)
    with pytest.raises(TypeError, match="owner"):
        Outbox(store, "w0")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="store"):
        Outbox("db", b"w0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_pending"):
        Outbox(store, b"w0", max_pending=0)


def test_in_memory_outbox(store: Store) -> None:
    clock = FakeClock()
    box = Outbox(None, b"client", NO_JITTER, clock, max_dead_letters=2)
    assert box.load() == 0
    for _ in range(3):
        box.add(box.next_id(), "d", b"m")
    batch = store.batch()
    box.stage(batch)
    assert len(batch) == 0
    assert box.ack(2) is True
    for _ in range(10):
        for e in box.due():
            box.sent(e)
        clock.now += 10
    assert [d.msg_id for d in box.expired()] == [1, 3]
    assert [d.msg_id for d in box.dead_letters()] == [1, 3]
    assert box.replay([1]) == 1
    assert [e.msg_id for e in box.due()] == [1]
    assert box.purge() == 1
    assert box.dead_letters() == []
    assert box.next_id() == 4
    box.ack(1)
    # The in-memory dead letters are bounded: the oldest go first.
    for i in (10, 11, 12):
        box.add(i, "d", b"")
    for _ in range(10):
        for e in box.due():
            box.sent(e)
        clock.now += 10
    assert [d.msg_id for d in box.dead_letters()] == [11, 12]
    assert list(store.iter_items("outbox")) == []


def test_stale_heap_items_are_compacted(store: Store) -> None:
    clock = FakeClock()
    policy = RetryPolicy(initial=0.001, max_delay=0.001, max_retries=1_000_000, jitter=0.0)
    box = Outbox(store, b"w0", policy, clock)
    box.add(1, "d", b"")
    for _ in range(5000):
        for e in box.due():
            box.sent(e)
        clock.now += 0.001
    assert len(box._heap) < 2000
    assert box.get(1) is not None and box.get(1).attempts == 5000  # type: ignore[union-attr]


# ------------------------------------------------------------------- dedup


def test_dedup_lookup_before_and_after_commit(store: Store) -> None:
    log = DedupLog(store, b"w0", clock=FakeClock())
    assert log.lookup("client-a", 1) is None
    log.record("client-a", 1, 0, b"reply-1")
    assert log.lookup("client-a", 1) == (0, b"reply-1")  # staged
    assert log.lookup("client-b", 1) is None
    assert log.lookup("client-a", 2) is None
    assert DedupLog(store, b"w0").lookup("client-a", 1) is None  # not on disk yet
    batch = store.batch()
    log.stage(batch)
    assert log.lookup("client-a", 1) == (0, b"reply-1")  # in the batch, not committed
    assert DedupLog(store, b"w0").lookup("client-a", 1) is None
    store.commit(batch)
    log.committed()
    assert log.lookup("client-a", 1) == (0, b"reply-1")
    other = DedupLog(store, b"w0")
    assert other.lookup("client-a", 1) == (0, b"reply-1")
    assert len(other) == 1
    assert DedupLog(store, b"w1").lookup("client-a", 1) is None


def test_dedup_record_commits_with_the_state_change(store: Store) -> None:
    log = DedupLog(store, b"w0", clock=FakeClock())
    log.record("src", 7, 5, b"error")
    batch = store.batch()
    batch.save_state("Counter/a", b"state")
    log.stage(batch)
    store.commit(batch)
    log.committed()
    assert store.load_state("Counter/a") == b"state"
    assert DedupLog(store, b"w0").lookup("src", 7) == (5, b"error")


def test_dedup_long_sources_and_rerecord(store: Store) -> None:
    log = DedupLog(store, b"w0", clock=FakeClock())
    long_a, long_b = "s" * 1024, "s" * 1023 + "t"
    log.record(long_a, 1, 0, b"a")
    log.record(long_b, 1, 0, b"b")
    log.record(long_a, 1, 0, b"a2")  # replaces, does not count twice
    commit(store, log)
    fresh = DedupLog(store, b"w0")
    assert fresh.lookup(long_a, 1) == (0, b"a2")
    assert fresh.lookup(long_b, 1) == (0, b"b")
    assert len(fresh) == 2
    assert sum(1 for _ in store.iter_items("dedup", b"\x02w0t")) == 2


def test_sweep_by_age(store: Store) -> None:
    clock = FakeClock(1_700_000_000.0)
    log = DedupLog(store, b"w0", window=100.0, clock=clock)
    for i in range(10):
        log.record("src", i, 0, b"r%d" % i)
        clock.now += 10
    commit(store, log)
    # now = start + 100: records 0..? are older than the window when start + 10 i < now - 100
    clock.now += 45  # start + 145: records recorded before start + 45 (i = 0..4) are too old
    batch = store.batch()
    assert log.sweep(batch) == 5
    assert log.lookup("src", 0) is None  # deleted in the overlay already
    assert DedupLog(store, b"w0").lookup("src", 0) == (0, b"r0")  # still on disk
    store.commit(batch)
    log.committed()
    fresh = DedupLog(store, b"w0")
    assert [fresh.lookup("src", i) is not None for i in range(10)] == [False] * 5 + [True] * 5
    assert len(fresh) == 5
    assert log.sweep(store.batch()) == 0


def test_sweep_by_count_limit_and_owner(store: Store) -> None:
    clock = FakeClock()
    log = DedupLog(store, b"w0", max_entries=5, clock=clock)
    neighbour = DedupLog(store, b"w", max_entries=1, clock=clock)
    neighbour.record("src", 1, 0, b"")
    neighbour.record("src", 2, 0, b"")
    for i in range(12):
        log.record("src", i, 0, b"")
        clock.now += 1
    commit(store, log, neighbour)
    assert len(log) == 12
    batch = store.batch()
    assert log.sweep(batch, limit=4) == 4
    assert log.sweep(batch, limit=100) == 3  # the 4 already swept are not counted twice
    store.commit(batch)
    log.committed()
    fresh = DedupLog(store, b"w0", max_entries=5)
    assert len(fresh) == 5
    assert [i for i in range(12) if fresh.lookup("src", i)] == [7, 8, 9, 10, 11]
    assert DedupLog(store, b"w").lookup("src", 1) == (0, b"")  # another owner: untouched


def test_sweep_keeps_a_record_re_recorded_since(store: Store) -> None:
    clock = FakeClock()
    log = DedupLog(store, b"w0", window=10.0, clock=clock)
    log.record("src", 1, 0, b"old")
    commit(store, log)
    clock.now += 20
    log.record("src", 1, 0, b"new")  # staged, younger
    batch = store.batch()
    assert log.sweep(batch) == 0
    store.commit(batch)
    log.committed()
    assert DedupLog(store, b"w0").lookup("src", 1) == (0, b"new")


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda log: log.lookup("", 1), ValueError),
        (lambda log: log.lookup(b"src", 1), ValueError),
        (lambda log: log.lookup("\udc00", 1), ValueError),
        (lambda log: log.lookup("src", -1), ValueError),
        (lambda log: log.record("src", 1, -1, b""), ValueError),
        (lambda log: log.record("src", 1, 0, "body"), TypeError),
    ],
)
def test_dedup_rejects_bad_input(store: Store, call: object, error: type[Exception]) -> None:
    log = DedupLog(store, b"w0")
    with pytest.raises(error):
        call(log)  # type: ignore[operator]
    assert len(log) == 0


def test_dedup_rejects_bad_construction(store: Store) -> None:
    with pytest.raises(TypeError, match="store"):
        DedupLog(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window"):
        DedupLog(store, window=0)
    with pytest.raises(ValueError, match="window"):
        DedupLog(store, window=float("inf"))
    with pytest.raises(ValueError, match="max_entries"):
        DedupLog(store, max_entries=0)


# ------------------------------------------------------------- crash test

CHILD = r"""
import sys
from phoenix_node.state.delivery import Outbox
from phoenix_node.state.store import Store

def payload(i):
    return (b"%d:" % i) * (1 + i % 97)

path, durability = sys.argv[1], sys.argv[2]
store = Store(path, durability=durability)
box = Outbox(store, b"crash")
box.load()
pending = [e.msg_id for e in box.due()]
while True:
    ids = [box.next_id() for _ in range(20)]
    for i in ids:
        box.add(i, "Agent/%d" % i, payload(i))
    acked = pending[:10] if len(pending) > 40 else []
    del pending[: len(acked)]
    for i in acked:
        assert box.ack(i)
    pending.extend(ids)
    print("intent", ids[0], ids[-1], *acked, flush=True)
    batch = store.batch()
    box.stage(batch)
    store.commit(batch)
    box.committed()
    print("done", flush=True)
"""


def payload(i: int) -> bytes:
    return (b"%d:" % i) * (1 + i % 97)


def read_lines(proc: subprocess.Popen[bytes], until: float, want_one: bool) -> bytes:
    """Read the child's stdout until ``until`` (or its first line when ``want_one``)."""
    assert proc.stdout is not None
    fd, out = proc.stdout.fileno(), b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while (left := until - time.monotonic()) > 0:
            if sel.select(left):
                data = os.read(fd, 65536)
                if not data:
                    break
                out += data
                if want_one and b"done\n" in out:
                    break
    return out


def replay_log(text: bytes, present: set[int], acked: set[int]) -> tuple[set[int], set[int]]:
    """Apply the child's committed batches; return the uncertain last batch (adds, acks)."""
    intent: tuple[set[int], set[int]] | None = None
    *complete, _partial = text.split(b"\n")  # a partial line was cut before its commit
    for line in complete:
        fields = line.split()
        if fields[:1] == [b"intent"]:
            first, last, *acks = map(int, fields[1:])
            intent = (set(range(first, last + 1)), set(acks))
        elif line == b"done" and intent is not None:
            present |= intent[0]
            present -= intent[1]
            acked |= intent[1]
            intent = None
    return intent if intent is not None else (set(), set())


@pytest.mark.parametrize("durability", ["durable", "buffered"])
def test_kill_9_keeps_every_committed_entry_whole(tmp_path: Path, durability: str) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    path = tmp_path / "db"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    present: set[int] = set()  # committed and not acked, per the child's reports
    acked: set[int] = set()
    for round_no in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), durability], stdout=subprocess.PIPE, env=env
        )
        try:
            out = read_lines(proc, time.monotonic() + 15, want_one=True)
            assert b"done" in out, f"child did not start (exit {proc.poll()})"
            out += read_lines(proc, time.monotonic() + rng.uniform(0.0, 0.15), want_one=False)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        assert proc.stdout is not None
        out += proc.stdout.read()
        proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL, (seed, round_no)
        maybe_added, maybe_acked = replay_log(out, present, acked)
        with Store(path) as store:
            store.reader_check()
            box = Outbox(store, b"crash")
            box.load()
            found = {e.msg_id: e for e in box.due()}
            next_id = box.next_id()
        for e in found.values():  # none half-written
            assert (e.dest, e.data) == (f"Agent/{e.msg_id}", payload(e.msg_id)), seed
        # The batch in flight at the kill is there entirely or not at all.
        if maybe_added and maybe_added <= set(found):
            present |= maybe_added
            present -= maybe_acked
            acked |= maybe_acked
        else:
            assert not maybe_added & set(found), (seed, round_no)
        assert set(found) == present, (seed, round_no, sorted(set(found) ^ present)[:10])
        assert next_id > max(present | acked), seed


def test_dedup_finds_records_out_of_order_and_after_reopen(store: Store) -> None:
    """New messages skip the record read (above the sender's high-water mark); that
    shortcut must never hide a record, whatever order the ids arrive in."""
    log = DedupLog(store, b"w0")
    for msg_id in (5, 9, 2, 7):
        assert log.lookup("src", msg_id) is None
        log.record("src", msg_id, 0, b"r%d" % msg_id)
    for msg_id in (2, 5, 7, 9):
        assert log.lookup("src", msg_id) == (0, b"r%d" % msg_id)
    assert log.lookup("src", 8) is None and log.lookup("src", 10) is None
    assert log.lookup("other", 1) is None
    commit(store, log)
    again = DedupLog(store, b"w0")
    for msg_id in (9, 2, 7, 5):
        assert again.lookup("src", msg_id) == (0, b"r%d" % msg_id)
    again.record("src", 7, 3, b"new")  # replaces: still one record
    assert len(again) == 4 and again.lookup("src", 7) == (3, b"new")
