"""Causal delivery of point-to-point messages (Raynal, Schiper and Toueg, 1991).

A *process* is anything that sends or receives messages (an agent, a client),
named by a ``str`` id. A receiver delays a message until every message that
causally precedes it *and is addressed to the same receiver* has been
delivered; messages to other receivers never hold it back.

Each process keeps a :class:`CausalClock`: the matrix ``SENT[src][dst]`` of how
many messages it knows ``src`` sent to ``dst`` (its own sends plus what it
learned from delivered messages). ``stamp(dest)`` counts one more message
``me -> dest`` and returns the matrix as a stamp carried by that message, so the
stamp's ``SENT[sender][dest]`` is the message's sequence number on its channel.
A receiver that also owns a :class:`CausalInbox` (the delivered counters
``DELIV[src]``) delivers a message from ``s`` stamped ``ST`` when::

    DELIV[s] == ST[s][me] - 1          (FIFO on the channel s -> me)
    DELIV[k] >= ST[k][me]  for k != s  (everything sent to me before it, causally)

and then merges ``SENT := max(SENT, ST)``. The inbox calls its clock's merge
itself: give it the receiver's clock, and do not also call
:meth:`CausalClock.deliver` for stamps that went through the inbox.

Usage rules:

- Stamp each message once, when it is first sent, and keep the stamp bytes with
  the message: a retransmission reuses them (a new ``stamp()`` is a new message).
- Persist the sender's clock before (or in the same transaction as) the message
  leaves: a clock restored from an older save would reuse sequence numbers, and
  receivers drop the new messages as duplicates.
- The receiver saves the clock and the inbox in the same transaction as the
  effects of the delivered messages. Items still waiting are *not* saved: after a
  restart they are gone, and the senders' at-least-once retransmission brings them
  back (the inbox drops the copies it already delivered, by sender and sequence).

Growth and pruning: the clock holds one counter per (sender, destination) pair
in its causal past and every stamp carries all of them, so stamps grow with the
number of channels that ever carried traffic, up to P*P for P processes (a stamp
counts a few bytes per pair; no differential encoding is done). ``prune(ids)``
forgets processes that are gone for good: their pairs are dropped, their ids are
kept in a small *retired* set (one string each) so that stamps still naming them
neither re-grow the matrix nor block delivery, messages *from* a retired process
are discarded, and sending *to* one is an error. Never reuse a pruned id (put the
incarnation in ids); prune only once the process's messages have been drained.

Wire format of a stamp (version 1)::

    msgpack array [1, names, sender, dest, flat]

``names`` is an array of distinct process ids (non-empty str, at most
:data:`MAX_ID_BYTES` UTF-8 bytes); ``sender`` and ``dest`` index it; ``flat`` is
``[src, dst, count, ...]`` (indices into ``names``, ``1 <= count < 2**64``, each
pair at most once, zero pairs omitted) and must count the message itself
(``(sender, dest)`` present). Saved clock: ``[1, me, names, flat, retired]``;
saved inbox: ``[1, me, [sender, count, ...]]``; both canonical (sorted). Any
input longer than :data:`MAX_ENCODED_BYTES` or malformed in any way raises
:class:`CausalDecodeError`, whatever the bytes.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, TypeVar

import msgpack

from ._errors import AgentError

__all__ = [
    "MAX_ENCODED_BYTES",
    "MAX_ID_BYTES",
    "CausalClock",
    "CausalDecodeError",
    "CausalError",
    "CausalInbox",
    "InboxFullError",
    "InboxStatistics",
    "StampError",
]

MAX_ENCODED_BYTES = 64 * 1024 * 1024
MAX_ID_BYTES = 256
_VERSION = 1
_UINT64_MAX = 2**64 - 1

T = TypeVar("T")
_Matrix = dict[tuple[str, str], int]


class CausalError(AgentError):
    """Base class of the errors of causal delivery."""


class CausalDecodeError(CausalError, ValueError):
    """Bytes are not a valid stamp or saved state (the message says what is wrong)."""


class StampError(CausalError, ValueError):
    """A well-formed stamp that this process must refuse (addressed to someone else)."""


class InboxFullError(CausalError):
    """An item would have to wait but ``max_waiting`` items already wait.

    The item is not kept and the inbox is unchanged: treat it as backpressure
    (do not acknowledge the message, so that the sender retransmits it later).
    Items that are deliverable at once are always accepted.
    """


def _check_id(process_id: object, what: str) -> str:
    if not isinstance(process_id, str):
        raise TypeError(f"{what} must be a str, got {type(process_id).__name__}")
    if not process_id:
        raise ValueError(f"{what} must not be empty")
    try:
        size = len(process_id.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{what} {process_id!r} is not valid UTF-8 text") from None
    if size > MAX_ID_BYTES:
        raise ValueError(f"{what} is {size} UTF-8 bytes, more than {MAX_ID_BYTES}")
    return process_id


def _check_ids(process_ids: Iterable[str], what: str) -> set[str]:
    if isinstance(process_ids, str):
        raise TypeError(f"{what} must be an iterable of ids, not a single str")
    return {_check_id(p, what) for p in process_ids}


# --- wire ----------------------------------------------------------------------------


def _bad(what: str, problem: str) -> NoReturn:
    raise CausalDecodeError(f"malformed {what}: {problem}")


def _refuse_ext(code: int, _data: bytes) -> NoReturn:
    raise CausalDecodeError(f"msgpack ext type {code} is not allowed")


def _unpack(data: object, what: str, length: int) -> list[Any]:
    """Decode a msgpack array of ``length`` elements with version 1 first."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, got {type(data).__name__}")
    if len(data) > MAX_ENCODED_BYTES:
        _bad(what, f"{len(data)} bytes, more than {MAX_ENCODED_BYTES}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
    except CausalDecodeError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as exc:
        _bad(what, f"not msgpack ({type(exc).__name__})")
    if not isinstance(obj, list) or len(obj) != length:
        _bad(what, f"expected an array of {length} elements")
    if type(obj[0]) is not int or obj[0] != _VERSION:
        _bad(what, f"unsupported version {obj[0]!r}")
    return obj


def _wire_id(value: object, what: str) -> str:
    try:
        return _check_id(value, "process id")
    except (TypeError, ValueError) as exc:
        _bad(what, str(exc))


def _wire_ids(value: object, what: str) -> list[str]:
    if not isinstance(value, list):
        _bad(what, "process ids must be an array")
    ids = [_wire_id(v, what) for v in value]
    if len(set(ids)) != len(ids):
        _bad(what, "duplicate process id")
    return ids


def _wire_int(value: object, low: int, high: int, what: str) -> int:
    if type(value) is not int or not low <= value <= high:
        _bad(what, f"expected an int in [{low}, {high}], got {value!r}")
    return value


def _wire_matrix(names: list[str], flat: object, what: str) -> _Matrix:
    if not isinstance(flat, list) or len(flat) % 3:
        _bad(what, "counts must be an array of [src, dst, count] triples")
    last = len(names) - 1
    matrix: _Matrix = {}
    for i in range(0, len(flat), 3):
        src = names[_wire_int(flat[i], 0, last, what)]
        dst = names[_wire_int(flat[i + 1], 0, last, what)]
        if (src, dst) in matrix:
            _bad(what, f"pair {src!r} -> {dst!r} counted twice")
        matrix[src, dst] = _wire_int(flat[i + 2], 1, _UINT64_MAX, what)
    return matrix


def _flatten(matrix: _Matrix, first: Iterable[str], canonical: bool) -> tuple[list[str], list[int]]:
    """Names (``first`` ones leading) and the flat triples of a matrix."""
    index: dict[str, int] = {}
    for name in first:
        index.setdefault(name, len(index))
    pairs: Iterable[tuple[tuple[str, str], int]] = matrix.items()
    if canonical:
        for src, dst in sorted(matrix):
            index.setdefault(src, len(index))
            index.setdefault(dst, len(index))
        pairs = sorted(pairs)
    flat: list[int] = []
    for (src, dst), count in pairs:
        i = index.setdefault(src, len(index))
        j = index.setdefault(dst, len(index))
        flat += (i, j, count)
    return list(index), flat


def _parse_stamp(stamp: object) -> tuple[str, str, _Matrix]:
    what = "stamp"
    _, names_obj, sender_i, dest_i, flat = _unpack(stamp, what, 5)
    names = _wire_ids(names_obj, what)
    if not names:
        _bad(what, "no process ids")
    sender = names[_wire_int(sender_i, 0, len(names) - 1, what)]
    dest = names[_wire_int(dest_i, 0, len(names) - 1, what)]
    matrix = _wire_matrix(names, flat, what)
    if (sender, dest) not in matrix:
        _bad(what, "it does not count its own message")
    return sender, dest, matrix


# --- clock ---------------------------------------------------------------------------


class CausalClock:
    """One process's knowledge of who sent how many messages to whom."""

    __slots__ = ("_me", "_retired", "_sent")

    def __init__(self, me: str) -> None:
        self._me = _check_id(me, "me")
        self._sent: _Matrix = {}
        self._retired: set[str] = set()

    @property
    def me(self) -> str:
        return self._me

    @property
    def known_pairs(self) -> int:
        """How many (sender, destination) counters the clock holds: a stamp's size."""
        return len(self._sent)

    @property
    def retired(self) -> frozenset[str]:
        """Ids dropped by :meth:`prune`."""
        return frozenset(self._retired)

    def sent(self, src: str, dst: str) -> int:
        """How many messages ``src -> dst`` this process knows of."""
        return self._sent.get((src, dst), 0)

    def stamp(self, dest: str) -> bytes:
        """Record one message ``me -> dest`` and return its stamp (see module docstring)."""
        _check_id(dest, "dest")
        if dest in self._retired:
            raise ValueError(f"cannot send to {dest!r}: the process was pruned")
        key = (self._me, dest)
        count = self._sent.get(key, 0) + 1
        if count > _UINT64_MAX:
            raise OverflowError(f"more than 2**64 - 1 messages {self._me!r} -> {dest!r}")
        self._sent[key] = count
        names, flat = _flatten(self._sent, (self._me, dest), canonical=False)
        return msgpack.packb([_VERSION, names, 0, 1 if dest != self._me else 0, flat])

    def deliver(self, stamp: bytes) -> None:
        """Merge the knowledge of a message delivered to ``me`` (idempotent).

        Only for receivers without a :class:`CausalInbox`; the inbox merges itself.
        Raises :class:`CausalDecodeError` or :class:`StampError` (not addressed to me).
        """
        _sender, dest, matrix = _parse_stamp(stamp)
        if dest != self._me:
            raise StampError(f"stamp is addressed to {dest!r}, not {self._me!r}")
        self._merge(matrix)

    def _merge(self, matrix: _Matrix) -> None:
        sent, retired = self._sent, self._retired
        for key, count in matrix.items():
            if count > sent.get(key, 0) and not (
                retired and (key[0] in retired or key[1] in retired)
            ):
                sent[key] = count

    def prune(self, process_ids: Iterable[str]) -> None:
        """Forget processes that are gone for good (see module docstring)."""
        gone = _check_ids(process_ids, "process_ids")
        if self._me in gone:
            raise ValueError(f"a process cannot prune itself ({self._me!r})")
        self._retired |= gone
        self._sent = {k: c for k, c in self._sent.items() if k[0] not in gone and k[1] not in gone}

    def encode(self) -> bytes:
        """Canonical bytes of the clock, for saving with the process's state."""
        names, flat = _flatten(self._sent, (), canonical=True)
        return msgpack.packb([_VERSION, self._me, names, flat, sorted(self._retired)])

    @classmethod
    def decode(cls, data: bytes) -> CausalClock:
        """Rebuild a clock from :meth:`encode`'s bytes; :class:`CausalDecodeError` if bad."""
        what = "saved clock"
        _, me, names_obj, flat, retired_obj = _unpack(data, what, 5)
        clock = cls(_wire_id(me, what))
        clock._sent = _wire_matrix(_wire_ids(names_obj, what), flat, what)
        clock._retired = set(_wire_ids(retired_obj, what))
        if clock._me in clock._retired:
            _bad(what, "the clock's own id is retired")
        if any(s in clock._retired or d in clock._retired for s, d in clock._sent):
            _bad(what, "a retired id still has counters")
        return clock

    def __repr__(self) -> str:
        return f"CausalClock({self._me!r}, known_pairs={len(self._sent)})"


# --- inbox ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InboxStatistics:
    """Counters of one :class:`CausalInbox` since it was created (not saved)."""

    waiting: int
    max_waiting: int
    delivered: int
    duplicates: int
    stale: int  # messages from pruned processes, discarded


class _Waiting(Generic[T]):
    __slots__ = ("deps", "item", "matrix", "sender", "seq")

    def __init__(self, sender: str, seq: int, deps: dict[str, int], matrix: _Matrix, item: T):
        self.sender = sender
        self.seq = seq
        self.deps = deps  # process -> how many of its messages to me must be delivered first
        self.matrix = matrix
        self.item = item


class CausalInbox(Generic[T]):
    """The receiving side of one process: holds back items until causally deliverable.

    ``clock`` must be the same process's :class:`CausalClock`: the inbox merges
    each delivered item's stamp into it. Not thread-safe.
    """

    __slots__ = (
        "_blocked",
        "_clock",
        "_delivered",
        "_duplicates",
        "_max_waiting",
        "_me",
        "_pending",
        "_stale",
        "_tick",
        "_total",
    )

    def __init__(self, me: str, clock: CausalClock, *, max_waiting: int = 10_000) -> None:
        _check_id(me, "me")
        if not isinstance(clock, CausalClock):
            raise TypeError(f"clock must be a CausalClock, got {type(clock).__name__}")
        if clock.me != me:
            raise ValueError(f"clock belongs to {clock.me!r}, not {me!r}")
        if type(max_waiting) is not int or max_waiting < 1:
            raise ValueError(f"max_waiting must be an int >= 1, got {max_waiting!r}")
        self._me = me
        self._clock = clock
        self._max_waiting = max_waiting
        self._delivered: dict[str, int] = {}
        self._pending: dict[tuple[str, int], _Waiting[T]] = {}
        # Waiting items indexed by the one counter they wait for: when DELIV[k] grows,
        # only the items blocked on k are looked at again, never the whole buffer.
        self._blocked: dict[str, list[tuple[int, int, _Waiting[T]]]] = {}
        self._tick = itertools.count()
        self._total = self._duplicates = self._stale = 0

    @property
    def me(self) -> str:
        return self._me

    @property
    def waiting(self) -> int:
        """How many items are held back."""
        return len(self._pending)

    def delivered(self, sender: str) -> int:
        """How many messages from ``sender`` were delivered here."""
        return self._delivered.get(sender, 0)

    def statistics(self) -> InboxStatistics:
        return InboxStatistics(
            waiting=len(self._pending),
            max_waiting=self._max_waiting,
            delivered=self._total,
            duplicates=self._duplicates,
            stale=self._stale,
        )

    def offer(self, stamp: bytes, item: T) -> list[T]:
        """Take one received message; returns the items now deliverable, in causal order.

        ``[]`` when ``item`` must wait, is a duplicate (same sender and sequence as one
        delivered or waiting), or comes from a pruned process. Raises
        :class:`CausalDecodeError` for a malformed stamp, :class:`StampError` for one
        addressed to another process, :class:`InboxFullError` (inbox unchanged) when
        the item would wait but ``max_waiting`` items already do.
        """
        sender, dest, matrix = _parse_stamp(stamp)
        if dest != self._me:
            raise StampError(f"stamp is addressed to {dest!r}, not {self._me!r}")
        if sender in self._clock._retired:
            self._stale += 1
            return []
        seq = matrix[sender, dest]
        if seq <= self._delivered.get(sender, 0) or (sender, seq) in self._pending:
            self._duplicates += 1
            return []
        deps = {src: n for (src, dst), n in matrix.items() if dst == self._me}
        deps[sender] = seq - 1
        waiting = _Waiting(sender, seq, deps, matrix, item)
        out: list[T] = []
        blocker = self._blocker(waiting)
        if blocker is None:
            self._release(waiting, out)
        elif len(self._pending) >= self._max_waiting:
            raise InboxFullError(
                f"{self._me!r}: {len(self._pending)} items already wait (max_waiting); "
                f"message {seq} from {sender!r} refused"
            )
        else:
            self._pending[sender, seq] = waiting
            self._park(waiting, blocker)
        return out

    def was_delivered(self, stamp: bytes) -> bool:
        """True if the message carrying ``stamp`` was delivered already (a duplicate the
        receiver should acknowledge again); raises like :meth:`offer` for a bad stamp."""
        sender, dest, matrix = _parse_stamp(stamp)
        if dest != self._me:
            raise StampError(f"stamp is addressed to {dest!r}, not {self._me!r}")
        return matrix[sender, dest] <= self._delivered.get(sender, 0)

    def _blocker(self, waiting: _Waiting[T]) -> tuple[str, int] | None:
        """The first counter ``waiting`` still waits for, or None if deliverable."""
        delivered, retired = self._delivered, self._clock._retired
        for src, need in waiting.deps.items():
            if delivered.get(src, 0) < need and src not in retired:
                return src, need
        return None

    def _park(self, waiting: _Waiting[T], blocker: tuple[str, int]) -> None:
        src, need = blocker
        heapq.heappush(self._blocked.setdefault(src, []), (need, next(self._tick), waiting))

    def _release(self, first: _Waiting[T], out: list[T]) -> None:
        """Deliver ``first`` and then every waiting item that this unblocks."""
        ready = deque([first])
        while ready:
            waiting = ready.popleft()
            self._delivered[waiting.sender] = waiting.seq
            self._clock._merge(waiting.matrix)
            self._total += 1
            out.append(waiting.item)
            heap = self._blocked.get(waiting.sender)
            while heap and heap[0][0] <= waiting.seq:
                woken = heapq.heappop(heap)[2]
                blocker = self._blocker(woken)
                if blocker is None:
                    del self._pending[woken.sender, woken.seq]
                    ready.append(woken)
                else:
                    self._park(woken, blocker)
            if heap is not None and not heap:
                del self._blocked[waiting.sender]

    def prune(self, process_ids: Iterable[str]) -> list[T]:
        """Forget processes gone for good, in this inbox and its clock.

        Their waiting messages are discarded; items that waited only for them are
        delivered and returned, in causal order.
        """
        gone = _check_ids(process_ids, "process_ids")
        self._clock.prune(gone)
        for process_id in gone:
            self._delivered.pop(process_id, None)
        survivors = [w for w in self._pending.values() if w.sender not in gone]
        self._stale += len(self._pending) - len(survivors)
        self._pending, self._blocked = {}, {}
        out: list[T] = []
        for waiting in survivors:
            # Re-admitted one by one: a survivor released here only wakes survivors
            # already parked again, and later ones see the counters it advanced.
            blocker = self._blocker(waiting)
            if blocker is None:
                self._release(waiting, out)
            else:
                self._pending[waiting.sender, waiting.seq] = waiting
                self._park(waiting, blocker)
        return out

    def encode(self) -> bytes:
        """Canonical bytes of the delivered counters (waiting items are not saved)."""
        flat: list[Any] = []
        for sender in sorted(self._delivered):
            flat += (sender, self._delivered[sender])
        return msgpack.packb([_VERSION, self._me, flat])

    @classmethod
    def decode(
        cls, data: bytes, clock: CausalClock, *, max_waiting: int = 10_000
    ) -> CausalInbox[Any]:
        """Rebuild an inbox (empty of waiting items) from :meth:`encode`'s bytes."""
        what = "saved inbox"
        _, me, flat = _unpack(data, what, 3)
        inbox: CausalInbox[Any] = cls(_wire_id(me, what), clock, max_waiting=max_waiting)
        if not isinstance(flat, list) or len(flat) % 2:
            _bad(what, "counters must be an array of sender, count pairs")
        for i in range(0, len(flat), 2):
            sender = _wire_id(flat[i], what)
            if sender in inbox._delivered:
                _bad(what, f"sender {sender!r} counted twice")
            inbox._delivered[sender] = _wire_int(flat[i + 1], 1, _UINT64_MAX, what)
        return inbox

    def __repr__(self) -> str:
        return f"CausalInbox({self._me!r}, waiting={len(self._pending)})"
