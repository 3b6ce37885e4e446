"""Bounded mailboxes (workers/mailbox.py): every overflow strategy, the watermark
hysteresis, the memory bound, and spilling to a real LMDB store in FIFO order across
memory, staged writes, disk and a store close/reopen ("restart")."""

from __future__ import annotations

import gc
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from phoenix_node.state import Store
from workers.mailbox import (
    MAX_MAILBOX_KEY,
    Mailbox,
    MailboxPolicy,
    Outcome,
    SpillError,
    SpillStore,
    Strategy,
)


def encode(item: dict[str, Any]) -> bytes:
    return json.dumps(item, sort_keys=True).encode()


def decode(data: bytes) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(data)
    return result


def msg(i: int) -> dict[str, Any]:
    return {"id": i, "body": "x" * (i % 7), "nested": [i, {"k": None}]}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "node", durability="buffered") as s:
        yield s


def spilling(
    spill: SpillStore, key: bytes = b"Counter/a", capacity: int = 4, low: int = 2
) -> Mailbox[dict[str, Any]]:
    policy = MailboxPolicy(capacity=capacity, low_watermark=low, strategy=Strategy.SPILL_TO_DISK)
    return Mailbox(policy, spill=spill, key=key, encode=encode, decode=decode)


def commit(store: Store, spill: SpillStore) -> None:
    batch = store.batch()
    spill.stage(batch)
    store.commit(batch)
    spill.committed()


def on_disk(store: Store) -> list[tuple[bytes, bytes]]:
    return list(store.iter_items("spill"))


def take_all(mailbox: Mailbox[Any]) -> list[Any]:
    out: list[Any] = []
    while mailbox.pending:
        got = mailbox.take(3)
        assert got, "pending items but take() returned none"
        assert len(mailbox) <= mailbox.policy.capacity
        out.extend(got)
    return out


# ------------------------------------------------------------------ policy


def test_policy_defaults_and_parse() -> None:
    policy = MailboxPolicy()
    assert (policy.capacity, policy.low_watermark, policy.strategy) == (1000, 500, "reject")
    assert policy.redirect_to is None
    parsed = MailboxPolicy.parse({"capacity": 100, "strategy": "drop_oldest"})
    assert parsed == MailboxPolicy(100, 50, Strategy.DROP_OLDEST)
    assert parsed.strategy is Strategy.DROP_OLDEST
    assert MailboxPolicy.parse(parsed) is parsed
    redirect = MailboxPolicy.parse({"strategy": "redirect", "redirect_to": "Overflow/x"})
    assert redirect.redirect_to == "Overflow/x"
    assert MailboxPolicy(capacity=1).low_watermark == 0


@pytest.mark.parametrize(
    ("spec", "error", "field"),
    [
        ({"capacity": 0}, ValueError, "capacity"),
        ({"capacity": -3}, ValueError, "capacity"),
        ({"capacity": "10"}, TypeError, "capacity"),
        ({"capacity": True}, TypeError, "capacity"),
        ({"capacity": 1.5}, TypeError, "capacity"),
        ({"capacity": 10, "low_watermark": 10}, ValueError, "low_watermark"),
        ({"capacity": 10, "low_watermark": 11}, ValueError, "low_watermark"),
        ({"capacity": 10, "low_watermark": -1}, ValueError, "low_watermark"),
        ({"capacity": 10, "low_watermark": 2.0}, TypeError, "low_watermark"),
        ({"strategy": "drop_random"}, ValueError, "strategy"),
        ({"strategy": 3}, ValueError, "strategy"),
        ({"strategy": "redirect"}, ValueError, "redirect_to"),
        ({"strategy": "redirect", "redirect_to": ""}, ValueError, "redirect_to"),
        ({"strategy": "redirect", "redirect_to": 7}, ValueError, "redirect_to"),
        ({"strategy": "reject", "redirect_to": "A/b"}, ValueError, "redirect_to"),
        ({"capacity": 10, "size": 3}, ValueError, "size"),
        ([("capacity", 10)], TypeError, "mailbox policy"),
        ("reject", TypeError, "mailbox policy"),
    ],
)
def test_bad_policies_are_refused_naming_the_field(
    spec: object, error: type[Exception], field: str
) -> None:
    with pytest.raises(error, match=field):
        MailboxPolicy.parse(spec)  # type: ignore[arg-type]


def test_policies_are_frozen() -> None:
    policy = MailboxPolicy()
    with pytest.raises(AttributeError):
        policy.capacity = 5  # type: ignore[misc]


# -------------------------------------------------------------- strategies


def test_reject_with_hysteresis() -> None:
    box: Mailbox[int] = Mailbox({"capacity": 4, "low_watermark": 2})
    assert [box.offer(i).outcome for i in range(4)] == [Outcome.ACCEPTED] * 4
    assert box.over
    rejected = box.offer(4)
    assert (rejected.outcome, rejected.queued) == (Outcome.REJECTED, False)
    assert box.take(1) == [0]
    assert box.offer(5).outcome is Outcome.REJECTED  # room for one, but still over
    assert box.take(1) == [1]  # drained to the low watermark
    assert not box.over
    assert box.offer(6).outcome is Outcome.ACCEPTED
    assert box.take(10) == [2, 3, 6]
    assert (box.accepted, box.rejected, box.dropped) == (5, 2, 0)


def test_redirect_with_hysteresis() -> None:
    box: Mailbox[str] = Mailbox({"capacity": 2, "strategy": "redirect", "redirect_to": "Spare/1"})
    assert box.offer("a").outcome is Outcome.ACCEPTED
    assert box.offer("b").outcome is Outcome.ACCEPTED
    offer = box.offer("c")
    assert (offer.outcome, offer.queued, offer.redirect_to) == (
        Outcome.REDIRECTED,
        False,
        "Spare/1",
    )
    assert box.take(1) == ["a"]  # 1 left: above the low watermark (1)? no: at it
    assert not box.over
    assert box.offer("d").outcome is Outcome.ACCEPTED
    assert box.take(5) == ["b", "d"]
    assert box.redirected == 1


def test_drop_oldest_keeps_the_newest_and_reports_the_dropped_one() -> None:
    box: Mailbox[int] = Mailbox({"capacity": 3, "strategy": "drop_oldest"})
    offers = [box.offer(i) for i in range(6)]
    assert [o.outcome for o in offers] == [Outcome.ACCEPTED] * 3 + [Outcome.DROPPED] * 3
    assert [o.dropped for o in offers[3:]] == [0, 1, 2]
    assert all(o.queued for o in offers)
    assert len(box) == 3
    assert box.take(10) == [3, 4, 5]
    assert (box.accepted, box.dropped) == (6, 3)


def test_drop_newest_keeps_the_oldest_and_reports_the_new_one() -> None:
    box: Mailbox[int] = Mailbox({"capacity": 3, "strategy": "drop_newest"})
    offers = [box.offer(i) for i in range(6)]
    assert [o.dropped for o in offers[3:]] == [3, 4, 5]
    assert not any(o.queued for o in offers[3:])
    assert box.take(1) == [0]
    dropped = box.offer(6)  # room again: the drop strategies drop only at capacity
    assert dropped.outcome is Outcome.ACCEPTED
    assert box.take(10) == [1, 2, 6]
    assert (box.accepted, box.dropped) == (4, 3)


def test_a_dropped_item_that_is_none_is_still_reported() -> None:
    box: Mailbox[None] = Mailbox({"capacity": 1, "strategy": "drop_newest"})
    box.offer(None)
    offer = box.offer(None)
    assert offer.outcome is Outcome.DROPPED and not offer.queued


def test_take_validates_n() -> None:
    box: Mailbox[int] = Mailbox()
    box.offer(1)
    assert box.take(0) == []
    for bad in (-1, 1.5, "2", None):
        with pytest.raises(ValueError, match="take"):
            box.take(bad)  # type: ignore[arg-type]
    assert box.take(1) == [1]


class Model:
    """What a mailbox must do, written as plainly as possible."""

    def __init__(self, policy: MailboxPolicy) -> None:
        self.policy = policy
        self.queue: list[int] = []
        self.over = False

    def offer(self, item: int) -> tuple[Outcome, int | None]:
        p, q = self.policy, self.queue
        if self.over and p.strategy in ("reject", "redirect", "spill_to_disk"):
            if p.strategy == "spill_to_disk":
                q.append(item)
                return Outcome.SPILLED, None
            return (Outcome.REJECTED if p.strategy == "reject" else Outcome.REDIRECTED), None
        if len(q) >= p.capacity:
            if p.strategy == "drop_newest":
                return Outcome.DROPPED, item
            q.append(item)
            return Outcome.DROPPED, q.pop(0)
        q.append(item)
        if len(q) >= p.capacity:
            self.over = True
        return Outcome.ACCEPTED, None

    def take(self, n: int) -> list[int]:
        out, self.queue = self.queue[:n], self.queue[n:]
        if len(self.queue) <= self.policy.low:
            self.over = False
        return out


OFFER, STAGE, COMMIT = -1, -2, -3


@settings(max_examples=300, deadline=None)
@given(
    strategy=st.sampled_from(list(Strategy)),
    capacity=st.integers(1, 6),
    low_fraction=st.floats(0, 0.99),
    ops=st.lists(
        st.one_of(st.just(OFFER), st.just(STAGE), st.just(COMMIT), st.integers(0, 8)),
        max_size=80,
    ),
)
# A spilled item refilled between stage and commit: its delete must outlive the commit.
@example(Strategy.SPILL_TO_DISK, 1, 0.0, [OFFER, OFFER, STAGE, 1, COMMIT])
def test_every_strategy_against_a_model(
    strategy: Strategy, capacity: int, low_fraction: float, ops: list[int]
) -> None:
    """OFFER offers the next item, n >= 0 takes n. STAGE stages the spill into a new
    batch (the previous one, if any, is dropped as if its commit failed); COMMIT
    commits the staged batch. At the end, the disk holds exactly what is not in memory."""
    low = int(capacity * low_fraction)
    redirect = "Spare/1" if strategy is Strategy.REDIRECT else None
    policy = MailboxPolicy(capacity, low, strategy, redirect)
    model = Model(policy)
    with tempfile.TemporaryDirectory() as tmp, Store(tmp, durability="buffered") as store:
        spill = SpillStore(store)
        box: Mailbox[int] = Mailbox(
            policy, spill=spill, key=b"k", encode=lambda i: str(i).encode(), decode=int
        )
        batch = None
        for step, op in enumerate(ops):
            if op == OFFER:
                offer = box.offer(step)
                assert (offer.outcome, offer.dropped) == model.offer(step)
            elif op == STAGE:
                batch = store.batch()
                spill.stage(batch)
            elif op == COMMIT and batch is not None:
                store.commit(batch)
                spill.committed()
                batch = None
            elif op >= 0:
                assert box.take(op) == model.take(op)
            assert len(box) <= capacity
            assert box.pending == len(model.queue)
            assert box.over == model.over
        commit(store, spill)
        assert [int(v) for _, v in on_disk(store)] == model.queue[len(box) :]
        assert box.clear() == model.queue
        commit(store, spill)
        assert on_disk(store) == []


# ---------------------------------------------------------------- spilling


def test_spilled_items_come_back_in_order_and_equal(store: Store) -> None:
    spill = SpillStore(store)
    box = spilling(spill, capacity=4, low=2)
    outcomes = [box.offer(msg(i)).outcome for i in range(20)]
    assert outcomes == [Outcome.ACCEPTED] * 4 + [Outcome.SPILLED] * 16
    assert (len(box), box.pending, box.spilled) == (4, 20, 16)
    assert box.take(2) == [msg(0), msg(1)]
    assert len(box) == 4  # fell to the low watermark: refilled from the backlog
    box.offer(msg(20))  # room in memory, but a backlog: goes behind it
    assert box.spilled == 17
    assert take_all(box) == [msg(i) for i in range(2, 21)]
    assert not box.over
    assert box.offer(msg(21)).outcome is Outcome.ACCEPTED  # backlog gone, under low


def test_reads_see_staged_data_and_commits_write_the_spill_format(store: Store) -> None:
    spill = SpillStore(store)
    box = spilling(spill, key=b"Counter/a", capacity=2, low=0)
    for i in range(5):
        box.offer(msg(i))
    assert on_disk(store) == []  # nothing written until the worker commits
    commit(store, spill)
    assert spill.staged == 0
    disk = on_disk(store)
    assert [k for k, _ in disk] == [b"Counter/a\x00" + struct.pack(">Q", s) for s in range(3)]
    assert [decode(v) for _, v in disk] == [msg(2), msg(3), msg(4)]
    assert box.take(2) == [msg(0), msg(1)]  # refills 2 and 3 from disk
    box.offer(msg(5))
    commit(store, spill)
    assert [decode(v) for _, v in on_disk(store)] == [msg(4), msg(5)]
    assert take_all(box) == [msg(i) for i in range(2, 6)]


def test_items_spilled_and_taken_between_commits_cost_no_write(store: Store) -> None:
    spill = SpillStore(store)
    box = spilling(spill, capacity=2, low=0)
    for i in range(10):
        box.offer(msg(i))
    assert take_all(box) == [msg(i) for i in range(10)]
    batch = store.batch()
    assert spill.stage(batch) == 0
    assert len(batch) == 0


def test_a_failed_commit_loses_nothing(store: Store, tmp_path: Path) -> None:
    spill = SpillStore(store)
    box = spilling(spill, capacity=1, low=0)
    for i in range(4):
        box.offer(msg(i))
    lost = store.batch()
    spill.stage(lost)
    lost.clear()  # as if the commit failed and the worker dropped the batch
    assert box.take(1) == [msg(0)]  # consumes item 1 from the staged-only backlog
    commit(store, spill)
    assert [decode(v) for _, v in on_disk(store)] == [msg(2), msg(3)]


def test_the_backlog_survives_a_restart_and_new_offers_queue_behind_it(tmp_path: Path) -> None:
    path = tmp_path / "node"
    with Store(path) as store:
        spill = SpillStore(store)
        box = spilling(spill, key=b"Counter/a", capacity=10, low=5)
        other = spilling(spill, key=b"Counter/b", capacity=1, low=0)
        for i in range(100):
            box.offer(msg(i))
        other.offer(msg(-1))
        other.offer(msg(-2))
        assert box.take(5) == [msg(i) for i in range(5)]  # refills 10..14 into memory
        commit(store, spill)
        for i in range(100, 103):
            box.offer(msg(i))  # staged, never committed: lost with the process
    with Store(path) as store:
        spill = SpillStore(store)
        assert spill.backlog() == {b"Counter/a": 85, b"Counter/b": 1}
        box = spilling(spill, key=b"Counter/a", capacity=10, low=5)
        assert box.over and len(box) == 0 and box.pending == 85
        assert box.offer(msg(1000)).outcome is Outcome.SPILLED
        assert box.take(3) == [msg(15), msg(16), msg(17)]
        commit(store, spill)
        keys = [k for k, _ in store.iter_items("spill", b"Counter/a\x00")]
        seqs = [struct.unpack(">Q", k[-8:])[0] for k in keys]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # resumed, no gap
        assert take_all(box) == [msg(i) for i in range(18, 100)] + [msg(1000)]
        commit(store, spill)
        assert spill.backlog() == {b"Counter/b": 1}


def test_a_restart_resumes_a_mailbox_drained_between_the_restart_and_the_commit(
    tmp_path: Path,
) -> None:
    path = tmp_path / "node"
    with Store(path) as store:
        spill = SpillStore(store)
        box = spilling(spill, capacity=1, low=0)
        for i in range(6):
            box.offer(msg(i))
        commit(store, spill)
        assert box.take(3) == [msg(0), msg(1), msg(2)]  # deletes staged, not committed
    with Store(path) as store:
        spill = SpillStore(store)
        assert spill.backlog() == {b"Counter/a": 5}  # the taken ones come back: at least once
        box = spilling(spill, capacity=1, low=0)
        assert take_all(box) == [msg(i) for i in range(1, 6)]


def test_one_live_mailbox_per_key(store: Store) -> None:
    spill = SpillStore(store)
    box = spilling(spill)
    for i in range(6):
        box.offer(msg(i))
    with pytest.raises(ValueError, match="already used"):
        spilling(spill)
    del box
    gc.collect()
    again = spilling(spill)  # the dropped mailbox released the key; its backlog stays
    assert again.pending == 2
    assert take_all(again) == [msg(4), msg(5)]


def test_a_key_reused_after_its_backlog_emptied_leaves_no_stale_item(store: Store) -> None:
    spill = SpillStore(store)
    for round_ in range(3):
        box = spilling(spill, capacity=1, low=0)
        box.offer(msg(round_))
        box.offer(msg(round_ + 10))
        commit(store, spill)
        assert take_all(box) == [msg(round_), msg(round_ + 10)]
        del box
        box = spilling(spill, capacity=1, low=0)
        box.offer(msg(round_ + 20))
        box.offer(msg(round_ + 30))
        assert take_all(box) == [msg(round_ + 20), msg(round_ + 30)]
        del box
        commit(store, spill)
        assert on_disk(store) == []
        assert spill.backlog() == {}


def test_clear_returns_everything_in_order_and_empties_the_disk(store: Store) -> None:
    spill = SpillStore(store)
    box = spilling(spill, capacity=3, low=1)
    for i in range(10):
        box.offer(msg(i))
    commit(store, spill)
    assert box.clear() == [msg(i) for i in range(10)]
    assert (len(box), box.pending, box.over) == (0, 0, False)
    commit(store, spill)
    assert on_disk(store) == []
    assert box.offer(msg(99)).outcome is Outcome.ACCEPTED


def test_an_undecodable_spilled_item_is_reported_and_skipped(store: Store) -> None:
    spill = SpillStore(store)

    def picky(data: bytes) -> dict[str, Any]:
        item = decode(data)
        if item["id"] == 3:
            raise ValueError("cannot read version 0")
        return item

    box: Mailbox[dict[str, Any]] = Mailbox(
        {"capacity": 2, "low_watermark": 0, "strategy": "spill_to_disk"},
        spill=spill,
        key=b"k",
        encode=encode,
        decode=picky,
    )
    for i in range(6):
        box.offer(msg(i))
    # Taking 0 and 1 refills from disk, meets the bad item after 2: the error waits
    # for the next call, so that 0 and 1 are not lost.
    assert box.take(2) == [msg(0), msg(1)]
    with pytest.raises(SpillError, match=r"item 1 of mailbox b'k'.*version 0"):
        box.take(10)
    assert box.take(10) == [msg(2), msg(4), msg(5)]
    assert box.undecodable == 1
    for i in range(6, 12):
        box.offer(msg(i if i != 8 else 3))
    assert box.clear() == [msg(6), msg(7), msg(9), msg(10), msg(11)]
    assert box.undecodable == 2


def test_a_tampered_spill_db_is_reported(store: Store) -> None:
    with store.batch() as batch:
        batch.put("spill", b"k\x00" + struct.pack(">Q", 0), b"{}")
        batch.put("spill", b"k\x00" + struct.pack(">Q", 5), b"{}")
    spill = SpillStore(store)
    with pytest.raises(SpillError, match="altered"):
        spilling(spill, key=b"k")
    with store.batch() as batch:
        batch.put("spill", b"junk", b"{}")
    with pytest.raises(SpillError, match="malformed"):
        spill.backlog()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"spill": None}, TypeError, "SpillStore"),
        ({"encode": None}, TypeError, "encode"),
        ({"decode": "json"}, TypeError, "decode"),
        ({"key": "Counter/a"}, TypeError, "bytes"),
        ({"key": b""}, ValueError, "key"),
        ({"key": b"a\x00b"}, ValueError, "x00"),
        ({"key": b"a" * (MAX_MAILBOX_KEY + 1)}, ValueError, str(MAX_MAILBOX_KEY)),
    ],
)
def test_bad_spill_settings_are_refused(
    store: Store, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    args: dict[str, Any] = {
        "spill": SpillStore(store),
        "key": b"k",
        "encode": encode,
        "decode": decode,
        **kwargs,
    }
    with pytest.raises(error, match=match):
        Mailbox({"strategy": "spill_to_disk"}, **args)


def test_encode_must_return_bytes(store: Store) -> None:
    box: Mailbox[int] = Mailbox(
        {"capacity": 1, "strategy": "spill_to_disk"},
        spill=SpillStore(store),
        key=b"k",
        encode=str,  # type: ignore[arg-type]
        decode=int,
    )
    box.offer(1)
    with pytest.raises(TypeError, match="not bytes"):
        box.offer(2)
    assert box.pending == 1


def test_the_longest_key_fits_in_lmdb(store: Store) -> None:
    spill = SpillStore(store)
    box = spilling(spill, key=b"a" * MAX_MAILBOX_KEY, capacity=1, low=0)
    box.offer(msg(0))
    box.offer(msg(1))
    commit(store, spill)
    assert spill.backlog() == {b"a" * MAX_MAILBOX_KEY: 1}
    assert os.path.exists(store.path)


def test_items_taken_between_stage_and_commit_are_deleted_by_the_next_commit(
    store: Store,
) -> None:
    spill = SpillStore(store)
    box = spilling(spill, capacity=1, low=0)
    for i in range(3):
        box.offer(msg(i))
    batch = store.batch()
    spill.stage(batch)  # writes items 1 and 2
    assert box.take(1) == [msg(0)]  # refills item 1: already in the batch
    store.commit(batch)
    spill.committed()
    assert [decode(v) for _, v in on_disk(store)] == [msg(1), msg(2)]
    commit(store, spill)  # the delete of item 1 was not forgotten
    assert [decode(v) for _, v in on_disk(store)] == [msg(2)]
