from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phoenix_node.state import (
    DecodeError,
    GSet,
    InvalidValueError,
    LWWMap,
    LWWRegister,
    TTLMap,
)
from phoenix_node.state._codec import pack
from phoenix_node.state.hlc import make_timestamp

from .conftest import FakeWall
from .laws import Spec, law_tests

# 0, False, 0.0 and -0.0 are one key in Python (as in a dict): the map must still
# converge to the same bytes whichever spelling arrives first.
KEYS = st.sampled_from([0, 1, -7, "a", b"a", None, ("t", 1)])
VALUES = st.sampled_from([None, 1, 1.0, True, "v", [1, 2], {"k": "v"}])
# (writer, timestamp): the default clock as the system's replica, or explicit
# timestamps written under a shared writer id from any replica, so that equal
# (timestamp, writer) pairs meet in merges and the tie-breaks are exercised.
STAMPS = st.one_of(
    st.tuples(st.none(), st.none()),
    st.tuples(st.sampled_from(["w1#1", "w2#1"]), st.integers(0, 1)),
)
OPS = st.one_of(
    st.tuples(st.just("put"), KEYS, VALUES, STAMPS),
    st.tuples(st.just("remove"), KEYS, st.none(), STAMPS),
)


def _apply(m: LWWMap, replica: str, op: tuple[str, Any, Any, tuple[Any, Any]]) -> LWWMap:
    kind, key, value, (writer, ts) = op
    writer = writer or replica
    assert len(m) == len(m.value)  # the live count survives merges
    delta = m.put(writer, key, value, ts) if kind == "put" else m.remove(writer, key, ts)
    assert len(m) == len(m.value)
    return delta


SPEC = Spec(LWWMap, OPS, _apply, others=[GSet(), LWWRegister(), TTLMap()])
globals().update(law_tests(SPEC))


def test_put_get_remove_like_a_dict(wall: FakeWall) -> None:
    m = LWWMap()
    m.put("a#1", "x", 1)
    m.put("a#1", ("k", 2), {"n": [1]})
    assert m.get("x") == 1 and m.get(("k", 2)) == {"n": [1]}
    assert "x" in m and len(m) == 2 and set(m.keys()) == {"x", ("k", 2)}
    m.remove("a#1", "x")
    assert "x" not in m and m.get("x", "gone") == "gone" and len(m) == 1
    assert m.value == {("k", 2): {"n": [1]}}
    assert LWWMap.decode(m.encode()) == m
    assert LWWMap.decode(m.encode()).value == m.value


def test_reads_are_copies() -> None:
    m = LWWMap()
    m.put("a#1", "k", [1], 1)
    m.get("k").append(2)
    m.value["k"].append(3)
    assert m.get("k") == [1]


def test_unhashable_lookups_are_simply_absent() -> None:
    m = LWWMap()
    assert m.get([1], "d") == "d"
    assert [1] not in m


def test_concurrent_puts_resolve_to_the_same_winner_everywhere() -> None:
    replicas = [LWWMap(), LWWMap(), LWWMap()]
    for i, (m, ts) in enumerate(zip(replicas, (30, 10, 20), strict=True)):
        m.put(f"r{i}#1", "k", f"from {i}", ts)
        m.put(f"r{i}#1", f"own{i}", i, ts)
    a, b, c = replicas
    results = [a.merge(b).merge(c), c.merge(b).merge(a), b.merge(a.merge(c))]
    assert {r.encode() for r in results} == {results[0].encode()}
    assert results[0].value == {"k": "from 0", "own0": 0, "own1": 1, "own2": 2}


def test_equal_timestamps_are_won_by_the_larger_replica_id() -> None:
    a, b = LWWMap(), LWWMap()
    a.put("node-a#1", "k", "a", 9)
    b.put("node-b#1", "k", "b", 9)
    assert a.merge(b).get("k") == b.merge(a).get("k") == "b"


def test_remove_wins_over_an_older_put() -> None:
    a, b = LWWMap(), LWWMap()
    a.put("a#1", "k", "v", make_timestamp(100))
    b.remove("b#1", "k", make_timestamp(101))
    assert "k" not in a.merge(b) and "k" not in b.merge(a)


def test_a_concurrent_newer_put_wins_over_a_remove() -> None:
    a, b = LWWMap(), LWWMap()
    a.put("a#1", "k", "v1", make_timestamp(100))
    shared = b.merge(a)
    shared.remove("b#1", "k", make_timestamp(101))
    a.put("a#1", "k", "v2", make_timestamp(102))  # concurrent with the remove
    assert a.merge(shared).get("k") == shared.merge(a).get("k") == "v2"


def test_remove_of_an_unseen_key_deletes_a_concurrent_older_put() -> None:
    a, b = LWWMap(), LWWMap()
    b.remove("b#1", "k", 20)
    a.put("a#1", "k", "v", 10)
    assert "k" not in a.merge(b)


def test_tombstone_wins_at_equal_timestamp_and_replica() -> None:
    a, b = LWWMap(), LWWMap()
    a.put("a#1", "k", "v", 5)
    b.remove("a#1", "k", 5)
    assert "k" not in a.merge(b) and "k" not in b.merge(a)


def test_own_write_supersedes_what_the_replica_has_seen(wall: FakeWall) -> None:
    m = LWWMap()
    future = make_timestamp(wall.ms + 60_000)
    m.put("fast#1", "k", "theirs", future)
    m.remove("me#1", "k")  # no timestamp: after the one it has seen
    assert "k" not in m
    m.put("me#1", "k", "back")
    assert m.get("k") == "back"


def test_float_and_bool_keys_are_refused_as_they_alias_ints() -> None:
    m = LWWMap()
    for key in (True, 1.0, ("t", False)):
        with pytest.raises(InvalidValueError, match="not allowed"):
            m.put("a#1", key, "v")
    assert len(m) == 0


def test_delta_is_just_the_written_entry() -> None:
    m = LWWMap()
    m.put("a#1", "x", 1, 1)
    delta = m.put("a#1", "y", 2, 2)
    assert delta.value == {"y": 2}
    tomb = m.remove("a#1", "x", 3)
    assert tomb.value == {} and len(tomb.encode()) < 20


@pytest.mark.parametrize(
    ("key", "value", "ts"),
    [
        ([1], 1, 1),
        ({"a": 1}, 1, 1),
        (float("nan"), 1, 1),
        ("k", float("nan"), 1),
        ("k", {1: "non-str key"}, 1),
        ("k", object(), 1),
        ("k", 1, -1),
        ("k", 1, 2**63),
        ("k", 1, 1.0),
    ],
)
def test_bad_inputs_are_refused_and_change_nothing(key: Any, value: Any, ts: Any) -> None:
    m = LWWMap()
    m.put("a#1", "k", "keep", 0)
    with pytest.raises(InvalidValueError):
        m.put("a#1", key, value, ts)
    assert m.value == {"k": "keep"}


def test_bad_remove_is_refused() -> None:
    with pytest.raises(InvalidValueError):
        LWWMap().remove("a#1", [1], 1)
    with pytest.raises(InvalidValueError):
        LWWMap().remove("", "k", 1)


@pytest.mark.parametrize(
    "body",
    [
        [["b", 1, "a#1", 1], ["a", 1, "a#1", 1]],  # keys out of order
        [["a", 1, "a#1", 1], ["a", 1, "a#1", 1]],  # duplicate
        [[1, 1, "a#1", 1], [True, 1, "a#1", 1]],  # one Python key twice
        [["a", 1, "a#1", 1, 2]],
        [["a", 1]],
        [["a", -1, "a#1"]],
        [["a", 1, 7]],
        [[[1, 2], 1, "a#1"], {"x": 1}],
        [[]],
    ],
)
def test_invalid_bodies_are_refused(body: object) -> None:
    with pytest.raises(DecodeError):
        LWWMap.decode(pack([LWWMap.TYPE_CODE, 1, body]))


def test_tuple_keys_round_trip_as_tuples() -> None:
    m = LWWMap()
    m.put("a#1", ("a", (1, b"x")), "v", 1)
    m.remove("a#1", ("b",), 1)
    back = LWWMap.decode(m.encode())
    assert back.value == {("a", (1, b"x")): "v"}
    assert back == m


def test_pruning_is_not_needed() -> None:
    m = LWWMap()
    m.put("gone#1", "k", 1, 1)
    assert m.modified_by() == frozenset()
    assert m.prune("gone#1", "a#1") == m == m.prune_cleanup("gone#1")


@given(
    st.lists(
        st.tuples(st.booleans(), KEYS, VALUES, st.sampled_from(["w1#1", "w2#1"])),
        min_size=1,
        max_size=8,
    ),
    st.randoms(use_true_random=False),
)
def test_writes_with_equal_timestamps_merge_the_same_in_any_order(
    writes: list[tuple[bool, Any, Any, str]], rnd: Any
) -> None:
    deltas = [
        LWWMap().put(w, k, v, 5) if is_put else LWWMap().remove(w, k, 5)
        for is_put, k, v, w in writes
    ]
    results = []
    for _ in range(3):
        rnd.shuffle(deltas)
        m = LWWMap()
        for d in deltas:
            m.merge_in(d)
        results.append(m.encode())
    assert len(set(results)) == 1
