from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phoenix_node.state import InvalidValueError, StateError, VectorClock
from phoenix_node.state.resolve import (
    CustomResolver,
    LastWriterWins,
    Resolution,
    ResolverError,
    SemanticMerge,
    Strategy,
    VectorClockSiblings,
    Version,
    _value_key,
    resolve,
)

LWW, SIBLINGS, SEMANTIC = LastWriterWins(), VectorClockSiblings(), SemanticMerge()


def clock(**ticks: int) -> VectorClock:
    c = VectorClock()
    for replica, n in ticks.items():
        for _ in range(n):
            c.tick(replica)
    return c


def version(value: Any, ts: int, replica: str = "a", **ticks: int) -> Version:
    return Version(value, clock(**ticks), ts, replica)


# --- the causal step -------------------------------------------------------------------


def test_a_single_version_is_its_own_resolution() -> None:
    for strategy in (LWW, SIBLINGS, SEMANTIC, CustomResolver(lambda vs: 1 / 0)):
        r = resolve([version({"k": [1]}, 5, a=1)], strategy)
        assert r.resolved and r.value == {"k": [1]} and r.siblings == []
        assert r.clock == clock(a=1)


def test_a_causally_newer_version_wins_whatever_the_timestamps() -> None:
    old = version("old", 100, "a", a=1)
    new = version("new", 1, "b", a=1, b=1)  # saw old; its wall clock is behind
    for strategy in (LWW, SIBLINGS, SEMANTIC, CustomResolver(lambda vs: "called")):
        r = resolve([old, new], strategy)
        assert r.value == "new" and r.resolved


def test_concurrent_equal_values_are_no_conflict() -> None:
    a = version([1, 2], 1, "a", a=1)
    b = version([1, 2], 2, "b", b=1)
    r = resolve([a, b], CustomResolver(lambda vs: pytest.fail("called without a conflict")))
    assert r.resolved and r.value == [1, 2]
    assert r.clock == clock(a=1, b=1)


def test_merged_clock_dominates_every_input() -> None:
    vs = [version(1, 1, "a", a=2), version(2, 1, "b", b=3), version(0, 0, "c", a=1, c=1)]
    r = resolve(vs, SIBLINGS)
    for v in vs:
        assert r.clock.dominates(v.clock)
    assert r.clock.value == {"a": 2, "b": 3, "c": 1}


# --- strategies -----------------------------------------------------------------------


def test_last_writer_wins_among_concurrent_versions() -> None:
    a = version("a-value", 10, "a", a=1)
    b = version("b-value", 20, "b", b=1)
    assert resolve([a, b], LWW).value == "b-value"
    tie = version("c-value", 20, "c", c=1)
    assert resolve([a, b, tie], LWW).value == "c-value"  # equal time: larger replica id
    same = version("z-value", 20, "c", c=2)
    # equal time and replica (a confused writer): the larger value key
    assert resolve([tie, same], LWW).value == "z-value"


def test_siblings_keep_concurrent_values_drop_dominated_and_duplicates() -> None:
    ancestor = version("base", 1, "a", a=1)
    left = version("left", 5, "a", a=2)
    right = version("right", 3, "b", a=1, b=1)
    right_again = version("right", 2, "c", a=1, c=1)  # same value, concurrent: one sibling
    r = resolve([left, ancestor, right_again, right, left], SIBLINGS)
    assert not r.resolved and r.value is None
    assert [(v.value, v.replica) for v in r.siblings] == [("right", "b"), ("left", "a")]
    assert r.clock == clock(a=2, b=1, c=1)


def test_equal_clocks_with_different_values_are_siblings() -> None:
    a = version(1, 1, "a", a=1)
    b = version(2, 1, "b", a=1)
    assert [v.value for v in resolve([a, b], SIBLINGS).siblings] == [1, 2]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([3, 7.5, 5], 7.5),
        ([-1, -2], -1),
        ([{1, 2}, frozenset({2, 3})], {1, 2, 3}),
        ([frozenset({1}), frozenset({4})], frozenset({1, 4})),
        ([[1, 2, 2], [3, 2, 1], [2, 2, 2]], [1, 2, 2, 3, 2]),
        ([(1,), (2,)], (1, 2)),
        ([{"n": 1, "s": {1}}, {"n": 4, "x": "new"}], {"n": 4, "s": {1}, "x": "new"}),
        ([{"deep": {"a": [1]}}, {"deep": {"a": [2], "b": 0}}], {"deep": {"a": [1, 2], "b": 0}}),
        (["old", "new"], "new"),
        ([True, False], False),
        ([1, "one"], "one"),
        ([{"k": "x"}, {"k": 2}], {"k": 2}),
        ([None, 5], 5),
    ],
)
def test_semantic_merge_rules(values: list[Any], expected: Any) -> None:
    # versions are concurrent, and later in the list means a later timestamp
    vs = [Version(v, clock(**{f"r{i}": 1}), i, f"r{i}") for i, v in enumerate(values)]
    result = resolve(reversed(vs), SEMANTIC)
    assert result.resolved
    assert result.value == expected
    assert type(result.value) is type(expected)


def test_semantic_merge_falls_back_to_the_owning_versions_timestamps() -> None:
    older = version({"name": "new-name?", "n": 1}, 1, "z", z=1)
    newer = version({"name": "final", "n": 0}, 2, "a", a=1)
    assert resolve([older, newer], SEMANTIC).value == {"name": "final", "n": 1}


def test_custom_resolver_gets_the_conflict_oldest_first() -> None:
    seen: list[list[Version]] = []

    def pick_shortest(vs: list[Version]) -> Any:
        seen.append(vs)
        return min((v.value for v in vs), key=len)

    a, b = version("long-value", 2, "a", a=1), version("short", 1, "b", b=1)
    r = resolve([a, b], CustomResolver(pick_shortest))
    assert r.value == "short" and r.resolved
    assert [v.value for v in seen[0]] == ["short", "long-value"]


def test_a_failing_custom_resolver_raises_a_resolver_error() -> None:
    def boom(vs: list[Version]) -> Any:
        raise KeyError("missing")

    a, b = version(1, 1, "a", a=1), version(2, 1, "b", b=1)
    with pytest.raises(ResolverError, match="boom failed on 2 versions: KeyError") as info:
        resolve([a, b], CustomResolver(boom))
    assert isinstance(info.value, StateError)
    assert isinstance(info.value.__cause__, KeyError)


# --- bad input ------------------------------------------------------------------------


def test_bad_input_is_refused() -> None:
    with pytest.raises(InvalidValueError, match="at least one"):
        resolve([], LWW)
    with pytest.raises(InvalidValueError, match="Version objects"):
        resolve([1], LWW)  # type: ignore[list-item]
    with pytest.raises(InvalidValueError, match="Strategy"):
        resolve([version(1, 1)], "lww")  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError):
        CustomResolver(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clock": {"a": 1}},
        {"timestamp": 1.5},
        {"timestamp": True},
        {"replica": ""},
        {"replica": 3},
    ],
)
def test_bad_versions_are_refused(kwargs: dict[str, Any]) -> None:
    fields = {"value": 1, "clock": VectorClock(), "timestamp": 1, "replica": "a#1"} | kwargs
    with pytest.raises(InvalidValueError):
        Version(**fields)


def test_a_version_keeps_its_own_copy_of_the_clock() -> None:
    c = clock(a=1)
    v = Version("x", c, 1, "a")
    c.tick("a")
    assert v.clock == clock(a=1)
    with pytest.raises(AttributeError):
        v.value = "y"  # type: ignore[misc]


# --- order independence ---------------------------------------------------------------

PLAIN = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-3, 3),
        st.floats(allow_nan=False, width=16),
        st.text(max_size=2),
        st.frozensets(st.integers(0, 3), max_size=3),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner),
        st.dictionaries(st.sampled_from("abc"), inner, max_size=3),
        st.sets(st.integers(0, 3), max_size=3),
    ),
    max_leaves=6,
)

VERSIONS = st.lists(
    st.builds(
        version,
        PLAIN,
        st.integers(0, 3),
        st.sampled_from(["a", "b", "c"]),
        a=st.integers(0, 2),
        b=st.integers(0, 2),
    ),
    min_size=1,
    max_size=6,
)

STRATEGIES: list[Strategy] = [
    LWW,
    SIBLINGS,
    SEMANTIC,
    CustomResolver(lambda vs: [(v.replica, v.timestamp) for v in vs]),
]


def _same(a: Resolution, b: Resolution) -> bool:
    return (
        _value_key(a.value) == _value_key(b.value)
        and [_value_key((v.value, v.timestamp, v.replica)) for v in a.siblings]
        == [_value_key((v.value, v.timestamp, v.replica)) for v in b.siblings]
        and a.siblings == b.siblings
        and a.clock == b.clock
    )


@settings(max_examples=150, deadline=None)
@given(VERSIONS, st.randoms(use_true_random=False))
def test_resolution_does_not_depend_on_input_order(versions: list[Version], rnd: Any) -> None:
    for strategy in STRATEGIES:
        expected = resolve(versions, strategy)
        for _ in range(3):
            shuffled = list(versions)
            rnd.shuffle(shuffled)
            assert _same(resolve(shuffled, strategy), expected), strategy


@settings(max_examples=100, deadline=None)
@given(VERSIONS)
def test_the_result_is_one_of_the_concurrent_values_or_siblings(versions: list[Version]) -> None:
    lww = resolve(versions, LWW)
    siblings = resolve(versions, SIBLINGS)
    candidates = siblings.siblings or [v for v in versions if v.value == siblings.value]
    assert any(_value_key(v.value) == _value_key(lww.value) for v in candidates)
    for s in siblings.siblings:  # no sibling is dominated by an input
        assert not any(s.clock.compare(v.clock).value == "before" for v in versions)
    assert len({_value_key(s.value) for s in siblings.siblings}) == len(siblings.siblings)
