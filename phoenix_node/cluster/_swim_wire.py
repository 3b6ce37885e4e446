"""Plain data of the SWIM membership protocol: its configuration, identities,
records and their merge order, and the wire format.

Everything here is plain data: no clock, no randomness, no state machine (that
is :mod:`.membership`). A message is a msgpack *map* whose exact key set
depends on its kind; the transport packs and unpacks it, this module turns the
decoded value into a :class:`Message` and back.

Wire format, version 1
----------------------
Common keys of every message::

    {"v": 1, "kind": KIND, "from": RECORD, "gossip": [RECORD, ...], ...}

- ``from``: the sender's own record. It is authoritative about the sender (the
  only node that bumps its own version), so every message is also a heartbeat
  and a refutation channel. Its address must equal the transport address the
  message came from.
- ``gossip``: at most :data:`MAX_GOSSIP` piggybacked membership updates.

``RECORD`` is ``[NODE_ID, STATE, VERSION]``: ``NODE_ID`` is the text form of a
:class:`NodeId` (``"tcp://HOST:PORT#INCARNATION"``), ``STATE`` one of the
:class:`MemberState` values (``"joining"``, ``"up"``, ``"suspect"``,
``"down"``, ``"leaving"``, ``"removed"``), ``VERSION`` an int in
``0..2**63-1`` (SWIM's per-member incarnation *number*).

Kinds and their extra keys:

=============  ======================  =========================================
kind           extra keys              meaning
=============  ======================  =========================================
``ping``       ``seq``, ``target``     are you alive? ``target`` is the NodeId
                                       the prober believes lives at the address
``ack``        ``seq``, ``target``     ``target`` is alive; ``seq`` echoes the
                                       ping (or, relayed, the ping-req)
``ping-req``   ``seq``, ``target``     please ping ``target`` for me and relay
                                       its ack (SWIM's indirect probe)
``join``       (none)                  ``from`` is the joiner's record
``sync``       ``members``             push-pull: my full member list
``sync-reply`` ``members``             the receiver's full list, in answer
=============  ======================  =========================================

``seq`` is an int in ``0..2**63-1``; ``members`` a list of at most
:data:`MAX_MEMBERS_WIRE` records. Unknown keys, missing keys, unknown kinds,
other versions, wrong types, bad node ids and oversized lists are all refused
with :class:`MembershipProtocolError`; arrays may arrive as lists or tuples
(``use_list=False``). A later version of the protocol bumps ``v``.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

__all__ = [
    "MAX_ADDRESS",
    "MAX_GOSSIP",
    "MAX_MEMBERS_WIRE",
    "MAX_VERSION",
    "WIRE_VERSION",
    "InvalidNodeIdError",
    "Member",
    "MemberState",
    "MembershipError",
    "MembershipEvent",
    "MembershipProtocolError",
    "Message",
    "NodeId",
    "Outgoing",
    "Record",
    "SwimConfig",
    "beats",
    "check_address",
    "decode",
    "encode",
]

WIRE_VERSION = 1
#: hard protocol limit on piggybacked updates per message
MAX_GOSSIP = 64
#: hard protocol limit on the records of a sync / sync-reply
MAX_MEMBERS_WIRE = 4096
#: largest address, in characters
MAX_ADDRESS = 255
#: largest incarnation, version and seq (they fit a signed 64-bit msgpack int)
MAX_VERSION = 2**63 - 1

KINDS = ("ping", "ack", "ping-req", "join", "sync", "sync-reply")
_PROBE_KINDS = frozenset(("ping", "ack", "ping-req"))
_LIST_KINDS = frozenset(("sync", "sync-reply"))
_COMMON_KEYS = frozenset(("v", "kind", "from", "gossip"))
_SECONDS = (
    "probe_interval",
    "probe_timeout",
    "suspicion_mult",
    "sync_interval",
    "reconnect_interval",
    "tombstone_ttl",
    "join_retry",
    "join_retry_max",
)
_KEYS = {
    kind: _COMMON_KEYS
    | ({"seq", "target"} if kind in _PROBE_KINDS else {"members"} if kind in _LIST_KINDS else set())
    for kind in KINDS
}

# host: a DNS name / IPv4 literal, or a bracketed IPv6 literal; port 1..65535
# (0 and * mean "any port" to ZeroMQ's bind, which is no address to reach a member at).
_ADDRESS_RE = re.compile(
    r"tcp://(?:[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):([1-9][0-9]{0,4})"
)
_DECIMAL_RE = re.compile(r"0|[1-9][0-9]{0,18}")


class MembershipError(Exception):
    """Base class of every error of :mod:`phoenix_node.cluster.membership`."""


class MembershipProtocolError(MembershipError, ValueError):
    """A received membership message is malformed or hostile; it changed nothing."""


class InvalidNodeIdError(MembershipError, ValueError):
    """A node id or member address is malformed."""


@dataclass(frozen=True, slots=True)
class SwimConfig:
    """Timing and limits of the membership protocol (all times in seconds).

    - ``probe_interval`` (0.5): the protocol period; one probe per period.
    - ``probe_timeout`` (0.2): wait this long for a direct ack before the
      indirect probes; must be shorter than the period (one network round trip
      plus scheduling slack).
    - ``indirect_probes`` (3): members asked to ping a silent target (ping-req).
    - ``suspicion_mult`` (4): suspicion timeout =
      ``suspicion_mult * max(1, log10(n)) * probe_interval``, n = live members
      (2 s for up to 10 members, 4 s for 100, 6 s for 1000).
    - ``retransmit_mult`` (4): each update is piggybacked
      ``retransmit_mult * ceil(log10(n + 1))`` times by every node that learns it.
    - ``max_piggyback`` (8): updates per message (at most 64).
    - ``sync_interval`` (5.0): push-pull full-state sync with a random member.
    - ``reconnect_interval`` (2.0): sync with a random down member or seed.
    - ``tombstone_ttl`` (60.0): how long down/removed records are kept, so that
      stale gossip cannot resurrect them and down members are retried.
    - ``join_retry`` (0.5) doubling to ``join_retry_max`` (8.0): join resends.
    - ``join_timeout`` (30.0): become up alone when no seed answers (``inf``:
      wait forever).
    - ``max_members`` (1000, at most 4096): records kept, this node included.
    - ``max_relays`` (64): pending indirect probes this node runs for others.

    Detection time: the first node whose round-robin reaches a crashed member
    finds it silent within a period and suspects it; it is down
    ``suspicion_timeout(n)`` later there, and about as soon elsewhere (each
    node that hears the suspicion runs its own timer, and the down record is
    gossiped). With ``n - 1`` probers the first probe usually comes within a
    period or two: about 1.5 periods + the suspicion timeout, 3 s for 5
    members (simulated with 10 ms links: p50 2.9 s, p99 4.5 s). Without loss
    every member sees it down within :meth:`detection_bound`,
    ``(2n + 1) * probe_interval + suspicion_timeout(n)`` (7.5 s for 5 members).
    """

    probe_interval: float = 0.5
    probe_timeout: float = 0.2
    indirect_probes: int = 3
    suspicion_mult: float = 4.0
    retransmit_mult: int = 4
    max_piggyback: int = 8
    sync_interval: float = 5.0
    reconnect_interval: float = 2.0
    tombstone_ttl: float = 60.0
    join_retry: float = 0.5
    join_retry_max: float = 8.0
    join_timeout: float = 30.0
    max_members: int = 1000
    max_relays: int = 64

    def __post_init__(self) -> None:
        for name in _SECONDS:
            _check_seconds(name, getattr(self, name), allow_inf=False)
        _check_seconds("join_timeout", self.join_timeout, allow_inf=True)
        if self.probe_timeout >= self.probe_interval:
            raise ValueError(
                f"probe_timeout ({self.probe_timeout}) must be shorter than "
                f"probe_interval ({self.probe_interval})"
            )
        if self.join_retry_max < self.join_retry:
            raise ValueError("join_retry_max must be at least join_retry")
        _check_int("indirect_probes", self.indirect_probes, 0, 16)
        _check_int("retransmit_mult", self.retransmit_mult, 1, 100)
        _check_int("max_piggyback", self.max_piggyback, 0, MAX_GOSSIP)
        _check_int("max_members", self.max_members, 2, MAX_MEMBERS_WIRE)
        _check_int("max_relays", self.max_relays, 0, 10_000)

    def suspicion_timeout(self, n: int) -> float:
        """Seconds from suspect to down with ``n`` live members."""
        return self.suspicion_mult * max(1.0, math.log10(max(n, 1))) * self.probe_interval

    def retransmit_limit(self, n: int) -> int:
        """How many times each node piggybacks one update, with ``n`` members."""
        return self.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))

    def detection_bound(self, n: int) -> float:
        """Bound on crash-to-down at every live member of ``n`` (no loss, no partition).

        A round-robin reaches each member at most ``2n - 3`` periods apart (the
        member last in one shuffled round, first in the next); one period to find
        it silent, the suspicion timeout, and 3 periods for the down record to spread.
        """
        return (2 * n + 1) * self.probe_interval + self.suspicion_timeout(n)


def _check_seconds(name: str, value: Any, *, allow_inf: bool) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"SwimConfig.{name} must be a number, got {type(value).__name__}")
    if not value > 0 or (math.isinf(value) and not allow_inf):
        raise ValueError(f"SwimConfig.{name} must be a positive finite number, got {value}")


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"SwimConfig.{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"SwimConfig.{name} must be in {low}..{high}, got {value}")


class MemberState(enum.StrEnum):
    """The state of a member as one node sees it.

    ``joining``: announced itself, has not received the member list yet (not
    serving). ``up``: alive. ``suspect``: a probe failed; alive until its
    suspicion timeout, unless it refutes. ``down``: declared failed (it can
    still refute with a higher version, e.g. after a partition heals).
    ``leaving``: handing its work off, still serving. ``removed``: left the
    cluster or was superseded by a higher incarnation; final for that NodeId.
    """

    JOINING = "joining"
    UP = "up"
    SUSPECT = "suspect"
    DOWN = "down"
    LEAVING = "leaving"
    REMOVED = "removed"


_STATES = {state.value: state for state in MemberState}


def check_address(address: object) -> str:
    """Return ``address`` if it is a member address ``tcp://HOST:PORT``, else raise."""
    if not isinstance(address, str):
        raise InvalidNodeIdError(f"member address must be a str, got {type(address).__name__}")
    if len(address) > MAX_ADDRESS:
        raise InvalidNodeIdError(f"member address is longer than {MAX_ADDRESS} characters")
    match = _ADDRESS_RE.fullmatch(address)
    if match is None or int(match.group(1)) > 65535:
        raise InvalidNodeIdError(
            f"member address {address!r} is not of the form tcp://HOST:PORT (port 1..65535)"
        )
    return address


@dataclass(frozen=True, slots=True, order=True)
class NodeId:
    """One life of one node: its address and the incarnation it started with.

    A restarted node must come back with a higher ``incarnation`` (the caller
    guarantees it, e.g. ``time.time_ns()`` at start): a record of a higher
    incarnation of an address supersedes every record of a lower one.
    ``str(node_id)`` is ``"tcp://host:port#incarnation"``, and
    :meth:`parse` accepts exactly that canonical form.
    """

    address: str
    incarnation: int

    def __post_init__(self) -> None:
        check_address(self.address)
        inc = self.incarnation
        if not isinstance(inc, int) or isinstance(inc, bool):
            raise InvalidNodeIdError(f"incarnation must be an int, got {type(inc).__name__}")
        if not 0 <= inc <= MAX_VERSION:
            raise InvalidNodeIdError(f"incarnation {inc} is outside 0..2**63-1")

    def __str__(self) -> str:
        return f"{self.address}#{self.incarnation}"

    @classmethod
    def parse(cls, text: object) -> NodeId:
        """The NodeId whose ``str()`` is ``text``; anything else raises InvalidNodeIdError."""
        if not isinstance(text, str):
            raise InvalidNodeIdError(f"node id must be a str, got {type(text).__name__}")
        return _parse(text)


@lru_cache(maxsize=4096)
def _parse(text: str) -> NodeId:
    # Cached: every message repeats the same few ids; the cache holds valid ids only
    # (a raise is not cached), so hostile input cannot evict more than 4096 entries.
    address, sep, inc = text.rpartition("#")
    if not sep or _DECIMAL_RE.fullmatch(inc) is None:
        raise InvalidNodeIdError(f"node id {text[:300]!r} is not of the form ADDRESS#INCARNATION")
    return NodeId(address, int(inc))


@dataclass(frozen=True, slots=True)
class Record:
    """What one node says about a member: ``(node, state, version)``."""

    node: NodeId
    state: MemberState
    version: int

    def to_wire(self) -> list[Any]:
        return [str(self.node), self.state.value, self.version]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to send: ``message`` is msgpack-able (maps, lists, str, int)."""

    address: str
    message: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Member:
    """A member as this node sees it; ``since``: when it entered ``state`` (caller's clock)."""

    node_id: NodeId
    state: MemberState
    version: int
    since: float


@dataclass(frozen=True, slots=True)
class MembershipEvent:
    """A state change seen by this node; ``old`` is None for a member first heard of."""

    node: NodeId
    old: MemberState | None
    new: MemberState
    time: float


_PRECEDENCE = {
    MemberState.JOINING: 0,
    MemberState.UP: 1,
    MemberState.LEAVING: 2,
    MemberState.SUSPECT: 3,
    MemberState.DOWN: 4,
    MemberState.REMOVED: 5,
}


def beats(new: Record, old: Record) -> bool:
    """Whether ``new`` replaces ``old``, two records of one NodeId (:mod:`.membership`'s
    Merge rules: removed is final, then the higher version, then the state precedence)."""
    if old.state is MemberState.REMOVED:
        return False
    if new.state is MemberState.REMOVED:
        return True
    if new.version != old.version:
        return new.version > old.version
    return _PRECEDENCE[new.state] > _PRECEDENCE[old.state]


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded membership message (see the module docstring for the fields)."""

    kind: str
    sender: Record
    gossip: tuple[Record, ...] = ()
    seq: int = 0
    target: NodeId | None = None
    members: tuple[Record, ...] = ()


def encode(message: Message) -> dict[str, Any]:
    """The msgpack-able map of ``message``."""
    out: dict[str, Any] = {
        "v": WIRE_VERSION,
        "kind": message.kind,
        "from": message.sender.to_wire(),
        "gossip": [r.to_wire() for r in message.gossip],
    }
    if message.kind in _PROBE_KINDS:
        out["seq"] = message.seq
        out["target"] = str(message.target)
    elif message.kind in _LIST_KINDS:
        out["members"] = [r.to_wire() for r in message.members]
    return out


def decode(raw: Any) -> Message:
    """Validate a decoded msgpack value; raise MembershipProtocolError if it is not a message."""
    if not isinstance(raw, dict):
        raise MembershipProtocolError(f"message must be a map, got {type(raw).__name__}")
    version = raw.get("v")
    if type(version) is not int or version != WIRE_VERSION:
        raise MembershipProtocolError(f"unsupported membership protocol version {_short(version)}")
    kind = raw.get("kind")
    if not isinstance(kind, str) or kind not in _KEYS:
        raise MembershipProtocolError(f"unknown message kind {_short(kind)}")
    keys = set(raw)
    if keys != _KEYS[kind]:
        missing = sorted(map(str, _KEYS[kind] - keys))
        extra = sorted(map(_short, keys - _KEYS[kind]))[:5]
        raise MembershipProtocolError(f"{kind}: missing keys {missing}, unknown keys {extra}")
    sender = _record(raw["from"], "from")
    gossip = _records(raw["gossip"], "gossip", MAX_GOSSIP)
    if kind in _PROBE_KINDS:
        return Message(kind, sender, gossip, _seq(raw["seq"]), _node_id(raw["target"], "target"))
    if kind in _LIST_KINDS:
        return Message(kind, sender, gossip, members=_records(raw["members"], "members"))
    return Message(kind, sender, gossip)


def _records(value: Any, what: str, limit: int = MAX_MEMBERS_WIRE) -> tuple[Record, ...]:
    if not isinstance(value, list | tuple):
        raise MembershipProtocolError(f"{what} must be an array, got {type(value).__name__}")
    if len(value) > limit:
        raise MembershipProtocolError(f"{what} has {len(value)} records, more than {limit}")
    return tuple(_record(item, what) for item in value)


def _record(value: Any, what: str) -> Record:
    if not isinstance(value, list | tuple) or len(value) != 3:
        raise MembershipProtocolError(f"{what}: a record must be [node_id, state, version]")
    node_text, state_text, version = value
    state = _STATES.get(state_text) if isinstance(state_text, str) else None
    if state is None:
        raise MembershipProtocolError(f"{what}: unknown member state {_short(state_text)}")
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= MAX_VERSION:
        raise MembershipProtocolError(f"{what}: version must be an int in 0..2**63-1")
    return Record(_node_id(node_text, what), state, version)


def _node_id(value: Any, what: str) -> NodeId:
    try:
        return NodeId.parse(value)
    except InvalidNodeIdError as exc:
        raise MembershipProtocolError(f"{what}: {exc}") from None


def _seq(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_VERSION:
        raise MembershipProtocolError("seq must be an int in 0..2**63-1")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
