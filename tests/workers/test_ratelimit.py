"""Token buckets (workers/ratelimit.py): rate, burst, refill cap, delays, per-sender tables
bounded by LRU eviction. A fake clock moves time; nothing sleeps."""

from __future__ import annotations

import dataclasses
import math

import pytest

from workers.ratelimit import BucketTable, RateLimit, TokenBucket


class FakeClock:
    """A monotonic clock in seconds that only moves when the test moves it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def drain(bucket: TokenBucket) -> int:
    taken = 0
    while bucket.try_take():
        taken += 1
        assert taken < 10_000, "the bucket never runs dry"
    return taken


# ------------------------------------------------------------------ bucket


def test_a_new_bucket_allows_a_burst_then_refuses(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=2, burst=5, clock=clock)
    assert bucket.tokens == 5
    assert drain(bucket) == 5
    assert not bucket.try_take()


def test_tokens_come_back_at_the_rate(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=4, burst=4, clock=clock)
    drain(bucket)
    clock.advance(0.5)
    assert drain(bucket) == 2
    clock.advance(0.1)  # 0.4 token: not enough for one
    assert not bucket.try_take()
    clock.advance(0.15)  # 0.4 + 0.6
    assert bucket.try_take()
    assert not bucket.try_take()


def test_sustained_rate_matches_the_limit_over_a_long_run(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=50, burst=10, clock=clock)
    taken = drain(bucket)
    for _ in range(10_000):  # 10 s in steps of 1 ms, trying 3 times a step
        clock.advance(0.001)
        taken += sum(bucket.try_take() for _ in range(3))
    assert taken == 10 + 50 * 10  # the initial burst, then exactly the rate: no token lost


def test_refill_is_capped_at_burst(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=10, burst=3, clock=clock)
    drain(bucket)
    clock.advance(3600)
    assert bucket.tokens == 3
    assert drain(bucket) == 3


def test_taking_several_tokens_at_once(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=1, burst=10, clock=clock)
    assert bucket.try_take(7)
    assert not bucket.try_take(4)  # refused: nothing taken
    assert bucket.tokens == pytest.approx(3)
    assert bucket.try_take(3)


def test_delay_says_how_long_until_the_tokens_are_there(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=4, burst=2, clock=clock)
    assert bucket.delay() == 0.0
    drain(bucket)
    assert bucket.delay() == pytest.approx(0.25)
    assert bucket.delay(2) == pytest.approx(0.5)
    assert bucket.tokens == pytest.approx(0)  # delay takes nothing
    clock.advance(bucket.delay(2))
    assert bucket.try_take(2)


def test_waiting_exactly_the_delay_suffices_even_after_days_of_uptime() -> None:
    clock = FakeClock(now=9 * 86400.123)  # float digits are scarce at this magnitude
    bucket = TokenBucket(rate=1000, burst=1, clock=clock)
    for _ in range(1000):
        if not bucket.try_take():
            clock.advance(bucket.delay())
            assert bucket.try_take()


def test_a_clock_stepping_back_credits_nothing(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=1, burst=5, clock=clock)
    drain(bucket)
    clock.advance(-100)
    assert bucket.tokens == 0
    clock.advance(101)  # only the 1 s past the last reading counts
    assert bucket.tokens == pytest.approx(1)


@pytest.mark.parametrize(
    ("rate", "burst", "error", "match"),
    [
        (0, 1, ValueError, "rate"),
        (-5, 1, ValueError, "rate"),
        (math.nan, 1, ValueError, "rate"),
        (math.inf, 1, ValueError, "rate"),
        ("10", 1, TypeError, "rate"),
        (True, 1, TypeError, "rate"),
        (1, 0.5, ValueError, "burst"),
        (1, 0, ValueError, "burst"),
        (1, None, TypeError, "burst"),
    ],
)
def test_bad_bucket_parameters_are_refused(
    rate: object, burst: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        TokenBucket(rate, burst)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [0, -1, 6, math.nan, "1"])
def test_bad_token_counts_are_refused(clock: FakeClock, n: object) -> None:
    bucket = TokenBucket(rate=1, burst=5, clock=clock)
    with pytest.raises((ValueError, TypeError), match="n must"):
        bucket.try_take(n)  # type: ignore[arg-type]
    with pytest.raises((ValueError, TypeError), match="n must"):
        bucket.delay(n)  # type: ignore[arg-type]
    assert bucket.tokens == 5


# ------------------------------------------------------------------- limit


@pytest.mark.parametrize(
    ("spec", "rate", "burst"),
    [
        ("100/s", 100, 100),
        ("6000/min", 100, 100),
        ("6000 / minute", 100, 100),
        ("36/h", 0.01, 1),
        ("0.5/sec", 0.5, 1),
        ({"rate": 100, "burst": 20}, 100, 20),
        ({"rate": "120/min"}, 2, 2),
        ({"rate": 3}, 3, 3),
    ],
)
def test_rate_limits_parse(spec: object, rate: float, burst: float) -> None:
    limit = RateLimit.parse(spec)  # type: ignore[arg-type]
    assert limit.rate == pytest.approx(rate)
    assert limit.burst == pytest.approx(burst)
    assert RateLimit.parse(limit) is limit


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("100", ValueError, "100/s"),
        ("100/fortnight", ValueError, "units"),
        ("abc/s", ValueError, "100/s"),
        ("-5/s", ValueError, "100/s"),
        ("0/s", ValueError, "rate must be > 0"),
        ({"burst": 3}, ValueError, "needs a rate"),
        ({"rate": 1, "brust": 2}, ValueError, "brust"),
        ({"rate": 10, "burst": 0}, ValueError, "burst"),
        ({"rate": None}, TypeError, "rate"),
        (42, TypeError, "rate limit"),
        (None, TypeError, "rate limit"),
    ],
)
def test_bad_rate_limits_are_refused(spec: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        RateLimit.parse(spec)  # type: ignore[arg-type]


def test_a_rate_limit_is_frozen_and_makes_full_buckets(clock: FakeClock) -> None:
    limit = RateLimit(rate=5, burst=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        limit.rate = 10  # type: ignore[misc]
    bucket = limit.bucket(clock)
    assert drain(bucket) == 2


# ------------------------------------------------------------------- table


def test_each_sender_has_its_own_bucket(clock: FakeClock) -> None:
    table = BucketTable(RateLimit(rate=1, burst=2), clock=clock)
    assert table.try_take("a") and table.try_take("a")
    assert not table.try_take("a")
    assert table.delay("a") == pytest.approx(1.0)
    assert table.try_take("b") and table.try_take("b")
    clock.advance(1)
    assert table.try_take("a")
    assert not table.try_take("a")


def test_a_flood_of_senders_cannot_grow_the_table(clock: FakeClock) -> None:
    table = BucketTable("10/s", max_keys=100, clock=clock)
    for i in range(10_000):
        table.try_take(f"sender-{i}")
        assert len(table) <= 100
    assert len(table) == 100
    assert "sender-9999" in table and "sender-0" not in table


def test_the_least_recently_used_sender_is_evicted(clock: FakeClock) -> None:
    table = BucketTable(RateLimit(rate=1, burst=1), max_keys=3, clock=clock)
    for key in "abc":
        assert table.try_take(key)
    assert not table.try_take("a")  # "a" is now the most recently used
    table.try_take("d")
    assert "b" not in table
    assert {"a", "c", "d"} == {k for k in "abcd" if k in table}
    assert not table.try_take("a")  # kept, with its empty bucket
    table.try_take("e")
    table.try_take("f")
    table.try_take("g")
    assert "a" not in table
    assert table.try_take("a")  # evicted: a fresh, full bucket


def test_delay_of_an_unknown_sender_is_zero_and_adds_no_key(clock: FakeClock) -> None:
    table = BucketTable({"rate": 1, "burst": 2}, clock=clock)
    assert table.delay("x", 2) == 0.0
    assert len(table) == 0
    with pytest.raises(ValueError, match="burst"):
        table.delay("x", 3)
    with pytest.raises(ValueError, match="burst"):
        table.try_take("x", 3)
    assert len(table) == 0


@pytest.mark.parametrize("max_keys", [0, -1, 1.5, True])
def test_bad_table_sizes_are_refused(max_keys: object) -> None:
    with pytest.raises(ValueError, match="max_keys"):
        BucketTable("1/s", max_keys=max_keys)  # type: ignore[arg-type]
