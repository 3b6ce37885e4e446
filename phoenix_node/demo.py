"""The demo agents (loaded by default through the ``phoenix_node.agents`` entry
points) and the scripted demo behind ``phoenix-node demo``."""

from __future__ import annotations

import itertools
import time
from typing import Any

from phoenix_node.state import LWWMap, PNCounter
from workers.agent import Agent, action

__all__ = ["KV", "Counter", "run_demo"]


class Counter(Agent):
    """A counter: ``inc(n=1)`` returns the new value, ``get()`` reads it."""

    count = PNCounter()

    @action
    def inc(self, n: int = 1) -> int:
        if n >= 0:
            self.count.increment(self.replica, n)
        else:
            self.count.decrement(self.replica, -n)
        return self.count.value

    @action
    def get(self) -> int:
        return self.count.value


class KV(Agent):
    """A key-value map: ``put(key, value)``, ``get(key)``, ``delete(key)``, ``keys()``."""

    data = LWWMap()

    @action
    def put(self, key: str, value: Any) -> None:
        self.data.put(self.replica, key, value)

    @action
    def get(self, key: str) -> Any:
        return self.data.get(key)

    @action
    def delete(self, key: str) -> bool:
        present = key in self.data
        self.data.remove(self.replica, key)
        return present

    @action
    def keys(self) -> list[str]:
        return sorted(self.data.keys())


def run_demo(data: str, workers: int, listen: str, seconds: float | None) -> int:
    """Start a node, talk to its agents, then show live activity until Ctrl-C."""
    from .node import Node

    print(f"starting a node: {workers or 'one per CPU'} workers, data in {data}/ ...")
    with Node(workers=workers, data=data, listen=listen) as node, node.client() as client:
        print(f"node {node.node_id} serving at {node.endpoint} (pid {node.pid})")
        print("Counter/demo.inc(n=5)      ->", client.ask("Counter/demo", "inc", n=5))
        print("Counter/demo.get()         ->", client.ask("Counter/demo", "get"))
        client.ask("KV/settings", "put", key="color", value="blue")
        print("KV/settings.get('color')   ->", client.ask("KV/settings", "get", key="color"))
        print("KV/settings.keys()         ->", client.ask("KV/settings", "keys"))
        status = client.status()
        for w in status["workers"]:
            print(f"  worker {w['index']}: pid {w['pid']} cpu {w['cpu']} {w['state']}")
        print("driving traffic to 1,000 counters; Ctrl-C stops the node gracefully")
        started = time.monotonic()
        keys = itertools.cycle(range(1000))
        try:
            while seconds is None or time.monotonic() - started < seconds:
                t0 = time.monotonic()
                calls: list[tuple[str, str, dict[str, Any]]] = [
                    (f"Counter/c{next(keys)}", "inc", {}) for _ in range(500)
                ]
                results = client.ask_many(calls, timeout=10)
                errors = sum(isinstance(r, Exception) for r in results)
                rate = len(calls) / (time.monotonic() - t0)
                st = client.status()
                agents = sum(w["agents"] for w in st["workers"])
                handled = sum(w["handled"] for w in st["workers"])
                print(
                    f"\r{rate:8.0f} asks/s  errors {errors}  active agents {agents}  "
                    f"handled {handled}  ",
                    end="",
                    flush=True,
                )
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        print("\nstopping the node (graceful drain)...")
    print(
        "Counter/demo survives restarts: run the demo again and it continues from",
        "its stored value.",
    )
    return 0
