"""The socket factories (ipc/sockets.py) on real ZeroMQ sockets over loopback tcp."""

from __future__ import annotations

import pytest
import zmq

from ipc import make_dealer, make_router


def _recv(sock: zmq.Socket[bytes], timeout_ms: int = 3000) -> list[bytes]:
    assert sock.poll(timeout_ms), "nothing arrived"
    return sock.recv_multipart()


@pytest.mark.timeout(20)
def test_a_dealer_that_comes_back_with_the_same_routing_id_takes_it_over(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    """A peer re-creates its DEALER (same routing id) while the ROUTER still holds the old
    connection: the new one is served (ROUTER_HANDOVER), not refused in silence."""
    router = make_router(ctx)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    old = make_dealer(ctx, identity=b"node:a#1", immediate=False)
    new = make_dealer(ctx, identity=b"node:a#1", immediate=False)
    try:
        old.connect(f"tcp://127.0.0.1:{port}")
        old.send_multipart([b"", b"first"])
        assert _recv(router) == [b"node:a#1", b"", b"first"]
        new.connect(f"tcp://127.0.0.1:{port}")  # the old connection is still up
        new.send_multipart([b"", b"second"])
        assert _recv(router) == [b"node:a#1", b"", b"second"]
        router.send_multipart([b"node:a#1", b"", b"answer"])
        assert _recv(new) == [b"", b"answer"]
    finally:
        for sock in (old, new, router):
            sock.close(0)
