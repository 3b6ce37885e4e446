from __future__ import annotations

import pytest
from hypothesis import strategies as st

from phoenix_node.state import DecodeError, GSet, InvalidValueError, TwoPhaseSet
from phoenix_node.state._codec import pack

from .laws import Skip, Spec, law_tests

ELEMENTS = st.one_of(
    st.integers(-3, 3), st.text(max_size=2), st.none(), st.tuples(st.integers(0, 1))
)


def _apply(s: TwoPhaseSet, replica: str, op: tuple[bool, object]) -> TwoPhaseSet:
    add, element = op
    if not add:
        return s.remove(element)
    if element in s.tombstones:
        raise Skip
    return s.add(element)


SPEC = Spec(TwoPhaseSet, st.tuples(st.booleans(), ELEMENTS), _apply, others=[GSet()])
globals().update(law_tests(SPEC))


def test_add_remove_and_membership() -> None:
    s = TwoPhaseSet()
    s.add("a")
    s.add("b")
    s.remove("a")
    assert s.value == {"b"}
    assert "b" in s and "a" not in s
    assert len(s) == 1
    assert s.tombstones == {"a"}


def test_a_removed_member_can_never_be_added_again() -> None:
    s = TwoPhaseSet()
    s.add("a")
    s.remove("a")
    with pytest.raises(InvalidValueError, match="can never be added again"):
        s.add("a")
    assert s.value == frozenset()


def test_remove_wins_over_a_concurrent_add() -> None:
    a, b = TwoPhaseSet(), TwoPhaseSet()
    a.add("x")
    b.merge_in(a)
    b.remove("x")
    a.add("y")
    a.add("x")  # a has not seen the remove yet: a no-op re-add
    assert a.merge(b).value == {"y"} == b.merge(a).value


def test_remove_of_an_unseen_member_blocks_adds_from_other_replicas() -> None:
    a, b = TwoPhaseSet(), TwoPhaseSet()
    tombstone = a.remove("ghost")
    assert a.value == frozenset() and a.tombstones == {"ghost"}
    b.add("ghost")  # concurrent: b does not know yet
    b.merge_in(tombstone)
    assert "ghost" not in b
    with pytest.raises(InvalidValueError):
        b.add("ghost")


def test_deltas_are_one_member_each() -> None:
    s = TwoPhaseSet()
    s.add(1)
    d_add = s.add(2)
    d_rm = s.remove(1)
    assert d_add.value == {2} and d_add.tombstones == frozenset()
    assert d_rm.value == frozenset() and d_rm.tombstones == {1}
    fresh = TwoPhaseSet()
    fresh.merge_in(d_add)
    fresh.merge_in(d_rm)
    assert fresh.value == {2}


def test_bad_members_are_refused() -> None:
    for bad in ([1], {"a": 1}, object(), float("nan")):
        with pytest.raises(InvalidValueError):
            TwoPhaseSet().add(bad)
        with pytest.raises(InvalidValueError):
            TwoPhaseSet().remove(bad)


def test_removed_members_are_stored_once() -> None:
    s = TwoPhaseSet()
    s.add("a")
    s.remove("a")
    assert s.to_wire()[2] == [[], ["a"]]


def test_non_canonical_encodings_are_refused() -> None:
    code = TwoPhaseSet.TYPE_CODE
    for body in ([["a"], ["a"]], [["b", "a"], []], [[], ["b", "a"]], [["a"]], ["a", []]):
        with pytest.raises(DecodeError):
            TwoPhaseSet.decode(pack([code, 1, body]))


def test_tuples_round_trip_as_tuples() -> None:
    s = TwoPhaseSet()
    s.add(("a", 1))
    s.remove(("b", 2))
    back = TwoPhaseSet.decode(s.encode())
    assert back.value == {("a", 1)} and back.tombstones == {("b", 2)}


def test_nothing_to_prune() -> None:
    s = TwoPhaseSet()
    s.add("a")
    assert s.modified_by() == frozenset()
    assert not s.needs_pruning_from("node-a#1")
    assert s.prune("node-a#1", "node-b#1") == s
