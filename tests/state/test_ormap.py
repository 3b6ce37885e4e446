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
    ORMap,
    ORSet,
    PNCounter,
    TypeMismatchError,
)
from phoenix_node.state._codec import pack
from phoenix_node.state.ormap import MAX_NESTING

from .laws import REPLICAS, Spec, System, law_tests, systems

A, B = "a#1", "b#1"

# Each key always holds the same type (a mismatch is an error, tested apart).
KEY_OPS = st.one_of(
    st.tuples(st.just("g"), st.integers(0, 3)),
    st.tuples(st.just("p"), st.tuples(st.booleans(), st.integers(0, 3))),
    st.tuples(st.just("s"), st.tuples(st.booleans(), st.sampled_from(["x", "y"]))),
    st.tuples(st.just(("m", 1)), st.tuples(st.booleans(), st.integers(0, 2))),
    st.tuples(st.just(7), st.integers(0, 3)),  # put of a whole GCounter
)
OPS = st.one_of(
    st.tuples(st.just("update"), KEY_OPS),
    st.tuples(st.just("remove"), st.sampled_from(["g", "p", "s", ("m", 1), 7, "absent"])),
)


def _apply(m: ORMap, replica: str, op: tuple[str, Any]) -> ORMap:
    kind, arg = op
    if kind == "remove":
        return m.remove(arg)
    key, x = arg
    if key == "g":
        return m.update(replica, key, GCounter, lambda c: c.increment(replica, x))
    if key == "p":
        up, n = x
        return m.update(
            replica,
            key,
            PNCounter,
            lambda c: c.increment(replica, n) if up else c.decrement(replica, n),
        )
    if key == "s":
        add, element = x
        return m.update(
            replica, key, ORSet, lambda s: s.add(replica, element) if add else s.remove(element)
        )
    if key == 7:
        value = GCounter()
        value.increment(replica, x)
        return m.put(replica, key, value)
    add, inner = x  # a nested ORMap: bump or remove one of its counters
    return m.update(
        replica,
        key,
        ORMap,
        lambda n: (
            n.update(replica, inner, GCounter, lambda c: c.increment(replica))
            if add
            else n.remove(inner)
        ),
    )


SPEC = Spec(ORMap, OPS, _apply, others=[ORSet(), GCounter(), GSet()])
globals().update(law_tests(SPEC))


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


def _counter(replica: str, n: int) -> GCounter:
    c = GCounter()
    c.increment(replica, n)
    return c


def _incr(m: ORMap, replica: str, key: Any, n: int = 1) -> ORMap:
    return m.update(replica, key, GCounter, lambda c: c.increment(replica, n))


# --- semantics ------------------------------------------------------------------------


def test_update_creates_then_changes_the_value() -> None:
    m = ORMap()
    _incr(m, A, "hits", 2)
    _incr(m, A, "hits", 3)
    m.update(A, "tags", ORSet, lambda s: s.add(A, "red"))
    assert m.value == {"hits": 5, "tags": frozenset({"red"})}
    assert "hits" in m and "nope" not in m
    assert len(m) == 2
    assert set(m.keys()) == {"hits", "tags"}
    hits = m.get("hits")
    assert isinstance(hits, GCounter) and hits.value == 5
    assert m.get("nope") is None


def test_update_delta_carries_the_value_delta_only() -> None:
    m = ORMap()
    _incr(m, A, "hits", 2)
    _incr(m, B, "hits", 5)
    delta = _incr(m, A, "hits", 1)
    # the GCounter delta holds A's entry only; merging it elsewhere adds the key
    assert delta.value == {"hits": 3}
    other = ORMap()
    other.merge_in(delta)
    assert other.value == {"hits": 3}


def test_value_shows_only_present_keys() -> None:
    m = ORMap()
    _incr(m, A, "a")
    _incr(m, A, "b")
    m.remove("a")
    assert m.value == {"b": 1}
    assert m.get("a") is None
    assert "a" not in m and len(m) == 1
    assert list(m.keys()) == ["b"]


def test_concurrent_update_and_remove_keeps_the_key() -> None:
    a, b = ORMap(), ORMap()
    b.merge_in(_incr(a, A, "k", 1))
    remove = a.remove("k")
    update = _incr(b, B, "k", 2)
    assert a.merge(b).value == {"k": 3}
    a.merge_in(update)
    b.merge_in(remove)
    assert a == b and a.value == {"k": 3}


def test_removed_key_that_is_re_added_continues_from_its_old_value() -> None:
    # the documented limitation: values of removed keys are kept in the state
    m = ORMap()
    _incr(m, A, "k", 5)
    m.remove("k")
    assert m.value == {}
    _incr(m, A, "k", 1)
    assert m.value == {"k": 6}


def test_put_merges_into_the_stored_value_and_copies_it() -> None:
    m = ORMap()
    value = _counter(A, 2)
    delta = m.put(A, "k", value)
    value.increment(A, 100)  # the map kept a copy
    assert m.value == {"k": 2}
    assert delta.value == {"k": 2}
    m.put(B, "k", _counter(B, 3))
    assert m.value == {"k": 5}


def test_nested_ormap() -> None:
    a, b = ORMap(), ORMap()

    def bump(m: ORMap, replica: str, outer: str, inner: str) -> ORMap:
        return m.update(replica, outer, ORMap, lambda n: _incr(n, replica, inner))

    b.merge_in(bump(a, A, "user-1", "logins"))
    d1 = bump(a, A, "user-1", "logins")
    d2 = bump(b, B, "user-1", "errors")
    a.merge_in(d2)
    b.merge_in(d1)
    assert a == b
    assert a.value == {"user-1": {"logins": 2, "errors": 1}}
    decoded = ORMap.decode(a.encode())
    assert decoded == a and decoded.value == a.value
    inner = a.get("user-1")
    assert isinstance(inner, ORMap) and inner.value == {"logins": 2, "errors": 1}


def test_update_returning_the_live_value_does_not_alias_the_delta() -> None:
    m = ORMap()

    def bump_and_return_it(c: GCounter) -> GCounter:
        c.increment(A)
        return c

    delta = m.update(A, "k", GCounter, bump_and_return_it)
    _incr(m, A, "k", 10)
    assert delta.value == {"k": 1}


def test_a_failing_mutate_leaves_the_map_unchanged() -> None:
    m = ORMap()

    def boom(c: GCounter) -> GCounter:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        m.update(A, "k", GCounter, boom)
    assert m == ORMap()


def test_deltas_go_to_the_sink() -> None:
    m = ORMap()
    seen: list[CRDT] = []
    m._sink = seen.append
    d1 = _incr(m, A, "k")
    d2 = m.put(A, "j", _counter(A, 1))
    d3 = m.remove("k")
    assert seen == [d1, d2, d3]


def test_remove_of_an_absent_key_is_an_empty_delta() -> None:
    m = ORMap()
    _incr(m, A, "k")
    assert m.remove("nope") == ORMap()
    assert m.value == {"k": 1}


# --- errors ---------------------------------------------------------------------------


def test_a_key_keeps_its_type() -> None:
    m = ORMap()
    _incr(m, A, "k")
    before = m.copy()
    with pytest.raises(TypeMismatchError):
        m.update(A, "k", PNCounter, lambda c: c.increment(A))
    with pytest.raises(TypeMismatchError):
        m.put(A, "k", PNCounter())
    m.remove("k")
    with pytest.raises(TypeMismatchError):  # a removed key keeps its value, so its type
        m.update(A, "k", ORSet, lambda s: s.add(A, 1))
    assert m.value == {}
    _incr(m, A, "k")  # the stored GCounter survived the refused mutations
    assert m.value == {"k": 2}
    assert before.value == {"k": 1}


def test_merging_maps_that_disagree_on_a_type_is_refused_and_changes_nothing() -> None:
    a, b = ORMap(), ORMap()
    _incr(a, A, "ok")
    _incr(a, A, "k")
    b.update(B, "k", ORSet, lambda s: s.add(B, "x"))
    _incr(b, B, "new")
    snapshot = a.encode()
    with pytest.raises(TypeMismatchError):
        a.merge(b)
    with pytest.raises(TypeMismatchError):
        a.merge_in(b)
    assert a.encode() == snapshot


def test_mutate_must_return_a_delta_of_the_kind() -> None:
    m = ORMap()
    with pytest.raises(TypeMismatchError):
        m.update(A, "k", GCounter, lambda c: None)  # type: ignore[arg-type,return-value]
    assert m == ORMap()


def test_bad_keys_values_and_kinds_are_refused() -> None:
    m = ORMap()
    with pytest.raises(InvalidValueError):
        m.update(A, [1], GCounter, lambda c: c.increment(A))
    with pytest.raises(InvalidValueError):
        m.put(A, "k", 5)  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError):
        m.update(A, "k", int, lambda c: c)  # type: ignore[arg-type,type-var]
    with pytest.raises(InvalidValueError):
        m.remove({"a": 1})
    with pytest.raises(InvalidValueError):
        _incr(m, "", "k")
    with pytest.raises(InvalidValueError):  # checked before mutate runs
        m.update("", "k", GCounter, lambda c: c.increment(A))
    assert m == ORMap()


def _wire(keys: ORSet, values: list[Any]) -> bytes:
    return pack([ORMap.TYPE_CODE, 1, [keys._body(), values]])


def test_inconsistent_or_non_canonical_bodies_are_refused() -> None:
    keys = ORSet()
    keys.add(A, "a")
    one = _counter(A, 1).to_wire()
    cases = [
        _wire(keys, []),  # present key without a value
        _wire(ORSet(), [["b", one], ["a", one]]),  # keys unsorted
        _wire(ORSet(), [["a", one], ["a", one]]),  # key twice
        _wire(ORSet(), [["a", [99, 1, []]]]),  # unknown value type
        _wire(ORSet(), [["a", [1, 1, [["", 1]]]]]),  # value its own type refuses
        _wire(ORSet(), [["a"]]),
        pack([ORMap.TYPE_CODE, 1, [keys._body()]]),
    ]
    for data in cases:
        with pytest.raises(DecodeError):
            ORMap.decode(data)
    # a removed key's value is legitimately there
    assert ORMap.decode(_wire(ORSet(), [["a", one]])).value == {}


def _nested_wire(levels: int) -> bytes:
    # written by hand: msgpack's packer itself refuses deep structures
    empty = bytes([0x93, ORMap.TYPE_CODE, 1, 0x92, 0x93, 0x90, 0x90, 0x90, 0x90])
    # [8, 1, [[[], [], []], [["k", <next level>]]]]
    level = bytes([0x93, ORMap.TYPE_CODE, 1, 0x92, 0x93, 0x90, 0x90, 0x90, 0x91, 0x92, 0xA1])
    return (level + b"k") * levels + empty


@pytest.mark.parametrize("levels", [MAX_NESTING + 1, 200, 300, 5000])
def test_too_deeply_nested_maps_are_refused(levels: int) -> None:
    with pytest.raises(DecodeError):
        ORMap.decode(_nested_wire(levels))


def test_maps_nested_up_to_the_limit_decode_and_encode_again() -> None:
    data = _nested_wire(MAX_NESTING - 1)
    m = ORMap.decode(data)
    assert m.encode() == data
    assert ORMap.decode(data) == m  # the depth counter was reset


# --- pruning --------------------------------------------------------------------------


def test_pruning_covers_keys_and_values() -> None:
    gone = "gone#1"
    m = ORMap()
    _incr(m, gone, "k", 3)
    m.update(gone, "s", ORSet, lambda s: s.add(gone, "x"))
    _incr(m, A, "j", 1)
    m.remove("j")
    assert m.modified_by() == {gone, A}
    stale = m.copy()
    pruned = m.prune(gone, A)
    assert pruned.value == m.value == {"k": 3, "s": frozenset({"x"})}
    assert not pruned.needs_pruning_from(gone)
    cleaned = stale.prune_cleanup(gone)
    assert not cleaned.needs_pruning_from(gone)
    assert pruned.merge(cleaned) == pruned
    _incr(pruned, A, "k")
    assert pruned.value["k"] == 4


def test_a_merge_result_shares_no_value_with_its_inputs() -> None:
    a, b = ORMap(), ORMap()
    _incr(b, B, "k", 1)
    merged = a.merge(b)
    a.merge_in(b)
    _incr(merged, A, "k", 10)
    _incr(a, A, "k", 10)
    assert b.value == {"k": 1}


def test_a_nested_type_mismatch_is_refused_before_any_change() -> None:
    a, b = ORMap(), ORMap()
    a.update(A, "outer", ORMap, lambda n: _incr(n, A, "inner"))
    b.update(B, "outer", ORMap, lambda n: n.update(B, "inner", ORSet, lambda s: s.add(B, 1)))
    _incr(b, B, "other")
    snapshot = a.encode()
    with pytest.raises(TypeMismatchError):
        a.merge_in(b)
    inner = b.get("outer")
    assert isinstance(inner, ORMap)
    with pytest.raises(TypeMismatchError):
        a.put(B, "outer", inner)
    assert a.encode() == snapshot
