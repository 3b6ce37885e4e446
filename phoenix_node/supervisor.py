"""The supervisor: forks, pins, watches and restarts the node's processes.

Modelled on gunicorn's Arbiter. The supervisor never creates a ZeroMQ context
or a thread, so it can fork at any time (first start and restarts alike)
without a child inheriting locked state (GOTCHAS: fork). It forks:

- one *worker* per slot (``workers`` setting, default one per CPU of
  ``os.sched_getaffinity(0)``; more workers than CPUs share them round-robin),
  each pinned to its CPU inside the child before anything else;
- one *control* process that owns the node's public endpoint (topology,
  status, forwarding for clients that do not route by themselves).

Signals only enqueue (``signal.set_wakeup_fd`` wakes the loop); the loop then

1. handles queued signals (SIGTERM/SIGINT: graceful stop; SIGCHLD: reap),
2. reads heartbeat lines from every child's pipe,
3. reaps dead children (``waitpid(-1, WNOHANG)`` until none is left), clears
   their stale LMDB reader slots and schedules a restart with exponential
   backoff,
4. kills children whose heartbeats stopped (hung loop, SIGSTOP),
5. starts children whose backoff has elapsed,
6. writes ``<data>/run/status.json`` for ``phoenix-node status``.

Too many crashes within ``restart_period`` (``max_restarts``) stop the node
with exit code :attr:`SupervisorExit.RESTART_LIMIT` and a message naming the
slot and its last exit, instead of restarting in a loop.

Graceful stop: SIGTERM to every child (workers finish what they hold, commit,
exit 0), wait up to ``drain_timeout``, SIGKILL what is left, exit 0. Children
notice a dead supervisor through EOF on a pipe and exit on their own.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import logging
import os
import secrets
import select
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import orjson

from phoenix_node.state import StateError
from phoenix_node.state.store import Store
from workers.agent import Agent
from workers.mailbox import MailboxPolicy
from workers.process import WorkerExit, WorkerSpec, run_worker
from workers.ratelimit import RateLimit

from .config import NodeConfig
from .control import ControlSpec, run_control

__all__ = ["Supervisor", "SupervisorExit"]

log = logging.getLogger("phoenix.supervisor")

CONTROL = -1  # slot index of the control process


class SupervisorExit(enum.IntEnum):
    """Exit codes of ``phoenix-node run``."""

    OK = 0
    CONFIG_ERROR = 2  # bad settings or a broken plugin: nothing was started
    RESTART_LIMIT = 3  # children crashed too often: the node stopped itself
    DATA_DIR_BUSY = 4  # another node holds the data directory
    BOOT_FAILED = 5


@dataclass
class Slot:
    """One child process position (a worker index, or CONTROL) and its history."""

    index: int
    cpu: int | None
    tcp_endpoint: str
    pid: int = 0
    hb_fd: int = -1
    parent_fd: int = -1
    buffer: bytes = b""
    started_at: float = 0.0
    last_beat: float = 0.0
    restarts: int = 0
    failures: int = 0  # consecutive, for the backoff
    next_start: float = 0.0
    beat: dict[str, Any] = field(default_factory=dict)
    last_exit: str = ""

    @property
    def name(self) -> str:
        return "control" if self.index == CONTROL else f"worker {self.index}"


class Supervisor:
    """Runs one node until it is stopped; :meth:`run` returns the exit code."""

    def __init__(
        self,
        config: NodeConfig,
        types: dict[str, type[Agent]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.types = types
        self.clock = clock
        self.node_id = secrets.token_hex(4)
        self.data_dir = os.path.abspath(config.data)
        self.store_path = os.path.join(self.data_dir, "lmdb")
        self.run_dir = os.path.join(self.data_dir, "run")
        self.status_path = os.path.join(self.run_dir, "status.json")
        self.signals: deque[int] = deque()
        self.stopping = False
        self.exit_code = SupervisorExit.OK
        self.crashes: deque[float] = deque()
        self.slots: dict[int, Slot] = {}
        self.ready = False
        self._last_status = 0.0
        self._lock_fd = -1
        self._activity = (0.0, 0)  # (when, handled) of the last activity line

    # --- setup ------------------------------------------------------------------------

    def _prepare(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        self._lock_fd = os.open(
            os.path.join(self.data_dir, "node.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
        )
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip()
            raise _DataDirBusy(
                f"data directory {self.data_dir} is used by another node (pid {holder or '?'})"
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        # Create the environment (and check it opens) before any child exists;
        # closed again so no LMDB handle crosses a fork.
        with Store(self.store_path, durability=self.config.durability) as store:  # type: ignore[arg-type]
            store.reader_check()
        cpus = sorted(os.sched_getaffinity(0))
        count = self.config.workers or len(cpus)
        host = self.config.listen.rpartition(":")[0]
        for i in range(count):
            self.slots[i] = Slot(i, cpus[i % len(cpus)], f"{host}:0")
        self.slots[CONTROL] = Slot(CONTROL, None, self.config.listen)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.status_path)
        if self.config.ready_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.ready_file)

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)  # the loop does the work (GOTCHAS: signals)

    # --- main loop --------------------------------------------------------------------

    def run(self) -> int:
        try:
            self._prepare()
        except _DataDirBusy as exc:
            log.error("%s", exc)
            return SupervisorExit.DATA_DIR_BUSY
        except (OSError, StateError) as exc:
            log.error("cannot prepare data directory %s: %s", self.data_dir, exc)
            return SupervisorExit.BOOT_FAILED
        self._install_signals()
        log.info(
            "node %s starting %d workers (pid %d, data %s)",
            self.node_id,
            len(self.slots) - 1,
            os.getpid(),
            self.data_dir,
        )
        try:
            while not (self.stopping and not self._live()):
                self._wait()
                self._handle_signals()
                self._read_heartbeats()
                self._reap()
                if self.stopping:
                    self._stop_step()
                    continue
                self._murder_hung()
                self._manage()
                self._write_status()
                self._log_activity()
        finally:
            self._finish()
        return self.exit_code

    def _wait(self) -> None:
        fds = [self._wake_r] + [s.hb_fd for s in self.slots.values() if s.hb_fd >= 0]
        try:
            readable, _, _ = select.select(fds, [], [], 0.2)
        except InterruptedError:
            return
        if self._wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 4096):
                    pass

    def _handle_signals(self) -> None:
        while self.signals:
            sig = self.signals.popleft()
            if sig in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                log.info("received %s: draining", signal.Signals(sig).name)
                self._begin_stop()
            # SIGCHLD: _reap runs every iteration anyway; SIGHUP: ignored for now.

    def _read_heartbeats(self) -> None:
        now = self.clock()
        for slot in self.slots.values():
            if slot.hb_fd < 0:
                continue
            try:
                chunk = os.read(slot.hb_fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                continue  # EOF: the child is exiting; _reap will see it
            slot.buffer += chunk
            *lines, slot.buffer = slot.buffer.split(b"\n")
            for line in lines[-1:]:
                try:
                    beat = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                slot.beat = beat
                slot.last_beat = now
                if beat.get("endpoint"):
                    # Sticky across restarts: a restarted child rebinds the same port,
                    # so clients' connections (and the ready file) stay valid.
                    slot.tcp_endpoint = beat["endpoint"]

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots.values() if s.pid == pid), None)
            if slot is not None:
                self._child_exited(slot, status)

    def _child_exited(self, slot: Slot, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        slot.last_exit = _describe_exit(code)
        self._close_fds(slot)
        slot.pid = 0
        if self.stopping:
            log.info("%s exited (%s)", slot.name, slot.last_exit)
            return
        log.warning("%s (cpu %s) exited: %s", slot.name, slot.cpu, slot.last_exit)
        self._clear_stale_readers()
        now = self.clock()
        self.crashes.append(now)
        while self.crashes and now - self.crashes[0] > self.config.restart_period:
            self.crashes.popleft()
        if len(self.crashes) > self.config.max_restarts:
            log.error(
                "%d crashes within %.0f s (last: %s %s): stopping the node instead of "
                "restarting in a loop",
                len(self.crashes),
                self.config.restart_period,
                slot.name,
                slot.last_exit,
            )
            self.exit_code = SupervisorExit.RESTART_LIMIT
            self._begin_stop()
            return
        uptime = now - slot.started_at
        slot.failures = 1 if uptime > 5.0 else slot.failures + 1
        delay = min(self.config.restart_backoff_max, 0.05 * 2 ** (slot.failures - 1))
        slot.next_start = now + delay
        slot.restarts += 1

    def _clear_stale_readers(self) -> None:
        try:
            with Store(self.store_path, durability=self.config.durability) as store:  # type: ignore[arg-type]
                cleared = store.reader_check()
            if cleared:
                log.info("cleared %d stale LMDB reader slot(s)", cleared)
        except StateError as exc:
            log.error("reader check failed: %s", exc)

    def _murder_hung(self) -> None:
        now = self.clock()
        limit = self.config.heartbeat_timeout
        for slot in self.slots.values():
            if slot.pid and now - max(slot.last_beat, slot.started_at) > limit:
                log.warning(
                    "%s (pid %d) sent no heartbeat for %.1f s: killing it",
                    slot.name,
                    slot.pid,
                    now - max(slot.last_beat, slot.started_at),
                )
                _kill(slot.pid, signal.SIGKILL)
                slot.last_beat = now  # one kill per timeout; _reap restarts it

    def _manage(self) -> None:
        now = self.clock()
        for slot in self.slots.values():
            if not slot.pid and now >= slot.next_start:
                self._spawn(slot)
        if not self.ready and all(s.pid and s.beat for s in self.slots.values()):
            self.ready = True
            endpoint = self.slots[CONTROL].beat.get("endpoint", self.config.listen)
            log.info(
                "node %s ready at %s with %d workers", self.node_id, endpoint, len(self.slots) - 1
            )
            self._write_status(force=True)
            if self.config.ready_file:
                _write_atomic(
                    self.config.ready_file,
                    orjson.dumps(
                        {"endpoint": endpoint, "pid": os.getpid(), "node_id": self.node_id}
                    ),
                )

    # --- fork -------------------------------------------------------------------------

    def _spawn(self, slot: Slot) -> None:
        hb_r, hb_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        parent_r, parent_w = os.pipe2(os.O_CLOEXEC)
        spec = self._spec_for(slot, hb_w, parent_r)
        pid = os.fork()
        if pid == 0:
            self._in_child(hb_r, parent_w, spec)
        os.close(hb_w)
        os.close(parent_r)
        slot.pid, slot.hb_fd, slot.parent_fd = pid, hb_r, parent_w
        slot.started_at = slot.last_beat = self.clock()
        slot.beat, slot.buffer = {}, b""
        log.info("started %s as pid %d (cpu %s)", slot.name, pid, slot.cpu)

    def _spec_for(self, slot: Slot, hb_w: int, parent_r: int) -> WorkerSpec | ControlSpec:
        cfg = self.config
        if slot.index == CONTROL:
            return ControlSpec(
                node_id=self.node_id,
                listen=slot.tcp_endpoint,
                workers=len(self.slots) - 1,
                status_path=self.status_path,
                heartbeat_fd=hb_w,
                parent_fd=parent_r,
                heartbeat_interval=cfg.heartbeat_interval,
                seeds=cfg.seeds,
                advertise=cfg.advertise,
                vnodes=cfg.vnodes,
                weight=cfg.weight,
                probe_interval=cfg.probe_interval,
                suspicion_mult=cfg.suspicion_mult,
                fault_injection=cfg.fault_injection,
                leave_timeout=min(cfg.drain_timeout, 2.0),
                store_path=self.store_path,
                durability=cfg.durability,
                replicas=cfg.replicas,
                anti_entropy_interval=cfg.anti_entropy_interval,
                replication_ack=cfg.replication_ack,
                replication_timeout=cfg.replication_timeout,
                replication_deltas=cfg.replication_deltas,
            )
        return WorkerSpec(
            index=slot.index,
            workers=len(self.slots) - 1,
            node_id=self.node_id,
            replica=f"{self.node_id}:{slot.index}",
            cpu=slot.cpu,
            store_path=self.store_path,
            durability=cfg.durability,
            tcp_endpoint=slot.tcp_endpoint,
            heartbeat_fd=hb_w,
            parent_fd=parent_r,
            types=self.types,
            batch_size=cfg.batch_size,
            idle_timeout=cfg.idle_timeout,
            max_active=cfg.max_active,
            heartbeat_interval=cfg.heartbeat_interval,
            mailbox=MailboxPolicy.parse(
                {"capacity": cfg.mailbox_capacity, "strategy": cfg.mailbox_strategy}
            ),
            sender_rate=RateLimit.parse(cfg.sender_rate) if cfg.sender_rate else None,
            dedup_window=cfg.dedup_window,
        )

    def _in_child(self, hb_r: int, parent_w: int, spec: WorkerSpec | ControlSpec) -> NoReturn:
        try:
            # Every inherited end the child must not hold: in particular the other
            # children's parent-pipe write ends, or their EOF would never come.
            inherited = [hb_r, parent_w, self._wake_r, self._wake_w, self._lock_fd]
            for other in self.slots.values():
                inherited += [other.hb_fd, other.parent_fd]
            for fd in inherited:
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            signal.set_wakeup_fd(-1)
            if isinstance(spec, WorkerSpec):
                run_worker(spec)
            run_control(spec)
        finally:
            os._exit(WorkerExit.CRASHED)

    # --- stop ---------------------------------------------------------------------------

    def _begin_stop(self) -> None:
        self.stopping = True
        self._stop_deadline = self.clock() + self.config.drain_timeout
        for slot in self.slots.values():
            if slot.pid:
                _kill(slot.pid, signal.SIGTERM)

    def _stop_step(self) -> None:
        if self._live() and self.clock() > self._stop_deadline:
            for slot in self.slots.values():
                if slot.pid:
                    log.warning(
                        "%s (pid %d) did not finish draining in %.1f s: killing it",
                        slot.name,
                        slot.pid,
                        self.config.drain_timeout,
                    )
                    _kill(slot.pid, signal.SIGKILL)
            self._stop_deadline = float("inf")

    def _live(self) -> bool:
        return any(s.pid for s in self.slots.values())

    def _finish(self) -> None:
        for slot in self.slots.values():
            if slot.pid:
                _kill(slot.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(slot.pid, 0)
                slot.pid = 0
            self._close_fds(slot)
        self._write_status(force=True, state="stopped")
        log.info("node %s stopped", self.node_id)

    def _close_fds(self, slot: Slot) -> None:
        for fd in (slot.hb_fd, slot.parent_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        slot.hb_fd = slot.parent_fd = -1

    # --- status -------------------------------------------------------------------------

    def status(self, state: str | None = None) -> dict[str, Any]:
        now = self.clock()
        control = self.slots.get(CONTROL)
        return {
            "node_id": self.node_id,
            "pid": os.getpid(),
            "state": state
            or ("stopping" if self.stopping else "ready" if self.ready else "starting"),
            "endpoint": (control.beat.get("endpoint") if control else None) or self.config.listen,
            "data": self.data_dir,
            "workers": [
                {
                    "index": s.index,
                    "pid": s.pid or None,
                    "cpu": s.cpu,
                    "state": (s.beat.get("state", "starting") if s.pid else "restarting"),
                    "endpoint": s.tcp_endpoint if s.beat else None,
                    "agents": s.beat.get("agents", 0),
                    "handled": s.beat.get("handled", 0),
                    "failed": s.beat.get("failed", 0),
                    "restarts": s.restarts,
                    "bad_frames": s.beat.get("bad_frames", 0),
                    "dropped_replies": s.beat.get("dropped_replies", 0),
                    "forwarded": s.beat.get("forwarded", 0),
                    "messaging": s.beat.get("messaging", {}),
                    "uptime": round(now - s.started_at, 1) if s.pid else 0.0,
                    "last_exit": s.last_exit or None,
                }
                for s in sorted(self.slots.values(), key=lambda s: s.index)
                if s.index != CONTROL
            ],
        }

    def _log_activity(self, every: float = 10.0) -> None:
        """One line of live activity every ``every`` seconds once the node is ready."""
        now = self.clock()
        last, last_handled = self._activity
        if not self.ready or now - last < every:
            return
        workers = [s for s in self.slots.values() if s.index != CONTROL]
        handled = sum(s.beat.get("handled", 0) for s in workers)
        rate = (handled - last_handled) / (now - last) if last else 0.0
        log.info(
            "%d/%d workers up, %d active agents, %d messages (%.0f/s), %d restarts",
            sum(1 for s in workers if s.pid and s.beat),
            len(workers),
            sum(s.beat.get("agents", 0) for s in workers),
            handled,
            rate,
            sum(s.restarts for s in workers),
        )
        self._activity = (now, handled)

    def _write_status(self, force: bool = False, state: str | None = None) -> None:
        now = self.clock()
        if not force and now - self._last_status < self.config.heartbeat_interval:
            return
        self._last_status = now
        try:
            _write_atomic(self.status_path, orjson.dumps(self.status(state)))
        except OSError as exc:
            log.error("cannot write %s: %s", self.status_path, exc)


class _DataDirBusy(Exception):
    pass


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    try:
        return f"exit {code} ({WorkerExit(code).name})"
    except ValueError:
        return f"exit {code}"


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
