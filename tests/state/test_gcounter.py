from __future__ import annotations

import pytest
from hypothesis import strategies as st

from phoenix_node.state import (
    CounterOverflowError,
    DecodeError,
    GCounter,
    InvalidValueError,
    TypeMismatchError,
)
from phoenix_node.state._codec import pack

from .laws import Spec, law_tests


def _apply(counter: GCounter, replica: str, n: int) -> GCounter:
    return counter.increment(replica, n)


SPEC = Spec(GCounter, st.integers(0, 2**70), _apply)
globals().update(law_tests(SPEC))


def test_value_is_the_sum_of_entries() -> None:
    c = GCounter()
    c.increment("a#1")
    c.increment("b#1", 5)
    c.increment("a#1", 2)
    assert c.value == 8
    assert c.entry("a#1") == 3


def test_delta_carries_only_the_writer_entry() -> None:
    c = GCounter()
    c.increment("a#1", 4)
    delta = c.increment("b#1", 2)
    assert delta.value == 2
    other = GCounter()
    other.increment("a#1", 1)
    assert other.merge(delta).value == 3


def test_counts_past_64_bits_are_exact() -> None:
    c = GCounter()
    c.increment("a#1", 2**64 - 1)
    c.increment("a#1", 1)
    c.increment("a#1", 2**64)
    assert c.value == 2**65
    assert GCounter.decode(c.encode()).value == 2**65


def test_overflow_past_the_documented_limit_is_refused() -> None:
    c = GCounter()
    c.increment("a#1", 2**256 - 1)
    with pytest.raises(CounterOverflowError):
        c.increment("a#1")
    assert c.value == 2**256 - 1


@pytest.mark.parametrize("n", [-1, 1.5, "3", True])
def test_bad_increments_are_refused(n: object) -> None:
    with pytest.raises(InvalidValueError):
        GCounter().increment("a#1", n)  # type: ignore[arg-type]


@pytest.mark.parametrize("replica", ["", 3, None, "x" * 300])
def test_bad_replica_ids_are_refused(replica: object) -> None:
    with pytest.raises(InvalidValueError):
        GCounter().increment(replica)  # type: ignore[arg-type]


def test_merge_with_another_type_is_refused() -> None:
    from phoenix_node.state import PNCounter

    with pytest.raises(TypeMismatchError):
        GCounter().merge(PNCounter())  # type: ignore[arg-type]


def test_non_canonical_encodings_are_refused() -> None:
    unsorted = pack([GCounter.TYPE_CODE, 1, [["b", 1], ["a", 1]]])
    zero = pack([GCounter.TYPE_CODE, 1, [["a", 0]]])
    small_big = pack([GCounter.TYPE_CODE, 1, [["a", (5).to_bytes(9, "big")]]])
    for data in (unsorted, zero, small_big):
        with pytest.raises(DecodeError):
            GCounter.decode(data)


def test_pruning_folds_a_removed_replica_into_another() -> None:
    c = GCounter()
    c.increment("gone#1", 3)
    c.increment("a#1", 2)
    stale = c.copy()
    pruned = c.prune("gone#1", "a#1")
    assert pruned.value == 5
    assert not pruned.needs_pruning_from("gone#1")
    assert c.needs_pruning_from("gone#1")
    # a stale state passes through prune_cleanup before it is merged
    assert pruned.merge(stale.prune_cleanup("gone#1")).value == 5
