"""Raw ZeroMQ + msgpack baselines: what the hardware and the libraries allow.

Phoenix figures are only meaningful as ratios against these, measured in the
same run on the same machine (see ``/work/shared/PERFORMANCE.md``):

- :func:`raw_push_pull_msgpack`: one-way PUSH -> PULL over ipc (abstract
  namespace), a small msgpack map packed per message by the sender and
  unpacked per message by the receiver. The floor for one message at a time.
- :func:`raw_dealer_router_roundtrip`: DEALER client -> ROUTER echo server,
  msgpack on both sides, ``in_flight`` requests outstanding (a sliding window).
- :func:`raw_dealer_router_latency`: the same with one request in flight,
  p50/p99 of the round trip.

Both sides of every baseline run in fresh child processes started with
``subprocess`` (never forked from a process that may hold a ZeroMQ context),
each pinned to its own CPU when at least two are usable. The calling process
only orchestrates: it pins nothing and opens no socket.

Run ``python bench/baselines.py`` to print all three.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = [
    "PAYLOAD",
    "peer_cpus",
    "raw_dealer_router_latency",
    "raw_dealer_router_roundtrip",
    "raw_push_pull_msgpack",
]

# A small map of the shape of a Phoenix request: 64 bytes once packed (seq < 2**16).
PAYLOAD: dict[str, Any] = {
    "agent": "Counter/c123",
    "action": "inc",
    "n": 1,
    "seq": 0,
    "p": "x" * 22,
}

_STOP = b"\xc0"  # msgpack nil: tells the echo server to exit
_PEER_TIMEOUT = 300.0
_LINE_TIMEOUT = 60.0


def peer_cpus() -> tuple[int | None, int | None]:
    """Two distinct usable CPUs for the two sides, or ``(None, None)`` (no pinning)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        return cpus[0], cpus[1]
    return None, None


# --- orchestration (the calling process) ------------------------------------------------


class _Peer:
    """One side of a baseline: ``python baselines.py --peer ROLE ...`` in a child."""

    def __init__(self, role: str, cpu: int | None, **args: Any) -> None:
        """The peer runs until it is done and, if it serves, until :meth:`release`."""
        cmd = [sys.executable, os.path.abspath(__file__), "--peer", role]
        if cpu is not None:
            cmd += ["--cpu", str(cpu)]
        for name, value in args.items():
            cmd += [f"--{name.replace('_', '-')}", str(value)]
        self.role = role
        # Serving peers (the PUSH sender, the echo server) stay up until their stdin
        # closes: a sender that exits as soon as its last send returns can lose the
        # last few hundred messages at disconnect, and a lost STOP would hang the run.
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def line(self, others: Sequence[_Peer] = (), timeout: float = _LINE_TIMEOUT) -> dict[str, Any]:
        """The next JSON line the peer prints (it prints one per step).

        Bounded: raises if no line comes within ``timeout`` seconds, or at once if
        one of ``others`` (the peer this one waits for) dies first.
        """
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while not select.select([self.proc.stdout], [], [], 0.2)[0]:
            for other in others:
                if other.proc.poll() is not None and other.proc.returncode != 0:
                    err = other.proc.stderr.read() if other.proc.stderr else ""
                    raise RuntimeError(
                        f"baseline peer {other.role} exited {other.proc.returncode}:\n{err}"
                    )
            if time.monotonic() > deadline:
                raise RuntimeError(f"baseline peer {self.role} printed nothing in {timeout} s")
        text = self.proc.stdout.readline()
        if not text:
            self.proc.wait(10)
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"baseline peer {self.role} exited {self.proc.returncode}:\n{err}")
        result: dict[str, Any] = json.loads(text)
        return result

    def finish(self, timeout: float = _PEER_TIMEOUT) -> None:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"baseline peer {self.role} did not finish in {timeout} s") from None
        if code != 0:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"baseline peer {self.role} exited {code}:\n{err}")
        self._close_pipes()

    def release(self) -> None:
        """Close the peer's stdin: a serving peer exits once it sees EOF."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass

    def kill(self) -> None:
        self.release()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def _ipc_endpoint() -> str:
    return f"ipc://@phoenix-bench-{os.getpid()}-{secrets.token_hex(6)}"


def raw_push_pull_msgpack(n: int) -> float:
    """One-way messages/s: PUSH -> PULL over ipc, msgpack pack + unpack per message.

    The receiver times from its first message to its ``n``-th.
    """
    cpu_a, cpu_b = peer_cpus()
    endpoint = _ipc_endpoint()
    receiver = _Peer("pull", cpu_b, endpoint=endpoint, n=n)
    sender = None
    try:
        receiver.line()  # bound
        sender = _Peer("push", cpu_a, endpoint=endpoint, n=n)
        result = receiver.line(others=[sender])
        sender.release()
        receiver.finish()
        sender.finish()
        return float(result["rate"])
    finally:
        receiver.kill()
        if sender is not None:
            sender.kill()


def _echo_endpoint(transport: str) -> str:
    if transport == "tcp":
        return "tcp://127.0.0.1:*"
    if transport == "ipc":
        return _ipc_endpoint()
    raise ValueError(f"transport must be 'tcp' or 'ipc', got {transport!r}")


def _roundtrips(n: int, in_flight: int, transport: str, latency: bool) -> dict[str, Any]:
    cpu_a, cpu_b = peer_cpus()
    server = _Peer("echo", cpu_b, endpoint=_echo_endpoint(transport))
    client = None
    try:
        endpoint = server.line()["endpoint"]
        client = _Peer(
            "dealer", cpu_a, endpoint=endpoint, n=n, in_flight=in_flight, latency=int(latency)
        )
        result = client.line(others=[server])
        client.finish()
        server.release()
        server.finish()
        return result
    finally:
        server.kill()
        if client is not None:
            client.kill()


def raw_dealer_router_roundtrip(n: int, in_flight: int = 100, transport: str = "tcp") -> float:
    """Round trips/s: DEALER -> ROUTER echo, msgpack both sides, ``in_flight`` outstanding."""
    return float(_roundtrips(n, in_flight, transport, latency=False)["rate"])


def raw_dealer_router_latency(n: int, transport: str = "tcp") -> dict[str, float]:
    """One round trip at a time: ``{"rate", "p50_us", "p99_us"}``."""
    result = _roundtrips(n, 1, transport, latency=True)
    return {"rate": result["rate"], "p50_us": result["p50_us"], "p99_us": result["p99_us"]}


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of an already sorted list, nearest rank."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


# --- the peers (child processes) ----------------------------------------------------------


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _peer_pull(endpoint: str, n: int) -> None:
    import msgpack
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    _emit({"bound": endpoint})
    unpackb, recv = msgpack.unpackb, sock.recv
    unpackb(recv())
    t0 = time.perf_counter()
    for _ in range(n - 1):
        unpackb(recv())
    elapsed = time.perf_counter() - t0
    _emit({"rate": (n - 1) / elapsed, "n": n, "seconds": elapsed})
    sock.close()
    ctx.term()


def _peer_push(endpoint: str, n: int) -> None:
    import msgpack
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(endpoint)
    pack, send = msgpack.Packer(use_bin_type=True).pack, sock.send
    payload = dict(PAYLOAD)
    for i in range(n):
        payload["seq"] = i & 0xFFFF
        send(pack(payload))
    sys.stdin.read()  # until the receiver has reported: see _Peer
    sock.close()
    ctx.term()


def _peer_echo(endpoint: str) -> None:
    import msgpack
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.setsockopt(zmq.RCVTIMEO, 200)  # to notice stdin EOF (see _Peer) when idle
    sock.bind(endpoint)
    _emit({"endpoint": sock.getsockopt_string(zmq.LAST_ENDPOINT)})
    unpackb, pack = msgpack.unpackb, msgpack.Packer(use_bin_type=True).pack
    recv, send = sock.recv_multipart, sock.send_multipart
    while True:
        try:
            ident, frame = recv()
        except zmq.Again:
            if select.select([sys.stdin], [], [], 0)[0] and not sys.stdin.read():
                break
            continue
        if frame == _STOP:
            break
        request = unpackb(frame)
        send([ident, pack(request)])
    sock.close()
    ctx.term()


def _peer_dealer(endpoint: str, n: int, in_flight: int, latency: bool) -> None:
    import msgpack
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.connect(endpoint)
    unpackb, pack = msgpack.unpackb, msgpack.Packer(use_bin_type=True).pack
    recv, send = sock.recv, sock.send
    payload = dict(PAYLOAD)
    # Warm-up: the connection is up and both processes have run their loops once.
    for _ in range(100):
        send(pack(payload))
        unpackb(recv())
    result: dict[str, Any] = {"n": n, "in_flight": in_flight}
    if latency:
        clock = time.perf_counter_ns
        samples = [0] * n
        t0 = time.perf_counter()
        for i in range(n):
            start = clock()
            payload["seq"] = i & 0xFFFF
            send(pack(payload))
            unpackb(recv())
            samples[i] = clock() - start
        elapsed = time.perf_counter() - t0
        samples.sort()
        us = [s / 1000 for s in samples]
        result.update(p50_us=percentile(us, 0.50), p99_us=percentile(us, 0.99))
    else:
        window = min(in_flight, n)
        t0 = time.perf_counter()
        for i in range(window):
            payload["seq"] = i & 0xFFFF
            send(pack(payload))
        for i in range(window, n + window):
            unpackb(recv())
            if i < n:
                payload["seq"] = i & 0xFFFF
                send(pack(payload))
        elapsed = time.perf_counter() - t0
    result.update(rate=n / elapsed, seconds=elapsed)
    send(_STOP)
    _emit(result)
    sock.close()
    ctx.term()


def _peer_main(args: argparse.Namespace) -> None:
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if args.peer == "pull":
        _peer_pull(args.endpoint, args.n)
    elif args.peer == "push":
        _peer_push(args.endpoint, args.n)
    elif args.peer == "echo":
        _peer_echo(args.endpoint)
    elif args.peer == "dealer":
        _peer_dealer(args.endpoint, args.n, args.in_flight, bool(args.latency))
    else:
        raise SystemExit(f"unknown peer role {args.peer!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--in-flight", type=int, default=100, help=argparse.SUPPRESS)
    parser.add_argument("--latency", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=500_000, help="messages per baseline")
    parser.add_argument("--transport", choices=("tcp", "ipc"), default="tcp")
    args = parser.parse_args(argv)
    if args.peer:
        _peer_main(args)
        return 0
    n = args.n
    print(f"pinned to CPUs {peer_cpus()}")
    print(f"PUSH->PULL ipc, msgpack both sides : {raw_push_pull_msgpack(n):12,.0f} msg/s")
    rate = raw_dealer_router_roundtrip(n // 4, 100, args.transport)
    print(f"DEALER->ROUTER {args.transport}, 100 in flight : {rate:12,.0f} round trips/s")
    lat = raw_dealer_router_latency(max(1000, n // 50), args.transport)
    print(
        f"DEALER->ROUTER {args.transport}, 1 in flight   : {lat['rate']:12,.0f} round trips/s"
        f"  p50 {lat['p50_us']:.1f} us  p99 {lat['p99_us']:.1f} us"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
