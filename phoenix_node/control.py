"""The control process: the node's public endpoint.

Forked by the supervisor like a worker (it is the only process of the node
that binds the public ``listen`` endpoint). It answers

- HELLO: the node's topology, so a client can route each message straight to
  the worker that owns the agent (``{"node_id", "protocol", "workers":
  [tcp endpoint of worker 0, 1, ...]}``);
- STATUS: the supervisor's view of the node (``<data>/run/status.json``);
- ASK/TELL sent to it by clients that do not route by themselves: forwarded,
  undecoded, to the owning worker's ipc endpoint, and the reply relayed back
  (the one extra hop such clients pay).

It heartbeats to the supervisor like a worker, and exits when the supervisor
is gone. Later issues give it the cluster duties (membership, gossip).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, NoReturn

import orjson
import zmq

from ipc import bindable, make_dealer, make_router, worker_ipc_endpoint
from ipc.protocol import (
    HELLO,
    PROTOCOL_VERSION,
    STATUS,
    SUBSCRIBE,
    TELL,
    UNSUBSCRIBE,
    ErrorCode,
    ProtocolError,
    decode_header,
    encode_reply,
    pack,
    split_envelope,
)
from workers.host import error_payload
from workers.placement import owner_index
from workers.process import WorkerExit

__all__ = ["ControlSpec", "run_control"]

log = logging.getLogger("phoenix.control")


@dataclass(frozen=True)
class ControlSpec:
    node_id: str
    listen: str
    workers: int
    status_path: str
    heartbeat_fd: int
    parent_fd: int
    heartbeat_interval: float = 0.5


def run_control(spec: ControlSpec) -> NoReturn:
    """Entry point in the forked child; never returns."""
    code = WorkerExit.CRASHED
    try:
        code = _Control(spec).run()
    except _BindError as exc:
        log.error("control process cannot bind %s: %s", spec.listen, exc)
        code = WorkerExit.BOOT_ERROR
    except BaseException:
        log.exception("control process crashed")
    finally:
        logging.shutdown()
    os._exit(int(code))


class _BindError(Exception):
    pass


class _Control:
    def __init__(self, spec: ControlSpec) -> None:
        self.spec = spec
        self.stopping = False
        self.bad_frames = 0
        self.forwarded = 0

    def _on_stop(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def run(self) -> WorkerExit:
        spec = self.spec
        for sig in (signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.front = make_router(ctx)
        try:
            self.front.bind(bindable(spec.listen))
        except zmq.ZMQError as exc:
            self.front.close(0)
            ctx.term()
            raise _BindError(str(exc)) from exc
        self.endpoint = self.front.getsockopt_string(zmq.LAST_ENDPOINT)
        self.backs = []
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        for i in range(spec.workers):
            back = make_dealer(ctx, immediate=False)
            back.connect(worker_ipc_endpoint(spec.node_id, i))
            poller.register(back, zmq.POLLIN)
            self.backs.append(back)
        poller.register(spec.parent_fd, zmq.POLLIN)
        poller.register(wake_r, zmq.POLLIN)
        next_beat = 0.0
        try:
            while not self.stopping:
                now = time.monotonic()
                if now >= next_beat:
                    self._heartbeat()
                    next_beat = now + spec.heartbeat_interval
                events = dict(poller.poll(max(1, int((next_beat - now) * 1000))))
                if spec.parent_fd in events:
                    return WorkerExit.SUPERVISOR_GONE
                for sock in events:
                    if sock is self.front:
                        self._serve_front()
                    elif isinstance(sock, zmq.Socket):
                        self._relay(sock)
            return WorkerExit.OK
        finally:
            for sock in (self.front, *self.backs):
                sock.close(0)
            ctx.term()

    def _serve_front(self) -> None:
        for _ in range(1000):
            try:
                frames = self.front.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._handle(frames)
            except Exception:
                # A bug must cost one message, not the node's endpoint.
                log.exception("control: unexpected error handling a message")
                self._bad_frame(frames[:1], ErrorCode.INTERNAL, 0, "internal error")

    def _handle(self, frames: list[bytes]) -> None:
        try:
            stack, header, _ = split_envelope(frames)
        except ProtocolError as exc:
            self._bad_frame(frames[:1], exc.code, 0, str(exc))
            return
        try:
            kind, corr, agent_id, _action = decode_header(header)
        except ProtocolError as exc:
            self._bad_frame(stack, exc.code, exc.corr_id, str(exc))
            return
        if kind == HELLO:
            self._answer(stack, corr, self._topology())
        elif kind == STATUS:
            self._answer(stack, corr, self._status())
        elif kind in (SUBSCRIBE, UNSUBSCRIBE) and b"phoenixagent" not in header:
            # A client's own subscription must reach every worker (any of them may
            # handle a publish); the client takes the first answer.
            for back in self.backs:
                try:
                    back.send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:
                    pass
            self.forwarded += 1
        else:
            # ASK/TELL go to the owner; a BATCH to the owner of its routing hint (the
            # subject of the header: the worker re-forwards entries it does not own).
            back = self.backs[owner_index(agent_id, self.spec.workers) if agent_id else 0]
            try:
                back.send_multipart(frames, zmq.NOBLOCK)
                self.forwarded += 1
            except zmq.Again:
                if kind != TELL:
                    self._send(
                        [
                            *stack,
                            b"",
                            encode_reply(corr, ErrorCode.UNAVAILABLE),
                            pack(
                                error_payload(
                                    ErrorCode.UNAVAILABLE,
                                    "the owning worker is not "
                                    "accepting messages (restarting or overloaded)",
                                )
                            ),
                        ]
                    )

    def _bad_frame(self, stack: list[bytes], code: int, corr: int, message: str) -> None:
        self.bad_frames += 1
        if stack and stack[0]:
            self._send([*stack, b"", encode_reply(corr, code), pack(error_payload(code, message))])

    def _relay(self, back: zmq.Socket[bytes]) -> None:
        for _ in range(1000):
            try:
                frames = back.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._send(frames)

    def _answer(self, stack: list[bytes], corr: int, body: dict[str, Any]) -> None:
        self._send([*stack, b"", encode_reply(corr, 0), pack(body)])

    def _send(self, frames: list[bytes]) -> None:
        try:
            self.front.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                raise

    def _status(self) -> dict[str, Any]:
        try:
            with open(self.spec.status_path, "rb") as f:
                status: dict[str, Any] = orjson.loads(f.read())
        except (OSError, orjson.JSONDecodeError):
            status = {"state": "starting", "workers": []}
        status["control"] = {
            "pid": os.getpid(),
            "forwarded": self.forwarded,
            "bad_frames": self.bad_frames,
        }
        return status

    def _topology(self) -> dict[str, Any]:
        workers = {w["index"]: w.get("endpoint") for w in self._status().get("workers", [])}
        return {
            "node_id": self.spec.node_id,
            "protocol": PROTOCOL_VERSION,
            "endpoint": self.endpoint,
            "workers": [workers.get(i) for i in range(self.spec.workers)],
        }

    def _heartbeat(self) -> None:
        line = (
            orjson.dumps(
                {
                    "pid": os.getpid(),
                    "index": -1,
                    "state": "ready",
                    "endpoint": self.endpoint,
                    "forwarded": self.forwarded,
                    "bad_frames": self.bad_frames,
                }
            )
            + b"\n"
        )
        try:
            os.write(self.spec.heartbeat_fd, line)
        except BlockingIOError:
            pass
        except BrokenPipeError:
            self.stopping = True
