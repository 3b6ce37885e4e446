"""CloudEvents 1.0.2 envelope of Phoenix messages, and its three codecs.

An :class:`Event` is one CloudEvent as Phoenix carries it: the CloudEvents context
attributes, the data as a Python value, and the Phoenix routing fields (``kind``,
``corr``, ``action``, ``delivery``) that the wire keeps in the request header.

Binary mode (the wire, ``to_wire`` / ``from_wire``), spec in ``docs`` and below::

    header  = msgpack [1, kind, corr, subject, action, delivery, attrs]
    payload = data encoded per ``datacontenttype`` (msgpack, or JSON bytes),
              zlib-compressed when attrs["phoenixencoding"] == "zlib"

- ``delivery`` and ``attrs`` are optional (defaults 0 and ``{}``); ``to_wire`` leaves
  them out when they hold the defaults, so such a header is byte-identical to a v1
  ``[1, kind, corr, subject, action]`` header.
- ``attrs`` holds only what differs from the defaults: ``id`` (default ``str(corr)``),
  ``source`` (default ``"/phoenix/anonymous"``; required when delivery >= 1, since it
  scopes ``corr`` for dedup), ``type`` (default: the taxonomy of ``kind``), ``time``,
  ``datacontenttype`` (default ``application/msgpack``), ``dataschema``, then the
  extensions: ``traceparent``, ``tracestate``, ``phoenixcausal`` (bytes),
  ``phoenixencoding`` ("zlib"), ``phoenixqos`` (int 0..9) and any other.
- An empty payload decodes to ``data = None`` (a CloudEvent without data).

Limits (checked on both sides, see :func:`check_attrs`): header <= 4 KiB; attrs <= 32
entries; attribute names ``[a-z0-9]{1,20}``; str and bytes values <= 1024 bytes
(``phoenixcausal`` <= 4 KiB); extension values str, bool, bytes or int in the
CloudEvents Integer range (32-bit signed); data nests at most 32 levels; a compressed
payload inflates to at most 16 MiB.

Structured modes (``to_json`` / ``from_json``, ``to_msgpack`` / ``from_msgpack``): one map
of every attribute with ``specversion`` "1.0", the routing fields as the extensions
``phoenixkind`` (int), ``phoenixcorr``, ``phoenixaction`` (omitted when ""),
``phoenixdelivery`` (the name: "at_most_once" ... "causal"), and the data:

- JSON (a valid CloudEvents JSON-format event, for other tools): ``data`` holds the
  value when ``datacontenttype`` is application/json, else ``data_base64`` holds its
  msgpack bytes; ``phoenixcorr`` is a decimal string (corr is a uint64, CloudEvents
  Integer is 32-bit); bytes extensions are base64 strings (CloudEvents Binary in JSON).
  JSON cannot say that a string was bytes, so only ``phoenixcausal`` comes back as
  bytes: other bytes extensions come back as their base64 string.
- msgpack (lossless; for the event store and dead letters): ``data`` holds the value
  inline whatever the content type, ``phoenixcorr`` is an int, bytes stay bytes.

Events from other producers: a missing ``phoenixkind`` is inferred from ``type`` (the
execute type gives TELL, since nothing waits for a reply), and an unknown type gives
PUBLISH; a missing ``datacontenttype`` means application/json in JSON (the CloudEvents
JSON-format rule) and application/msgpack in msgpack.

Every malformed or invalid input raises :class:`ipc.ProtocolError` with code
BAD_REQUEST (UNSUPPORTED_VERSION for a wrong header version), on encoding too.
"""

from __future__ import annotations

import base64
import binascii
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgpack
import orjson

from ._errors import ProtocolError
from .protocol import (
    ADMIN,
    ASK,
    AT_LEAST_ONCE,
    AT_MOST_ONCE,
    BATCH,
    CAUSAL,
    CREDIT,
    EVENT,
    EXACTLY_ONCE,
    HELLO,
    MAX_ACTION,
    MAX_DEPTH,
    MAX_HEADER,
    PROTOCOL_VERSION,
    PUBLISH,
    REPLY,
    REPLY_BATCH,
    STATUS,
    SUBSCRIBE,
    TELL,
    UNSUBSCRIBE,
    ErrorCode,
    check_agent_id,
    header_fields,
    pack,
    unpack,
)

__all__ = [
    "ADMIN",
    "ANONYMOUS_SOURCE",
    "ASK",
    "AT_LEAST_ONCE",
    "AT_MOST_ONCE",
    "BATCH",
    "CAUSAL",
    "CREDIT",
    "DELIVERY_BY_NAME",
    "DELIVERY_NAMES",
    "EVENT",
    "EXACTLY_ONCE",
    "HELLO",
    "JSON",
    "MAX_ATTRS",
    "MAX_ATTR_BYTES",
    "MAX_CAUSAL_BYTES",
    "MAX_DECOMPRESSED",
    "MSGPACK",
    "PUBLISH",
    "REPLY",
    "REPLY_BATCH",
    "STATUS",
    "SUBSCRIBE",
    "TELL",
    "TYPE_ADMIN",
    "TYPE_BY_KIND",
    "TYPE_CREDIT",
    "TYPE_DELIVER",
    "TYPE_EXECUTE",
    "TYPE_HELLO",
    "TYPE_PUBLISH",
    "TYPE_RESULT",
    "TYPE_STATUS",
    "TYPE_SUBSCRIBE",
    "TYPE_UNSUBSCRIBE",
    "UNSUBSCRIBE",
    "Event",
    "ExtensionValue",
    "check_attrs",
    "check_event",
    "compress_payload",
    "decompress_payload",
    "from_json",
    "from_msgpack",
    "from_wire",
    "to_json",
    "to_msgpack",
    "to_wire",
]

TYPE_EXECUTE = "phoenix.agent.action.execute"
TYPE_RESULT = "phoenix.agent.action.result"
TYPE_PUBLISH = "phoenix.pubsub.publish"
TYPE_SUBSCRIBE = "phoenix.pubsub.subscribe"
TYPE_UNSUBSCRIBE = "phoenix.pubsub.unsubscribe"
TYPE_DELIVER = "phoenix.pubsub.deliver"
TYPE_HELLO = "phoenix.node.hello"
TYPE_STATUS = "phoenix.node.status"
TYPE_ADMIN = "phoenix.node.admin"
TYPE_CREDIT = "phoenix.flow.credit"

# BATCH, REPLY_BATCH and ACKS are containers of events, not events: they have no type.
TYPE_BY_KIND: dict[int, str] = {
    ASK: TYPE_EXECUTE,
    TELL: TYPE_EXECUTE,
    HELLO: TYPE_HELLO,
    STATUS: TYPE_STATUS,
    PUBLISH: TYPE_PUBLISH,
    SUBSCRIBE: TYPE_SUBSCRIBE,
    UNSUBSCRIBE: TYPE_UNSUBSCRIBE,
    ADMIN: TYPE_ADMIN,
    REPLY: TYPE_RESULT,
    EVENT: TYPE_DELIVER,
    CREDIT: TYPE_CREDIT,
}
_KIND_BY_TYPE = {t: k for k, t in TYPE_BY_KIND.items() if k != ASK}
_WIRE_KINDS = frozenset((ASK, TELL, HELLO, STATUS, PUBLISH, SUBSCRIBE, UNSUBSCRIBE, ADMIN))

DELIVERY_NAMES: dict[int, str] = {
    AT_MOST_ONCE: "at_most_once",
    AT_LEAST_ONCE: "at_least_once",
    EXACTLY_ONCE: "exactly_once",
    CAUSAL: "causal",
}
DELIVERY_BY_NAME: dict[str, int] = {name: d for d, name in DELIVERY_NAMES.items()}

MSGPACK = "application/msgpack"
JSON = "application/json"
ANONYMOUS_SOURCE = "/phoenix/anonymous"
SPECVERSION = "1.0"

MAX_ATTRS = 32
MAX_ATTR_BYTES = 1024
MAX_CAUSAL_BYTES = 4096
MAX_DECOMPRESSED = 16 * 1024 * 1024
MAX_STRUCTURED = 16 * 1024 * 1024  # one frame
_U64 = 2**64
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1

ExtensionValue = str | int | bool | bytes

_NAME = re.compile(r"[a-z0-9]{1,20}", re.ASCII)
_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.\d+)?(?:[Zz]|[+-](\d\d):(\d\d))",
    re.ASCII,
)
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:", re.ASCII)
_URI_FORBIDDEN = re.compile(r"[\x00-\x20\x7f]")
_DECIMAL = re.compile(r"[0-9]{1,20}", re.ASCII)

# Carried by the header (or the structured map itself), so never an attrs entry: two
# places for one value would let them disagree.
_HEADER_CARRIED = frozenset(
    ("specversion", "subject", "phoenixkind", "phoenixcorr", "phoenixaction", "phoenixdelivery")
)
# Names an Event's ``extensions`` may not use: its own fields, and what the codecs set.
_RESERVED_EXTENSIONS = _HEADER_CARRIED | {
    "id",
    "source",
    "type",
    "time",
    "datacontenttype",
    "dataschema",
    "data",
    "phoenixencoding",
}


@dataclass(slots=True, kw_only=True)
class Event:
    """One CloudEvent as Phoenix carries it.

    ``id`` defaults to ``str(corr)`` and ``type`` to ``TYPE_BY_KIND[kind]`` (filled in at
    construction when left empty). ``subject`` "" means no subject (CloudEvents forbids
    an empty one); ``time`` is an RFC 3339 string, kept as written. ``data`` is any value
    the content type can carry (msgpack: None, bool, int, float, str, bytes, lists,
    str-keyed maps; JSON: the same without bytes). Nothing is checked here, because an
    Event is mutable: every codec runs :func:`check_event` before it encodes.
    """

    kind: int
    id: str = ""
    source: str = ANONYMOUS_SOURCE
    type: str = ""
    subject: str = ""
    time: str | None = None
    datacontenttype: str = MSGPACK
    dataschema: str | None = None
    data: Any = None
    corr: int = 0
    action: str = ""
    delivery: int = AT_MOST_ONCE
    extensions: dict[str, ExtensionValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.id == "" and type(self.corr) is int:
            self.id = str(self.corr)
        if self.type == "" and type(self.kind) is int:
            self.type = TYPE_BY_KIND.get(self.kind, "")


# --- attribute validation ---------------------------------------------------------------


def _bad(message: str) -> ProtocolError:
    return ProtocolError(message, code=ErrorCode.BAD_REQUEST)


def _check_str(name: str, value: Any, limit: int = MAX_ATTR_BYTES) -> str:
    if type(value) is not str:
        raise _bad(f"attribute {name!r} must be a string, not {type(value).__name__}")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise _bad(f"attribute {name!r} is not valid UTF-8 text (lone surrogate)") from None
    if size > limit:
        raise _bad(f"attribute {name!r} is {size} bytes long, more than {limit}")
    return value


def _check_nonempty(name: str, value: Any) -> None:
    if not _check_str(name, value):
        raise _bad(f"attribute {name!r} must not be empty")


def _check_uri_ref(name: str, value: Any) -> None:
    _check_nonempty(name, value)
    if _URI_FORBIDDEN.search(value):
        raise _bad(f"attribute {name!r} is not a URI reference (space or control character)")


def _check_uri(name: str, value: Any) -> None:
    _check_uri_ref(name, value)
    if not _URI_SCHEME.match(value):
        raise _bad(f"attribute {name!r} must be an absolute URI (with a scheme)")


def _check_time(name: str, value: Any) -> None:
    match = _RFC3339.fullmatch(_check_str(name, value))
    if match is None:
        raise _bad(f"attribute 'time' {value[:40]!r} is not an RFC 3339 timestamp")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    off_h, off_m = match.group(7), match.group(8)
    try:
        # second 60 is a leap second, valid in RFC 3339 but not for datetime
        datetime(year, month, day, hour, minute, min(second, 59))
        if second > 60 or (off_h is not None and (int(off_h) > 23 or int(off_m) > 59)):
            raise ValueError
    except ValueError:
        raise _bad(f"attribute 'time' {value[:40]!r} is not a valid date and time") from None


def _check_content_type(name: str, value: Any) -> None:
    if value != MSGPACK and value != JSON:
        raise _bad(f"datacontenttype {str(value)[:60]!r} is not supported: use {MSGPACK} or {JSON}")


def _check_causal(name: str, value: Any) -> None:
    if type(value) is not bytes:
        raise _bad(f"attribute 'phoenixcausal' must be bytes, not {type(value).__name__}")
    if len(value) > MAX_CAUSAL_BYTES:
        raise _bad(f"attribute 'phoenixcausal' is longer than {MAX_CAUSAL_BYTES} bytes")


def _check_encoding(name: str, value: Any) -> None:
    if value != "zlib":
        raise _bad(f"phoenixencoding {str(value)[:40]!r} is not supported (only 'zlib')")


def _check_qos(name: str, value: Any) -> None:
    if type(value) is not int or not 0 <= value <= 9:
        raise _bad(f"phoenixqos must be an int from 0 to 9, not {str(value)[:40]!r}")


def _check_extension(name: str, value: Any) -> None:
    kind = type(value)
    if kind is str:
        _check_str(name, value)
    elif kind is bytes:
        if len(value) > MAX_ATTR_BYTES:
            raise _bad(f"attribute {name!r} is longer than {MAX_ATTR_BYTES} bytes")
    elif kind is int:
        if not _INT32_MIN <= value <= _INT32_MAX:
            raise _bad(f"attribute {name!r} is outside the CloudEvents Integer range (32-bit)")
    elif kind is not bool:
        raise _bad(
            f"attribute {name!r} has a value of type {kind.__name__}: "
            "extensions are str, int, bool or bytes"
        )


# W3C trace context is only type-checked: a tracer that gets a malformed traceparent
# starts a new trace (W3C rule), so it is no reason to refuse the message.
_ATTR_CHECKS: dict[str, Callable[[str, Any], object]] = {
    "id": _check_nonempty,
    "source": _check_uri_ref,
    "type": _check_nonempty,
    "time": _check_time,
    "datacontenttype": _check_content_type,
    "dataschema": _check_uri,
    "traceparent": _check_str,
    "tracestate": _check_str,
    "phoenixcausal": _check_causal,
    "phoenixencoding": _check_encoding,
    "phoenixqos": _check_qos,
}


def check_attrs(attrs: Any) -> dict[str, Any]:
    """Validate a wire ``attrs`` map (the header's last element) and return it.

    Raises ProtocolError(BAD_REQUEST) naming the first attribute that breaks a rule of
    the module docstring; names carried by the header (``subject``, ``phoenixcorr``...)
    are refused, so that the header and attrs can never disagree.
    """
    if type(attrs) is not dict:
        raise _bad(f"attrs must be a map, not {type(attrs).__name__}")
    if len(attrs) > MAX_ATTRS:
        raise _bad(f"attrs has {len(attrs)} entries, more than {MAX_ATTRS}")
    for name, value in attrs.items():
        if type(name) is not str or not _NAME.fullmatch(name):
            raise _bad(
                f"attribute name {str(name)[:40]!r} is not 1 to 20 lowercase letters or digits"
            )
        if name in _HEADER_CARRIED:
            raise _bad(f"attribute {name!r} travels in the header, not in attrs")
        _ATTR_CHECKS.get(name, _check_extension)(name, value)
    return attrs


def _check_routing(kind: Any, corr: Any, subject: Any, action: Any, delivery: Any) -> None:
    if type(kind) is not int or kind not in TYPE_BY_KIND:
        raise _bad(f"unknown event kind {str(kind)[:40]!r}")
    if type(corr) is not int or not 0 <= corr < _U64:
        raise _bad("corr must be an unsigned 64-bit int")
    if type(subject) is not str or type(action) is not str:
        raise _bad("subject and action must be strings")
    if type(delivery) is not int or delivery not in DELIVERY_NAMES:
        raise _bad(f"delivery must be an int from 0 to 3, not {str(delivery)[:40]!r}")
    if kind in (ASK, TELL):
        check_agent_id(subject)
        if not action.isidentifier() or len(action) > MAX_ACTION:
            raise _bad(f"action {action[:40]!r} is not an identifier of <= {MAX_ACTION} chars")


def _wire_attrs(event: Event) -> dict[str, Any]:
    """The attrs map ``to_wire`` sends for ``event``: only what differs from the defaults."""
    attrs: dict[str, Any] = {}
    if event.id != str(event.corr):
        attrs["id"] = event.id
    if event.source != ANONYMOUS_SOURCE:
        attrs["source"] = event.source
    if event.type != TYPE_BY_KIND.get(event.kind):
        attrs["type"] = event.type
    if event.time is not None:
        attrs["time"] = event.time
    if event.datacontenttype != MSGPACK:
        attrs["datacontenttype"] = event.datacontenttype
    if event.dataschema is not None:
        attrs["dataschema"] = event.dataschema
    attrs.update(event.extensions)
    return check_attrs(attrs)


def _check_source(event: Event) -> None:
    if event.delivery >= AT_LEAST_ONCE and event.source == ANONYMOUS_SOURCE:
        raise _bad(
            f"delivery {DELIVERY_NAMES[event.delivery]} needs a source other than "
            f"{ANONYMOUS_SOURCE!r} (it scopes corr for dedup)"
        )


def _check_event(event: Event) -> dict[str, Any]:
    if not isinstance(event, Event):
        raise TypeError(f"expected an Event, not {type(event).__name__}")
    _check_routing(event.kind, event.corr, event.subject, event.action, event.delivery)
    if type(event.extensions) is not dict:
        raise _bad("extensions must be a dict")
    for name in event.extensions:
        if name in _RESERVED_EXTENSIONS:
            raise _bad(f"extension name {name!r} is reserved (an Event field or set by a codec)")
    attrs = _wire_attrs(event)
    _check_source(event)
    return attrs


def check_event(event: Event) -> Event:
    """Validate every field of ``event`` (the rules of the module docstring); return it.

    Raises ProtocolError(BAD_REQUEST) naming the problem; TypeError if not an Event.
    """
    _check_event(event)
    return event


def _check_plain(value: Any, depth: int = 0) -> None:
    """Refuse nesting deeper than MAX_DEPTH, non-str map keys and msgpack timestamps
    (ext -1 decodes without calling ext_hook); ``depth`` is ``value``'s own level."""
    if isinstance(value, dict):
        if depth >= MAX_DEPTH:
            raise _bad(f"data nests deeper than {MAX_DEPTH} levels")
        for key, item in value.items():
            if type(key) is not str:
                raise _bad("data map keys must be str")
            if isinstance(item, (dict, list, msgpack.Timestamp)):
                _check_plain(item, depth + 1)
    elif isinstance(value, list):
        if depth >= MAX_DEPTH:
            raise _bad(f"data nests deeper than {MAX_DEPTH} levels")
        for item in value:
            if isinstance(item, (dict, list, msgpack.Timestamp)):
                _check_plain(item, depth + 1)
    elif isinstance(value, msgpack.Timestamp):
        raise _bad("msgpack ext type -1 (timestamp) is not allowed")


# --- compression --------------------------------------------------------------------------


def compress_payload(payload: bytes, threshold: int = 4096, level: int = 1) -> tuple[bytes, bool]:
    """zlib-compress ``payload`` if it is longer than ``threshold`` bytes and the result
    is smaller; return ``(bytes, compressed)``. Level 1: on a local link the CPU spent
    on a higher level costs more than the bytes it saves."""
    if type(threshold) is not int or threshold < 0:
        raise ValueError(f"threshold must be an int >= 0, not {threshold!r}")
    if type(level) is not int or not -1 <= level <= 9:
        raise ValueError(f"zlib level must be an int from -1 to 9, not {level!r}")
    if len(payload) <= threshold:
        return payload, False
    packed = zlib.compress(payload, level)
    if len(packed) >= len(payload):
        return payload, False
    return packed, True


def decompress_payload(data: bytes, limit: int = MAX_DECOMPRESSED) -> bytes:
    """Inflate one complete zlib stream of at most ``limit`` bytes.

    Inflates at most ``limit + 1`` bytes whatever ``data`` claims, so a decompression
    bomb costs ``limit`` bytes of memory, then ProtocolError. A truncated stream or
    bytes after its end are ProtocolError too.
    """
    if type(limit) is not int or limit < 1:  # max_length 0 would mean "no limit"
        raise ValueError(f"limit must be an int >= 1, not {limit!r}")
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit)
        if not inflater.eof and inflater.decompress(inflater.unconsumed_tail, 1):
            raise _bad(f"compressed payload inflates to more than {limit} bytes")
    except zlib.error as exc:
        raise _bad(f"payload is not a valid zlib stream ({exc})") from None
    if not inflater.eof:
        raise _bad("compressed payload is truncated")
    if inflater.unused_data:
        raise _bad("bytes after the end of the compressed payload")
    return out


# --- binary mode (the wire) ---------------------------------------------------------------


def _encode_data(data: Any, content_type: str) -> bytes:
    try:
        if content_type == JSON:
            return orjson.dumps(data)
        return pack(data)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _bad(f"data cannot be encoded as {content_type}: {exc}") from None


def _decode_json(raw: bytes) -> Any:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"malformed JSON data: {exc}") from None
    _check_plain(value)
    return value


def _decode_data(payload: bytes, content_type: str) -> Any:
    if not payload:
        return None
    if content_type == JSON:
        return _decode_json(payload)
    return unpack(payload)


def to_wire(event: Event, *, compress_threshold: int | None = 4096) -> tuple[bytes, bytes]:
    """``(header, payload)`` frames of a request ``event`` (kinds ASK, TELL, HELLO, STATUS,
    PUBLISH, SUBSCRIBE, UNSUBSCRIBE, ADMIN).

    The payload is zlib-compressed (and ``phoenixencoding`` set) when it is longer than
    ``compress_threshold`` bytes and compression makes it smaller; None disables it.
    """
    attrs = _check_event(event)
    if event.kind not in _WIRE_KINDS:
        raise _bad(f"kind {event.kind} has no request header: to_wire sends requests only")
    payload = _encode_data(event.data, event.datacontenttype)
    # A full attrs map is not refused for want of room for phoenixencoding: send it raw.
    if compress_threshold is not None and len(attrs) < MAX_ATTRS:
        payload, compressed = compress_payload(payload, compress_threshold)
        if compressed:
            attrs["phoenixencoding"] = "zlib"
    fields: list[Any] = [PROTOCOL_VERSION, event.kind, event.corr, event.subject, event.action]
    if attrs:  # delivery >= 1 always has attrs: it needs a source
        fields += [event.delivery, attrs]
    try:
        header = pack(fields)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _bad(f"header cannot be encoded: {exc}") from None
    if len(header) > MAX_HEADER:
        raise _bad(f"header of {len(header)} bytes exceeds {MAX_HEADER}")
    return header, payload


def from_wire(header: bytes, payload: bytes) -> Event:
    """Decode and validate a request's header and payload frames into an Event.

    Raises ProtocolError (BAD_REQUEST, or UNSUPPORTED_VERSION), with ``corr_id`` set once
    the header got far enough for the sender to be answered.
    """
    fields = header_fields(header)  # size, version and corr: one check for every reader
    if len(fields) < 5:
        raise _bad("request header must be [1, kind, corr, subject, action, delivery, attrs]")
    corr = fields[2]
    try:
        return _event_from_header(fields, payload)
    except ProtocolError as exc:
        exc.corr_id = corr
        raise


def _event_from_header(fields: list[Any], payload: bytes) -> Event:
    kind, corr, subject, action = fields[1], fields[2], fields[3], fields[4]
    delivery = fields[5] if len(fields) > 5 else AT_MOST_ONCE
    attrs = check_attrs(fields[6] if len(fields) > 6 else {})
    _check_routing(kind, corr, subject, action, delivery)
    if kind not in _WIRE_KINDS:
        raise _bad(f"kind {kind} is not a request kind")
    if attrs.pop("phoenixencoding", None) is not None:
        payload = decompress_payload(payload)
    content_type = attrs.pop("datacontenttype", MSGPACK)
    event = Event(
        kind=kind,
        id=attrs.pop("id", None) or str(corr),
        source=attrs.pop("source", ANONYMOUS_SOURCE),
        type=attrs.pop("type", None) or TYPE_BY_KIND[kind],
        subject=subject,
        time=attrs.pop("time", None),
        datacontenttype=content_type,
        dataschema=attrs.pop("dataschema", None),
        data=_decode_data(payload, content_type),
        corr=corr,
        action=action,
        delivery=delivery,
        extensions=attrs,
    )
    _check_source(event)
    return event


# --- structured modes ---------------------------------------------------------------------


def _structured(event: Event, binary: bool) -> dict[str, Any]:
    _check_event(event)
    out: dict[str, Any] = {
        "specversion": SPECVERSION,
        "id": event.id,
        "source": event.source,
        "type": event.type,
    }
    if event.subject:
        out["subject"] = event.subject
    if event.time is not None:
        out["time"] = event.time
    out["datacontenttype"] = event.datacontenttype
    if event.dataschema is not None:
        out["dataschema"] = event.dataschema
    out["phoenixkind"] = event.kind
    out["phoenixcorr"] = event.corr if binary else str(event.corr)
    if event.action:
        out["phoenixaction"] = event.action
    out["phoenixdelivery"] = DELIVERY_NAMES[event.delivery]
    for name, value in event.extensions.items():
        out[name] = value if binary or type(value) is not bytes else _b64(value)
    if event.data is not None:
        if binary or event.datacontenttype == JSON:
            out["data"] = event.data
        else:
            out["data_base64"] = _b64(_encode_data(event.data, MSGPACK))
    return out


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(name: str, value: Any) -> bytes:
    if type(value) is not str:
        raise _bad(f"{name} must be a base64 string, not {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"{name} is not valid base64") from None


def to_json(event: Event) -> bytes:
    """The CloudEvents JSON-format (structured mode) bytes of ``event``."""
    try:
        return orjson.dumps(_structured(event, binary=False))
    except TypeError as exc:  # orjson.JSONEncodeError: data JSON cannot carry (bytes...)
        raise _bad(f"event cannot be encoded as JSON: {exc}") from None


def to_msgpack(event: Event) -> bytes:
    """The structured msgpack bytes of ``event``: lossless, for storage."""
    try:
        return pack(_structured(event, binary=True))
    except (TypeError, ValueError, OverflowError) as exc:
        raise _bad(f"event cannot be encoded as msgpack: {exc}") from None


def from_json(raw: bytes | str) -> Event:
    """Decode and validate one CloudEvents JSON-format event (any producer's)."""
    if len(raw) > MAX_STRUCTURED:
        raise _bad(f"structured event longer than {MAX_STRUCTURED} bytes")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"malformed JSON event: {exc}") from None
    return _from_structured(obj, binary=False)


def from_msgpack(raw: bytes) -> Event:
    """Decode and validate one structured msgpack event written by :func:`to_msgpack`."""
    if len(raw) > MAX_STRUCTURED:
        raise _bad(f"structured event longer than {MAX_STRUCTURED} bytes")
    try:
        # Not ipc.protocol.unpack: its depth limit counts from the map, so data nested
        # exactly MAX_DEPTH levels (valid on the wire) could be stored but not read back.
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
    except ProtocolError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as exc:
        raise _bad(f"malformed msgpack event: {type(exc).__name__}") from None
    if type(obj) is dict and "data" in obj:
        _check_plain(obj["data"])
    return _from_structured(obj, binary=True)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise _bad(f"msgpack ext type {code} is not allowed")


def _required(obj: dict[str, Any], name: str) -> str:
    if name not in obj:
        raise _bad(f"required attribute {name!r} is missing")
    value = obj.pop(name)
    _check_nonempty(name, value)
    return str(value)


def _from_structured(obj: Any, binary: bool) -> Event:
    if type(obj) is not dict:
        raise _bad(f"a structured event must be a map, not {type(obj).__name__}")
    obj = dict(obj)
    specversion = obj.pop("specversion", None)
    if specversion != SPECVERSION:
        raise _bad(f"specversion must be {SPECVERSION!r}, not {str(specversion)[:20]!r}")
    event_id, source, type_ = (_required(obj, n) for n in ("id", "source", "type"))
    content_type = obj.pop("datacontenttype", MSGPACK if binary else JSON)
    _check_content_type("datacontenttype", content_type)
    data = _structured_data(obj, content_type, binary)
    subject = obj.pop("subject", None)
    if subject is not None:
        _check_nonempty("subject", subject)
    kind = obj.pop("phoenixkind", None)
    if kind is None:
        kind = _KIND_BY_TYPE.get(type_, PUBLISH)
    delivery_name = obj.pop("phoenixdelivery", DELIVERY_NAMES[AT_MOST_ONCE])
    if type(delivery_name) is not str or delivery_name not in DELIVERY_BY_NAME:
        raise _bad(f"phoenixdelivery {str(delivery_name)[:40]!r} is not a delivery name")
    corr = _structured_corr(obj.pop("phoenixcorr", 0))
    if not binary and "phoenixcausal" in obj:
        obj["phoenixcausal"] = _unb64("phoenixcausal", obj["phoenixcausal"])
    event = Event(
        kind=kind,
        id=event_id,
        source=source,
        type=type_,
        subject=subject or "",
        time=obj.pop("time", None),
        datacontenttype=content_type,
        dataschema=obj.pop("dataschema", None),
        data=data,
        corr=corr,
        action=obj.pop("phoenixaction", ""),
        delivery=DELIVERY_BY_NAME[delivery_name],
        extensions=obj,
    )
    return check_event(event)


def _structured_data(obj: dict[str, Any], content_type: str, binary: bool) -> Any:
    if "data_base64" in obj:
        if binary or "data" in obj:
            raise _bad("data_base64 is only for JSON events without a data member")
        raw = _unb64("data_base64", obj.pop("data_base64"))
        return _decode_data(raw, content_type)
    data = obj.pop("data", None)
    if data is not None and not binary:
        if content_type != JSON:
            raise _bad(f"{content_type} data must be carried in data_base64")
        _check_plain(data)
    return data


def _structured_corr(value: Any) -> int:
    """phoenixcorr: an int, or (JSON) its decimal string."""
    if type(value) is str and _DECIMAL.fullmatch(value):
        value = int(value)
    if type(value) is not int or not 0 <= value < _U64:
        raise _bad(f"phoenixcorr {str(value)[:40]!r} is not an unsigned 64-bit int")
    return value
