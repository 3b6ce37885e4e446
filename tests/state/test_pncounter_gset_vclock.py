from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phoenix_node.state import GCounter, GSet, InvalidValueError, Order, PNCounter, VectorClock

from .laws import Spec, law_tests

ELEMENTS = st.one_of(
    st.integers(-5, 5),
    st.text(max_size=3),
    st.binary(max_size=2),
    st.none(),
    st.tuples(st.integers(0, 3), st.text(max_size=2)),
)


def _pn(counter: PNCounter, replica: str, op: tuple[bool, int]) -> PNCounter:
    up, n = op
    return counter.increment(replica, n) if up else counter.decrement(replica, n)


def _gset(s: GSet, replica: str, element: object) -> GSet:
    return s.add(element)


def _tick(clock: VectorClock, replica: str, _: None) -> VectorClock:
    return clock.tick(replica)


for _name, _spec in {
    "pncounter": Spec(
        PNCounter, st.tuples(st.booleans(), st.integers(0, 2**66)), _pn, others=[GCounter()]
    ),
    "gset": Spec(GSet, ELEMENTS, _gset, others=[GCounter()]),
    "vclock": Spec(VectorClock, st.none(), _tick, others=[GSet()]),
}.items():
    for _test_name, _fn in law_tests(_spec).items():
        globals()[f"{_test_name}__{_name}"] = _fn


def test_pncounter_goes_negative_and_back() -> None:
    c = PNCounter()
    c.decrement("a#1", 5)
    c.increment("b#1", 2)
    assert c.value == -3
    d = c.increment("a#1", 3)
    assert d.value == 3
    assert PNCounter.decode(c.encode()).value == 0


def test_pncounter_refuses_negative_amounts() -> None:
    with pytest.raises(InvalidValueError):
        PNCounter().increment("a#1", -1)
    with pytest.raises(InvalidValueError):
        PNCounter().decrement("a#1", -1)


def test_gset_refuses_unhashable_or_non_plain_members() -> None:
    for bad in ([1], {"a": 1}, object(), float("nan"), 2**64):
        with pytest.raises(InvalidValueError):
            GSet().add(bad)


def test_gset_tuples_round_trip_as_tuples() -> None:
    s = GSet()
    s.add(("a", 1))
    assert GSet.decode(s.encode()).value == {("a", 1)}


@given(
    st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 3)), max_size=12),
    st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 3)), max_size=12),
)
def test_vclock_compare_matches_entrywise_order(
    ta: list[tuple[str, int]], tb: list[tuple[str, int]]
) -> None:
    a, b = VectorClock(), VectorClock()
    for r, k in ta:
        for _ in range(k):
            a.tick(r)
    for r, k in tb:
        for _ in range(k):
            b.tick(r)
    keys = set(a.value) | set(b.value)
    le = all(a[k] <= b[k] for k in keys)
    ge = all(a[k] >= b[k] for k in keys)
    expected = {
        (True, True): Order.EQUAL,
        (True, False): Order.BEFORE,
        (False, True): Order.AFTER,
        (False, False): Order.CONCURRENT,
    }[(le, ge)]
    assert a.compare(b) is expected
    merged = a.merge(b)
    assert merged.dominates(a) and merged.dominates(b)


def test_vclock_prune_keeps_the_clock_after_the_removed_replica() -> None:
    a = VectorClock()
    a.tick("gone#1")
    a.tick("x#1")
    pruned = a.prune("gone#1", "x#1")
    assert "gone#1" not in pruned.value
    assert pruned["x#1"] == 2
