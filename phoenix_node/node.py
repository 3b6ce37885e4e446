"""Start a whole node from Python: ``with Node(workers=2) as node: node.client()``.

The node runs as a child process (``python -m phoenix_node run``), never
forked from the caller: the caller may have threads or a ZeroMQ context of its
own, which must not cross a fork. The endpoint defaults to a free port on
127.0.0.1 and the data directory to a temporary one that :meth:`Node.stop`
removes (pass ``data=`` to keep it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from typing import IO, Any

import orjson

from .client import Client
from .errors import PhoenixError

__all__ = ["Node", "NodeStartError"]


class NodeStartError(PhoenixError):
    """The node process exited or did not become ready in time; the message has its log."""


class Node:
    """A node in a child process; a context manager."""

    def __init__(
        self,
        *,
        workers: int = 2,
        data: str | os.PathLike[str] | None = None,
        listen: str = "tcp://127.0.0.1:0",
        agents: Iterable[str] = (),
        entry_points: bool = True,
        startup_timeout: float = 30.0,
        log_path: str | None = None,
        **settings: Any,
    ) -> None:
        """``settings`` are any other node settings by name (see ``phoenix-node run --help``)."""
        self.workers = workers
        self.listen = listen
        self.agents = list(agents)
        self.entry_points = entry_points
        self.startup_timeout = startup_timeout
        self.settings = settings
        self._own_data = data is None
        self.data = str(data) if data is not None else tempfile.mkdtemp(prefix="phoenix-node-")
        self.log_path = log_path or os.path.join(self.data, "node.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = ""
        self.node_id = ""
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise NodeStartError("the node is not started")
        return self.proc.pid

    def command(self, ready_file: str) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "phoenix_node",
            "run",
            "--workers",
            str(self.workers),
            "--listen",
            self.listen,
            "--data",
            self.data,
            "--ready-file",
            ready_file,
        ]
        if not self.entry_points:
            cmd.append("--no-entry-points")
        if self.agents:
            cmd += ["--agents", *self.agents]
        for name, value in self.settings.items():
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                cmd.append(flag if value else "--no-" + name.replace("_", "-"))
            elif isinstance(value, list | tuple):
                cmd += [flag, *map(str, value)] if value else []
            else:
                cmd += [flag, str(value)]
        return cmd

    def start(self) -> Node:
        ready = os.path.join(self.data, "ready.json")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ready)
        os.makedirs(self.data, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command(ready),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._cleanup()
                raise NodeStartError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with open(ready, "rb") as f:
                    info = orjson.loads(f.read())
                self.endpoint, self.node_id = info["endpoint"], info["node_id"]
                return self
            except (FileNotFoundError, orjson.JSONDecodeError):
                time.sleep(0.05)
        self.stop()
        raise NodeStartError(f"node not ready within {self.startup_timeout} s:\n{self.log()}")

    def client(self, **kwargs: Any) -> Client:
        """A new client of this node (close it, or use it as a context manager)."""
        if not self.endpoint:
            raise NodeStartError("the node is not started")
        return Client(self.endpoint, **kwargs)

    def status(self) -> dict[str, Any]:
        with self.client(timeout=5.0) as c:
            return c.status()

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.status()["workers"] if w["pid"]]

    def log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-20000:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the node, wait for its graceful drain, SIGKILL after ``timeout``."""
        code = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait()
        elif self.proc is not None:
            code = self.proc.returncode
        self._cleanup()
        return code

    def _cleanup(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_data and (self.proc is None or self.proc.poll() is not None):
            shutil.rmtree(self.data, ignore_errors=True)

    def __enter__(self) -> Node:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
