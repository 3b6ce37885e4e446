"""Hostile input over real sockets: malformed multipart messages sent with a raw DEALER
to a running node's public endpoint and straight to its workers' tcp endpoints. Each is
answered with an error reply or dropped; no process of the node crashes."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
import zmq

from ipc.protocol import (
    ASK,
    CREDIT,
    HELLO,
    STATUS,
    TELL,
    ErrorCode,
    ProtocolError,
    decode_reply_header,
    decode_reply_kind,
    encode_request,
    reply_items,
    unpack,
)
from phoenix_node import Client, Node
from phoenix_node.errors import PhoenixError
from workers.placement import owner_index

from ..conftest import kill_pids

StartNode = Callable[..., Node]
Ctx = zmq.Context[zmq.Socket[bytes]]

AGENT = "Counter/hostile"
CORR = 7
PROBE_CORR = 2**40 + 1
MiB = 2**20


def raw(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def header(*fields: Any) -> bytes:
    return raw(list(fields))


# an unknown type's id owned by the same worker as AGENT (of 2): replies then keep their order
NOPE = next(
    f"Nope/{i}" for i in range(1000) if owner_index(f"Nope/{i}", 2) == owner_index(AGENT, 2)
)
INC = header(1, ASK, CORR, AGENT, "inc")
ARGS = raw({"n": 1})
BAD = ErrorCode.BAD_REQUEST


@dataclass(frozen=True)
class Case:
    frames: list[bytes]
    codes: frozenset[int] = frozenset({BAD})  # acceptable codes of an error reply
    must_reply: bool = False  # an ASK whose header is readable must be answered
    bad_header: bool = True  # counted in bad_frames by the receiver
    ok: bool = False  # a valid edge case: an ok reply echoing the corr id


def _bad(frames: list[bytes], *codes: int) -> Case:
    return Case(frames, frozenset(codes or {BAD}))


def _payload(payload: bytes, *codes: int, kind: int = ASK, agent: str = AGENT) -> Case:
    return Case(
        [b"", header(1, kind, CORR, agent, "inc"), payload],
        frozenset(codes or {BAD}),
        must_reply=kind == ASK,
        bad_header=False,
    )


CORPUS: dict[str, Case] = {
    "one frame": _bad([b"hello"]),
    "only the delimiter": _bad([b""]),
    "header and payload, no delimiter": _bad([INC, ARGS]),
    "no delimiter": _bad([b"x", INC, ARGS]),
    "ten frames": _bad([b"x"] * 10),
    "garbage header": _bad([b"", b"\xc1\xff garbage", ARGS]),
    "truncated header": _bad([b"", INC[:-2], ARGS]),
    "empty header": _bad([b"", b"", ARGS]),
    "header not an array": _bad([b"", raw({"version": 1}), ARGS]),
    "header of 3 elements": _bad([b"", header(1, ASK, CORR), ARGS]),
    "version 2": _bad([b"", header(2, ASK, CORR, AGENT, "inc"), ARGS], 9),
    "version 0": _bad([b"", header(0, ASK, CORR, AGENT, "inc"), ARGS], 9),
    "version True": _bad([b"", header(True, ASK, CORR, AGENT, "inc"), ARGS], 9),
    "kind 15": _bad([b"", header(1, 15, CORR, AGENT, "inc"), ARGS]),
    "kind REPLY": _bad([b"", header(1, 16, CORR, AGENT, "inc"), ARGS]),
    "kind as str": _bad([b"", header(1, "ask", CORR, AGENT, "inc"), ARGS]),
    "negative corr id": _bad([b"", header(1, ASK, -1, AGENT, "inc"), ARGS]),
    "bool corr id": _bad([b"", header(1, ASK, True, AGENT, "inc"), ARGS]),
    "float corr id": _bad([b"", header(1, ASK, 2.0**64, AGENT, "inc"), ARGS]),
    "agent id x": _bad([b"", header(1, ASK, CORR, "x", "inc"), ARGS]),
    "agent id /k": _bad([b"", header(1, ASK, CORR, "/k", "inc"), ARGS]),
    "agent id T/": _bad([b"", header(1, ASK, CORR, "Counter/", "inc"), ARGS]),
    "agent id of 600 bytes": _bad([b"", header(1, ASK, CORR, "Counter/" + "k" * 592, "inc"), ARGS]),
    "agent id as bin": _bad([b"", header(1, ASK, CORR, AGENT.encode(), "inc"), ARGS]),
    "action 1nc": _bad([b"", header(1, ASK, CORR, AGENT, "1nc"), ARGS]),
    "action of 129 chars": _bad([b"", header(1, ASK, CORR, AGENT, "a" * 129), ARGS]),
    "header over 4 KiB": _bad([b"", header(1, ASK, CORR, AGENT, "inc", "x" * 5000), ARGS]),
    "ext type in header": _bad([b"", header(1, ASK, CORR, msgpack.ExtType(3, b"x"), "inc"), ARGS]),
    "int map key in header": _bad([b"", header(1, ASK, CORR, {1: 2}, "inc"), ARGS]),
    "payload not a map": _payload(raw([1, 2])),
    "payload nil": _payload(raw(None)),
    "payload with an ext type": _payload(raw({"n": msgpack.ExtType(5, b"\x00")})),
    "payload of garbage bytes": _payload(b"\xc1\xc1\xc1"),
    "payload truncated": _payload(ARGS[:-1]),
    "payload with an int key": _payload(raw({1: 1})),
    "payload nested 10k deep": _payload(b"\x81\xa1n" + b"\x91" * 10_000 + b"\xc0"),
    "payload with trailing bytes": _payload(ARGS + b"\x00"),
    "bad arguments": _payload(raw({"wings": 2}), ErrorCode.BAD_ARGUMENTS),
    "unknown type, garbage payload": _payload(b"\xc1", ErrorCode.UNKNOWN_AGENT_TYPE, agent=NOPE),
    "TELL with a garbage payload": _payload(b"\xc1", kind=TELL),
    "max corr id (valid)": Case(
        [b"", header(1, ASK, 2**64 - 1, AGENT, "get"), b""], bad_header=False, ok=True
    ),
}
WORKER_ONLY: dict[str, Case] = {
    "HELLO to a worker": _payload(b"", kind=HELLO, agent=""),
    "STATUS to a worker": _payload(b"", kind=STATUS, agent=""),
}


# --- helpers --------------------------------------------------------------------------------


@pytest.fixture
def ctx() -> Iterator[Ctx]:
    context: Ctx = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)


def dealer(ctx: Ctx, endpoint: str) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


Reply = tuple[int, int, bytes, list[bytes]]


def replies_until_probe(sock: zmq.Socket[bytes], timeout: float = 10.0) -> list[Reply]:
    """Every reply received before the probe's ok reply, as ``(corr, status, body,
    frames)``: batched replies are split, flow-control credits skipped.

    The probe asks AGENT, so it reaches the same worker as the case (directly or through
    the same forwarding socket) and its reply comes after any reply to the case.
    """
    received: list[Reply] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sock.poll(100):
            continue
        frames = sock.recv_multipart()
        try:
            kind, corr, status = decode_reply_kind(frames[-2])
        except (ProtocolError, IndexError):
            received.append((-1, -1, b"", frames))
            continue
        if kind == CREDIT:
            continue
        for c, st, body in reply_items(kind, corr, status, frames[-1]):
            if c == PROBE_CORR and st == 0:
                return received
            received.append((c, st, body, frames))
    raise AssertionError("the probe sent after the case got no reply: the receiver is stuck")


def check_case(ctx: Ctx, endpoint: str, name: str, case: Case) -> None:
    sock = dealer(ctx, endpoint)
    try:
        sock.send_multipart(case.frames)
        probe = [b"", encode_request(ASK, PROBE_CORR, AGENT, "get"), b""]
        sock.send_multipart(probe)
        replies = replies_until_probe(sock)
    finally:
        sock.close(linger=0)
    assert len(replies) <= 1, f"{name}: {len(replies)} replies to one message"
    if not replies:
        assert not (case.must_reply or case.ok), f"{name}: no reply"
        return
    corr, status, raw_body, frames = replies[0]
    assert len(frames) >= 3 and frames[-3] == b"", f"{name}: reply without a delimiter"
    assert corr >= 0, f"{name}: unreadable reply {frames}"
    body = unpack(raw_body)
    if case.ok:
        assert (corr, status) == (2**64 - 1, 0), f"{name}: {status} {body}"
        return
    assert status in case.codes, f"{name}: code {status}, expected {set(case.codes)}: {body}"
    assert isinstance(body, dict) and body["code"] == status, name
    assert isinstance(body["message"], str) and body["message"], name
    if case.must_reply:
        assert corr == CORR, f"{name}: the reply does not echo the corr id"


def snapshot(node: Node) -> dict[str, Any]:
    with node.client(timeout=5.0) as c:
        return c.status()


def assert_node_unharmed(node: Node, before: dict[str, Any]) -> dict[str, Any]:
    after = snapshot(node)
    assert [w["pid"] for w in after["workers"]] == [w["pid"] for w in before["workers"]]
    assert all(w["restarts"] == 0 for w in after["workers"]), after["workers"]
    assert after["control"]["pid"] == before["control"]["pid"], "the control process died"
    with Client(node.endpoint, timeout=5.0) as fresh:
        assert fresh.ask(AGENT, "get") == 0, "a malformed message ran the action"
        assert fresh.ask("Counter/after-hostile", "inc", n=2) == 2
        assert fresh.ask("KV/after-hostile", "keys") == []
    with Client(node.endpoint, timeout=5.0, route=False) as via_node:
        assert via_node.ask("Counter/after-hostile", "inc") == 3
    assert "crashed" not in node.log(), node.log()
    return after


def worker_endpoint(status: dict[str, Any], owner: bool) -> str:
    workers = status["workers"]
    index = owner_index(AGENT, len(workers))
    if not owner:
        index = (index + 1) % len(workers)
    endpoint: str = workers[index]["endpoint"]
    assert endpoint.startswith("tcp://127.0.0.1:")
    return endpoint


# --- the corpus ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("target", ["node", "owning worker", "other worker"])
def test_malformed_messages_are_answered_or_dropped_and_nothing_crashes(
    start_node: StartNode, ctx: Ctx, target: str
) -> None:
    node = start_node(workers=2)
    before = snapshot(node)
    if target == "node":
        endpoint, corpus = node.endpoint, CORPUS
    else:
        endpoint = worker_endpoint(before, owner=target == "owning worker")
        corpus = {**CORPUS, **WORKER_ONLY}
    for name, case in corpus.items():
        check_case(ctx, endpoint, name, case)
    after = assert_node_unharmed(node, before)
    grew = after["control"]["bad_frames"] - before["control"]["bad_frames"]
    if target == "node":
        assert grew == sum(c.bad_header for c in corpus.values())
    else:
        assert grew == 0
    # Worker bad_frames are counted in heartbeats, but Client.status() does not report
    # them (supervisor.status() drops the field): see the report, not asserted here.


@pytest.mark.timeout(60)
def test_an_oversized_message_is_dropped_by_disconnecting_the_peer(
    start_node: StartNode, ctx: Ctx
) -> None:
    node = start_node(workers=2)
    before = snapshot(node)
    big = raw({"n": 1, "pad": b"x" * (17 * MiB)})
    for endpoint in (node.endpoint, worker_endpoint(before, owner=True)):
        sock = dealer(ctx, endpoint)
        try:
            sock.send_multipart([b"", INC, big])
            assert not sock.poll(1000), f"{endpoint} answered a message over 16 MiB"
            # the peer was disconnected; the DEALER reconnects and is served again
            sock.send_multipart([b"", encode_request(ASK, PROBE_CORR, AGENT, "get"), b""])
            assert sock.poll(5000), f"{endpoint} did not serve the reconnected peer"
            assert decode_reply_header(sock.recv_multipart()[-2]) == (PROBE_CORR, 0)
        finally:
            sock.close(linger=0)
    assert_node_unharmed(node, before)


@pytest.mark.timeout(60)
def test_a_multipart_message_over_16_mib_is_not_run(start_node: StartNode, ctx: Ctx) -> None:
    node = start_node(workers=1)
    sock = dealer(ctx, node.endpoint)
    try:
        sock.send_multipart([b"r" * (9 * MiB), b"q" * (9 * MiB), b"", INC, ARGS])
        sock.poll(2000)
    finally:
        sock.close(linger=0)
    with node.client() as c:
        assert c.ask(AGENT, "get") == 0, "an 18 MiB message was accepted and run"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("target", ["node", "worker"])
def test_a_list_as_kind_does_not_crash_the_receiver(
    start_node: StartNode, ctx: Ctx, target: str
) -> None:
    node = start_node(workers=1)
    before = snapshot(node)
    endpoint = node.endpoint if target == "node" else before["workers"][0]["endpoint"]
    sock = dealer(ctx, endpoint)
    try:
        sock.send_multipart([b"", header(1, [ASK], CORR, AGENT, "inc"), ARGS])
        assert sock.poll(1500), "no error reply: the receiver crashed"
        assert decode_reply_header(sock.recv_multipart()[-2])[1] == BAD
    finally:
        sock.close(linger=0)
    assert_node_unharmed(node, before)


@pytest.mark.timeout(60)
def test_an_error_reply_to_a_readable_header_echoes_its_corr_id(
    start_node: StartNode, ctx: Ctx
) -> None:
    node = start_node(workers=1)
    sock = dealer(ctx, node.endpoint)
    try:
        sock.send_multipart([b"", header(1, ASK, 4242, "no-slash", "inc"), ARGS])
        assert sock.poll(3000)
        assert decode_reply_header(sock.recv_multipart()[-2]) == (4242, BAD)
    finally:
        sock.close(linger=0)


@pytest.mark.timeout(60)
def test_a_restarted_control_process_keeps_the_public_endpoint(start_node: StartNode) -> None:
    node = start_node(workers=1)
    control = snapshot(node)["control"]["pid"]
    try:
        os.kill(control, signal.SIGKILL)
        deadline = time.monotonic() + 4
        status = None
        while status is None and time.monotonic() < deadline:
            try:
                with Client(node.endpoint, timeout=0.5) as c:
                    status = c.status()
            except PhoenixError:
                pass
        assert status is not None, "the node endpoint is gone after a control restart"
        assert status["control"]["pid"] != control
    finally:
        kill_pids([control])
