"""Endpoint validation (ipc/endpoints.py) and the socket factory (ipc/sockets.py), with
real ZeroMQ sockets over inproc, ipc (abstract namespace) and tcp on 127.0.0.1."""

from __future__ import annotations

import os
from typing import Any

import pytest
import zmq

from ipc import (
    EndpointError,
    TransportError,
    bindable,
    check_endpoint,
    control_ipc_endpoint,
    make_dealer,
    make_router,
    worker_ipc_endpoint,
)
from ipc.protocol import (
    ASK,
    decode_header,
    decode_reply_header,
    encode_reply,
    encode_request,
    pack,
    split_envelope,
    unpack,
)
from ipc.sockets import DEFAULT_MAX_MESSAGE

IPC_MAX = 107

VALID = [
    "tcp://127.0.0.1:5555",
    "tcp://127.0.0.1:0",
    "tcp://127.0.0.1:*",
    "tcp://*:1",
    "tcp://localhost:65535",
    "tcp://[::1]:7400",
    "tcp://eth0:7400",
    "ipc://@phoenix-node",
    "ipc:///tmp/phoenix.sock",
    "ipc://@" + "n" * (IPC_MAX - 1),  # exactly 107 bytes after the scheme
    "inproc://phoenix",
]


@pytest.mark.parametrize("endpoint", VALID)
def test_valid_endpoints_are_returned_unchanged(endpoint: str) -> None:
    assert check_endpoint(endpoint) == endpoint


INVALID: dict[str, Any] = {
    "empty": "",
    "no scheme": "127.0.0.1:5555",
    "scheme only": "tcp://",
    "unknown scheme": "http://127.0.0.1:80",
    "udp": "udp://127.0.0.1:5555",
    "uppercase scheme": "TCP://127.0.0.1:5555",
    "tcp without port": "tcp://127.0.0.1",
    "tcp without host": "tcp://:5555",
    "tcp empty port": "tcp://127.0.0.1:",
    "tcp port 65536": "tcp://127.0.0.1:65536",
    "tcp port -1": "tcp://127.0.0.1:-1",
    "tcp port name": "tcp://127.0.0.1:http",
    "tcp port with space": "tcp://127.0.0.1:55 55",
    "tcp port +1": "tcp://127.0.0.1:+1",
    "ipc empty": "ipc://",
    "ipc 108 bytes": "ipc://@" + "n" * IPC_MAX,
    "ipc 108 UTF-8 bytes in 55 chars": "ipc://@" + "é" * 53 + "n",
    "inproc empty": "inproc://",
    "not a str: bytes": b"tcp://127.0.0.1:5555",
    "not a str: None": None,
    "not a str: int": 5555,
}


@pytest.mark.parametrize("endpoint", INVALID.values(), ids=INVALID.keys())
def test_invalid_endpoints_raise_endpoint_error(endpoint: Any) -> None:
    with pytest.raises(EndpointError):
        check_endpoint(endpoint)
    with pytest.raises(EndpointError):
        bindable(endpoint)


def test_endpoint_error_is_a_transport_error_and_a_value_error() -> None:
    with pytest.raises(EndpointError, match="107 bytes") as info:
        check_endpoint("ipc://@" + "n" * IPC_MAX)
    assert isinstance(info.value, TransportError)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "port",
    ["\u00b2", "\uff15\uff15\uff15\uff15", "\u0663"],
    ids=["superscript", "fullwidth", "arabic"],
)
def test_non_ascii_digit_ports_are_refused(port: str) -> None:
    with pytest.raises(EndpointError):
        check_endpoint(f"tcp://127.0.0.1:{port}")


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("tcp://127.0.0.1:0", "tcp://127.0.0.1:*"),
        ("tcp://*:0", "tcp://*:*"),
        ("tcp://127.0.0.1:*", "tcp://127.0.0.1:*"),
        ("tcp://127.0.0.1:10", "tcp://127.0.0.1:10"),
        ("tcp://127.0.0.1:100", "tcp://127.0.0.1:100"),
        ("ipc://@x:0", "ipc://@x:0"),
        ("inproc://a:0", "inproc://a:0"),
    ],
)
def test_bindable_turns_only_a_tcp_port_0_into_star(endpoint: str, expected: str) -> None:
    assert bindable(endpoint) == expected


def test_local_ipc_endpoints_are_abstract_valid_and_distinct() -> None:
    names = {worker_ipc_endpoint("abcd1234", i) for i in range(64)}
    names.add(control_ipc_endpoint("abcd1234"))
    names.add(worker_ipc_endpoint("ffff0000", 0))
    assert len(names) == 66
    for name in names:
        assert name.startswith("ipc://@") and check_endpoint(name) == name
    with pytest.raises(EndpointError):
        worker_ipc_endpoint("n" * 200, 0)


# --- real sockets --------------------------------------------------------------------------


def test_factory_sets_safe_options(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    router = make_router(ctx, identity=b"r1")
    dealer = make_dealer(ctx)
    slow = make_dealer(ctx, immediate=False, linger_ms=250, max_message=1024, hwm=10)
    try:
        for sock in (router, dealer):
            assert sock.getsockopt(zmq.LINGER) == 0
            assert sock.getsockopt(zmq.MAXMSGSIZE) == DEFAULT_MAX_MESSAGE == 16 * 2**20
            assert sock.getsockopt(zmq.SNDHWM) > 0 and sock.getsockopt(zmq.RCVHWM) > 0
        assert router.getsockopt(zmq.IDENTITY) == b"r1"
        assert dealer.getsockopt(zmq.IMMEDIATE) == 1
        assert slow.getsockopt(zmq.IMMEDIATE) == 0
        assert slow.getsockopt(zmq.LINGER) == 250
        assert slow.getsockopt(zmq.MAXMSGSIZE) == 1024
        assert slow.getsockopt(zmq.SNDHWM) == 10
    finally:
        for sock in (router, dealer, slow):
            sock.close(linger=0)


def test_router_mandatory_refuses_unknown_peers(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    router = make_router(ctx)
    try:
        router.bind(bindable("tcp://127.0.0.1:0"))
        with pytest.raises(zmq.ZMQError) as info:
            router.send_multipart([b"nobody", b"", encode_reply(1), pack(None)], zmq.NOBLOCK)
        assert info.value.errno == zmq.EHOSTUNREACH
    finally:
        router.close(linger=0)


ENDPOINTS = {
    "inproc": "inproc://phoenix-test-{pid}",
    "ipc": "ipc://@phoenix-test-{pid}",
    "tcp": "tcp://127.0.0.1:0",
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("template", ENDPOINTS.values(), ids=ENDPOINTS.keys())
def test_request_and_reply_over_each_transport(
    ctx: zmq.Context[zmq.Socket[bytes]], template: str
) -> None:
    router = make_router(ctx)
    dealer = make_dealer(ctx, immediate=False)
    try:
        router.bind(bindable(check_endpoint(template.format(pid=os.getpid()))))
        bound = router.getsockopt_string(zmq.LAST_ENDPOINT)
        if template.startswith("tcp"):
            port = int(bound.rpartition(":")[2])
            assert bound.startswith("tcp://127.0.0.1:") and 0 < port < 65536
        dealer.connect(bound)
        dealer.send_multipart([b"", encode_request(ASK, 42, "Counter/a", "inc"), pack({"n": 3})])
        assert router.poll(5000), "request not received"
        stack, header, payload = split_envelope(router.recv_multipart())
        assert len(stack) == 1 and stack[0]
        assert decode_header(header) == (ASK, 42, "Counter/a", "inc")
        assert unpack(payload) == {"n": 3}
        router.send_multipart([*stack, b"", encode_reply(42, 0), pack(3)], zmq.NOBLOCK)
        assert dealer.poll(5000), "reply not received"
        routes, header, payload = split_envelope(dealer.recv_multipart())
        assert routes == [] and decode_reply_header(header) == (42, 0) and unpack(payload) == 3
    finally:
        dealer.close(linger=0)
        router.close(linger=0)


@pytest.mark.timeout(30)
def test_maxmsgsize_disconnects_a_peer_that_sends_too_much(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    router = make_router(ctx, max_message=1000)
    dealer = make_dealer(ctx, immediate=False)
    try:
        router.bind(bindable("tcp://127.0.0.1:0"))
        dealer.connect(router.getsockopt_string(zmq.LAST_ENDPOINT))
        dealer.send_multipart([b"", b"h", b"x" * 1001])
        assert not router.poll(500), "an oversized message was delivered"
        dealer.send_multipart([b"", b"h", b"x" * 10])  # the dealer reconnects
        assert router.poll(5000)
        assert router.recv_multipart()[1:] == [b"", b"h", b"x" * 10]
    finally:
        dealer.close(linger=0)
        router.close(linger=0)
