from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phoenix_node.state import (
    DecodeError,
    GCounter,
    InvalidValueError,
    LWWMap,
    LWWRegister,
    TypeMismatchError,
    hlc,
)
from phoenix_node.state._codec import pack
from phoenix_node.state.hlc import make_timestamp

from .conftest import FakeWall
from .laws import Skip, Spec, law_tests

# 1, 1.0 and True (and 0.0, -0.0) are equal in Python but distinct values here:
# with explicit equal timestamps they exercise the value tie-break.
VALUES = st.one_of(
    st.sampled_from([None, 0, 1, 1.0, True, 0.0, -0.0, "a", b"a", [1], (1,), {"k": 1}]),
    st.text(max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(-2, 2), max_size=2),
)
TIMESTAMPS = st.one_of(st.none(), st.integers(0, 3))


def _set(reg: LWWRegister, replica: str, op: tuple[Any, int | None]) -> LWWRegister:
    value, ts = op
    try:
        return reg.set(replica, value, ts)
    except InvalidValueError:
        raise Skip() from None


SPEC = Spec(LWWRegister, st.tuples(VALUES, TIMESTAMPS), _set, others=[GCounter(), LWWMap()])
globals().update(law_tests(SPEC))


def test_empty_register_reads_none() -> None:
    reg = LWWRegister()
    assert (reg.value, reg.timestamp, reg.replica) == (None, None, None)
    assert LWWRegister.decode(reg.encode()) == reg


def test_later_write_wins_and_delta_carries_it(wall: FakeWall) -> None:
    reg = LWWRegister()
    reg.set("a#1", "first")
    wall.ms += 1
    delta = reg.set("b#1", "second")
    assert reg.value == "second" and reg.replica == "b#1"
    assert delta.value == "second" and delta.timestamp == reg.timestamp
    assert hlc.physical_ms(reg.timestamp or 0) == wall.ms


def test_concurrent_writes_resolve_to_the_same_winner_everywhere() -> None:
    a, b, c = LWWRegister(), LWWRegister(), LWWRegister()
    a.set("a#1", "from a", make_timestamp(10))
    b.set("b#1", "from b", make_timestamp(12))
    c.set("c#1", "from c", make_timestamp(11))
    results = [a.merge(b).merge(c), c.merge(a).merge(b), b.merge(c).merge(a)]
    assert all(r.value == "from b" for r in results)
    assert len({r.encode() for r in results}) == 1


def test_equal_timestamps_are_won_by_the_larger_replica_id() -> None:
    a, b = LWWRegister(), LWWRegister()
    a.set("node-a#1", "a", 5)
    b.set("node-b#1", "b", 5)
    assert a.merge(b).value == b.merge(a).value == "b"


def test_same_replica_and_timestamp_twice_merges_deterministically() -> None:
    x, y = LWWRegister(), LWWRegister()
    x.set("a#1", 1, 7)
    y.set("a#1", True, 7)  # equal to 1 in Python, but another value
    xy, yx = x.merge(y), y.merge(x)
    assert xy.encode() == yx.encode()
    assert xy.value is True  # msgpack bytes of True (0xc3) sort after 1 (0x01)


def test_explicit_older_timestamp_loses_but_delta_still_carries_it() -> None:
    reg = LWWRegister()
    reg.set("a#1", "new", 100)
    before = reg.copy()
    delta = reg.set("b#1", "old", 50)
    assert reg == before and reg.value == "new"
    assert delta.value == "old"
    assert before.merge(delta) == reg


def test_own_write_supersedes_a_future_timestamp_it_has_seen(wall: FakeWall) -> None:
    reg = LWWRegister()
    future = make_timestamp(wall.ms + 3_600_000)  # a peer with a clock an hour ahead
    reg.set("fast#1", "theirs", future)
    reg.set("me#1", "mine")
    assert reg.value == "mine" and (reg.timestamp or 0) > future
    # the clock remembers it: a write elsewhere is ordered after it too
    assert hlc.DEFAULT_CLOCK.now() > future


def test_no_timestamp_left_after_the_maximum_is_a_clear_error(wall: FakeWall) -> None:
    reg = LWWRegister()
    reg.set("a#1", "x", hlc.MAX_TIMESTAMP)
    with pytest.raises(InvalidValueError):
        reg.set("a#1", "y")
    assert reg.value == "x"


def test_values_are_stored_canonically_and_read_as_copies() -> None:
    reg = LWWRegister()
    reg.set("a#1", {"b": (1, 2), "a": [3]}, 1)
    value = reg.value
    assert value == {"a": [3], "b": [1, 2]} and list(value) == ["a", "b"]
    value["a"].append(4)
    assert reg.value == {"a": [3], "b": [1, 2]}
    assert LWWRegister.decode(reg.encode()).value == reg.value


@pytest.mark.parametrize(
    "value", [float("nan"), {1: "a"}, {"a": {2: 1}}, object(), 2**64, {"x": [float("nan")]}]
)
def test_bad_values_are_refused_and_change_nothing(value: object) -> None:
    reg = LWWRegister()
    reg.set("a#1", "keep", 1)
    with pytest.raises(InvalidValueError):
        reg.set("a#1", value, 2)
    assert reg.value == "keep"


@pytest.mark.parametrize("ts", [-1, 2**63, 1.5, True, "1", 2**64])
def test_bad_timestamps_are_refused(ts: object) -> None:
    with pytest.raises(InvalidValueError):
        LWWRegister().set("a#1", 1, ts)  # type: ignore[arg-type]


@pytest.mark.parametrize("replica", ["", 3, None, "x" * 300])
def test_bad_replica_ids_are_refused(replica: object) -> None:
    with pytest.raises(InvalidValueError):
        LWWRegister().set(replica, 1, 1)  # type: ignore[arg-type]


def test_merge_with_another_type_is_refused() -> None:
    with pytest.raises(TypeMismatchError):
        LWWRegister().merge(LWWMap())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "body",
    [
        [1, "a#1"],
        [-1, "a#1", 1],
        [2**63, "a#1", 1],
        [True, "a#1", 1],
        [1, "", 1],
        [1, "a#1", {"b": 1, "a": 2}],  # dict value not canonical
        {"a": 1},
    ],
)
def test_invalid_bodies_are_refused(body: object) -> None:
    with pytest.raises(DecodeError):
        LWWRegister.decode(pack([LWWRegister.TYPE_CODE, 1, body]))


def test_pruning_is_not_needed_and_keeps_the_register() -> None:
    reg = LWWRegister()
    reg.set("gone#1", "v", 3)
    assert reg.modified_by() == frozenset()
    assert not reg.needs_pruning_from("gone#1")
    assert reg.prune("gone#1", "a#1") == reg
    assert reg.prune_cleanup("gone#1") == reg


@given(
    st.lists(st.tuples(VALUES, st.sampled_from(["w1#1", "w2#1"])), min_size=1, max_size=6),
    st.randoms(use_true_random=False),
)
def test_writes_with_equal_timestamps_merge_the_same_in_any_order(
    writes: list[tuple[Any, str]], rnd: Any
) -> None:
    deltas = [LWWRegister().set(w, v, 5) for v, w in writes]
    results = []
    for _ in range(3):
        rnd.shuffle(deltas)
        reg = LWWRegister()
        for d in deltas:
            reg.merge_in(d)
        results.append(reg.encode())
    assert len(set(results)) == 1
