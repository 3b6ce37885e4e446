from __future__ import annotations

import itertools
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phoenix_node.state import RGA, DecodeError, GSet, InvalidValueError, TwoPhaseSet
from phoenix_node.state._codec import pack
from phoenix_node.state.rga import RGAIndexError

from .laws import Skip, Spec, law_tests

VALUES = st.one_of(st.integers(-3, 3), st.text(max_size=2), st.none(), st.lists(st.booleans()))

OPS = st.one_of(
    st.tuples(st.just("insert"), st.integers(0, 50), VALUES),
    st.tuples(st.just("append"), st.just(0), VALUES),
    st.tuples(st.just("delete"), st.integers(-50, 50), st.none()),
)


def _apply(rga: RGA, replica: str, op: tuple[str, int, Any]) -> RGA:
    kind, n, value = op
    if kind == "insert":
        return rga.insert(replica, n % (len(rga) + 1), value)
    if kind == "append":
        return rga.append(replica, value)
    if not len(rga):
        raise Skip
    return rga.delete(n % len(rga))


SPEC = Spec(RGA, OPS, _apply, others=[GSet(), TwoPhaseSet()], max_steps=30)
globals().update(law_tests(SPEC))


def _typed(replica: str, text: str, base: RGA | None = None, at: int = 0) -> tuple[RGA, list[RGA]]:
    rga = base.copy() if base is not None else RGA()
    deltas = [rga.insert(replica, at + i, ch) for i, ch in enumerate(text)]
    return rga, deltas


# --- the list API ----------------------------------------------------------------------


def test_insert_append_delete_behave_like_a_list() -> None:
    rga, model = RGA(), []
    for i, (index, value) in enumerate([(0, "a"), (1, "c"), (1, "b"), (0, "_"), (4, "d")]):
        rga.insert(f"r{i % 2}#1", index, value)
        model.insert(index, value)
    assert rga.value == model == ["_", "a", "b", "c", "d"]
    rga.delete(0)
    rga.delete(-1)
    rga.append("r0#1", {"k": [1, 2]})
    assert rga.value == ["a", "b", "c", {"k": [1, 2]}]
    assert len(rga) == 4
    assert rga[1] == "b" and rga[-1] == {"k": [1, 2]} and rga[1:3] == ["b", "c"]
    assert list(rga) == rga.value
    assert rga.tombstone_count == 2


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 30), st.integers(-9, 9)), max_size=40))
def test_local_edits_match_a_python_list(ops: list[tuple[bool, int, int]]) -> None:
    rga, model = RGA(), []
    for is_insert, n, value in ops:
        if is_insert:
            rga.insert("a#1", n % (len(model) + 1), value)
            model.insert(n % (len(model) + 1), value)
        elif model:
            rga.delete(n % len(model))
            del model[n % len(model)]
        assert len(rga) == len(model)
    assert rga.value == model
    assert RGA.decode(rga.encode()).value == model


def test_values_are_stored_canonically_and_checked() -> None:
    rga = RGA()
    rga.append("a#1", ({"b": 1, "a": (2,)},))
    assert rga.value == [[{"a": [2], "b": 1}]]
    for bad in ({1: "x"}, object(), float("nan"), {1, 2}):
        with pytest.raises(InvalidValueError):
            rga.append("a#1", bad)
    assert len(rga) == 1


@pytest.mark.parametrize("index", [-1, 2, 1.0, "0", None, True])
def test_bad_insert_index_is_refused_with_a_clear_error(index: Any) -> None:
    rga = RGA()
    rga.append("a#1", "x")
    with pytest.raises(RGAIndexError, match=r"0\.\.1"):
        rga.insert("a#1", index, "y")
    assert rga.value == ["x"]


def test_bad_delete_and_get_index_is_refused() -> None:
    rga = RGA()
    with pytest.raises(InvalidValueError, match="list length 0"):
        rga.delete(0)
    rga.append("a#1", "x")
    for bad in (1, -2, "0", 0.0):
        with pytest.raises(RGAIndexError):
            rga.delete(bad)  # type: ignore[arg-type]
        with pytest.raises(IndexError):
            rga[bad]  # type: ignore[index]
    assert rga.value == ["x"]


@pytest.mark.parametrize("replica", ["", 3, None, "x" * 300])
def test_bad_replica_ids_are_refused(replica: Any) -> None:
    with pytest.raises(InvalidValueError):
        RGA().append(replica, 1)


# --- concurrency -----------------------------------------------------------------------


def test_concurrent_inserts_at_the_same_position_converge_to_one_order() -> None:
    base = RGA()
    base.append("a#1", "x")
    base.append("a#1", "z")
    a, b = base.copy(), base.copy()
    da = a.insert("a#1", 1, "from-a")
    db = b.insert("b#1", 1, "from-b")
    ab, ba = a.merge(db), b.merge(da)
    assert ab.value == ba.value
    # equal counters: the larger replica id goes first
    assert ab.value == ["x", "from-b", "from-a", "z"]
    assert ab.encode() == ba.encode()


def test_a_later_insert_goes_before_an_older_concurrent_one() -> None:
    base = RGA()
    base.append("a#1", "x")
    a, b = base.copy(), base.copy()
    b.append("b#1", "seen")  # b's counter moves ahead
    db = b.insert("b#1", 1, "newer")
    da = a.insert("a#1", 1, "older")  # id (2, a#1) < (2, b#1) of "seen"
    merged = a.merge(b)
    assert merged.value == ["x", "newer", "seen", "older"]
    assert b.merge(a).value == merged.value
    assert a.merge(db).merge(b).value == merged.value
    assert b.merge(da).value == merged.value


def test_concurrently_typed_runs_do_not_interleave() -> None:
    base = RGA()
    base.append("s#1", "|")
    a, _ = _typed("a#1", "hello", base, at=1)
    b, _ = _typed("b#1", "world", base, at=1)
    assert a.merge(b).value == list("|worldhello")
    assert b.merge(a).value == list("|worldhello")


def test_insert_after_a_concurrently_deleted_element() -> None:
    base = RGA()
    for ch in "xy":
        base.append("a#1", ch)
    a, b = base.copy(), base.copy()
    d_del = b.delete(0)  # b deletes x
    d_ins = a.insert("a#1", 1, "after-x")  # a inserts after x
    assert a.merge(b).value == ["after-x", "y"] == b.merge(a).value
    late = base.copy()
    late.merge_in(d_del)
    assert late.value == ["y"]
    late.merge_in(d_ins)
    assert late.value == ["after-x", "y"]


def test_concurrent_deletes_of_one_element_are_one_delete() -> None:
    base = RGA()
    for ch in "abc":
        base.append("a#1", ch)
    a, b = base.copy(), base.copy()
    a.delete(1)
    b.delete(1)
    assert a.merge(b).value == ["a", "c"]
    assert a.merge(b).tombstone_count == 1


def test_child_delta_before_parent_waits_then_appears() -> None:
    src = RGA()
    d1 = src.append("a#1", "first")
    d2 = src.append("a#1", "second")
    d3 = src.insert("a#1", 1, "middle")
    d4 = src.delete(0)
    for order in itertools.permutations([d1, d2, d3, d4]):
        dst = RGA()
        for d in order:
            dst.merge_in(d)
        assert dst == src and dst.value == ["middle", "second"], order
    dst = RGA()
    dst.merge_in(d2)
    assert dst.value == [] and len(dst) == 0  # parent missing: invisible, kept
    dst.merge_in(d3)
    assert dst.value == []
    dst.merge_in(d1)
    assert dst.value == ["first", "middle", "second"]


def test_orphan_waits_under_a_tombstone_parent_delivered_late() -> None:
    src = RGA()
    src.append("a#1", "p")
    d_child = src.append("a#1", "c")
    d_tomb = src.delete(0)
    dst = RGA()
    dst.merge_in(d_child)
    assert dst.value == []
    dst.merge_in(d_tomb)  # the parent arrives already deleted
    assert dst.value == ["c"] == src.value


def test_cached_order_stays_right_under_interleaved_remote_deltas() -> None:
    a, b, c = RGA(), RGA(), RGA()
    for step in range(60):
        writer, reader = (a, b) if step % 3 else (b, a)
        d = (
            writer.delete(step % len(writer))
            if step % 7 == 6 and len(writer)
            else writer.insert(f"w{step % 2}#1", (step * 5) % (len(writer) + 1), step)
        )
        reader.merge_in(d)
        c.merge_in(d)
        for r in (a, b, c):
            fresh = RGA.decode(r.encode())  # rebuilt from scratch, no cache
            assert r.value == fresh.value
    assert a == b == c


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), OPS), max_size=30), st.randoms())
def test_elements_never_change_their_relative_order(
    steps: list[tuple[int, tuple[str, int, Any]]], rnd: Any
) -> None:
    # What a replica has seen in some order stays in that order after any merge.
    replicas = [RGA() for _ in range(3)]
    snapshots = []
    for i, op in steps:
        try:
            _apply(replicas[i], f"r{i}#1", op)
        except Skip:
            continue
        if rnd.random() < 0.3:
            replicas[rnd.randrange(3)].merge_in(replicas[rnd.randrange(3)])
        snapshots.append(list(replicas[i]._visible()))
    final = replicas[0].merge(replicas[1]).merge(replicas[2])
    final_order = final._visible()
    for seen in snapshots:
        kept = set(seen) & set(final_order)
        assert [x for x in seen if x in kept] == [x for x in final_order if x in kept]


# --- encoding --------------------------------------------------------------------------


def test_wire_body_uses_a_replica_table() -> None:
    rga = RGA()
    rga.append("b#1", "x")
    rga.append("a#1", "y")
    rga.delete(0)
    assert rga.to_wire()[2] == [
        ["a#1", "b#1"],
        [[1, 1, None, True, None], [2, 0, [1, 1], False, "y"]],
    ]


@pytest.mark.parametrize(
    "body",
    [
        [["a"], [[1, 0, None, False, "x"], [1, 0, None, False, "x"]]],  # repeated id
        [["a"], [[2, 0, None, False, "x"], [1, 0, None, False, "x"]]],  # unsorted
        [["a"], [[1, 0, [1, 0], False, "x"]]],  # parent not older (self-parent)
        [["a"], [[1, 0, [2, 0], False, "x"], [2, 0, [1, 0], False, "y"]]],  # cycle
        [["a"], [[1, 0, None, True, "x"]]],  # tombstone with a value
        [["a"], [[1, 0, None, 1, "x"]]],  # deleted not a bool
        [["a"], [[0, 0, None, False, "x"]]],  # counter 0
        [["a"], [[True, 0, None, False, "x"]]],  # bool counter
        [["a"], [[1, 1, None, False, "x"]]],  # replica index out of the table
        [["a", "b"], [[1, 0, None, False, "x"]]],  # unused table entry
        [["b", "a"], [[1, 0, None, False, "x"], [2, 1, None, False, "x"]]],  # table unsorted
        [["a"], [[1, 0, [1], False, "x"]]],  # bad parent shape
        [["a"], [[1, 0, None, False, {"b": 1, "a": 2}]]],  # non-canonical dict
        [["a"], [[1, 0, None, False]]],
        [[], [], []],
    ],
)
def test_inconsistent_or_non_canonical_encodings_are_refused(body: Any) -> None:
    with pytest.raises(DecodeError):
        RGA.decode(pack([RGA.TYPE_CODE, 1, body]))


def test_decoded_state_keeps_the_lamport_counter() -> None:
    rga = RGA()
    for ch in "abc":
        rga.append("a#1", ch)
    back = RGA.decode(rga.encode())
    d = back.insert("b#1", 0, "new")
    assert next(iter(d._nodes))[0] == 4


def test_merge_of_states_that_disagree_on_an_id_still_converges() -> None:
    # Only corrupt input can do this (a replica id reused); merge must stay a join.
    x, y, z = RGA(), RGA(), RGA()
    x.append("a#1", "one")
    y.append("a#1", "two")
    z.append("a#1", "zzz")
    z.delete(0)
    for p in itertools.permutations([x, y, z]):
        assert p[0].merge(p[1]).merge(p[2]) == x.merge(y).merge(z)
    assert x.merge(y).value == y.merge(x).value == ["one"]  # msgpack bytes: "one" < "two"
    assert x.merge(z).value == []

    with_parent = RGA()
    with_parent.append("b#1", "p")
    with_parent.append("a#1", "child")  # id (2, a#1) under (1, b#1)
    with_parent.append("a#1", "x")  # id (3, a#1) under (2, a#1)
    other = RGA()
    other.append("q#1", "q")
    other.append("a#1", "head?")  # id (2, a#1) under (1, q#1)
    other.insert("a#1", 0, "head")  # id (3, a#1) under the head
    assert with_parent.merge(other) == other.merge(with_parent)
    assert with_parent.merge(other).value == other.merge(with_parent).value


@pytest.mark.parametrize(("left", "right"), [(0.0, -0.0), (1, 1.0), (1, True), ([1], [1.0])])
def test_merge_tells_equal_looking_values_apart(left: Any, right: Any) -> None:
    a, b = RGA(), RGA()
    a.append("a#1", left)
    b.append("a#1", right)
    assert a.merge(b) == b.merge(a)
    assert a.merge(b).encode() == b.merge(a).encode()


# --- pruning ----------------------------------------------------------------------------


def test_pruning_leaves_ids_alone() -> None:
    rga = RGA()
    rga.append("gone#1", "x")
    rga.append("a#1", "y")
    assert rga.modified_by() == {"gone#1", "a#1"}
    assert not rga.needs_pruning_from("gone#1")
    assert rga.prune("gone#1", "a#1") == rga
    assert rga.prune_cleanup("gone#1").value == ["x", "y"]


# --- performance -----------------------------------------------------------------------


def test_long_lists_stay_fast() -> None:
    rga = RGA()
    start = time.perf_counter()
    for i in range(20_000):
        rga.append("a#1", i)
    for i in range(0, 20_000, 4):
        rga.insert("b#1", i, -i)
    for _ in range(2_000):
        rga.delete(100)
    elapsed_local = time.perf_counter() - start
    replica = RGA.decode(rga.encode())
    start = time.perf_counter()
    assert len(replica.value) == len(rga) == 23_000
    for _ in range(2_000):  # remote appends into a warm cache
        replica.merge_in(rga.append("a#1", "tail"))
    assert replica.value[-1] == "tail"
    elapsed_remote = time.perf_counter() - start
    assert replica.value == rga.value
    # quadratic behaviour would take minutes here
    assert elapsed_local < 5 and elapsed_remote < 5, (elapsed_local, elapsed_remote)
