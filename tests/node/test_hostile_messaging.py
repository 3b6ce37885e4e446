"""Hostile input for the messaging kinds (BATCH, PUBLISH, SUBSCRIBE, ADMIN, attrs,
encodings) over real sockets, to the node endpoint and to the workers: every message
is answered with the right error code or dropped, and no process of the node dies."""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
import zmq

from ipc.protocol import (
    ACKS,
    ADMIN,
    ASK,
    BATCH,
    CREDIT,
    HELLO,
    PUBLISH,
    REPLY_BATCH,
    SUBSCRIBE,
    TELL,
    UNSUBSCRIBE,
    ErrorCode,
    ProtocolError,
    decode_reply_kind,
    reply_items,
    unpack,
)
from phoenix_node import Node
from workers.placement import owner_index

from .test_hostile_input import AGENT, assert_node_unharmed, snapshot

StartNode = Callable[..., Node]
Ctx = zmq.Context[zmq.Socket[bytes]]
MiB = 2**20
BAD = ErrorCode.BAD_REQUEST
CORR = 31
PROBES = {2**40 + 11: AGENT}  # completed below with an agent of the other worker
OTHER = next(
    f"Counter/other{i}"
    for i in range(1000)
    if owner_index(f"Counter/other{i}", 2) != owner_index(AGENT, 2)
)
PROBES[2**40 + 12] = OTHER


def raw(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def header(*fields: Any) -> bytes:
    return raw(list(fields))


def batch(entries: Any, defaults: Any = None, hint: str = AGENT) -> list[bytes]:
    head = header(1, BATCH, 0, hint, "", 0, defaults) if defaults is not None else header(
        1, BATCH, 0, hint, ""
    )  # fmt: skip
    return [b"", head, entries if isinstance(entries, bytes) else raw(entries)]


def entry(*fields: Any) -> list[Any]:
    """A BATCH entry; defaults to a well-formed ASK of AGENT.get, fields override."""
    base: list[Any] = [ASK, CORR, AGENT, "get", 0, None, b""]
    base[: len(fields)] = fields
    return base


def ask(
    attrs: Any = None, payload: bytes = b"", delivery: Any = 0, action: str = "get"
) -> list[bytes]:
    fields: list[Any] = [1, ASK, CORR, AGENT, action, delivery]
    if attrs is not None:
        fields.append(attrs)
    return [b"", header(*fields), payload]


@dataclass(frozen=True)
class Case:
    frames: list[bytes]
    codes: frozenset[int] = frozenset({BAD})
    replies: int = 1  # at most this many replies (a batch: one per entry)
    must_reply: bool = False  # a readable ASK (or entry) must be answered


def bad(frames: list[bytes], *codes: int, replies: int = 1, must: bool = False) -> Case:
    return Case(frames, frozenset(codes or {BAD}), replies, must)


def sub(kind: int, pattern: Any, action: str = "", attrs: Any = None) -> list[bytes]:
    fields: list[Any] = [1, kind, CORR, pattern, action, 0]
    if attrs is not None:
        fields.append(attrs)
    return [b"", header(*fields), b""]


GET = raw({})
BOMB = zlib.compress(b"\x00" * (20 * MiB), 9)

CORPUS: dict[str, Case] = {
    # --- BATCH frames
    "batch payload a map": bad(batch(raw({"a": 1}))),
    "batch payload garbage": bad(batch(b"\xc1\xc1")),
    "batch payload nil": bad(batch(raw(None))),
    "batch of 10,001 entries": bad(batch([entry(TELL, i, AGENT, "get") for i in range(10_001)])),
    "batch entry not an array": bad(batch([5]), must=True),
    "batch entry of 6 fields": bad(batch([entry()[:6]]), must=True),
    "batch entry of 8 fields": bad(batch([[*entry(), 1]]), must=True),
    "batch entry corr a str": bad(batch([entry(ASK, "7")]), must=True),
    "batch entry corr negative": bad(batch([entry(ASK, -7)]), must=True),
    "batch entry kind HELLO": bad(batch([entry(HELLO)]), must=True),
    "batch entry kind BATCH": bad(batch([entry(BATCH)]), must=True),
    "batch entry kind SUBSCRIBE": bad(batch([entry(SUBSCRIBE, CORR, "a.b", "")]), must=True),
    "batch entry kind 99": bad(batch([entry(99)]), must=True),
    "batch entry kind REPLY": bad(batch([entry(16)]), must=True),
    "batch entry subject an int": bad(batch([entry(ASK, CORR, 5)]), must=True),
    "batch entry bad agent id": bad(batch([entry(ASK, CORR, "noslash")]), must=True),
    "batch entry bad action": bad(batch([entry(ASK, CORR, AGENT, "1nc")]), must=True),
    "batch entry delivery 9": bad(batch([entry(ASK, CORR, AGENT, "get", 9)]), must=True),
    "batch entry delivery str": bad(batch([entry(ASK, CORR, AGENT, "get", "1")]), must=True),
    "batch entry delivery 1 without source": bad(
        batch([entry(ASK, CORR, AGENT, "get", 1)]), must=True
    ),
    "batch entry attrs a list": bad(batch([entry(ASK, CORR, AGENT, "get", 0, [1])]), must=True),
    "batch entry attrs with a bad time": bad(
        batch([entry(ASK, CORR, AGENT, "get", 0, {"time": "yesterday"})]), must=True
    ),
    "batch entry attrs with an unknown encoding": bad(
        batch([entry(ASK, CORR, AGENT, "get", 0, {"phoenixencoding": "gzip"}, GET)]), must=True
    ),
    "batch entry attrs with a float extension": bad(
        batch([entry(ASK, CORR, AGENT, "get", 0, {"myext": 1.5})]), must=True
    ),
    "batch defaults not a map": bad(batch([entry()], defaults=[1, 2])),
    "batch entry data a map": bad(
        batch([entry(ASK, CORR, AGENT, "get", 0, None, {"a": 1})]), must=True
    ),
    "batch entry data garbage": bad(
        batch([entry(ASK, CORR, AGENT, "get", 0, None, b"\xc1")]), must=True
    ),
    "batch entry huge data": bad(
        batch([entry(ASK, CORR, AGENT, "get", 0, None, raw(b"x" * (15 * MiB)))]), must=True
    ),
    "batch entry zlib bomb": bad(
        batch([entry(ASK, CORR, AGENT, "get", 0, {"phoenixencoding": "zlib"}, BOMB)]), must=True
    ),
    "batch of three bad entries": bad(
        batch([entry(99), entry(ASK, CORR, "x"), entry(ASK, CORR, AGENT, "get", 7)]),
        replies=3,
        must=True,
    ),
    # --- attrs in the header
    "attrs a list": bad(ask([1, 2]), must=True),
    "attrs of 33 entries": bad(ask({f"x{i}": i for i in range(33)}), must=True),
    "attrs name with a dash": bad(ask({"bad-name": "v"}), must=True),
    "attrs name uppercase": bad(ask({"Source": "v"}), must=True),
    "attrs int key": bad(ask({1: "v"}), must=True),
    "attrs time not RFC 3339": bad(ask({"time": "21 Nov 2026"}), must=True),
    "attrs time an int": bad(ask({"time": 1700000000}), must=True),
    "attrs time Feb 30": bad(ask({"time": "2026-02-30T00:00:00Z"}), must=True),
    "attrs source empty": bad(ask({"source": ""}), must=True),
    "attrs source an int": bad(ask({"source": 5}), must=True),
    "attrs subject carried in the header": bad(ask({"subject": "x"}), must=True),
    "attrs datacontenttype text": bad(ask({"datacontenttype": "text/plain"}), must=True),
    "attrs phoenixqos 10": bad(ask({"phoenixqos": 10}), must=True),
    "attrs extension a float": bad(ask({"myext": 1.5}), must=True),
    "attrs extension a list": bad(ask({"myext": [1]}), must=True),
    "attrs str value over 1 KiB": bad(ask({"myext": "x" * 2000}, payload=GET), must=True),
    "phoenixencoding gzip": bad(ask({"phoenixencoding": "gzip"}, GET), must=True),
    "phoenixencoding an int": bad(ask({"phoenixencoding": 1}, GET), must=True),
    "zlib payload garbage": bad(ask({"phoenixencoding": "zlib"}, b"not zlib"), must=True),
    "zlib payload truncated": bad(
        ask({"phoenixencoding": "zlib"}, zlib.compress(GET)[:-2]), must=True
    ),
    "zlib bomb": bad(ask({"phoenixencoding": "zlib"}, BOMB), must=True),
    "zlib of garbage msgpack": bad(
        ask({"phoenixencoding": "zlib"}, zlib.compress(b"\xc1")), must=True
    ),
    "JSON payload invalid": bad(ask({"datacontenttype": "application/json"}, b"{no"), must=True),
    "JSON payload an array": bad(
        ask({"datacontenttype": "application/json"}, b"[1, 2]"), must=True
    ),
    # --- delivery values
    "delivery 4": bad(ask(None, GET, 4), must=True),
    "delivery -1": bad(ask(None, GET, -1), must=True),
    "delivery a str": bad(ask(None, GET, "at_least_once"), must=True),
    "delivery True": bad(ask(None, GET, True), must=True),
    "delivery 1 without source": bad(ask(None, GET, 1), must=True),
    "delivery 2 with source an int": bad(ask({"source": 1}, GET, 2), must=True),
    "delivery causal without a stamp": bad(ask({"source": "/t"}, GET, 3), must=True),
    "delivery causal with a garbage stamp": bad(
        ask({"source": "/t", "phoenixcausal": b"\xc1garbage"}, GET, 3), must=True
    ),
    # --- PUBLISH with bad topics
    "publish empty topic": bad([b"", header(1, PUBLISH, CORR, "", "", 0), raw(1)]),
    "publish topic a..b": bad([b"", header(1, PUBLISH, CORR, "a..b", "", 0), raw(1)]),
    "publish topic .a": bad([b"", header(1, PUBLISH, CORR, ".a", "", 0), raw(1)]),
    "publish topic with *": bad([b"", header(1, PUBLISH, CORR, "a.*", "", 0), raw(1)]),
    "publish topic #": bad([b"", header(1, PUBLISH, CORR, "#", "", 0), raw(1)]),
    "publish topic of 300 chars": bad([b"", header(1, PUBLISH, CORR, "t" * 300, "", 0), raw(1)]),
    "publish topic an int": bad([b"", header(1, PUBLISH, CORR, 7, "", 0), raw(1)]),
    "publish garbage data": bad([b"", header(1, PUBLISH, CORR, "ok.topic", "", 0), b"\xc1"]),
    # --- SUBSCRIBE / UNSUBSCRIBE
    "subscribe empty pattern": bad(sub(SUBSCRIBE, ""), replies=2),
    "subscribe a.#.b": bad(sub(SUBSCRIBE, "a.#.b"), replies=2),
    "subscribe a*": bad(sub(SUBSCRIBE, "a*"), replies=2),
    "subscribe a..b": bad(sub(SUBSCRIBE, "a..b"), replies=2),
    "subscribe 300 chars": bad(sub(SUBSCRIBE, "p" * 300), replies=2),
    "subscribe pattern an int": bad(sub(SUBSCRIBE, 5), replies=2),
    "unsubscribe a.#.b": bad(sub(UNSUBSCRIBE, "a.#.b"), replies=2),
    "subscribe agent id an int": bad(sub(SUBSCRIBE, "a.b", "get", {"phoenixagent": 5})),
    "subscribe agent id bad": bad(sub(SUBSCRIBE, "a.b", "get", {"phoenixagent": "noslash"})),
    "subscribe agent bad action": bad(sub(SUBSCRIBE, "a.b", "1x", {"phoenixagent": AGENT})),
    "subscribe agent delivery 9": bad(
        sub(SUBSCRIBE, "a.b", "get", {"phoenixagent": AGENT, "phoenixsubdelivery": 9})
    ),
    "subscribe agent delivery a str": bad(
        sub(SUBSCRIBE, "a.b", "get", {"phoenixagent": AGENT, "phoenixsubdelivery": "1"})
    ),
    "unsubscribe agent bad pattern": bad(sub(UNSUBSCRIBE, "#.a", "", {"phoenixagent": AGENT})),
    # --- ADMIN
    "admin unknown operation": bad([b"", header(1, ADMIN, CORR, "", "format_disk"), b""]),
    "admin empty operation": bad([b"", header(1, ADMIN, CORR, "", ""), b""]),
    "admin operation an int": bad([b"", header(1, ADMIN, CORR, "", 5), b""]),
    "admin operation of 5000 chars": bad([b"", header(1, ADMIN, CORR, "", "x" * 5000), b""]),
    # --- reply-direction kinds sent as requests
    "REPLY header": bad([b"", header(1, 16, CORR, 0), raw(1)]),
    "REPLY with a request's fields": bad([b"", header(1, 16, CORR, AGENT, "get"), GET]),
    "REPLY_BATCH": bad([b"", header(1, REPLY_BATCH, 0, 0), raw([[CORR, 0, b"\xc0"]])]),
    "EVENT": bad([b"", header(1, 18, 1, 0), raw(["t", "", "1", b"\xc0"])]),
    "ACKS": bad([b"", header(1, ACKS, 0, 0), struct.pack(">Q", CORR)]),
    "ACKS of 7 bytes": bad([b"", header(1, ACKS, 0, 0), b"\x00" * 7]),
    "CREDIT of 2**63": bad([b"", header(1, CREDIT, 2**63, 0), b""]),
    "CREDIT with a request's fields": bad([b"", header(1, CREDIT, 5, AGENT, "get"), b""]),
}


# --- helpers --------------------------------------------------------------------------------


@pytest.fixture
def ctx() -> Iterator[Ctx]:
    context: Ctx = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)


Reply = tuple[int, int, bytes]


def exchange(ctx: Ctx, endpoint: str, frames: list[bytes], probes: dict[int, str]) -> list[Reply]:
    """Send ``frames``, then a ``get`` probe to each agent of ``probes``; return every reply
    received before all probes were answered (replies split, credits skipped). A probe
    per worker makes this a barrier: each worker answers one sender in order."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        # The probes travel as one BATCH: a worker that forwards entries of another's
        # agents batches them, and a plain ASK it forwards may overtake such a batch.
        sock.send_multipart(batch([entry(ASK, corr, agent) for corr, agent in probes.items()]))
        waiting = set(probes)
        received: list[Reply] = []
        deadline = time.monotonic() + 15
        while waiting and time.monotonic() < deadline:
            if not sock.poll(100):
                continue
            got = sock.recv_multipart()
            assert len(got) >= 3 and got[-3] == b"", f"reply without a delimiter: {got[:3]}"
            try:
                kind, corr, status = decode_reply_kind(got[-2])
            except ProtocolError:
                raise AssertionError(f"unreadable reply header {got[-2]!r}") from None
            if kind == CREDIT:
                continue
            for c, st, body in reply_items(kind, corr, status, got[-1]):
                if c in waiting and st == 0:
                    waiting.discard(c)
                else:
                    received.append((c, st, body))
        assert not waiting, "a probe sent after the case got no reply: a receiver is stuck"
        return received
    finally:
        sock.close(linger=0)


def check(ctx: Ctx, endpoint: str, name: str, case: Case, probes: dict[int, str]) -> None:
    replies = exchange(ctx, endpoint, case.frames, probes)
    assert len(replies) <= case.replies, f"{name}: {len(replies)} replies: {replies[:3]}"
    if case.must_reply:
        assert replies, f"{name}: no reply"
    for corr, status, body_raw in replies:
        body = unpack(body_raw)
        assert status in case.codes, f"{name}: code {status}, expected {set(case.codes)}: {body}"
        assert isinstance(body, dict) and body["code"] == status, f"{name}: {body}"
        assert isinstance(body["message"], str) and body["message"], name
        if case.must_reply:
            assert corr in (CORR, 0), f"{name}: the reply does not echo the corr id ({corr})"


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("target", ["node", "owning worker", "other worker"])
def test_malformed_messaging_frames_are_answered_or_dropped(
    start_node: StartNode, ctx: Ctx, target: str
) -> None:
    node = start_node(workers=2)
    before = snapshot(node)
    workers = before["workers"]
    if target == "node":
        endpoint = node.endpoint
    else:
        index = owner_index(AGENT, 2)
        endpoint = workers[index if target == "owning worker" else 1 - index]["endpoint"]
    # a probe through a worker's own endpoint reaches the other worker by forwarding
    failures = []
    for name, case in CORPUS.items():
        try:
            check(ctx, endpoint, name, case, PROBES)
        except AssertionError as exc:
            failures.append(str(exc).splitlines()[0])
    assert not failures, "\n".join(failures)
    assert_node_unharmed(node, before)


@pytest.mark.timeout(60)
def test_a_zlib_bomb_does_not_grow_the_worker(start_node: StartNode, ctx: Ctx) -> None:
    import psutil

    node = start_node(workers=1)
    before = snapshot(node)
    worker = psutil.Process(before["workers"][0]["pid"])
    rss = worker.memory_info().rss
    bomb = zlib.compress(b"\x00" * (256 * MiB), 9)  # ~256 KiB on the wire
    for _ in range(5):
        check(ctx, node.endpoint, "bomb", bad(ask({"phoenixencoding": "zlib"}, bomb)), PROBES)
    grew = worker.memory_info().rss - rss
    assert grew < 100 * MiB, f"the worker grew by {grew // MiB} MiB inflating bombs"
    assert_node_unharmed(node, before)
