from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phoenix_node.state import (
    DecodeError,
    InvalidValueError,
    LWWMap,
    LWWRegister,
    TTLMap,
    hlc,
)
from phoenix_node.state._codec import pack
from phoenix_node.state.hlc import HybridClock, make_timestamp

from .conftest import FakeWall
from .laws import Skip, Spec, law_tests

KEYS = st.sampled_from([0, 1, 2, "a", "b", ("t", 1)])
VALUES = st.sampled_from([None, 1, 1.0, True, "v", [1], {"k": 2}])
TIMESTAMPS = st.one_of(st.none(), st.integers(0, 3))
EXPIRIES = st.one_of(st.none(), st.integers(0, 4))
OPS = st.one_of(
    st.tuples(st.just("put"), KEYS, VALUES, TIMESTAMPS, EXPIRIES),
    st.tuples(st.just("remove"), KEYS, st.none(), TIMESTAMPS, st.none()),
    st.tuples(st.just("compact"), st.none(), st.none(), st.none(), st.integers(0, 5)),
)


def _apply(m: TTLMap, replica: str, op: tuple[str, Any, Any, int | None, int | None]) -> TTLMap:
    kind, key, value, ts, ms = op
    try:
        if kind == "put":
            return m.put(replica, key, value, timestamp=ts, expires_at=ms)
        if kind == "remove":
            return m.remove(replica, key, ts)
        assert ms is not None
        return m.compact(ms)
    except InvalidValueError:
        raise Skip() from None


SPEC = Spec(TTLMap, OPS, _apply, others=[LWWMap(), LWWRegister()])
globals().update(law_tests(SPEC))


def test_ttl_expires_on_the_injected_wall_clock(wall: FakeWall) -> None:
    m = TTLMap()
    m.put("a#1", "session", "tok", ttl=1.5)
    m.put("a#1", "config", "forever")
    assert m.expiry("session") == 1_001_500 and m.expiry("config") is None
    assert m.value == {"session": "tok", "config": "forever"} and len(m) == 2
    wall.ms = 1_001_499
    assert "session" in m and m.get("session") == "tok"
    wall.ms = 1_001_500
    assert "session" not in m and m.get("session", "gone") == "gone"
    assert m.value == {"config": "forever"} and m.keys() == ["config"] and len(m) == 1


def test_reads_at_an_explicit_time() -> None:
    m = TTLMap()
    m.put("a#1", "k", "v", timestamp=1, expires_at=500)
    assert m.value_at(499) == {"k": "v"} and m.value_at(500) == {}
    assert m.get("k", now_ms=10) == "v" and m.get("k", "d", now_ms=600) == "d"
    assert m.keys(now_ms=0) == ["k"] and m.keys(now_ms=500) == []


def test_merge_is_the_same_whatever_the_clocks_of_the_replicas(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # replica A's wall clock is an hour ahead of B's; the expiry times differ by
    # the same skew, but merge only compares (timestamp, replica, ...)
    monkeypatch.setattr(hlc, "DEFAULT_CLOCK", HybridClock(FakeWall(5_000_000)))
    a = TTLMap()
    a.put("a#1", "k", "from a", ttl=10)
    monkeypatch.setattr(hlc, "DEFAULT_CLOCK", HybridClock(FakeWall(5_000_000 - 3_600_000)))
    b = TTLMap()
    b.put("b#1", "k", "from b", ttl=10)
    ab, ba = a.merge(b), b.merge(a)
    assert ab.encode() == ba.encode()
    assert ab.value_at(0) == {"k": "from a"}  # A's write has the later timestamp


def test_expired_entry_still_beats_an_older_write_without_compaction() -> None:
    a, b = TTLMap(), TTLMap()
    b.put("b#1", "k", "old", timestamp=make_timestamp(100))
    a.put("a#1", "k", "new", timestamp=make_timestamp(200), expires_at=300)
    merged = a.merge(b)
    assert merged.value_at(250) == {"k": "new"}
    assert merged.value_at(300) == {}  # expired: the older value does not reappear


def test_compaction_never_resurrects_an_older_value() -> None:
    a, b = TTLMap(), TTLMap()
    b.put("b#1", "k", "old, lives forever", timestamp=make_timestamp(100))
    a.put("a#1", "k", "short-lived", timestamp=make_timestamp(200), expires_at=300)
    a.put("a#1", "other", "big" * 100, timestamp=make_timestamp(200), expires_at=300)
    size_before = len(a.encode())
    delta = a.compact(now_ms=400)
    assert len(a.encode()) < size_before - 250  # the values are gone
    assert a.value_at(0) == {}  # compacted entries are dead at any time
    for merged in (a.merge(b), b.merge(a), b.merge(delta)):
        assert "k" not in merged.value_at(400)
        assert merged.value_at(0) == {}
    assert a.merge(b).encode() == b.merge(a).encode()


def test_compacted_entry_beats_its_uncompacted_twin() -> None:
    m = TTLMap()
    m.put("a#1", "k", "v", timestamp=7, expires_at=10)
    twin = m.copy()
    before = m.copy()
    delta = m.compact(now_ms=10)
    assert before.merge(delta) == m
    assert twin.merge(m) == m.merge(twin) == m
    assert twin.merge(m).encode() == m.encode()
    assert len(delta.encode()) < len(twin.encode())


def test_compact_leaves_live_entries_and_gives_an_empty_delta_when_nothing_expired() -> None:
    m = TTLMap()
    m.put("a#1", "k", "v", timestamp=1, expires_at=10)
    m.put("a#1", "f", "v", timestamp=1)
    assert m.compact(now_ms=9) == TTLMap()
    assert m.value_at(9) == {"k": "v", "f": "v"}
    assert m.compact(now_ms=10).encode() != TTLMap().encode()
    assert m.value_at(0) == {"f": "v"}


def test_compact_uses_the_default_wall_clock(wall: FakeWall) -> None:
    m = TTLMap()
    m.put("a#1", "k", "v", ttl=1)
    assert m.compact() == TTLMap()
    wall.ms += 1_000
    assert m.compact().value_at(0) == {} and m.value_at(0) == {}


def test_remove_and_concurrent_newer_put() -> None:
    a = TTLMap()
    a.put("a#1", "k", "v1", timestamp=make_timestamp(10), expires_at=10**15)
    b = a.copy()
    b.remove("b#1", "k", make_timestamp(11))
    a.put("a#1", "k", "v2", timestamp=make_timestamp(12))
    assert a.merge(b).value_at(0) == b.merge(a).value_at(0) == {"k": "v2"}
    c = a.copy()
    c.remove("c#1", "k", make_timestamp(13))
    assert a.merge(c).value_at(0) == {}


def test_own_put_supersedes_what_the_replica_has_seen(wall: FakeWall) -> None:
    m = TTLMap()
    m.put("fast#1", "k", "theirs", timestamp=make_timestamp(wall.ms + 10_000))
    m.put("me#1", "k", "mine", ttl=60)
    assert m.get("k") == "mine"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ttl": float("nan")},
        {"ttl": float("inf")},
        {"ttl": -1},
        {"ttl": True},
        {"ttl": "1"},
        {"ttl": 1e300},
        {"ttl": 1, "expires_at": 5},
        {"expires_at": -1},
        {"expires_at": 1.5},
        {"expires_at": 2**63},
        {"timestamp": -1},
        {"timestamp": 2**63},
    ],
)
def test_bad_ttls_expiries_and_timestamps_are_refused(kwargs: dict[str, Any]) -> None:
    m = TTLMap()
    with pytest.raises(InvalidValueError):
        m.put("a#1", "k", "v", **kwargs)
    assert m == TTLMap()


@pytest.mark.parametrize(("key", "value"), [([1], 1), (float("nan"), 1), ("k", {2: 1})])
def test_bad_keys_and_values_are_refused(key: Any, value: Any) -> None:
    with pytest.raises(InvalidValueError):
        TTLMap().put("a#1", key, value, expires_at=5)


def test_bad_read_times_are_refused() -> None:
    m = TTLMap()
    for bad in (-1, 1.5, None, "now"):
        with pytest.raises(InvalidValueError):
            m.value_at(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError):
        m.compact(-5)


@pytest.mark.parametrize(
    "body",
    [
        [["a", 1, "a#1", None, 1], ["a", 1, "a#1", None]],
        [["a", 1, "a#1", -1, 1]],
        [["a", 1, "a#1", 1.5]],
        [["a", 1, "a#1", True]],
        [["a", 1, "a#1"]],
        [["a", 1, "a#1", None, 1, 2]],
        [["b", 1, "a#1", None], ["a", 1, "a#1", None]],
    ],
)
def test_invalid_bodies_are_refused(body: object) -> None:
    with pytest.raises(DecodeError):
        TTLMap.decode(pack([TTLMap.TYPE_CODE, 1, body]))


def test_pruning_is_not_needed() -> None:
    m = TTLMap()
    m.put("gone#1", "k", 1, timestamp=1, expires_at=9)
    assert m.modified_by() == frozenset()
    assert m.prune("gone#1", "a#1") == m == m.prune_cleanup("gone#1")


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["put", "remove", "put+compact"]),
            KEYS,
            VALUES,
            st.sampled_from(["w1#1", "w2#1"]),
            EXPIRIES,
        ),
        min_size=1,
        max_size=8,
    ),
    st.randoms(use_true_random=False),
)
def test_writes_with_equal_timestamps_merge_the_same_in_any_order(
    writes: list[tuple[str, Any, Any, str, int | None]], rnd: Any
) -> None:
    deltas = []
    for kind, key, value, writer, expires in writes:
        m = TTLMap()
        if kind == "remove":
            deltas.append(m.remove(writer, key, 5))
            continue
        deltas.append(m.put(writer, key, value, timestamp=5, expires_at=expires))
        if kind == "put+compact":
            deltas.append(m.compact(now_ms=3))
    results = []
    for _ in range(3):
        rnd.shuffle(deltas)
        m = TTLMap()
        for d in deltas:
            m.merge_in(d)
        results.append(m.encode())
    assert len(set(results)) == 1
