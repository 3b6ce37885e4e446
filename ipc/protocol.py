"""The Phoenix wire protocol, version 1 (node-local and client-to-node traffic).

Every message is one ZeroMQ multipart message::

    [route_1, ..., route_k, b"", header, payload]

- ``route_*``: ZeroMQ routing ids pushed by ROUTER sockets on the way (the
  client's id at the node, the forwarding process's id at the worker...).
  Never empty. A reply carries the same stack back.
- ``b""``: the empty delimiter that ends the routing stack.
- ``header``: a msgpack array, decoded by routers; it never includes the
  payload, so a router forwards payload bytes without decoding them.
- ``payload``: msgpack bytes, decoded only by the process that runs the agent
  (or by the client, for a reply).

Header layouts (msgpack arrays; a receiver ignores elements past the ones it
knows, so later versions may append)::

    request: [1, kind, corr_id, agent_id, action]
             kind 1 = ASK (a reply follows), 2 = TELL (no reply),
                  3 = HELLO (topology; agent_id and action are ""),
                  4 = STATUS (node status; agent_id and action are "")
    reply:   [1, 16, corr_id, status]      status 0 = ok, else an ErrorCode

- ``corr_id``: unsigned int < 2**64 chosen by the sender; the reply echoes it.
- ``agent_id``: ``"<Type>/<key>"``, UTF-8, at most 511 bytes (LMDB's key limit).
- ``action``: a Python identifier of at most 128 characters.

Payloads: a request's payload is a msgpack map of keyword arguments (str keys);
an ok reply's payload is the action's result; an error reply's payload is a
map ``{"code": int, "message": str, "agent": str, "action": str, "type": str}``
(``type`` names the exception class raised by the action, for display only: the
client rebuilds errors from ``code``, never from a class name). HELLO and
STATUS replies are maps described in ``docs/protocol.md``.

Limits: a frame is at most 16 MiB (``MAXMSGSIZE`` on every socket); at most 8
routing frames of at most 255 bytes each; a header at most 4 KiB; payloads nest
at most 32 levels; msgpack ext types (the timestamp type included) are refused;
map keys must be str. A frame
that breaks any rule gets an error reply with code BAD_REQUEST (when a reply is
possible: an ASK whose header could be read) and is counted; it never crashes
the receiver.
"""

from __future__ import annotations

import array
import enum
import struct
import sys
from typing import Any

import msgpack

from ._errors import ProtocolError

__all__ = [
    "ACKS",
    "ASK",
    "CLUSTER",
    "HELLO",
    "PROTOCOL_VERSION",
    "REPLY",
    "STATUS",
    "TELL",
    "ErrorCode",
    "decode_header",
    "decode_reply_header",
    "encode_reply",
    "encode_request",
    "pack",
    "split_envelope",
    "unpack",
]

PROTOCOL_VERSION = 1
ASK, TELL, HELLO, STATUS, BATCH, PUBLISH, SUBSCRIBE, UNSUBSCRIBE, ADMIN = 1, 2, 3, 4, 5, 6, 7, 8, 9
CLUSTER = 10  # node to node (membership); see phoenix_node.cluster.service
REPLY, REPLY_BATCH, EVENT, CREDIT, ACKS = 16, 17, 18, 19, 20
_REQUEST_KINDS = frozenset(
    (ASK, TELL, HELLO, STATUS, BATCH, PUBLISH, SUBSCRIBE, UNSUBSCRIBE, ADMIN, CLUSTER)
)
BATCH_KINDS = frozenset((ASK, TELL, PUBLISH))
_REPLY_KINDS = frozenset((REPLY, REPLY_BATCH, EVENT, CREDIT, ACKS))
AT_MOST_ONCE, AT_LEAST_ONCE, EXACTLY_ONCE, CAUSAL = 0, 1, 2, 3
MAX_BATCH = 10_000
MAX_ATTRS = 32
MAX_TOPIC = 255
MAX_HEADER = 4096
MAX_ROUTES = 8
MAX_ROUTE_ID = 255
MAX_DEPTH = 32
MAX_AGENT_ID = 511
MAX_ACTION = 128
_U64 = 2**64
_LITTLE = sys.byteorder == "little"


class ErrorCode(enum.IntEnum):
    """Error codes of error replies; the client maps each to one exception class."""

    BAD_REQUEST = 1
    UNKNOWN_AGENT_TYPE = 2
    UNKNOWN_ACTION = 3
    ACTION_FAILED = 4
    UNAVAILABLE = 5
    STORE_FAILED = 6
    BAD_ARGUMENTS = 7
    INTERNAL = 8
    UNSUPPORTED_VERSION = 9
    BAD_RESULT = 10
    BACKPRESSURE = 11
    RATE_LIMITED = 12


#: errors after which the same message may succeed later: a sender retries these
RETRYABLE = frozenset(
    (
        ErrorCode.UNAVAILABLE,
        ErrorCode.STORE_FAILED,
        ErrorCode.BACKPRESSURE,
        ErrorCode.RATE_LIMITED,
    )
)


_packer = msgpack.Packer(use_bin_type=True, autoreset=True)


def pack(obj: Any) -> bytes:
    """msgpack-encode a payload. Raises TypeError for values msgpack cannot carry."""
    return _packer.pack(obj)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack ext type {code} is not allowed")


def unpack(frame: bytes) -> Any:
    """Decode a payload; any malformed input raises ProtocolError(BAD_REQUEST)."""
    try:
        obj = msgpack.unpackb(frame, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
    except ProtocolError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"malformed msgpack payload: {type(exc).__name__}") from None
    if isinstance(obj, (list, dict)):
        _check_plain(obj, 0)
    elif isinstance(obj, msgpack.Timestamp):
        raise ProtocolError("msgpack ext type -1 (timestamp) is not allowed")
    return obj


def _check_plain(obj: list[Any] | dict[Any, Any], depth: int) -> None:
    """Refuse what msgpack lets through but the protocol does not: bytes map keys and
    timestamps (ext -1 is decoded without calling ext_hook), and deep nesting."""
    if depth >= MAX_DEPTH:
        raise ProtocolError(f"payload nests deeper than {MAX_DEPTH} levels")
    if isinstance(obj, dict):
        for key, value in obj.items():
            if type(key) is not str:
                raise ProtocolError("payload map keys must be str")
            if isinstance(value, (list, dict)):
                _check_plain(value, depth + 1)
            elif isinstance(value, msgpack.Timestamp):
                raise ProtocolError("msgpack ext type -1 (timestamp) is not allowed")
        return
    for value in obj:
        if isinstance(value, (list, dict)):
            _check_plain(value, depth + 1)
        elif isinstance(value, msgpack.Timestamp):
            raise ProtocolError("msgpack ext type -1 (timestamp) is not allowed")


def encode_request(
    kind: int,
    corr_id: int,
    agent_id: str = "",
    action: str = "",
    delivery: int = AT_MOST_ONCE,
    attrs: dict[str, Any] | None = None,
) -> bytes:
    """A request header; the delivery and attrs elements are sent only when set."""
    if attrs:
        return _packer.pack([PROTOCOL_VERSION, kind, corr_id, agent_id, action, delivery, attrs])
    if delivery:
        return _packer.pack([PROTOCOL_VERSION, kind, corr_id, agent_id, action, delivery])
    return _packer.pack([PROTOCOL_VERSION, kind, corr_id, agent_id, action])


def encode_entry(
    kind: int,
    corr_id: int,
    agent_id: str,
    action: str,
    delivery: int,
    attrs: dict[str, Any] | None,
    data: bytes,
) -> bytes:
    """One entry of a BATCH payload, already msgpack-encoded (so a sender can keep it,
    e.g. in its outbox, and batch it later with :func:`join_entries`)."""
    return _packer.pack([kind, corr_id, agent_id, action, delivery, attrs, data])


def join_entries(entries: list[bytes]) -> bytes:
    """A BATCH payload from entries made by :func:`encode_entry` (no re-encoding)."""
    n = len(entries)
    if n < 16:
        head = bytes((0x90 | n,))
    elif n < 65536:
        head = b"\xdc" + n.to_bytes(2, "big")
    else:
        head = b"\xdd" + n.to_bytes(4, "big")
    return head + b"".join(entries)


def encode_batch_header(defaults: dict[str, Any] | None = None, hint: str = "") -> bytes:
    """The header of a BATCH message; ``defaults`` are attrs every entry inherits;
    ``hint`` (the header's subject) is an agent id or topic a router may route the
    whole batch by (a worker forwards the entries it does not own)."""
    if defaults:
        return _packer.pack([PROTOCOL_VERSION, BATCH, 0, hint, "", 0, defaults])
    return _packer.pack([PROTOCOL_VERSION, BATCH, 0, hint, ""])


def encode_reply_batch(items: list[tuple[int, int, bytes]]) -> bytes:
    """A REPLY_BATCH payload: ``[corr, status, body]`` triples, bodies msgpack bytes."""
    return _packer.pack(items)


def encode_acks(corr_ids: list[int]) -> bytes:
    """An ACKS payload: the corr ids of guaranteed tells and publishes that succeeded,
    as unsigned 64-bit big-endian integers (8 bytes each, no msgpack): an
    acknowledgement costs the sender and the receiver no per-item decoding."""
    return struct.pack(f">{len(corr_ids)}Q", *corr_ids)


def decode_acks(payload: bytes) -> list[int]:
    """The corr ids of an ACKS payload (a multiple of 8 bytes, at most MAX_BATCH ids)."""
    n, rest = divmod(len(payload), 8)
    if rest or n > MAX_BATCH:
        raise ProtocolError(
            f"ACKS payload must be at most {MAX_BATCH} 8-byte ids, got {len(payload)} bytes"
        )
    ids = array.array("Q", payload)
    if _LITTLE:
        ids.byteswap()
    return ids.tolist()


def reply_items(
    kind: int, corr_id: int, status: int, payload: bytes
) -> list[tuple[int, int, bytes]]:
    """The ``(corr, status, body)`` answers one reply-direction frame carries (its header
    decoded by :func:`decode_reply_kind`): a REPLY one, a REPLY_BATCH its triples, an
    ACKS its ids (status 0, body nil); EVENT and CREDIT none."""
    if kind == REPLY:
        return [(corr_id, status, payload)]
    if kind == REPLY_BATCH:
        return decode_reply_batch(payload)
    if kind == ACKS:
        return [(c, 0, b"\xc0") for c in decode_acks(payload)]
    return []


def encode_reply_kind(kind: int, corr_id: int, status: int = 0) -> bytes:
    """A reply-direction header of any kind (REPLY_BATCH, EVENT, CREDIT)."""
    return _packer.pack([PROTOCOL_VERSION, kind, corr_id, status])


def encode_reply(corr_id: int, status: int = 0) -> bytes:
    """A reply header; ``status`` 0 means ok, else an :class:`ErrorCode`."""
    return _packer.pack([PROTOCOL_VERSION, REPLY, corr_id, status])


def split_envelope(frames: list[bytes]) -> tuple[list[bytes], bytes, bytes]:
    """``(routing stack, header, payload)``; raises ProtocolError if malformed."""
    n = len(frames)
    if n < 3:
        raise ProtocolError(f"message of {n} frames: expected [routes..., b'', header, payload]")
    if frames[n - 3] != b"":
        raise ProtocolError("missing the empty delimiter frame before header and payload")
    stack = frames[: n - 3]
    if len(stack) > MAX_ROUTES or any(len(r) > MAX_ROUTE_ID or not r for r in stack):
        raise ProtocolError(
            f"routing stack must be at most {MAX_ROUTES} non-empty ids of "
            f"at most {MAX_ROUTE_ID} bytes"
        )
    return stack, frames[n - 2], frames[n - 1]


def header_fields(frame: bytes) -> list[Any]:
    """A header frame as an array, its size, version and corr checked."""
    if len(frame) > MAX_HEADER:
        raise ProtocolError(f"header of {len(frame)} bytes exceeds {MAX_HEADER}")
    header = unpack(frame)
    if not isinstance(header, list) or len(header) < 4:
        raise ProtocolError("header must be a msgpack array of at least 4 elements")
    if type(header[0]) is not int or header[0] != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {header[0]!r} is not supported (this node speaks "
            f"{PROTOCOL_VERSION})",
            code=ErrorCode.UNSUPPORTED_VERSION,
        )
    corr = header[2]
    if type(corr) is not int or not 0 <= corr < _U64:
        raise ProtocolError("corr_id must be an unsigned 64-bit int")
    return header


def decode_header(frame: bytes) -> tuple[int, int, str, str]:
    """Decode a request header into ``(kind, corr_id, agent_id, action)``."""
    return decode_request(frame)[:4]


Request = tuple[int, int, str, str, int, dict[str, Any]]


def decode_request(frame: bytes) -> Request:
    """Decode a request header into ``(kind, corr_id, subject, action, delivery, attrs)``."""
    header = header_fields(frame)
    if len(header) < 5:
        raise ProtocolError("request header must be [version, kind, corr_id, agent_id, action]")
    try:
        return check_fields(header[1], header[2], header[3], header[4], header[5:], _REQUEST_KINDS)
    except ProtocolError as exc:
        exc.corr_id = header[2]  # the header got far enough for the sender to be answered
        raise


def check_fields(
    kind: Any, corr: Any, subject: Any, action: Any, rest: list[Any], kinds: frozenset[int]
) -> Request:
    """Validate the fields of a request header or BATCH entry (``rest`` = the optional
    ``[delivery, attrs]`` tail); raises ProtocolError(BAD_REQUEST)."""
    if type(kind) is not int or kind not in kinds:
        raise ProtocolError(f"unknown message kind {kind!r:.40}")
    if not isinstance(subject, str) or not isinstance(action, str):
        raise ProtocolError("agent_id and action must be strings")
    delivery = rest[0] if rest else AT_MOST_ONCE
    if type(delivery) is not int or not AT_MOST_ONCE <= delivery <= CAUSAL:
        raise ProtocolError(f"delivery {delivery!r:.40} is not 0..3")
    attrs = rest[1] if len(rest) > 1 else None
    if attrs is None:
        attrs = {}
    elif not isinstance(attrs, dict) or len(attrs) > MAX_ATTRS:
        raise ProtocolError(f"attrs must be a map of at most {MAX_ATTRS} entries")
    if kind in (ASK, TELL):
        check_agent_id(subject)
        if not action.isidentifier() or len(action) > MAX_ACTION:
            raise ProtocolError(f"action {action[:40]!r} is not an identifier of <= 128 chars")
    elif kind in (PUBLISH, SUBSCRIBE, UNSUBSCRIBE) and (not subject or len(subject) > MAX_TOPIC):
        raise ProtocolError(f"topic must be a non-empty str of at most {MAX_TOPIC} chars")
    if delivery and not isinstance(attrs.get("source"), str):
        raise ProtocolError("delivery at_least_once and stronger need a 'source' attribute")
    return kind, corr, subject, action, delivery, attrs


Entry = tuple[int, int, str, str, int, dict[str, Any], bytes]


def decode_batch(payload: bytes, defaults: dict[str, Any]) -> list[Entry | ProtocolError]:
    """The entries of a BATCH payload, each validated on its own.

    A malformed entry becomes a ProtocolError in its place (with ``corr_id`` set when
    the entry's corr was readable), so the others are still handled. ``defaults`` are
    the batch header's attrs; an entry's own attrs win.
    """
    items = unpack(payload)
    if not isinstance(items, list) or len(items) > MAX_BATCH:
        raise ProtocolError(f"BATCH payload must be an array of at most {MAX_BATCH} entries")
    out: list[Entry | ProtocolError] = []
    for item in items:
        corr = 0
        try:
            if not isinstance(item, list) or len(item) != 7:
                raise ProtocolError(
                    "BATCH entry must be [kind, corr, subject, action, delivery, attrs, data]"
                )
            corr = item[1]
            if type(corr) is not int or not 0 <= corr < _U64:
                corr = 0
                raise ProtocolError("corr_id must be an unsigned 64-bit int")
            data = item[6]
            if not isinstance(data, bytes):
                raise ProtocolError("BATCH entry data must be bytes (msgpack bin)")
            attrs = item[5]
            if defaults:
                attrs = {**defaults, **attrs} if isinstance(attrs, dict) else defaults
            kind, corr, subject, action, delivery, attrs = check_fields(
                item[0], corr, item[2], item[3], [item[4], attrs], BATCH_KINDS
            )
            out.append((kind, corr, subject, action, delivery, attrs, data))
        except ProtocolError as exc:
            exc.corr_id = corr
            out.append(exc)
    return out


def decode_reply_batch(payload: bytes) -> list[tuple[int, int, bytes]]:
    """The ``(corr, status, body)`` triples of a REPLY_BATCH payload."""
    items = unpack(payload)
    if not isinstance(items, list):
        raise ProtocolError("REPLY_BATCH payload must be an array")
    for item in items:
        if (
            not isinstance(item, list)
            or len(item) != 3
            or type(item[0]) is not int
            or type(item[1]) is not int
            or not isinstance(item[2], bytes)
        ):
            raise ProtocolError("REPLY_BATCH entry must be [corr, status, body]")
    return items


def decode_reply_header(frame: bytes) -> tuple[int, int]:
    """Decode a REPLY header into ``(corr_id, status)``."""
    kind, corr, status = decode_reply_kind(frame)
    if kind != REPLY:
        raise ProtocolError(f"expected a reply header, got kind {kind!r}")
    return corr, status


def decode_reply_kind(frame: bytes) -> tuple[int, int, int]:
    """Decode a reply-direction header into ``(kind, corr_id, status)``."""
    header = header_fields(frame)
    kind, status = header[1], header[3]
    if type(kind) is not int or kind not in _REPLY_KINDS:
        raise ProtocolError(f"expected a reply-direction header, got kind {kind!r:.40}")
    if type(status) is not int:
        raise ProtocolError("reply status must be an int")
    return kind, header[2], status


def check_agent_id(agent_id: str) -> str:
    """Validate ``"<Type>/<key>"``: raise ProtocolError(BAD_REQUEST) if malformed."""
    type_name, slash, key = agent_id.partition("/")
    if not slash or not type_name or not key:
        raise ProtocolError(f"agent id {agent_id[:60]!r} is not of the form '<Type>/<key>'")
    try:
        encoded = agent_id.encode()
    except UnicodeEncodeError:
        raise ProtocolError("agent id is not valid UTF-8 text (lone surrogate)") from None
    if len(encoded) > MAX_AGENT_ID:
        raise ProtocolError(f"agent id longer than {MAX_AGENT_ID} bytes")
    return agent_id
