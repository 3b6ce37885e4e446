"""The wire format of ipc/protocol.py: valid frames round-trip, every malformed input is
a ProtocolError (never another exception), with the code the receiver answers with."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ipc import ProtocolError
from ipc.protocol import (
    ACKS,
    ASK,
    CREDIT,
    EVENT,
    HELLO,
    MAX_ACTION,
    MAX_AGENT_ID,
    MAX_BATCH,
    MAX_HEADER,
    PROTOCOL_VERSION,
    REPLY,
    REPLY_BATCH,
    STATUS,
    TELL,
    ErrorCode,
    check_agent_id,
    decode_acks,
    decode_header,
    decode_reply_header,
    encode_acks,
    encode_reply,
    encode_reply_batch,
    encode_request,
    pack,
    reply_items,
    split_envelope,
    unpack,
)

U64_MAX = 2**64 - 1


def raw(obj: Any) -> bytes:
    """msgpack bytes built independently of ipc.protocol.pack."""
    return msgpack.packb(obj, use_bin_type=True)


def request(*fields: Any) -> bytes:
    return raw(list(fields))


def bad_request_code(frame: bytes, decoder: Any = decode_header) -> int:
    with pytest.raises(ProtocolError) as info:
        decoder(frame)
    return info.value.code


# --- valid headers ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", [ASK, TELL])
@pytest.mark.parametrize("corr", [0, 1, 2**32, U64_MAX])
def test_ask_and_tell_headers_round_trip(kind: int, corr: int) -> None:
    frame = encode_request(kind, corr, "Counter/a", "inc")
    assert decode_header(frame) == (kind, corr, "Counter/a", "inc")
    # what a client in another language would send decodes the same
    assert decode_header(request(1, kind, corr, "Counter/a", "inc")) == (
        kind,
        corr,
        "Counter/a",
        "inc",
    )


@pytest.mark.parametrize("kind", [HELLO, STATUS])
def test_hello_and_status_need_no_agent_or_action(kind: int) -> None:
    assert decode_header(encode_request(kind, 9)) == (kind, 9, "", "")


def test_limits_are_inclusive() -> None:
    longest_id = "T/" + "k" * (MAX_AGENT_ID - 2)
    longest_action = "a" * MAX_ACTION
    assert decode_header(encode_request(ASK, 1, longest_id, longest_action))[2:] == (
        longest_id,
        longest_action,
    )
    # the agent id limit counts UTF-8 bytes: 2 + 2*254 = 510 bytes of text is fine
    assert check_agent_id("T/" + "é" * 254) == "T/" + "é" * 254
    # unicode identifiers are identifiers
    assert decode_header(encode_request(TELL, 1, "Typ/ключ", "действие"))[3] == "действие"


def test_later_versions_may_append_header_elements() -> None:
    frame = request(1, ASK, 5, "Counter/a", "inc", 0, {}, "future", {"x": 1})
    assert decode_header(frame) == (ASK, 5, "Counter/a", "inc")
    assert decode_reply_header(raw([1, REPLY, 5, 0, "future"])) == (5, 0)


def test_header_size_limit_is_exactly_max_header() -> None:
    def padded(n: int) -> bytes:
        return request(1, ASK, 1, "T/k", "a", 0, None, "x" * n)

    padding = next(n for n in range(MAX_HEADER) if len(padded(n)) == MAX_HEADER)
    assert decode_header(padded(padding)) == (ASK, 1, "T/k", "a")
    assert len(padded(padding + 1)) == MAX_HEADER + 1
    with pytest.raises(ProtocolError, match="exceeds") as info:
        decode_header(padded(padding + 1))
    assert info.value.code == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("status", [0, *list(ErrorCode)])
@pytest.mark.parametrize("corr", [0, 77, U64_MAX])
def test_reply_headers_round_trip(status: int, corr: int) -> None:
    assert decode_reply_header(encode_reply(corr, status)) == (corr, int(status))


def test_payloads_round_trip_plain_data() -> None:
    value = {
        "none": None,
        "t": True,
        "i": -(2**63),
        "u": U64_MAX,
        "f": 1.5,
        "s": "héllo",
        "b": b"\x00\xff",
        "l": [1, [2, {"k": "v"}]],
    }
    assert unpack(pack(value)) == value
    assert unpack(pack((1, 2))) == [1, 2]  # tuples come back as lists


# --- malformed request headers -----------------------------------------------------------

VALID = (1, ASK, 7, "Counter/a", "inc")


def _with(index: int, value: Any) -> bytes:
    fields = list(VALID)
    fields[index] = value
    return raw(fields)


MALFORMED_HEADERS: dict[str, bytes] = {
    "empty frame": b"",
    "reserved byte 0xc1": b"\xc1",
    "garbage": b"\xff\xfe\xfd garbage",
    "trailing bytes": encode_request(ASK, 7, "Counter/a", "inc") + b"\x00",
    "not an array: map": raw({"version": 1}),
    "not an array: int": raw(1),
    "not an array: str": raw("ASK"),
    "not an array: nil": raw(None),
    "not an array: bin": raw(b"\x95\x01\x01\x07"),
    "empty array": raw([]),
    "three elements": raw([1, ASK, 7]),
    "four elements (a reply's length)": raw([1, ASK, 7, "Counter/a"]),
    "array claims 2**32-1 elements": b"\xdd\xff\xff\xff\xff\x01",
    "str claims 2**32-1 bytes": b"\x95\x01\x01\x07\xdb\xff\xff\xff\xff",
    "invalid utf-8 in agent id": b"\x95\x01\x01\x07\xa3T/\xff\xa3inc",
    "nested 3000 deep": b"\x96\x01\x01\x07\xa3T/k\xa1a" + b"\x91" * 3000 + b"\xc0",
    "ext type in header": _with(3, msgpack.ExtType(5, b"T/k")),
    "reserved ext type -5 in header": b"\x95\x01\x01\x07\xa3T/k\xd4\xfb\x00",
    "timestamp ext as agent id": _with(3, msgpack.Timestamp(0)),
    "int map key inside header": _with(3, {1: "x"}),
    "nil map key inside header": b"\x95\x01\x01\x07\x81\xc0\x01\xa3inc",
    "map with a list key": b"\x95\x01\x01\x07\x81\x91\x01\x01\xa3inc",
    "header over 4 KiB": _with(3, "T/" + "k" * 5000),
    # kinds
    "kind 0": _with(1, 0),
    "kind 15": _with(1, 15),
    "kind REPLY as a request": _with(1, REPLY),
    "kind -1": _with(1, -1),
    "kind as str": _with(1, "1"),
    "kind nil": _with(1, None),
    "kind True (bool, not int)": _with(1, True),
    "kind False": _with(1, False),
    # corr ids
    "corr -1": _with(2, -1),
    "corr -2**63": _with(2, -(2**63)),
    "corr 2.0**64 (float)": _with(2, 2.0**64),
    "corr 1.5": _with(2, 1.5),
    "corr as str": _with(2, "7"),
    "corr nil": _with(2, None),
    "corr True (bool, not int)": _with(2, True),
    "corr False": _with(2, False),
    # agent ids
    "agent id without slash": _with(3, "x"),
    "agent id without type": _with(3, "/k"),
    "agent id without key": _with(3, "T/"),
    "agent id empty": _with(3, ""),
    "agent id only a slash": _with(3, "/"),
    "agent id of 512 bytes": _with(3, "T/" + "k" * (MAX_AGENT_ID - 1)),
    "agent id of 512 UTF-8 bytes, 257 chars": _with(3, "T/" + "é" * 255),
    "agent id as bin": _with(3, b"Counter/a"),
    "agent id as int": _with(3, 123),
    "agent id nil": _with(3, None),
    "agent id as array": _with(3, ["Counter", "a"]),
    # actions
    "action empty": _with(4, ""),
    "action starting with a digit": _with(4, "1inc"),
    "action with a dash": _with(4, "in-c"),
    "action with a dot": _with(4, "a.b"),
    "action with a space": _with(4, "in c"),
    "action of 129 chars": _with(4, "a" * (MAX_ACTION + 1)),
    "action as bin": _with(4, b"inc"),
    "action as int": _with(4, 5),
    "action nil": _with(4, None),
    "HELLO with a non-str agent id": raw([1, HELLO, 1, None, ""]),
    "STATUS with a non-str action": raw([1, STATUS, 1, "", 5]),
}


@pytest.mark.parametrize("frame", MALFORMED_HEADERS.values(), ids=MALFORMED_HEADERS.keys())
def test_malformed_request_header_is_a_bad_request(frame: bytes) -> None:
    assert bad_request_code(frame) == ErrorCode.BAD_REQUEST


WRONG_VERSIONS = {
    "0": 0,
    "2": 2,
    "255": 255,
    "-1": -1,
    "True": True,
    "str 1": "1",
    "nil": None,
    "array": [1],
}


@pytest.mark.parametrize("version", WRONG_VERSIONS.values(), ids=WRONG_VERSIONS.keys())
def test_wrong_version_is_unsupported_version(version: Any) -> None:
    assert bad_request_code(_with(0, version)) == ErrorCode.UNSUPPORTED_VERSION
    reply = raw([version, REPLY, 1, 0])
    assert bad_request_code(reply, decode_reply_header) == ErrorCode.UNSUPPORTED_VERSION


def test_every_truncation_of_a_valid_header_is_a_bad_request() -> None:
    frame = encode_request(ASK, U64_MAX, "Counter/truncated", "increment")
    for cut in range(len(frame)):
        with pytest.raises(ProtocolError) as info:
            decode_header(frame[:cut])
        assert info.value.code == ErrorCode.BAD_REQUEST, cut


@pytest.mark.parametrize("kind", [[1], {"k": 1}], ids=["list", "map"])
def test_unhashable_kind_is_a_bad_request(kind: Any) -> None:
    assert bad_request_code(_with(1, kind)) == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize(("index", "value"), [(0, 1.0), (1, 1.0), (1, 2.0)])
def test_float_version_or_kind_is_refused(index: int, value: float) -> None:
    with pytest.raises(ProtocolError):
        decode_header(_with(index, value))


# --- reply headers ---------------------------------------------------------------------

MALFORMED_REPLIES: dict[str, bytes] = {
    "empty": b"",
    "garbage": b"\xc1\xc1",
    "truncated": encode_reply(5, 0)[:-1],
    "three elements": raw([1, REPLY, 5]),
    "request kind": raw([1, ASK, 5, 0]),
    "kind nil": raw([1, None, 5, 0]),
    "status as str": raw([1, REPLY, 5, "0"]),
    "status nil": raw([1, REPLY, 5, None]),
    "status True": raw([1, REPLY, 5, True]),
    "status float": raw([1, REPLY, 5, 0.0]),
    "corr -1": raw([1, REPLY, -1, 0]),
    "corr True": raw([1, REPLY, True, 0]),
    "corr float": raw([1, REPLY, 5.0, 0]),
    "ext type": raw([1, REPLY, 5, msgpack.ExtType(1, b"")]),
    "map": raw({"corr": 5}),
    "over 4 KiB": raw([1, REPLY, 5, 0, "x" * MAX_HEADER]),
}


@pytest.mark.parametrize("frame", MALFORMED_REPLIES.values(), ids=MALFORMED_REPLIES.keys())
def test_malformed_reply_header_is_a_protocol_error(frame: bytes) -> None:
    assert bad_request_code(frame, decode_reply_header) == ErrorCode.BAD_REQUEST


# --- envelopes -------------------------------------------------------------------------

H, P = encode_request(ASK, 1, "T/k", "a"), pack({})


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b""],
        [b"", H],
        [H, P],
        [b"x", H, P],  # no delimiter
        [b"id", b"x", H, P],  # delimiter missing after a route
        [b"x"] * 10,
        [b"", H, P, b"extra"],  # payload not last
    ],
    ids=[
        "0 frames",
        "1 frame",
        "2 frames",
        "no delimiter 2",
        "no delimiter",
        "route no delim",
        "10 frames",
        "extra frame",
    ],
)
def test_split_envelope_refuses_malformed_messages(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError) as info:
        split_envelope(frames)
    assert info.value.code == ErrorCode.BAD_REQUEST


def test_split_envelope_returns_routes_header_and_payload() -> None:
    assert split_envelope([b"", H, P]) == ([], H, P)
    assert split_envelope([b"r1", b"r2", b"", H, P]) == ([b"r1", b"r2"], H, P)
    assert split_envelope([b"r1", b"", H, b""]) == ([b"r1"], H, b"")


# --- payloads ----------------------------------------------------------------------------

MALFORMED_PAYLOADS: dict[str, bytes] = {
    "empty": b"",
    "reserved byte": b"\xc1",
    "trailing bytes": raw({"n": 1}) + b"\x01",
    "truncated map": raw({"n": 1})[:-1],
    "truncated str": raw("hello")[:-2],
    "invalid utf-8": b"\xa2\xff\xfe",
    "int map key": raw({1: 2}),
    "nil map key": b"\x81\xc0\x01",
    "float map key": raw({1.5: 2}),
    "array map key": b"\x81\x91\x01\x01",
    "nested int key": raw({"a": {2: 3}}),
    "ext type 5": raw(msgpack.ExtType(5, b"data")),
    "ext type 127": raw({"n": msgpack.ExtType(127, b"")}),
    "reserved ext type -5": b"\x91\xd4\xfb\x78",
    "malformed timestamp ext": b"\xd4\xff\x00",
    "claims 2**32-1 elements": b"\xdd\xff\xff\xff\xff",
    "claims 2**32-1 map pairs": b"\xdf\xff\xff\xff\xff",
    "claims 2**32-1 bin bytes": b"\xc6\xff\xff\xff\xff",
    "nested 100k deep": b"\x91" * 100_000 + b"\xc0",
}


@pytest.mark.parametrize("frame", MALFORMED_PAYLOADS.values(), ids=MALFORMED_PAYLOADS.keys())
def test_malformed_payload_is_a_bad_request(frame: bytes) -> None:
    assert bad_request_code(frame, unpack) == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize(
    "frame",
    [raw(msgpack.Timestamp(0)), raw({"n": msgpack.Timestamp(1, 5)}), b"\xd6\xff\x00\x00\x00\x01"],
    ids=["bare", "in a map", "fixext4"],
)
def test_timestamp_ext_is_refused(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        unpack(frame)


@pytest.mark.parametrize("value", [{b"n": 1}, {"a": {b"b": 1}}], ids=["top", "nested"])
def test_bytes_map_keys_are_refused(value: Any) -> None:
    with pytest.raises(ProtocolError):
        unpack(raw(value))


def test_check_agent_id_with_surrogates_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        check_agent_id("T/\ud800")


def test_pack_refuses_what_msgpack_cannot_carry() -> None:
    with pytest.raises(TypeError):
        pack(object())
    with pytest.raises((TypeError, OverflowError)):
        pack(2**64)


# --- properties ---------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=6000))
def test_arbitrary_bytes_raise_only_protocol_error(data: bytes) -> None:
    for decoder in (decode_header, decode_reply_header, unpack):
        try:
            decoder(data)
        except ProtocolError as exc:
            assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.UNSUPPORTED_VERSION)


@FUZZ
@given(st.binary(max_size=64).map(lambda tail: encode_request(ASK, 1, "T/k", "a")[:6] + tail))
def test_bytes_after_a_plausible_prefix_raise_only_protocol_error(data: bytes) -> None:
    try:
        decode_header(data)
    except ProtocolError:
        pass


msgpack_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), U64_MAX),
    st.text(max_size=20),
    st.binary(max_size=20),
)
msgpack_values = st.recursive(
    st.one_of(msgpack_scalars, st.floats(allow_nan=False)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=8,
)
kinds = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 16, -1, True, 1.0]), msgpack_values)
agent_ids = st.one_of(st.sampled_from(["T/k", "x", "/k", "T/", ""]), msgpack_values)
actions = st.one_of(st.sampled_from(["inc", "", "1a", "a" * 129]), msgpack_values)


@FUZZ
@given(st.tuples(kinds, msgpack_values, agent_ids, actions))
def test_structured_headers_decode_strictly_or_raise_protocol_error(fields: tuple) -> None:
    frame = raw([PROTOCOL_VERSION, *fields])
    try:
        kind, corr, agent_id, action = decode_header(frame)
    except ProtocolError as exc:
        assert exc.code == ErrorCode.BAD_REQUEST
        return
    assert type(kind) is int and kind in (ASK, TELL, HELLO, STATUS)
    assert type(corr) is int and 0 <= corr <= U64_MAX
    assert isinstance(agent_id, str) and isinstance(action, str)
    if kind in (ASK, TELL):
        assert check_agent_id(agent_id) == agent_id and action.isidentifier()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(msgpack_values, min_size=4, max_size=6))
@example([[ASK], 1, "T/k", "a"])  # an unhashable kind once escaped as TypeError
def test_any_header_array_raises_only_protocol_error(fields: list) -> None:
    try:
        kind, corr, _, _ = decode_header(raw([PROTOCOL_VERSION, *fields]))
    except ProtocolError:
        return
    assert type(kind) is int and type(corr) is int


def test_acks_round_trip_as_big_endian_u64() -> None:
    ids = [0, 1, 255, 2**32, 2**64 - 1]
    payload = encode_acks(ids)
    assert payload[:16] == bytes(8) + bytes(7) + b"\x01" and len(payload) == 40
    assert decode_acks(payload) == ids
    assert decode_acks(b"") == []


@pytest.mark.parametrize("payload", [b"\x00" * 7, b"\x00" * 9, b"\x00" * 8 * (MAX_BATCH + 1)])
def test_acks_of_a_wrong_size_are_refused(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="ACKS payload"):
        decode_acks(payload)


def test_reply_items_of_every_reply_kind() -> None:
    assert reply_items(REPLY, 7, 3, b"\x01") == [(7, 3, b"\x01")]
    batch = encode_reply_batch([(1, 0, b"\xc0"), (2, 4, b"\x02")])
    assert reply_items(REPLY_BATCH, 0, 0, batch) == [[1, 0, b"\xc0"], [2, 4, b"\x02"]]
    assert reply_items(ACKS, 0, 0, encode_acks([5, 6])) == [(5, 0, b"\xc0"), (6, 0, b"\xc0")]
    assert reply_items(CREDIT, 9, 0, b"") == [] and reply_items(EVENT, 1, 0, b"") == []
