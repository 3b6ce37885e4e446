from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phoenix_node.state import (
    CRDT,
    DecodeError,
    GCounter,
    GSet,
    InvalidValueError,
    ORSet,
    TypeMismatchError,
)
from phoenix_node.state._codec import pack

from .laws import REPLICAS, Spec, System, law_tests, systems

ELEMENTS = st.one_of(
    st.sampled_from(["x", "y", "z"]),
    st.integers(0, 3),
    st.tuples(st.integers(0, 1), st.text(max_size=1)),
    st.none(),
    st.binary(max_size=1),
)


def _apply(s: ORSet, replica: str, op: tuple[str, Any]) -> ORSet:
    kind, element = op
    return s.add(replica, element) if kind == "add" else s.remove(element)


OPS = st.tuples(st.sampled_from(["add", "add", "remove"]), ELEMENTS)
SPEC = Spec(ORSet, OPS, _apply, others=[GSet(), GCounter()])
globals().update(law_tests(SPEC))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(REPLICAS), OPS), max_size=30))
def test_one_replica_behaves_like_a_plain_set(ops: list[tuple[str, tuple[str, Any]]]) -> None:
    s, model = ORSet(), set()
    for replica, (kind, element) in ops:
        _apply(s, replica, (kind, element))
        if kind == "add":
            model.add(element)
        else:
            model.discard(element)
    assert s.value == model


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), OPS), max_size=12), st.randoms(use_true_random=False))
def test_deltas_alone_in_any_order_rebuild_the_state(
    ops: list[tuple[int, tuple[str, Any]]], rnd: Any
) -> None:
    # Replicas that only ever exchange deltas, delivered late and out of order:
    # removes often arrive before the adds they cover.
    replicas = [ORSet(), ORSet()]
    deltas: list[ORSet] = []
    for i, op in ops:
        delta = _apply(replicas[i], REPLICAS[i], op)
        deltas.append(delta)
        if rnd.random() < 0.5:
            replicas[1 - i].merge_in(rnd.choice(deltas))
    target = replicas[0].merge(replicas[1])
    rnd.shuffle(deltas)
    rebuilt = ORSet()
    for delta in deltas:
        rebuilt.merge_in(delta)
    assert rebuilt == target
    assert rebuilt.value == target.value


@settings(max_examples=60, deadline=None)
@given(systems(SPEC))
def test_pruning_any_reachable_state_keeps_its_value(system: System) -> None:
    removed, into = REPLICAS[2], REPLICAS[0]
    joined = system.join()
    pruned = joined.prune(removed, into)
    assert pruned.value == joined.value
    assert removed not in pruned.modified_by()
    for replica in system.replicas:
        assert pruned.merge(replica.prune_cleanup(removed)) == pruned


A, B, C = "a#1", "b#1", "c#1"


def _body(obj: list[Any]) -> bytes:
    return pack([ORSet.TYPE_CODE, 1, obj])


# --- semantics ------------------------------------------------------------------------


def test_reading_the_set() -> None:
    s = ORSet()
    s.add(A, "x")
    s.add(B, ("t", 1))
    s.add(A, "x")
    assert s.value == {"x", ("t", 1)}
    assert "x" in s and "y" not in s
    assert len(s) == 2
    assert set(s.elements()) == {"x", ("t", 1)}


def test_concurrent_add_and_remove_add_wins() -> None:
    a, b = ORSet(), ORSet()
    b.merge_in(a.add(A, "x"))
    remove = a.remove("x")
    add = b.add(B, "x")
    assert a.merge(b).value == {"x"}
    assert b.merge(a).value == {"x"}
    a.merge_in(add)
    b.merge_in(remove)
    assert a == b and a.value == {"x"}


def test_re_adding_an_element_concurrently_removed_elsewhere_keeps_it() -> None:
    # b re-adds x (superseding a's dot) while a removes the old x: the re-add wins
    a, b = ORSet(), ORSet()
    b.merge_in(a.add(A, "x"))
    readd = b.add(B, "x")
    remove = a.remove("x")
    a.merge_in(readd)
    b.merge_in(remove)
    assert a.value == b.value == {"x"}
    assert a == b


def test_remove_then_re_add() -> None:
    s = ORSet()
    s.add(A, "x")
    s.remove("x")
    assert s.value == frozenset()
    s.add(A, "x")
    assert s.value == {"x"}
    other = ORSet()
    other.add(B, "x")
    other.remove("x")
    assert s.merge(other).value == {"x"}


@pytest.mark.parametrize("earlier_adds", [0, 2])
def test_remove_delta_arriving_before_the_add_delta(earlier_adds: int) -> None:
    a, b, c = ORSet(), ORSet(), ORSet()
    for i in range(earlier_adds):  # with earlier dots missing, the remove lands in the cloud
        b.merge_in(a.add(A, i))
    add = a.add(A, "x")
    b.merge_in(add)
    remove = b.remove("x")
    c.merge_in(remove)
    assert c.value == frozenset()
    c.merge_in(add)  # the late add was already observed and removed
    assert c.value == frozenset()
    c.merge_in(a)
    assert c == b


def test_out_of_order_deltas_are_kept_in_the_context_cloud() -> None:
    a, c = ORSet(), ORSet()
    d1, d2, d3 = a.add(A, "x"), a.add(A, "y"), a.add(A, "z")
    c.merge_in(d3)
    assert c.value == {"z"}
    assert c._body()[1:] == [[], [[A, 3]]]  # dot 3 sits in the cloud
    c.merge_in(d1)
    assert c._body()[1:] == [[[A, 1]], [[A, 3]]]
    c.merge_in(d2)
    assert c._body()[1:] == [[[A, 3]], []]  # compacted once contiguous
    assert c == a


def test_an_add_delta_supersedes_the_element_dots_it_has_seen() -> None:
    s = ORSet()
    s.add(A, "x")
    delta = s.add(A, "x")
    assert delta.value == {"x"}
    # the delta carries the new dot and, in its context, the superseded one
    assert delta._body() == [[["x", [[A, 2]]]], [[A, 2]], []]
    assert s._body()[0] == [["x", [[A, 2]]]]


def test_remove_of_an_absent_element_is_an_empty_delta() -> None:
    s = ORSet()
    s.add(A, "x")
    delta = s.remove("nope")
    assert delta == ORSet()
    assert s.value == {"x"}


def test_remove_delta_holds_only_the_context_of_the_removed_dots() -> None:
    s = ORSet()
    s.add(A, "x")
    s.add(B, "y")
    delta = s.remove("y")
    assert delta.value == frozenset()
    assert delta._body() == [[], [[B, 1]], []]


def test_deltas_go_to_the_sink() -> None:
    s = ORSet()
    seen: list[CRDT] = []
    s._sink = seen.append
    d1 = s.add(A, "x")
    d2 = s.remove("x")
    assert seen == [d1, d2]


def test_dots_of_concurrent_adders_are_all_kept_until_removed() -> None:
    a, b = ORSet(), ORSet()
    a.add(A, "x")
    b.add(B, "x")
    m = a.merge(b)
    assert m._body()[0] == [["x", [[A, 1], [B, 1]]]]
    m.remove("x")
    assert m.value == frozenset()
    assert m.merge(a).value == frozenset()
    assert m.merge(b).value == frozenset()


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [[1], {"a": 1}, float("nan"), 2**64, object()])
def test_bad_elements_are_refused(bad: object) -> None:
    s = ORSet()
    with pytest.raises(InvalidValueError):
        s.add(A, bad)
    with pytest.raises(InvalidValueError):
        s.remove(bad)
    assert s == ORSet()


@pytest.mark.parametrize("replica", ["", 3, None, "x" * 300])
def test_bad_replica_ids_are_refused(replica: object) -> None:
    s = ORSet()
    with pytest.raises(InvalidValueError):
        s.add(replica, "x")  # type: ignore[arg-type]
    assert s == ORSet()


def test_merge_with_another_type_is_refused() -> None:
    with pytest.raises(TypeMismatchError):
        ORSet().merge(GSet())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "body",
    [
        [[["y", [[A, 1]]], ["x", [[A, 2]]]], [[A, 2]], []],  # elements unsorted
        [[["x", [[A, 1]]], ["x", [[A, 2]]]], [[A, 2]], []],  # element twice
        [[["x", []]], [[A, 1]], []],  # element without dots
        [[["x", [[A, 2], [A, 1]]]], [[A, 2]], []],  # dots unsorted
        [[["x", [[A, 1], [A, 1]]]], [[A, 1]], []],  # duplicate dot
        [[["x", [[A, 1]]], ["y", [[A, 1]]]], [[A, 1]], []],  # dot in two elements
        [[["x", [[A, 0]]]], [[A, 1]], []],  # zero counter
        [[["x", [[A, 2]]]], [[A, 1]], []],  # dot not covered
        [[], [[A, 0]], []],  # zero vector entry
        [[], [[B, 1], [A, 1]], []],  # vector unsorted
        [[], [[A, 1]], [[A, 2]]],  # cloud not compacted
        [[], [[A, 3]], [[A, 2]]],  # cloud dot already in the vector
        [[], [], [[A, 1]]],  # first dot in the cloud
        [[], [], [[B, 3], [A, 3]]],  # cloud unsorted
        [[], [], [[A, -3]]],  # negative counter
        [[], []],  # missing part
        [[["x", [["", 1]]]], [["", 1]], []],  # empty replica id
    ],
)
def test_non_canonical_or_inconsistent_bodies_are_refused(body: list[Any]) -> None:
    with pytest.raises(DecodeError):
        ORSet.decode(_body(body))


def test_a_valid_body_with_a_cloud_decodes() -> None:
    s = ORSet.decode(_body([[["x", [[A, 3]]]], [[A, 1]], [[A, 3]]]))
    assert s.value == {"x"}
    # a later add of that replica continues after the highest dot it knows
    assert s.add(A, "y")._body()[0] == [["y", [[A, 4]]]]


# --- pruning --------------------------------------------------------------------------


def test_pruning_keeps_the_value_and_drops_the_removed_replica() -> None:
    gone, keep = "gone#1", A
    s = ORSet()
    s.add(gone, "x")
    s.add(gone, "y")
    s.add(keep, "y")
    s.add(keep, "z")
    s.remove("z")
    stale = s.copy()
    assert s.needs_pruning_from(gone)
    pruned = s.prune(gone, keep)
    assert pruned.value == {"x", "y"}
    assert not pruned.needs_pruning_from(gone)
    assert pruned.modified_by() == {keep}
    assert s.needs_pruning_from(gone)  # prune returns a copy
    # a stale state passes through prune_cleanup before it is merged
    cleaned = stale.prune_cleanup(gone)
    assert cleaned.value == {"y"}
    assert not cleaned.needs_pruning_from(gone)
    assert pruned.merge(cleaned) == pruned
    assert cleaned.merge(pruned).value == {"x", "y"}
    # the pruned replica keeps working: removes still remove, adds still add
    pruned.remove("x")
    pruned.add(keep, "w")
    assert pruned.value == {"y", "w"}
    assert ORSet.decode(pruned.encode()) == pruned


def test_pruning_a_replica_that_left_no_trace_changes_nothing() -> None:
    s = ORSet()
    s.add(A, "x")
    assert s.prune("gone#1", A) == s
    assert s.prune_cleanup("gone#1") == s
