"""Token buckets: per-agent and per-sender rate limits.

A :class:`TokenBucket` holds up to ``burst`` tokens and gains ``rate`` tokens a
second; a message costs one (or ``n``). It starts full, so a quiet sender may send
``burst`` messages at once, and over time no more than ``rate`` a second. The
clock is injected (``time.monotonic`` by default, never the wall clock): tests move
a fake one instead of sleeping.

A :class:`BucketTable` keeps one bucket per key (per sender) and at most
``max_keys`` of them, evicting the least recently used: a flood of distinct
senders cannot grow memory. An evicted sender starts again with a full bucket,
so under such a flood the limit per sender is approximate; the limit per agent
(one bucket) is not.
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["BucketTable", "RateLimit", "TokenBucket"]

Clock = Callable[[], float]

#: Slack (in tokens) for float rounding, so that ``try_take(n)`` succeeds after
#: ``delay(n)`` seconds even on a clock reading of days (elapsed * rate loses digits).
_EPSILON: Final = 1e-6
_PER: Final = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
}
_RATE_TEXT: Final = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*/\s*([a-z]+)\s*")


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


def _check_limits(rate: object, burst: object) -> tuple[float, float]:
    rate_f, burst_f = _number("rate", rate), _number("burst", burst)
    if rate_f <= 0:
        raise ValueError(f"rate must be > 0 tokens a second, got {rate!r}")
    if burst_f < 1:
        raise ValueError(f"burst must be >= 1, got {burst!r}")
    return rate_f, burst_f


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full."""

    __slots__ = ("_burst", "_clock", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic) -> None:
        self._rate, self._burst = _check_limits(rate, burst)
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {clock!r}")
        self._clock = clock
        self._tokens = self._burst
        self._stamp = clock()

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    @property
    def tokens(self) -> float:
        """Tokens available now (at most ``burst``)."""
        self._refill()
        return self._tokens

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._stamp
        # A clock that stepped back credits nothing; the stamp stays put so the
        # same interval is never credited twice.
        if elapsed > 0:
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
            self._stamp = now

    def _cost(self, n: float) -> float:
        cost = _number("n", n)
        if not 0 < cost <= self._burst:
            # More than burst never fits: refuse rather than return False forever.
            raise ValueError(f"n must be > 0 and <= burst ({self._burst:g}), got {n!r}")
        return cost

    def try_take(self, n: float = 1) -> bool:
        """Take ``n`` tokens if there are enough; True if taken."""
        cost = self._cost(n)
        self._refill()
        if self._tokens + _EPSILON < cost:
            return False
        self._tokens -= cost
        return True

    def delay(self, n: float = 1) -> float:
        """Seconds until ``n`` tokens are available (0.0 if they are now); takes none."""
        cost = self._cost(n)
        self._refill()
        missing = cost - self._tokens
        return 0.0 if missing <= _EPSILON else missing / self._rate

    def __repr__(self) -> str:
        return f"<TokenBucket {self._rate:g}/s burst={self._burst:g} tokens={self.tokens:.3g}>"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A rate (tokens a second) and a burst; see :meth:`parse` for the accepted forms."""

    rate: float
    burst: float

    def __post_init__(self) -> None:
        rate, burst = _check_limits(self.rate, self.burst)
        object.__setattr__(self, "rate", rate)
        object.__setattr__(self, "burst", burst)

    @classmethod
    def parse(cls, obj: RateLimit | str | Mapping[str, Any]) -> RateLimit:
        """A limit from ``"100/s"``, ``"6000/min"``, ``"10/h"``, ``{"rate": 100,
        "burst": 20}`` (rate: a number a second, or such a string) or a RateLimit.

        Without a burst, the burst is one second's worth of tokens (at least 1).
        """
        if isinstance(obj, RateLimit):
            return obj
        if isinstance(obj, str):
            return cls._with_default_burst(_parse_rate(obj))
        if not isinstance(obj, Mapping):
            raise TypeError(
                f"a rate limit must be a str like '100/s', a dict or a RateLimit, got {obj!r}"
            )
        unknown = sorted(str(k) for k in obj if k not in ("rate", "burst"))
        if unknown:
            raise ValueError(
                f"unknown rate limit field(s) {', '.join(unknown)}; valid: burst, rate"
            )
        if "rate" not in obj:
            raise ValueError(f"a rate limit needs a rate, got {dict(obj)!r}")
        raw = obj["rate"]
        rate = _parse_rate(raw) if isinstance(raw, str) else _number("rate", raw)
        if "burst" in obj:
            return cls(rate, obj["burst"])
        return cls._with_default_burst(rate)

    @classmethod
    def _with_default_burst(cls, rate: float) -> RateLimit:
        return cls(rate, max(1.0, rate))

    def bucket(self, clock: Clock = time.monotonic) -> TokenBucket:
        """A new, full bucket with this limit."""
        return TokenBucket(self.rate, self.burst, clock)


def _parse_rate(text: str) -> float:
    """Tokens a second of ``"<number>/<unit>"``, unit s, sec, second, m, min, minute, h, hour."""
    match = _RATE_TEXT.fullmatch(text.lower())
    if match is None or match.group(2) not in _PER:
        raise ValueError(
            f"rate {text!r} must look like '100/s', '6000/min' or '10/h' (units: {', '.join(_PER)})"
        )
    return float(match.group(1)) / _PER[match.group(2)]


class BucketTable:
    """One :class:`TokenBucket` per key, at most ``max_keys`` of them (LRU evicted)."""

    __slots__ = ("_buckets", "_clock", "_limit", "_max_keys")

    def __init__(
        self,
        limit: RateLimit | str | Mapping[str, Any],
        max_keys: int = 10_000,
        clock: Clock = time.monotonic,
    ) -> None:
        self._limit = RateLimit.parse(limit)
        if type(max_keys) is not int or max_keys < 1:
            raise ValueError(f"max_keys must be an int >= 1, got {max_keys!r}")
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {clock!r}")
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    @property
    def limit(self) -> RateLimit:
        return self._limit

    @property
    def max_keys(self) -> int:
        return self._max_keys

    def try_take(self, key: Hashable, n: float = 1) -> bool:
        """Take ``n`` tokens from ``key``'s bucket (made full if new); True if taken."""
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            bucket = self._limit.bucket(self._clock)
            bucket._cost(n)  # validate before the table changes
            buckets[key] = bucket
            if len(buckets) > self._max_keys:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(key)
        return bucket.try_take(n)

    def delay(self, key: Hashable, n: float = 1) -> float:
        """Seconds until ``key`` may take ``n`` tokens; adds no key, takes nothing."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return self._limit.bucket(self._clock).delay(n)  # a full bucket: validates n
        return bucket.delay(n)

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets

    def __repr__(self) -> str:
        return f"<BucketTable {self._limit.rate:g}/s burst={self._limit.burst:g} keys={len(self)}>"
