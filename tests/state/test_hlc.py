from __future__ import annotations

import itertools
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phoenix_node.state import InvalidValueError
from phoenix_node.state.hlc import (
    DEFAULT_CLOCK,
    MAX_TIMESTAMP,
    HybridClock,
    check_timestamp,
    logical,
    make_timestamp,
    physical_ms,
    system_wall_ms,
)


class FakeWall:
    """An injected wall clock that the test moves by hand."""

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def test_now_follows_the_wall_clock_when_it_advances() -> None:
    wall = FakeWall(1_000)
    clock = HybridClock(wall)
    first = clock.now()
    assert (physical_ms(first), logical(first)) == (1_000, 0)
    wall.ms = 1_005
    second = clock.now()
    assert (physical_ms(second), logical(second)) == (1_005, 0)


def test_now_is_strictly_increasing_while_the_wall_clock_stands_still() -> None:
    clock = HybridClock(FakeWall(1_000))
    stamps = [clock.now() for _ in range(100)]
    assert stamps == sorted(set(stamps))
    assert {physical_ms(t) for t in stamps} == {1_000}
    assert logical(stamps[-1]) == 99


def test_now_is_monotonic_when_the_wall_clock_goes_backwards() -> None:
    wall = FakeWall(50_000)
    clock = HybridClock(wall)
    before = clock.now()
    wall.ms = 10_000  # NTP step back by 40 s
    after = [clock.now() for _ in range(3)]
    assert before < after[0] < after[1] < after[2]
    assert physical_ms(after[2]) == 50_000  # stays on the highest time seen
    wall.ms = 50_001  # the wall clock catches up: physical time again
    assert clock.now() == make_timestamp(50_001)


def test_logical_overflow_advances_the_physical_part() -> None:
    clock = HybridClock(FakeWall(7))
    clock.update(make_timestamp(7, 0xFFFE))
    assert clock.last == make_timestamp(7, 0xFFFF)
    nxt = clock.now()
    assert (physical_ms(nxt), logical(nxt)) == (8, 0)


def test_a_full_millisecond_of_logical_ticks_carries_into_the_next() -> None:
    clock = HybridClock(FakeWall(3))
    stamps = [clock.now() for _ in range(0x10001)]
    assert stamps[-1] == make_timestamp(4, 0)
    assert all(a < b for a, b in itertools.pairwise(stamps))


def test_update_from_a_remote_clock_ahead_orders_later_events_after_it() -> None:
    wall = FakeWall(1_000)
    clock = HybridClock(wall)
    clock.now()
    remote = make_timestamp(9_000, 4)
    received = clock.update(remote)
    assert received > remote
    assert clock.now() > received
    wall.ms = 2_000  # local wall still behind the remote: logical ticks continue
    assert physical_ms(clock.now()) == 9_000


def test_update_with_an_older_remote_still_ticks() -> None:
    clock = HybridClock(FakeWall(5_000))
    local = clock.now()
    assert clock.update(make_timestamp(100)) > local


def test_clocks_exchanging_messages_keep_causal_order() -> None:
    a, b = HybridClock(FakeWall(10_000)), HybridClock(FakeWall(2_000))
    sent = a.now()
    received = b.update(sent)
    reply = b.now()
    assert sent < received < reply
    assert a.update(reply) > reply


@pytest.mark.parametrize("bad", [-1, 2**63, 1.5, True, "5", None, 2**70])
def test_update_refuses_bad_timestamps(bad: object) -> None:
    clock = HybridClock(FakeWall(1))
    with pytest.raises(InvalidValueError):
        clock.update(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError):
        check_timestamp(bad)


def test_exhausted_timestamp_space_raises_and_keeps_the_clock() -> None:
    clock = HybridClock(FakeWall(1))
    clock.update(MAX_TIMESTAMP - 1)
    assert clock.last == MAX_TIMESTAMP
    with pytest.raises(InvalidValueError):
        clock.now()
    other = HybridClock(FakeWall(1))
    before = other.now()
    with pytest.raises(InvalidValueError):
        other.update(MAX_TIMESTAMP)
    assert other.last == before


def test_make_timestamp_validates_its_parts() -> None:
    assert make_timestamp(2, 3) == (2 << 16) | 3
    for ms, counter in ((-1, 0), (1, -1), (1, 0x10000), (2**47, 0), (1.0, 0)):
        with pytest.raises(InvalidValueError):
            make_timestamp(ms, counter)  # type: ignore[arg-type]


def test_default_clock_reads_the_system_wall_clock() -> None:
    ts = HybridClock().now()
    assert abs(physical_ms(ts) - system_wall_ms()) < 5_000
    assert DEFAULT_CLOCK.now() < DEFAULT_CLOCK.now()
    assert 0 <= ts < 2**63


def test_now_from_many_threads_never_repeats() -> None:
    clock = HybridClock(FakeWall(1_000))
    results: list[list[int]] = [[] for _ in range(4)]

    def work(out: list[int]) -> None:
        for _ in range(2_000):
            out.append(clock.now())

    threads = [threading.Thread(target=work, args=(out,)) for out in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    stamps = [s for out in results for s in out]
    assert len(set(stamps)) == len(stamps) == 8_000
    assert all(out == sorted(out) for out in results)


@given(
    st.lists(
        st.tuples(
            st.integers(0, 2**20),
            st.one_of(st.none(), st.integers(0, 2**40)),
        ),
        max_size=40,
    )
)
def test_any_wall_clock_and_remote_sequence_gives_increasing_stamps(
    steps: list[tuple[int, int | None]],
) -> None:
    wall = FakeWall(0)
    clock = HybridClock(wall)
    last = -1
    for ms, remote in steps:
        wall.ms = ms
        ts = clock.now() if remote is None else clock.update(remote)
        assert ts > last
        assert remote is None or ts > remote
        assert physical_ms(ts) >= ms  # never behind the wall clock
        last = ts
