"""Delivery guarantees: the sender's outbox and the receiver's dedup log.

Used by the Python client (with its own :class:`~phoenix_node.state.store.Store`
in a client data dir, or with no store: in memory) and by every worker (the
node's Store). Nothing here sends or receives: the caller's loop asks the
:class:`Outbox` what is due, sends it, and reports acks; it asks the
:class:`DedupLog` whether a message was already processed before running it.

Group commit
------------
Neither class commits. Changes are staged in memory; the caller's loop calls
``stage(batch)`` on each of them once per iteration to write them into its own
:class:`~phoenix_node.state.store.WriteBatch`, commits that batch (with the
agents' state changes: the dedup record lands in the SAME transaction as the
state change it guards), then calls ``committed()``. If the commit fails, the
caller either retries it with the same batch (which keeps its operations) or
calls ``abort()``, which keeps the changes staged for the next batch. In
memory mode (``store=None``) there is nothing to stage.

On-disk format (format version 1)
---------------------------------
One LMDB environment is shared by every process of a node, so every key
starts with the owner's prefix ``P = len(owner) (1 byte) + owner`` (owner: at
most :data:`MAX_OWNER` bytes, e.g. the worker index or the client id; one
live Outbox / DedupLog per owner at a time). The length byte keeps owner
``b"a"`` from seeing owner ``b"ab"``'s keys. Integers are unsigned 64-bit
big-endian (``u64``), so LMDB's bytewise order is numeric order. Values are
msgpack arrays whose first element is the format version (1).

``outbox`` db:

- ``P + b"m" + u64(msg_id)`` -> ``[1, dest, data]``: a message not yet acked.
  Attempt counts are not stored (that would cost a write per send): after a
  restart every restored message is due at once and starts at 0 attempts.
- ``P + b"x" + u64(msg_id)`` -> ``[1, dest, data, attempts, reason, time]``:
  a dead letter (``time``: wall clock, seconds since the epoch).
- ``P + b"h"`` -> ``u64``: the highest msg_id ever handed out or added,
  written in the same batch as the add, so ids are never reused after a crash.

``dedup`` db:

- ``P + b"r" + S + u64(msg_id)`` -> ``[1, time, status, reply_body]``: a
  processed message. ``S`` is the source: ``len (1 byte, <= 200) + UTF-8``,
  or for a longer source ``b"\\xff" + blake2b-192(UTF-8)`` (keys are limited to
  511 bytes, sources to 1024).
- ``P + b"t" + u64(time in microseconds) + S + u64(msg_id)`` -> ``b""``: the
  time-ordered index that :meth:`DedupLog.sweep` walks from its oldest end.
- ``P + b"c"`` -> ``u64``: how many records the owner has.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import random
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final

import msgpack

from ._errors import DecodeError
from .store import Store, WriteBatch

__all__ = [
    "FORMAT_VERSION",
    "MAX_MSG_ID",
    "MAX_OWNER",
    "DeadLetter",
    "DedupLog",
    "Delivery",
    "DeliveryError",
    "Outbox",
    "OutboxEntry",
    "OutboxFullError",
    "RetryPolicy",
    "parse_delivery",
]

FORMAT_VERSION: Final = 1
MAX_MSG_ID: Final = 2**64 - 1
#: Longest owner id, in bytes.
MAX_OWNER: Final = 64
#: Sources up to this many bytes of UTF-8 are kept verbatim in dedup keys, longer ones hashed.
_INLINE_SOURCE: Final = 200
_U64 = struct.Struct(">Q")
Clock = Callable[[], float]


class DeliveryError(Exception):
    """Base class of the errors this module raises on purpose (besides bad arguments)."""


class OutboxFullError(DeliveryError):
    """The outbox holds ``max_pending`` messages: the caller must apply backpressure."""


# ----------------------------------------------------------------- delivery


class Delivery(IntEnum):
    """A message's delivery guarantee (the ``delivery`` element of the wire header)."""

    AT_MOST_ONCE = 0
    AT_LEAST_ONCE = 1
    EXACTLY_ONCE = 2
    CAUSAL = 3

    @property
    def wire_name(self) -> str:
        """The CloudEvents ``phoenixdelivery`` value, e.g. ``"at_least_once"``."""
        return self.name.lower()


def parse_delivery(value: str | int | Delivery) -> Delivery:
    """A :class:`Delivery` from itself, its number or its name (any case, ``-`` or ``_``)."""
    names = ", ".join(d.wire_name for d in Delivery)
    if isinstance(value, Delivery):
        return value
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(
            f"delivery must be a str, int or Delivery, got {type(value).__name__}; "
            f"valid names: {names}"
        )
    if isinstance(value, int):
        try:
            return Delivery(value)
        except ValueError:
            raise ValueError(
                f"unknown delivery {value}: valid values 0..{len(Delivery) - 1} ({names})"
            ) from None
    try:
        return Delivery[value.strip().upper().replace("-", "_")]
    except KeyError:
        raise ValueError(f"unknown delivery {value!r}; valid names: {names}") from None


# -------------------------------------------------------------------- retry


_FIRST_RTO = 1.0  # seconds: RFC 6298 section 2.1


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, capped.

    The wait after the n-th send (n >= 1) is ``initial * multiplier**(n - 1)``,
    scaled by a random factor in ``[1 - jitter, 1 + jitter]`` (so that many
    senders that lost the same peer do not retry in lockstep), then capped at
    ``max_delay``. A message is sent at most ``1 + max_retries`` times.
    """

    initial: float = 0.2
    multiplier: float = 2.0
    max_delay: float = 10.0
    max_retries: int = 8
    jitter: float = 0.2

    def __post_init__(self) -> None:
        for name in ("initial", "multiplier", "max_delay", "jitter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"RetryPolicy.{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"RetryPolicy.{name} must be finite, got {value!r}")
        if self.initial <= 0:
            raise ValueError(f"RetryPolicy.initial must be > 0, got {self.initial}")
        if self.multiplier < 1:
            raise ValueError(f"RetryPolicy.multiplier must be >= 1, got {self.multiplier}")
        if self.max_delay < self.initial:
            raise ValueError(
                f"RetryPolicy.max_delay ({self.max_delay}) must be >= initial ({self.initial})"
            )
        if not 0 <= self.jitter < 1:
            raise ValueError(f"RetryPolicy.jitter must be in [0, 1), got {self.jitter}")
        _check_int("RetryPolicy.max_retries", self.max_retries, 0, 1_000_000)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``attempt``-th send; no jitter when ``rng`` is None."""
        _check_int("attempt", attempt, 1, 2**63)
        try:
            base = min(self.initial * self.multiplier ** (attempt - 1), self.max_delay)
        except OverflowError:
            base = self.max_delay
        if rng is not None and self.jitter:
            base *= 1.0 + rng.uniform(-self.jitter, self.jitter)
        return min(base, self.max_delay)


# ------------------------------------------------------------------ helpers


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value}")
    return value


def _check_msg_id(msg_id: object) -> int:
    return _check_int("msg_id", msg_id, 0, MAX_MSG_ID)


def _owner_prefix(owner: object) -> bytes:
    if not isinstance(owner, bytes):
        raise TypeError(f"owner must be bytes, got {type(owner).__name__}")
    if len(owner) > MAX_OWNER:
        raise ValueError(f"owner must be at most {MAX_OWNER} bytes, got {len(owner)}")
    return bytes([len(owner)]) + owner


_MAX_CACHED_SOURCES = 100_000
_MAX_RECENT = 200_000  # DedupLog: records kept in memory to skip reads for new messages


def _source_part(source: object) -> bytes:
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be a non-empty str, got {source!r}")
    try:
        raw = source.encode()
    except UnicodeEncodeError as exc:
        raise ValueError(f"source {source[:40]!r} is not valid UTF-8 text") from exc
    if len(raw) <= _INLINE_SOURCE:
        return bytes([len(raw)]) + raw
    return b"\xff" + hashlib.blake2b(raw, digest_size=24).digest()


def _pack(*items: object) -> bytes:
    data: bytes = msgpack.packb([FORMAT_VERSION, *items], use_bin_type=True)
    return data


def _unpack(what: str, key: bytes, value: bytes, types: tuple[type, ...]) -> list[Any]:
    """Decode a versioned record whose elements after the version have ``types``."""
    try:
        items = msgpack.unpackb(value, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types on garbage
        raise DecodeError(f"{what} {key!r} is not valid msgpack: {exc}") from exc
    if not isinstance(items, list) or not items or items[0] != FORMAT_VERSION:
        raise DecodeError(f"{what} {key!r} has an unknown format: {items!r:.80}")
    fields = items[1:]
    if len(fields) != len(types) or not all(
        isinstance(v, t) and not isinstance(v, bool) for v, t in zip(fields, types, strict=True)
    ):
        raise DecodeError(f"{what} {key!r} has malformed fields: {fields!r:.80}")
    return fields


def _u64(what: str, key: bytes, value: bytes) -> int:
    if len(value) != 8:
        raise DecodeError(f"{what} {key!r} must be 8 bytes, got {len(value)}")
    number: int = _U64.unpack(value)[0]
    return number


class _Table:
    """One db of the store as its owner sees it: the committed data plus staged writes.

    ``_pending`` holds writes not yet put into a batch, ``_inflight`` those put
    into a batch that is not known to be committed; reads see pending, then
    inflight, then the store. With ``store=None`` the table is a plain dict.
    """

    __slots__ = ("_db", "_inflight", "_mem", "_pending", "_store")

    def __init__(self, store: Store | None, db: str) -> None:
        self._store = store
        self._db = db
        self._mem: dict[bytes, bytes] = {}
        self._pending: dict[bytes, bytes | None] = {}
        self._inflight: dict[bytes, bytes | None] = {}

    def put(self, key: bytes, value: bytes) -> None:
        if self._store is None:
            self._mem[key] = value
        else:
            self._pending[key] = value

    def delete(self, key: bytes) -> None:
        if self._store is None:
            self._mem.pop(key, None)
        else:
            self._pending[key] = None

    def is_staged(self, key: bytes) -> bool:
        return key in self._pending or key in self._inflight

    def get(self, key: bytes) -> bytes | None:
        if self._store is None:
            return self._mem.get(key)
        for layer in (self._pending, self._inflight):
            if key in layer:
                return layer[key]
        return self._store.get(self._db, key)

    def items(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Live ``(key, value)`` pairs under ``prefix`` in key order (not a snapshot)."""
        if self._store is None:
            keys = sorted(k for k in self._mem if k.startswith(prefix))
            return iter([(k, self._mem[k]) for k in keys])
        overlay = {**self._inflight, **self._pending}
        staged = sorted((k, v) for k, v in overlay.items() if k.startswith(prefix))
        return _merge(self._store.iter_items(self._db, prefix), staged)

    def stage(self, batch: WriteBatch) -> None:
        for key, value in self._pending.items():
            if value is None:
                batch.delete(self._db, key)
            else:
                batch.put(self._db, key, value)
        self._inflight.update(self._pending)
        self._pending.clear()

    def committed(self) -> None:
        self._inflight.clear()

    def abort(self) -> None:
        self._pending = {**self._inflight, **self._pending}
        self._inflight.clear()

    def mem_size(self) -> int:
        return len(self._mem)

    def drop_first_mem(self) -> None:
        del self._mem[next(iter(self._mem))]


def _merge(
    disk: Iterable[tuple[bytes, bytes]], staged: list[tuple[bytes, bytes | None]]
) -> Iterator[tuple[bytes, bytes]]:
    """Merge two key-ordered streams; a staged entry wins and ``None`` hides the key."""
    over = iter(staged)
    nxt = next(over, None)
    for key, value in disk:
        while nxt is not None and nxt[0] < key:
            if nxt[1] is not None:
                yield nxt[0], nxt[1]
            nxt = next(over, None)
        if nxt is not None and nxt[0] == key:
            if nxt[1] is not None:
                yield key, nxt[1]
            nxt = next(over, None)
            continue
        yield key, value
    while nxt is not None:
        if nxt[1] is not None:
            yield nxt[0], nxt[1]
        nxt = next(over, None)


# ------------------------------------------------------------------- outbox


@dataclass(slots=True, eq=False)
class OutboxEntry:
    """A message kept until acked. ``attempts``: sends so far (in this process)."""

    msg_id: int
    dest: str
    data: bytes
    attempts: int = 0
    next_due: float = 0.0
    added: float = field(default=0.0, repr=False)
    sent_at: float = field(default=0.0, repr=False)
    # The due time of this entry's one authoritative heap item (others are stale).
    heap_due: float = field(default=-1.0, repr=False)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message given up on. ``time``: when, in wall-clock seconds since the epoch."""

    msg_id: int
    dest: str
    data: bytes
    attempts: int
    reason: str
    time: float


class Outbox:
    """Messages of one owner kept until acked, re-sent with backoff, then dead-lettered.

    The loop: ``for e in outbox.due(): send(e); outbox.sent(e)``; on an ack,
    ``outbox.ack(msg_id)``; once per iteration ``outbox.stage(batch)``, commit,
    ``outbox.committed()``. :meth:`due` reschedules what it returns as if it
    had been sent, so an entry the caller could not send (backpressure) comes
    back after the backoff without counting an attempt. An entry still not
    acked after ``1 + max_retries`` sends becomes due once more, and then
    moves to the dead letters instead (reason ``"max_retries"``).

    Call :meth:`load` once, before anything else, to restore the owner's
    messages after a restart. Not thread-safe; one Outbox per owner per store.
    With ``store=None`` the dead letters live in memory too, at most
    ``max_dead_letters`` of them (the oldest are dropped first).
    """

    def __init__(
        self,
        store: Store | None,
        owner: bytes,
        policy: RetryPolicy | None = None,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        *,
        max_pending: int = 100_000,
        max_dead_letters: int = 10_000,
        wall_clock: Clock = time.time,
    ) -> None:
        if store is not None and not isinstance(store, Store):
            raise TypeError(f"store must be a Store or None, got {type(store).__name__}")
        if policy is not None and not isinstance(policy, RetryPolicy):
            raise TypeError(f"policy must be a RetryPolicy, got {type(policy).__name__}")
        self._prefix = _owner_prefix(owner)
        self.policy = policy if policy is not None else RetryPolicy()
        self._max_pending = _check_int("max_pending", max_pending, 1, 2**40)
        self._max_dead = _check_int("max_dead_letters", max_dead_letters, 1, 2**40)
        self._store = store
        self._table = _Table(store, "outbox")
        self._clock = clock
        self._wall = wall_clock
        self._rng = rng if rng is not None else random.Random()
        self._entries: dict[int, OutboxEntry] = {}
        # (due, seq, entries): one timer for the entries in the list (see add()); an
        # entry is live in it while it is pending and its heap_due is that due.
        self._heap: list[tuple[float, int, list[OutboxEntry]]] = []
        self._group: list[OutboxEntry] | None = None
        self._group_at = self._group_due = 0.0
        self._seq = itertools.count()
        self._high = 0  # highest msg_id handed out or added
        self._high_put = 0  # the high-water mark last written to the table
        self._mkey = self._prefix + b"m"
        self._expired: deque[DeadLetter] = deque(maxlen=1000)
        self._dead_total = 0
        self._loaded = False
        self._srtt: float | None = None
        self._rttvar = 0.0
        # Before the first round trip is measured: RFC 6298's initial RTO of 1 s (or the
        # policy's own delays when they are longer, or its cap when shorter). A burst
        # queued deep in a receiver must not be re-sent before a single ack came back.
        self._rto = min(max(self.policy.initial, _FIRST_RTO), self.policy.max_delay)
        self._backoff = [0.0] + [self.policy.delay(a) for a in range(1, 65)]

    # ------------------------------------------------------------- keys

    def _key(self, kind: bytes, msg_id: int) -> bytes:
        return self._prefix + kind + _U64.pack(msg_id)

    def _set_high(self, msg_id: int) -> None:
        if msg_id > self._high:
            self._high = msg_id  # written by stage(), once per batch

    # ------------------------------------------------------------ intake

    def load(self) -> int:
        """Restore the owner's committed, not-acked messages (all due now); returns how many.

        Also restores the msg_id high-water mark. A no-op in memory mode.
        """
        if self._entries or self._loaded or self._high:
            raise DeliveryError("Outbox.load() must be called once, before any other use")
        self._loaded = True
        if self._store is None:
            return 0
        raw = self._store.get("outbox", self._prefix + b"h")
        high = 0 if raw is None else _u64("outbox high-water mark", self._prefix + b"h", raw)
        now = self._clock()
        for key, value in self._store.iter_items("outbox", self._prefix + b"m"):
            msg_id = _u64("outbox key", key, key[len(self._prefix) + 1 :])
            dest, data = _unpack("outbox entry", key, value, (str, bytes))
            self._insert(OutboxEntry(msg_id, dest, data), now)
            high = max(high, msg_id)
        self._high = self._high_put = high
        return len(self._entries)

    def next_id(self) -> int:
        """A msg_id never used by this owner before, even across restarts (once committed)."""
        if self._high >= MAX_MSG_ID:
            raise DeliveryError("the msg_id space of this owner is exhausted")
        self._set_high(self._high + 1)
        return self._high

    def add(self, msg_id: int, dest: str, data: bytes, *, sending: bool = False) -> OutboxEntry:
        """Keep a message until it is acked; its first send is due now.

        With ``sending=True`` the caller sends it itself right away (after the
        commit that makes it durable): it counts as sent now and only comes out
        of :meth:`due` for its retries. That saves a trip through the timer heap
        per message on the common path; a caller that then cannot send it loses
        nothing but a retry delay.

        Raises OutboxFullError at ``max_pending`` messages, ValueError if the
        id is pending already.
        """
        _check_msg_id(msg_id)
        if not isinstance(dest, str) or not dest:
            raise ValueError(f"dest must be a non-empty str, got {dest!r}")
        if not isinstance(data, bytes):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        if msg_id in self._entries:
            raise ValueError(f"msg_id {msg_id} is already pending in this outbox")
        if len(self._entries) >= self._max_pending:
            raise OutboxFullError(
                f"the outbox holds max_pending={self._max_pending} unacked messages"
            )
        entry = OutboxEntry(msg_id, dest, data)
        now = self._clock()
        if sending:
            # Messages added for sending within a millisecond share one timer (heap item,
            # jitter draw): a burst of N costs one push and one pop, not N of each.
            group = self._group
            if group is None or now - self._group_at > 0.001 or len(group) >= 4096:
                when = now + self._retry_delay(1, self._rng)
                group = self._group = []
                self._group_at, self._group_due = now, when
                heapq.heappush(self._heap, (when, next(self._seq), group))
                self._compact()
            group.append(entry)
            entry.added = entry.sent_at = now
            entry.attempts = 1
            entry.next_due = entry.heap_due = self._group_due
            self._entries[msg_id] = entry
        else:
            self._insert(entry, now)
        if self._store is not None:
            self._table.put(self._mkey + _U64.pack(msg_id), _pack(dest, data))
        if msg_id > self._high:
            self._high = msg_id
        return entry

    def _insert(self, entry: OutboxEntry, now: float) -> None:
        entry.added = now
        self._entries[entry.msg_id] = entry
        self._schedule(entry, now)

    def _schedule(self, entry: OutboxEntry, when: float) -> None:
        entry.next_due = when
        if entry.heap_due >= 0 and entry.heap_due <= when:
            return  # its heap item pops first and is pushed again then (see due())
        self._push(entry, when)

    def _push(self, entry: OutboxEntry, when: float) -> None:
        entry.heap_due = when
        heapq.heappush(self._heap, (when, next(self._seq), [entry]))
        self._compact()

    def _compact(self) -> None:
        if len(self._heap) > 2 * len(self._entries) + 4096:
            # Acks and rescheduling leave stale heap items behind: drop them now and then.
            # In place: due() holds a reference to the list while it pops.
            live = self._is_live
            self._heap[:] = [
                (due, seq, group if group is self._group else kept)  # add() still appends
                for due, seq, group in self._heap
                if group is self._group or (kept := [e for e in group if live(e, due)])
            ]
            heapq.heapify(self._heap)

    def _is_live(self, entry: OutboxEntry, due: float) -> bool:
        return self._entries.get(entry.msg_id) is entry and entry.heap_due == due

    # ------------------------------------------------------ retry timing

    @property
    def rto(self) -> float:
        """The first-retry delay now: the policy's ``initial``, or more when acks take
        longer (smoothed round trip + 4 deviations, as TCP computes it), at most
        ``max_delay``; 1 s (within those bounds) until the first ack was timed.
        Retries after the first multiply it like the policy does."""
        return self._rto

    def _observe_rtt(self, sample: float) -> None:
        # Jacobson/Karels; Karn: only entries sent once give samples (see ack()).
        if self._srtt is None:
            self._srtt, self._rttvar = sample, sample / 2
        else:
            self._rttvar += 0.25 * (abs(self._srtt - sample) - self._rttvar)
            self._srtt += 0.125 * (sample - self._srtt)
        policy = self.policy
        self._rto = min(max(policy.initial, self._srtt + 4 * self._rttvar), policy.max_delay)

    def _retry_delay(self, attempts: int, rng: random.Random | None) -> float:
        """Seconds after the ``attempts``-th send before the next one (jittered when
        ``rng`` is given): the policy's backoff, or the round-trip estimate's if longer.
        The hot path of every send: no argument checks, a table for the backoff."""
        policy = self.policy
        table = self._backoff
        base = table[attempts] if attempts < len(table) else policy.max_delay
        if self._rto > policy.initial:
            scaled = self._rto * policy.multiplier ** min(attempts - 1, 64)
            base = max(base, min(scaled, policy.max_delay))
        if rng is not None and policy.jitter:
            base = min(base * (1.0 + rng.uniform(-policy.jitter, policy.jitter)), policy.max_delay)
        return base

    def _rto_floor(self, attempts: int) -> float:
        """The earliest re-send the current estimate allows, jitter included."""
        policy = self.policy
        scaled = self._rto * policy.multiplier ** min(attempts - 1, 64)
        return min(scaled, policy.max_delay) * (1.0 - policy.jitter)

    # ---------------------------------------------------------- sending

    def due(self, now: float | None = None, limit: int | None = None) -> list[OutboxEntry]:
        """Entries to (re)send now, oldest due first; at most ``limit`` of them.

        Entries past their retries move to the dead letters here instead.
        """
        now = self._clock() if now is None else now
        if limit is not None:
            _check_int("limit", limit, 0, 2**62)
        out: list[OutboxEntry] = []
        heap = self._heap
        live = self._is_live
        while heap and heap[0][0] <= now and (limit is None or len(out) < limit):
            due, seq, group = heapq.heappop(heap)
            if group is self._group:
                self._group = None  # closed: later adds start a new timer
            for i, entry in enumerate(group):
                if limit is not None and len(out) >= limit:
                    heapq.heappush(heap, (due, seq, group[i:]))
                    break
                if live(entry, due):
                    self._due_one(entry, now, out)
        return out

    def _due_one(self, entry: OutboxEntry, now: float, out: list[OutboxEntry]) -> None:
        """One popped, live entry: due now (into ``out``), later, or dead."""
        entry.heap_due = -1.0
        attempts = entry.attempts
        not_before = entry.next_due  # later than ``due`` when rescheduled lazily
        if attempts and self._rto > self.policy.initial:
            # Not before the delay the current round-trip estimate asks for: acks
            # slower than the policy expected (a busy receiver) must not cause a
            # storm of re-sends of messages that are merely queued.
            not_before = max(not_before, entry.sent_at + self._rto_floor(attempts))
        if not_before > now:
            self._push(entry, not_before)
            return
        if attempts > self.policy.max_retries:
            self._kill(entry, "max_retries")
            return
        # Back after the backoff if the caller cannot send it now (not counted). The
        # low end of the jitter, so that sent() only ever moves it later (no push).
        delay = self._retry_delay(max(attempts, 1), None) * (1.0 - self.policy.jitter)
        self._schedule(entry, now + delay)
        out.append(entry)

    def sent(self, entry: OutboxEntry, now: float | None = None) -> None:
        """Count a send of ``entry`` and schedule its next attempt (no-op once acked)."""
        if self._entries.get(entry.msg_id) is not entry:
            return
        now = self._clock() if now is None else now
        entry.attempts += 1
        entry.sent_at = now
        self._schedule(entry, now + self._retry_delay(entry.attempts, self._rng))

    def ack_many(self, msg_ids: Iterable[int]) -> int:
        """:meth:`ack` for many messages (an ACKS frame); returns how many were pending.

        Takes one round-trip sample per call (from the oldest message sent once),
        as TCP takes one per ack: the acks of one frame left the receiver together.
        """
        entries = self._entries
        table = self._table if self._store is not None else None
        mkey = self._mkey
        sampled_at = 0.0
        n = 0
        for msg_id in msg_ids:
            entry = entries.pop(msg_id, None)
            if entry is None:
                continue
            n += 1
            if entry.attempts == 1 and not sampled_at:
                sampled_at = entry.sent_at
            if table is not None:
                table.delete(mkey + _U64.pack(msg_id))
        if sampled_at:
            self._observe_rtt(self._clock() - sampled_at)
        return n

    def ack(self, msg_id: int) -> bool:
        """Forget a delivered message; False if it is not pending (unknown, acked, dead)."""
        _check_msg_id(msg_id)
        entry = self._entries.pop(msg_id, None)
        if entry is None:
            return False
        if entry.attempts == 1:
            self._observe_rtt(self._clock() - entry.sent_at)
        if self._store is not None:
            self._table.delete(self._key(b"m", msg_id))
        return True

    def reject(self, msg_id: int, reason: str) -> bool:
        """The receiver refused the message for good (an unknown action, an action that
        raised...): move it to the dead letters with ``reason``; False if not pending."""
        _check_msg_id(msg_id)
        entry = self._entries.get(msg_id)
        if entry is None:
            return False
        self._kill(entry, reason)
        return True

    def _kill(self, entry: OutboxEntry, reason: str) -> None:
        del self._entries[entry.msg_id]
        letter = DeadLetter(
            entry.msg_id, entry.dest, entry.data, entry.attempts, reason, float(self._wall())
        )
        if self._store is not None:
            self._table.delete(self._key(b"m", entry.msg_id))
        dead_key = self._key(b"x", entry.msg_id)
        self._table.put(dead_key, _pack(*_letter_fields(letter)))
        if self._store is None and self._table.mem_size() > self._max_dead:
            self._table.drop_first_mem()
        self._expired.append(letter)
        self._dead_total += 1

    # ------------------------------------------------------ persistence

    def stage(self, batch: WriteBatch) -> None:
        """Write the adds, acks and dead-letter moves since the last stage into ``batch``."""
        if self._store is not None:
            if self._high != self._high_put:
                self._table.put(self._prefix + b"h", _U64.pack(self._high))
                self._high_put = self._high
            self._table.stage(batch)

    def committed(self) -> None:
        """The batch given to :meth:`stage` was committed."""
        self._table.committed()

    def abort(self) -> None:
        """The batch given to :meth:`stage` was not committed: stage it all again next time."""
        self._table.abort()

    # ---------------------------------------------------- dead letters

    def expired(self) -> list[DeadLetter]:
        """The messages dead-lettered since the last call (the latest 1000 at most)."""
        out = list(self._expired)
        self._expired.clear()
        return out

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Up to ``limit`` dead letters of this owner (staged ones included), by msg_id."""
        _check_int("limit", limit, 0, 2**62)
        return [letter for _, letter in itertools.islice(self._dead_items(None), limit)]

    def _dead_items(self, msg_ids: Iterable[int] | None) -> Iterator[tuple[bytes, DeadLetter]]:
        if msg_ids is None:
            items: Iterable[tuple[bytes, bytes]] = self._table.items(self._prefix + b"x")
        else:
            keys = [self._key(b"x", _check_msg_id(i)) for i in msg_ids]
            items = ((k, v) for k in keys if (v := self._table.get(k)) is not None)
        for key, value in items:
            msg_id = _u64("dead letter key", key, key[len(self._prefix) + 1 :])
            fields = _unpack("dead letter", key, value, (str, bytes, int, str, float))
            yield key, DeadLetter(msg_id, *fields)

    def replay(self, msg_ids: Iterable[int] | None = None) -> int:
        """Move dead letters (all, or those of ``msg_ids``) back into the outbox, due now.

        Their attempts restart at 0. Stops when the outbox is full; returns how
        many moved.
        """
        room = self._max_pending - len(self._entries)
        chosen = list(itertools.islice(self._dead_items(msg_ids), max(room, 0)))
        now = self._clock()
        moved = 0
        for key, letter in chosen:
            self._table.delete(key)
            if letter.msg_id not in self._entries:
                entry = OutboxEntry(letter.msg_id, letter.dest, letter.data)
                self._insert(entry, now)
                if self._store is not None:
                    self._table.put(
                        self._mkey + _U64.pack(letter.msg_id), _pack(entry.dest, entry.data)
                    )
                moved += 1
        return moved

    def purge(self, msg_ids: Iterable[int] | None = None) -> int:
        """Delete dead letters (all, or those of ``msg_ids``); returns how many."""
        keys = [key for key, _ in self._dead_items(msg_ids)]
        for key in keys:
            self._table.delete(key)
        return len(keys)

    # ------------------------------------------------------- inspection

    @property
    def pending(self) -> int:
        """Messages not yet acked (nor dead)."""
        return len(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._entries

    def get(self, msg_id: int) -> OutboxEntry | None:
        """The pending entry of ``msg_id``, or None."""
        return self._entries.get(msg_id)

    @property
    def oldest_age(self) -> float:
        """Seconds since the oldest pending message was added (or loaded/replayed); 0 if none."""
        for entry in self._entries.values():  # insertion order: the first is the oldest
            return max(self._clock() - entry.added, 0.0)
        return 0.0

    def statistics(self) -> dict[str, Any]:
        """``pending``, ``oldest_age``, ``dead_total`` (dead-lettered by this instance),
        ``high_water`` (highest msg_id used) and ``max_pending``."""
        return {
            "pending": len(self._entries),
            "oldest_age": self.oldest_age,
            "dead_total": self._dead_total,
            "high_water": self._high,
            "max_pending": self._max_pending,
            "rto": self._rto,
        }


def _letter_fields(letter: DeadLetter) -> tuple[str, bytes, int, str, float]:
    return letter.dest, letter.data, letter.attempts, letter.reason, letter.time


# -------------------------------------------------------------------- dedup


class DedupLog:
    """Exactly-once support on the receiver: the reply of each processed message.

    Before running a message with delivery >= at-least-once, look it up by
    ``(source, msg_id)``: a hit means it was processed already, and the stored
    ``(status, reply_body)`` is sent again instead. After running it,
    :meth:`record` the reply and :meth:`stage` it into the same batch as the
    state change, so both commit or neither does.

    The window: records older than ``window`` seconds (wall clock, because
    records outlive the process) and the oldest beyond ``max_entries`` are
    deleted by :meth:`sweep`. A duplicate arriving after its record was swept
    is processed again. Until it is swept, an old record still answers.
    """

    def __init__(
        self,
        store: Store,
        owner: bytes = b"",
        window: float = 86400.0,
        max_entries: int = 1_000_000,
        clock: Clock = time.time,
    ) -> None:
        if not isinstance(store, Store):
            raise TypeError(f"store must be a Store, got {type(store).__name__}")
        if isinstance(window, bool) or not isinstance(window, int | float):
            raise TypeError(f"window must be a number of seconds, got {window!r}")
        if not (math.isfinite(window) and window > 0):
            raise ValueError(f"window must be a finite number of seconds > 0, got {window}")
        self._prefix = _owner_prefix(owner)
        self._max_entries = _check_int("max_entries", max_entries, 1, 2**62)
        self._window = float(window)
        self._store = store
        self._table = _Table(store, "dedup")
        self._clock = clock
        self._count_key = self._prefix + b"c"
        raw = store.get("dedup", self._count_key)
        self._count = 0 if raw is None else _u64("dedup count", self._count_key, raw)
        # A new message (the common case) must cost no read. Per source, the highest
        # msg_id ever recorded is persisted with the records (``_highs``). ``_base``
        # holds it as it was when this instance first met the source, and ``_recent``
        # every record made since above it: so an id above the base and not recent
        # has no record, whatever order the messages run in.
        self._highs: dict[bytes, int] = {}
        self._base: dict[bytes, int] = {}
        self._recent: set[tuple[bytes, int]] = set()
        self._parts: dict[str, bytes] = {}

    def _part(self, source: str) -> bytes:
        part = self._parts.get(source) if type(source) is str else None
        if part is None:
            part = _source_part(source)
            if len(self._parts) >= _MAX_CACHED_SOURCES:
                self._parts.clear()
                self._highs.clear()
                self._base.clear()
                self._recent.clear()
            self._parts[source] = part
        return part

    def _base_of(self, part: bytes) -> int:
        base = self._base.get(part)
        if base is None:
            base = self._base[part] = self._high(part)
        return base

    def _high(self, part: bytes) -> int:
        high = self._highs.get(part)
        if high is None:
            key = self._prefix + b"h" + part
            raw = self._table.get(key)
            high = 0 if raw is None else _u64("dedup high-water mark", key, raw)
            self._highs[part] = high
        return high

    def _record_key(self, source: str, msg_id: int) -> bytes:
        return self._prefix + b"r" + self._part(source) + _U64.pack(_check_msg_id(msg_id))

    def _index_key(self, when: float, tail: bytes) -> bytes:
        micros = min(max(int(when * 1_000_000), 0), MAX_MSG_ID)
        return self._prefix + b"t" + _U64.pack(micros) + tail

    def lookup(self, source: str, msg_id: int) -> tuple[int, bytes] | None:
        """``(status, reply_body)`` of an already processed message (staged or committed)."""
        key = self._record_key(source, msg_id)
        part = key[len(self._prefix) + 1 : -8]
        if msg_id > self._base_of(part) and (part, msg_id) not in self._recent:
            return None
        value = self._table.get(key)
        if value is None:
            return None
        _when, status, body = _unpack("dedup record", key, value, (float, int, bytes))
        return status, body

    def record(self, source: str, msg_id: int, status: int, body: bytes) -> None:
        """Remember the reply of a processed message (staged; replaces an earlier record)."""
        key = self._record_key(source, msg_id)
        _check_int("status", status, 0, 2**32 - 1)
        if not isinstance(body, bytes):
            raise TypeError(f"body must be bytes, got {type(body).__name__}")
        tail = key[len(self._prefix) + 1 :]
        part = tail[:-8]
        high = self._high(part)
        new = msg_id > self._base_of(part) and (part, msg_id) not in self._recent
        old = None if new else self._table.get(key)
        if old is None:
            self._count += 1
        else:
            old_when = _unpack("dedup record", key, old, (float, int, bytes))[0]
            self._table.delete(self._index_key(old_when, tail))
        now = float(self._clock())
        self._table.put(key, _pack(now, status, body))
        self._table.put(self._index_key(now, tail), b"")
        self._table.put(self._count_key, _U64.pack(self._count))
        if msg_id > high:
            self._highs[part] = msg_id
            self._table.put(self._prefix + b"h" + part, _U64.pack(msg_id))
        if msg_id > self._base_of(part):
            if len(self._recent) >= _MAX_RECENT:
                # Every record is at or below its source's high now: start over from there.
                self._base = {p: self._high(p) for p in self._base}
                self._recent.clear()
            else:
                self._recent.add((part, msg_id))

    def __len__(self) -> int:
        """Records of this owner, staged ones included."""
        return self._count

    def stage(self, batch: WriteBatch) -> None:
        """Write the records (and sweeps) since the last stage into ``batch``."""
        self._table.stage(batch)

    def committed(self) -> None:
        """The batch given to :meth:`stage` was committed."""
        self._table.committed()

    def abort(self) -> None:
        """The batch given to :meth:`stage` was not committed: stage it all again next time."""
        self._table.abort()

    def sweep(self, batch: WriteBatch, now: float | None = None, limit: int = 10_000) -> int:
        """Delete up to ``limit`` records, older than the window or beyond ``max_entries``.

        Walks the time index from its oldest end, so it reads only what it
        deletes (plus one). Stages everything pending into ``batch`` (call
        :meth:`committed` after the commit as for :meth:`stage`); returns how
        many records it deleted.
        """
        now = float(self._clock()) if now is None else now
        _check_int("limit", limit, 0, 2**62)
        cutoff = self._index_key(now - self._window, b"")
        index_prefix = self._prefix + b"t"
        removed = 0
        for key, _ in self._store.iter_items("dedup", index_prefix):
            if removed >= limit or (key >= cutoff and self._count <= self._max_entries):
                break
            record_key = self._prefix + b"r" + key[len(index_prefix) + 8 :]
            if self._table.is_staged(key) or self._table.is_staged(record_key):
                continue  # re-recorded or already swept, not yet committed
            self._table.delete(key)
            self._table.delete(record_key)
            self._count -= 1
            removed += 1
        if removed:
            self._table.put(self._count_key, _U64.pack(self._count))
        self._table.stage(batch)
        return removed
