"""Bounded mailboxes: what a worker does with a message when an agent falls behind.

Each agent (and each client subscription) of a worker has a :class:`Mailbox`; the
worker loop takes messages from the mailboxes round-robin. A mailbox holds at most
``capacity`` items in memory, whatever the senders do; its :class:`MailboxPolicy`
says what happens to an offer beyond that (:class:`Strategy`), and :meth:`Mailbox.offer`
tells the caller what it did (:class:`Offer`), since only the caller can answer a
dropped ask, reply BACKPRESSURE or forward a redirected message.

Watermarks
----------
Once the in-memory part reached ``capacity`` the mailbox is *over*, and stays over
until :meth:`Mailbox.take` drained it (memory and spilled backlog together) to
``low_watermark``. While over, ``reject``
rejects, ``redirect`` redirects and ``spill_to_disk`` spills every offer, even when
there would be room again: without that hysteresis a full mailbox flips between
accepting and refusing on every message, and a sender told BACKPRESSURE retries into
a mailbox that is full again at once. The drop strategies drop only when the mailbox
is at capacity (each drop loses a message; dropping below capacity would lose more
than needed); ``over`` still follows the watermarks for them, as a congestion signal.

Spill format (``spill`` DB of :class:`~phoenix_node.state.Store`)
-----------------------------------------------------------------
key = the mailbox key (1..502 bytes, no ``b"\\x00"``) + ``b"\\x00"`` + the item's
sequence number as 8 bytes big-endian; value = ``encode(item)``. LMDB's bytewise order
thus keeps each mailbox's items together and in FIFO order. A mailbox's live items
always have consecutive sequence numbers (items leave at the head, arrive at the
tail); a new :class:`Mailbox` with the same key resumes from them after a restart.

Spill writes are group-committed by the worker: :class:`SpillStore` stages appends and
deletes in memory, :meth:`SpillStore.stage` copies them into the worker's
:class:`~phoenix_node.state.WriteBatch` before its commit, :meth:`SpillStore.committed`
forgets them after it. Reads see staged data; an item spilled and taken back between
two commits costs no write at all. What was spilled but not committed is lost with
the process, like every other uncommitted write of the worker, and it holds memory
until committed: commit every loop iteration. An item taken but whose delete was not
committed yet comes back after a restart (at-least-once, like the rest of the node).
When the in-memory part falls to ``low_watermark``, :meth:`Mailbox.take` refills it
from disk up to ``capacity``, in order.
"""

from __future__ import annotations

import struct
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Final, Generic, TypeVar

from phoenix_node.state import Store, WriteBatch
from phoenix_node.state.store import MAX_KEY_SIZE

from ._errors import AgentError

__all__ = [
    "MAX_MAILBOX_KEY",
    "Mailbox",
    "MailboxPolicy",
    "Offer",
    "Outcome",
    "SpillError",
    "SpillStore",
    "Strategy",
]

T = TypeVar("T")

_SEQ: Final = struct.Struct(">Q")
_SEP: Final = b"\x00"
#: Longest mailbox key: an LMDB key also holds the separator and the sequence number.
MAX_MAILBOX_KEY: Final = MAX_KEY_SIZE - 1 - _SEQ.size
_DB: Final = "spill"


class SpillError(AgentError, ValueError):
    """Spilled data cannot be read back: an undecodable item or a malformed spill key.

    An undecodable item is removed from its mailbox (so it cannot block the ones
    behind it); the error names the mailbox key and the sequence number.
    """


class Strategy(StrEnum):
    """What a mailbox does with an offer when it is full (or over, see the module docs)."""

    DROP_OLDEST = "drop_oldest"
    DROP_NEWEST = "drop_newest"
    REJECT = "reject"
    SPILL_TO_DISK = "spill_to_disk"
    REDIRECT = "redirect"


def _positive_int(name: str, value: object, minimum: int) -> int:
    if type(value) is not int:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class MailboxPolicy:
    """Capacity, watermarks and overflow strategy of a mailbox.

    ``capacity`` is the high watermark (the most items held in memory);
    ``low_watermark`` (default ``capacity // 2``, below ``capacity``) is where an
    over mailbox starts accepting again; ``redirect_to`` (an agent id) is required
    with the ``redirect`` strategy and refused with the others.
    """

    capacity: int = 1000
    low_watermark: int | None = None
    strategy: Strategy = Strategy.REJECT
    redirect_to: str | None = None

    _FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"capacity", "low_watermark", "strategy", "redirect_to"}
    )

    def __post_init__(self) -> None:
        capacity = _positive_int("capacity", self.capacity, 1)
        low = capacity // 2 if self.low_watermark is None else self.low_watermark
        _positive_int("low_watermark", low, 0)
        if low >= capacity:
            raise ValueError(
                f"low_watermark must be below capacity ({capacity}), got {self.low_watermark}"
            )
        object.__setattr__(self, "low_watermark", low)
        object.__setattr__(self, "strategy", _strategy(self.strategy))
        if self.strategy is Strategy.REDIRECT:
            if not isinstance(self.redirect_to, str) or not self.redirect_to:
                raise ValueError(
                    f"redirect_to must be a non-empty agent id with strategy 'redirect', "
                    f"got {self.redirect_to!r}"
                )
        elif self.redirect_to is not None:
            raise ValueError(
                f"redirect_to is only valid with strategy 'redirect', not {self.strategy.value!r}"
            )

    @property
    def low(self) -> int:
        """``low_watermark`` as an int (always set after construction)."""
        assert self.low_watermark is not None  # set by __post_init__
        return self.low_watermark

    @classmethod
    def parse(cls, obj: MailboxPolicy | Mapping[str, Any]) -> MailboxPolicy:
        """A policy from a policy or a mapping.

        E.g. ``{"capacity": 100, "strategy": "drop_oldest"}``; unknown fields are refused.
        """
        if isinstance(obj, MailboxPolicy):
            return obj
        if not isinstance(obj, Mapping):
            raise TypeError(f"a mailbox policy must be a dict or a MailboxPolicy, got {obj!r}")
        unknown = sorted(str(k) for k in obj if k not in cls._FIELDS)
        if unknown:
            raise ValueError(
                f"unknown mailbox policy field(s) {', '.join(unknown)}; "
                f"valid: {', '.join(sorted(cls._FIELDS))}"
            )
        return cls(**obj)


def _strategy(value: object) -> Strategy:
    if isinstance(value, Strategy):
        return value
    if isinstance(value, str):
        try:
            return Strategy(value)
        except ValueError:
            pass
    raise ValueError(
        f"strategy must be one of {', '.join(s.value for s in Strategy)}, got {value!r}"
    )


class Outcome(StrEnum):
    """What :meth:`Mailbox.offer` did with an item."""

    ACCEPTED = "accepted"  #: queued in memory
    SPILLED = "spilled"  #: queued on disk, behind the rest
    DROPPED = "dropped"  #: an item was dropped: see Offer.dropped and Offer.queued
    REJECTED = "rejected"  #: not queued: the caller replies BACKPRESSURE
    REDIRECTED = "redirected"  #: not queued: the caller sends it to Offer.redirect_to


@dataclass(frozen=True, slots=True)
class Offer(Generic[T]):
    """The answer of :meth:`Mailbox.offer`.

    ``queued``: the offered item is now in the mailbox. With ``DROPPED``,
    ``dropped`` is the item that was dropped, the oldest one (drop_oldest, the offered
    item was queued) or the offered one (drop_newest): the caller must answer it
    if it was an ask. ``redirect_to`` is set with ``REDIRECTED``.
    """

    outcome: Outcome
    queued: bool
    dropped: T | None = None
    redirect_to: str | None = None


_ACCEPTED: Final[Offer[Any]] = Offer(Outcome.ACCEPTED, True)
_SPILLED: Final[Offer[Any]] = Offer(Outcome.SPILLED, True)
_REJECTED: Final[Offer[Any]] = Offer(Outcome.REJECTED, False)


# ----------------------------------------------------------------- spill store


class _Range:
    """A mailbox's live sequence numbers [head, tail) and its entries in the overlay."""

    __slots__ = ("head", "ops", "tail")

    def __init__(self, head: int, tail: int) -> None:
        self.head = head
        self.tail = tail
        self.ops = 0


def _split_key(key: bytes) -> tuple[bytes, int]:
    mailbox = key[: -_SEQ.size - 1]
    if len(key) < _SEQ.size + 2 or key[-_SEQ.size - 1] != 0 or _SEP in mailbox:
        raise SpillError(f"malformed key {key!r} in the spill db")
    return mailbox, _SEQ.unpack(key[-_SEQ.size :])[0]


def _check_mailbox_key(key: object) -> bytes:
    if not isinstance(key, bytes):
        raise TypeError(f"a mailbox key must be bytes, got {type(key).__name__}")
    if not 0 < len(key) <= MAX_MAILBOX_KEY or _SEP in key:
        raise ValueError(
            f"a mailbox key must be 1..{MAX_MAILBOX_KEY} bytes without b'\\x00', got {key[:40]!r}"
        )
    return key


class SpillStore:
    """Spilled mailbox items in the store's ``spill`` DB, with writes staged in memory.

    One per worker, used from the worker's thread. At most one live :class:`Mailbox`
    per key (a dropped mailbox releases its key). Seen from the worker:
    ``spill.stage(batch)``, ``store.commit(batch)``, ``spill.committed()``. If the
    commit fails, nothing is forgotten: the next ``stage`` writes it all again.
    """

    __slots__ = ("_inflight", "_overlay", "_owners", "_ranges", "_store")

    def __init__(self, store: Store) -> None:
        if not isinstance(store, Store):
            raise TypeError(f"SpillStore needs a Store, got {type(store).__name__}")
        self._store = store
        # LMDB key -> value to write, or None to delete; not yet known committed.
        self._overlay: dict[bytes, bytes | None] = {}
        # What the last stage() copied into a batch: committed() forgets these ops
        # unless the overlay changed them since.
        self._inflight: dict[bytes, bytes | None] = {}
        # Known mailboxes; an empty one is forgotten once its ops are committed, so
        # sequence numbers restart at 0 only when the disk holds nothing of the key.
        self._ranges: dict[bytes, _Range] = {}
        self._owners: weakref.WeakValueDictionary[bytes, Mailbox[Any]] = (
            weakref.WeakValueDictionary()
        )

    @property
    def store(self) -> Store:
        return self._store

    @property
    def staged(self) -> int:
        """Operations not yet known committed (what the next :meth:`stage` writes)."""
        return len(self._overlay)

    def stage(self, batch: WriteBatch) -> int:
        """Copy every pending append and delete into ``batch``; returns how many."""
        if not isinstance(batch, WriteBatch):
            raise TypeError(f"stage() needs a WriteBatch, got {type(batch).__name__}")
        for key, value in self._overlay.items():
            if value is None:
                batch.delete(_DB, key)
            else:
                batch.put(_DB, key, value)
        self._inflight = dict(self._overlay)
        return len(self._inflight)

    def committed(self) -> None:
        """The batch of the last :meth:`stage` was committed: forget what it carried."""
        overlay = self._overlay
        for key, value in self._inflight.items():
            # Sequence numbers are never reused while an op of theirs is pending, so
            # an unchanged entry is the very op that was committed.
            if key in overlay and overlay[key] is value:
                del overlay[key]
                self._op_done(key)
        self._inflight = {}

    def backlog(self) -> dict[bytes, int]:
        """Mailbox key -> number of spilled items, for every non-empty spilled mailbox.

        Scans the whole ``spill`` DB, which every worker of the node shares: the
        answer holds the other workers' mailboxes too (filter by owner). Meant for
        start-up, after a restart; counts staged data.
        """
        found: dict[bytes, list[int]] = {}
        for key, _value in self._store.iter_items(_DB):
            mailbox, seq = _split_key(key)
            if mailbox in self._ranges:
                continue  # ours, and known better than the disk knows it
            span = found.setdefault(mailbox, [seq, seq, 0])
            span[1], span[2] = seq, span[2] + 1
        counts = {key: r.tail - r.head for key, r in self._ranges.items()}
        for mailbox, (low, high, count) in found.items():
            rng = self._checked_range(mailbox, low, high, count)
            counts[mailbox] = rng.tail - rng.head
        return {key: n for key, n in counts.items() if n}

    # ------------------------------------------------- used by Mailbox only
    #
    # A live mailbox holds its _Range; self._ranges holds those that are not empty
    # or have ops pending, so that sequence numbers are never reused while an op of
    # theirs may still be written (a reused key would let a stale item survive).

    def _attach(self, key: bytes, mailbox: Mailbox[Any]) -> _Range:
        owner = self._owners.get(key)
        if owner is not None and owner is not mailbox:
            raise ValueError(f"mailbox key {key!r} is already used by a live Mailbox")
        rng = self._ranges.get(key)
        if rng is None:
            # Not known here, so nothing of it is staged: the disk tells it all.
            seqs = [_split_key(k)[1] for k, _v in self._store.iter_items(_DB, key + _SEP)]
            if not seqs:
                rng = _Range(0, 0)
            else:
                rng = self._ranges[key] = self._checked_range(key, seqs[0], seqs[-1], len(seqs))
        self._owners[key] = mailbox
        return rng

    @staticmethod
    def _checked_range(key: bytes, low: int, high: int, count: int) -> _Range:
        if high - low + 1 != count:
            raise SpillError(
                f"spilled mailbox {key!r} has {count} items for sequence numbers "
                f"{low}..{high}: the spill db was altered"
            )
        return _Range(low, high + 1)

    def _append(self, key: bytes, rng: _Range, data: bytes) -> None:
        lmdb_key = key + _SEP + _SEQ.pack(rng.tail)
        rng.tail += 1
        self._overlay[lmdb_key] = data
        rng.ops += 1
        self._ranges[key] = rng

    def _peek(self, key: bytes, rng: _Range, n: int) -> Iterator[tuple[int, bytes]]:
        """Up to ``n`` items from the head: (sequence number, value), oldest first."""
        prefix = key + _SEP
        overlay = self._overlay
        disk: Iterator[tuple[bytes, bytes]] | None = None
        for seq in range(rng.head, min(rng.tail, rng.head + n)):
            lmdb_key = prefix + _SEQ.pack(seq)
            value = overlay.get(lmdb_key)
            if value is None:
                # Committed items come first (a contiguous run from the head): read
                # them in chunks, past those consumed but not yet deleted on disk.
                if disk is None:
                    disk = self._store.iter_items(_DB, prefix)
                value = self._disk_value(disk, lmdb_key)
            yield seq, value

    @staticmethod
    def _disk_value(disk: Iterator[tuple[bytes, bytes]], lmdb_key: bytes) -> bytes:
        for key, value in disk:
            if key == lmdb_key:
                return value
            if key > lmdb_key:
                break
        raise SpillError(f"spilled item {lmdb_key!r} is missing: the spill db was altered")

    def _consume(self, key: bytes, rng: _Range, n: int) -> None:
        """Remove the ``n`` oldest items of the mailbox."""
        prefix = key + _SEP
        overlay, inflight = self._overlay, self._inflight
        for seq in range(rng.head, rng.head + n):
            lmdb_key = prefix + _SEQ.pack(seq)
            if overlay.get(lmdb_key) is not None and lmdb_key not in inflight:
                del overlay[lmdb_key]  # never left this process: nothing to delete
                rng.ops -= 1
            else:
                if lmdb_key not in overlay:
                    rng.ops += 1
                overlay[lmdb_key] = None
        rng.head += n
        self._forget_if_idle(key, rng)

    def _op_done(self, lmdb_key: bytes) -> None:
        key = lmdb_key[: -_SEQ.size - 1]
        rng = self._ranges.get(key)
        if rng is not None:
            rng.ops -= 1
            self._forget_if_idle(key, rng)

    def _forget_if_idle(self, key: bytes, rng: _Range) -> None:
        if rng.head == rng.tail and rng.ops == 0 and self._ranges.get(key) is rng:
            del self._ranges[key]


# --------------------------------------------------------------------- mailbox


class Mailbox(Generic[T]):
    """A bounded FIFO of opaque items with an overflow strategy (see the module docs).

    ``spill``, ``key``, ``encode`` and ``decode`` are needed by (and only used by)
    the ``spill_to_disk`` strategy; ``decode(encode(item))`` must equal ``item``.
    A spilling mailbox whose key has a spilled backlog (after a restart) starts
    over, with that backlog pending. Used from one thread.
    """

    __slots__ = (
        "__weakref__",
        "_accepted",
        "_capacity",
        "_decode",
        "_dropped",
        "_encode",
        "_error",
        "_items",
        "_key",
        "_low",
        "_over",
        "_policy",
        "_range",
        "_redirected",
        "_rejected",
        "_spill",
        "_spilled",
        "_strategy",
        "_undecodable",
    )

    def __init__(
        self,
        policy: MailboxPolicy | Mapping[str, Any] | None = None,
        *,
        spill: SpillStore | None = None,
        key: bytes | None = None,
        encode: Callable[[T], bytes] | None = None,
        decode: Callable[[bytes], T] | None = None,
    ) -> None:
        self._policy = MailboxPolicy() if policy is None else MailboxPolicy.parse(policy)
        self._strategy = self._policy.strategy
        self._capacity = self._policy.capacity
        self._low = self._policy.low
        self._items: deque[T] = deque()
        self._over = False
        self._error: SpillError | None = None
        self._accepted = self._dropped = self._rejected = 0
        self._spilled = self._redirected = self._undecodable = 0
        self._spill: SpillStore | None = None
        self._range = _Range(0, 0)
        self._key = b""
        self._encode: Callable[[T], bytes] | None = None
        self._decode: Callable[[bytes], T] | None = None
        if self._strategy is Strategy.SPILL_TO_DISK:
            self._setup_spill(spill, key, encode, decode)

    def _setup_spill(
        self,
        spill: SpillStore | None,
        key: bytes | None,
        encode: Callable[[T], bytes] | None,
        decode: Callable[[bytes], T] | None,
    ) -> None:
        if not isinstance(spill, SpillStore):
            raise TypeError(f"strategy spill_to_disk needs spill=SpillStore, got {spill!r}")
        if not callable(encode) or not callable(decode):
            raise TypeError("strategy spill_to_disk needs callable encode and decode")
        self._key = _check_mailbox_key(key)
        self._range = spill._attach(self._key, self)
        self._spill, self._encode, self._decode = spill, encode, decode
        # A backlog left by an earlier process is older than anything offered now.
        self._over = self._on_disk() > 0

    def _on_disk(self) -> int:
        return self._range.tail - self._range.head

    # ------------------------------------------------------------ offer

    def offer(self, item: T) -> Offer[T]:
        """Queue ``item`` or not, per the policy; memory never exceeds ``capacity`` items."""
        strategy = self._strategy
        if self._over:
            # Invariant: only over mailboxes have spilled items, so FIFO holds.
            if strategy is Strategy.SPILL_TO_DISK:
                return self._spill_one(item)
            if strategy is Strategy.REJECT:
                self._rejected += 1
                return _REJECTED
            if strategy is Strategy.REDIRECT:
                self._redirected += 1
                return Offer(Outcome.REDIRECTED, False, redirect_to=self._policy.redirect_to)
        items = self._items
        if len(items) >= self._capacity:
            # Only the drop strategies get here: the others are over at capacity.
            self._dropped += 1
            if strategy is Strategy.DROP_NEWEST:
                return Offer(Outcome.DROPPED, False, dropped=item)
            oldest = items.popleft()
            items.append(item)
            self._accepted += 1
            return Offer(Outcome.DROPPED, True, dropped=oldest)
        items.append(item)
        self._accepted += 1
        if len(items) >= self._capacity:
            self._over = True
        return _ACCEPTED

    def _spill_one(self, item: T) -> Offer[T]:
        assert self._spill is not None and self._encode is not None
        data = self._encode(item)
        if not isinstance(data, bytes):
            raise TypeError(f"the mailbox's encode() returned {type(data).__name__}, not bytes")
        self._spill._append(self._key, self._range, data)
        self._spilled += 1
        return _SPILLED

    # ------------------------------------------------------------- take

    def take(self, n: int) -> list[T]:
        """Up to ``n`` items, oldest first (from memory, then from the spilled backlog).

        Raises SpillError for a spilled item that does not decode; that item is gone,
        the ones around it are not (an error met after some items were taken is
        raised by the next call).
        """
        if type(n) is not int or n < 0:
            raise ValueError(f"take() needs an int n >= 0, got {n!r}")
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        items, low = self._items, self._low
        out: list[T] = []
        while len(out) < n:
            if len(items) <= low and self._on_disk() and not self._refill(out):
                break
            if not items:
                break
            out.append(items.popleft())
        if len(items) <= low and self._on_disk() and self._error is None:
            self._refill(out)
        if len(items) <= low and not self._on_disk():
            self._over = False
        return out

    def _refill(self, out: list[T]) -> bool:
        """Move spilled items into memory, up to capacity; False after a decode error."""
        assert self._spill is not None and self._decode is not None
        spill, rng, items = self._spill, self._range, self._items
        taken = 0
        try:
            for seq, data in spill._peek(self._key, rng, self._capacity - len(items)):
                taken += 1
                try:
                    item = self._decode(data)
                except Exception as exc:
                    self._undecodable += 1
                    raise SpillError(
                        f"spilled item {seq} of mailbox {self._key!r} does not decode: {exc!r}"
                    ) from exc
                items.append(item)
        except SpillError as exc:
            spill._consume(self._key, rng, taken)
            if not out:
                raise
            self._error = exc
            return False
        spill._consume(self._key, rng, taken)
        return True

    def clear(self) -> list[T]:
        """Remove and return every item, spilled ones included, oldest first.

        For failure paths (e.g. passivation failed and the asks must be answered):
        an undecodable spilled item is skipped (and counted in ``undecodable``)
        instead of raising.
        """
        self._error = None
        out: list[T] = []
        while self.pending:
            try:
                out.extend(self.take(self.pending))
            except SpillError:
                pass
            self._error = None
        self._over = False
        return out

    # ------------------------------------------------------- statistics

    @property
    def policy(self) -> MailboxPolicy:
        return self._policy

    @property
    def key(self) -> bytes | None:
        """The spill key, None unless the strategy is spill_to_disk."""
        return self._key if self._spill is not None else None

    def __len__(self) -> int:
        """Items in memory."""
        return len(self._items)

    @property
    def pending(self) -> int:
        """Items waiting, in memory and spilled."""
        return len(self._items) + self._on_disk()

    @property
    def over(self) -> bool:
        """Reached capacity and not yet drained to the low watermark."""
        return self._over

    @property
    def accepted(self) -> int:
        """Offers queued in memory (drop_oldest's included)."""
        return self._accepted

    @property
    def dropped(self) -> int:
        """Items dropped by drop_oldest or drop_newest."""
        return self._dropped

    @property
    def rejected(self) -> int:
        return self._rejected

    @property
    def spilled(self) -> int:
        """Offers written to disk."""
        return self._spilled

    @property
    def redirected(self) -> int:
        return self._redirected

    @property
    def undecodable(self) -> int:
        """Spilled items lost because ``decode`` failed on them."""
        return self._undecodable

    def __repr__(self) -> str:
        return (
            f"<Mailbox {self._policy.strategy.value} {len(self._items)}/{self._capacity}"
            f" pending={self.pending}{' over' if self._over else ''}>"
        )
