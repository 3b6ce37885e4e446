"""Messaging benchmark: guaranteed tells, pub/sub fan-out and overload, against raw baselines.

A real node (``Node``: durable commits, ``--workers`` workers, the bench
agents of :mod:`bench.agents`) and, in the same run, the raw ZeroMQ baselines
of :mod:`bench.baselines` (PUSH->PULL ipc with msgpack on both sides;
DEALER->ROUTER tcp round trips, 100 in flight). The client runs in this
process, on the same CPUs as the workers. Each round runs:

- **tells** ``Client.tell_many`` of ``Tally.inc`` in chunks of ``CHUNK`` over
  ``--keys`` agents for ``--seconds``, then: ``at_most_once``: one ``get`` per
  worker on the same connections (FIFO: when they answer, every tell ran);
  ``at_least_once`` / ``exactly_once``: ``Client.flush`` (every message
  acknowledged after its commit). The rate is messages acknowledged (or run)
  per second of the whole send + drain. ``at_least_once`` runs twice: with the
  client's default :class:`RetryPolicy`, and with a first retry after 30 s
  (``alo_noretry``) so that no message is re-sent during the run, which shows
  what spurious re-sends cost.
- **fan-out** ``--listeners`` :class:`~bench.agents.Listener` agents (on both
  workers) subscribed to ``bench.amo.#`` (at most once) and as many to
  ``bench.alo.#`` (at least once); ``--events`` publishes with the same
  guarantee over 8 topics (so both workers publish), timed until the
  listeners' counters add up to events x listeners.
- **overload** one :class:`~bench.agents.Slow` agent (``work`` sleeps 1 ms:
  ~1,000 messages/s) flooded at ``--flood-rate`` (default 10x its capacity)
  for ``--flood-seconds`` by ``tell_many`` in chunks of 100, at most once and
  at least once. A thread samples the owning worker's RSS (psutil, pid from
  ``Client.status()``) every 20 ms; another, with its own client, asks a
  Tally agent of the same worker every 50 ms and times it. After the flood
  the bench sets the Slow agents' sleep to 0 so that the backlog drains in
  seconds, then samples RSS again.

Verification, after every node scenario, by reading the counters back
(``get``): ``at_most_once`` and ``exactly_once`` tells must match the sent /
acknowledged count exactly; ``at_least_once`` must reach it, and the excess
(messages the client re-sent whose first copy had also run) is reported as
duplicates. Fan-out: every listener's count is the number of events
(at-least-once: at least). Overload at most once: runs + refusals (the
workers' ``refused`` counter) == sent; at least once: every message
acknowledged and run at least once. Any failed check makes the exit status 1.

Run: ``.venv/bin/python bench/messaging_bench.py [--quick] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import psutil  # type: ignore[import-untyped]  # noqa: E402

from bench.agents import SLOW_MAILBOX  # noqa: E402
from bench.baselines import (  # noqa: E402
    percentile,
    raw_dealer_router_roundtrip,
    raw_push_pull_msgpack,
)
from bench.node_bench import environment  # noqa: E402
from phoenix_node import Client, Node  # noqa: E402
from phoenix_node.state.delivery import RetryPolicy  # noqa: E402
from workers.placement import owner_index  # noqa: E402

__all__ = ["TARGETS", "main", "run_bench"]

AGENTS = ["bench.agents:Tally", "bench.agents:Listener", "bench.agents:Slow"]
CHUNK = 1000  # tells per tell_many call
FLOOD_CHUNK = 100
TOPICS = 8
SLOW_RATE = 1000.0  # messages/s one Slow agent can run (1 ms each)
_PUSH_PULL_RATE, _RT100_RATE = 750_000, 120_000
#: scenario -> (baseline, minimum ratio)
TARGETS = {
    "tells_alo": ("raw_push_pull", 0.15),
    "tells_eo": ("raw_push_pull", 0.10),
}
_NO_RETRY = RetryPolicy(initial=30.0, max_delay=30.0)
# Counts added up over the rounds in the summary (other figures are medians).
_SUMMED = frozenset(
    ("messages", "deliveries", "events", "sent", "ran", "refused", "lost", "duplicates",
     "dedup_hits", "neighbour_errors", "neighbour_asks")
)  # fmt: skip

Calls = list[tuple[str, str, dict[str, Any]]]


# --- helpers --------------------------------------------------------------------------------


def read_counts(client: Client, keys: list[str]) -> dict[str, int]:
    """Every agent's ``get``, asked in groups of 100 (an error reads as -1)."""
    out: dict[str, int] = {}
    for i in range(0, len(keys), 100):
        part = keys[i : i + 100]
        values = client.ask_many([(k, "get", {}) for k in part], timeout=60)
        out.update((k, v if isinstance(v, int) else -1) for k, v in zip(part, values, strict=True))
    return out


def owned_key(prefix: str, index: int, workers: int) -> str:
    """The first ``prefix<i>`` agent id that worker ``index`` owns."""
    return next(
        f"{prefix}{i}" for i in range(1_000_000) if owner_index(f"{prefix}{i}", workers) == index
    )


def _stat_total(client: Client, field: str) -> int:
    return sum(int(w.get(field, 0)) for w in client.worker_stats())


class CpuMeter:
    """Process CPU time of the workers and of this process (the client) over a span."""

    def __init__(self, worker_pids: list[int]) -> None:
        self.procs = [psutil.Process(p) for p in worker_pids]
        self.me = psutil.Process()
        self.start = self._read()

    def _read(self) -> tuple[float, float]:
        workers = sum(sum(p.cpu_times()[:2]) for p in self.procs)
        return workers, sum(self.me.cpu_times()[:2])

    def per_message(self, n: int) -> dict[str, float]:
        """CPU µs per message, workers (all together) and client."""
        workers, client = self._read()
        n = max(n, 1)
        return {
            "cpu_us_workers": (workers - self.start[0]) / n * 1e6,
            "cpu_us_client": (client - self.start[1]) / n * 1e6,
        }


class Tallies:
    """The Tally agents and the count each should have."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.expected = dict.fromkeys(keys, 0)

    def verify(self, client: Client, name: str, exact: bool, **extra: Any) -> dict[str, Any]:
        observed = read_counts(client, self.keys)
        low = [k for k in self.keys if observed[k] < self.expected[k]]
        high = [k for k in self.keys if observed[k] > self.expected[k]]
        got, want = sum(observed.values()), sum(self.expected.values())
        # The counters now hold what ran: duplicates are not expected twice.
        self.expected.update(observed)
        return {
            "scenario": name,
            "ok": not low and not (exact and high),
            "expected_total": want,
            "observed_total": got,
            "missing_keys": len(low),
            "duplicates": got - want if got > want else 0,
            **extra,
        }


# --- tells ----------------------------------------------------------------------------------


def tells(
    client: Client,
    tallies: Tallies,
    delivery: str,
    seconds: float,
    sentinels: list[str],
    meter: CpuMeter,
) -> dict[str, Any]:
    """``tell_many`` of ``inc`` in chunks until ``seconds`` passed, then drain (see module)."""
    keys = tallies.keys
    total = -(-len(keys) // CHUNK) * CHUNK  # every key equally often when CHUNK divides
    flat = [keys[j % len(keys)] for j in range(total)]
    chunks: list[Calls] = [
        [(k, "inc", {}) for k in flat[i : i + CHUNK]] for i in range(0, total, CHUNK)
    ]
    sent = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    i = 0
    while True:
        calls = chunks[i % len(chunks)]
        i += 1
        client.tell_many(calls, delivery=delivery)
        for key, _, _ in calls:
            tallies.expected[key] += 1
        sent += len(calls)
        if time.perf_counter() >= deadline:
            break
    t_sent = time.perf_counter()
    if delivery == "at_most_once":
        client.ask_many([(k, "get", {}) for k in sentinels], timeout=120)
    else:
        client.flush(timeout=120)
    t_done = time.perf_counter()
    return {
        "rate": sent / (t_done - t0),
        "messages": sent,
        "send_rate": sent / (t_sent - t0),
        "drain_s": t_done - t_sent,
        **meter.per_message(sent),
    }


# --- pub/sub fan-out ------------------------------------------------------------------------


def subscribe_listeners(client: Client, listeners: int) -> dict[str, list[str]]:
    """Listener/amo<i> on ``bench.amo.#`` at most once, Listener/alo<i> on ``bench.alo.#``."""
    groups: dict[str, list[str]] = {}
    for short, delivery in (("amo", "at_most_once"), ("alo", "at_least_once")):
        ids = [f"Listener/{short}{i}" for i in range(listeners)]
        for agent_id in ids:
            client.subscribe_agent(f"bench.{short}.#", agent_id, "on_event", delivery=delivery)
        groups[short] = ids
    return groups


def fanout(
    client: Client,
    listeners: list[str],
    expected: dict[str, int],
    short: str,
    events: int,
    meter: CpuMeter,
) -> dict[str, Any]:
    """Publish ``events`` events; timed until every listener counted them."""
    delivery = "at_most_once" if short == "amo" else "at_least_once"
    topics = [f"bench.{short}.t{j}" for j in range(TOPICS)]
    target = {k: expected[k] + events for k in listeners}
    t0 = time.perf_counter()
    for start in range(0, events, CHUNK):
        with client.batch():  # guaranteed publishes leave together
            for j in range(start, min(events, start + CHUNK)):
                client.publish(topics[j % TOPICS], j, delivery=delivery)
    if delivery != "at_most_once":
        client.flush(timeout=120)
    t_pub = time.perf_counter()
    counts, t_done, stalled = _wait_counts(client, listeners, target)
    # Guaranteed deliveries stay in the workers' outboxes until acknowledged, and may
    # be re-sent (and run again) meanwhile: wait for that tail before counting.
    settle_s = wait_outboxes_empty(client)
    counts = read_counts(client, listeners)
    expected.update(counts)
    deliveries = events * len(listeners)
    return {
        "rate": deliveries / (t_done - t0),
        "events": events,
        "deliveries": deliveries,
        "publish_rate": events / (t_pub - t0),
        "lost": sum(max(0, target[k] - counts[k]) for k in listeners),
        "duplicates": sum(max(0, counts[k] - target[k]) for k in listeners),
        "stalled": stalled,
        "settle_s": settle_s,
        **meter.per_message(deliveries),
    }


def wait_outboxes_empty(client: Client, timeout: float = 120.0) -> float:
    """Seconds until no worker has an unacknowledged outbox message (bounded)."""
    t0 = time.perf_counter()
    while _stat_total(client, "outbox") and time.perf_counter() - t0 < timeout:
        time.sleep(0.01)
    return time.perf_counter() - t0


def _wait_counts(
    client: Client, keys: list[str], target: dict[str, int], patience: float = 12.0
) -> tuple[dict[str, int], float, bool]:
    """Poll the counters until each reached its target, or nothing moved for ``patience`` s
    (longer than the longest retry backoff, 10 s: refused guaranteed messages come back)."""
    last_total, last_change = -1, time.monotonic()
    while True:
        counts = read_counts(client, keys)
        now = time.perf_counter()
        if all(counts[k] >= target[k] for k in keys):
            return counts, now, False
        total = sum(counts.values())
        if total != last_total:
            last_total, last_change = total, time.monotonic()
        elif time.monotonic() - last_change > patience:
            return counts, now, True
        time.sleep(0.005)


# --- overload -------------------------------------------------------------------------------


class _Sampler(threading.Thread):
    """RSS of one process every ``interval`` seconds, with the time since start."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.t0 = time.perf_counter()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.perf_counter() - self.t0, self.proc.memory_info().rss))
            self.stop.wait(self.interval)


class _Prober(threading.Thread):
    """Asks ``agent_id`` ``get`` every ``interval`` seconds on its own client; latencies."""

    def __init__(self, endpoint: str, agent_id: str, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.agent_id, self.interval = endpoint, agent_id, interval
        self.samples: list[tuple[float, float]] = []  # (start, latency ms)
        self.errors = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with Client(self.endpoint, timeout=30) as client:
            client.ask(self.agent_id, "get")  # connected and activated before timing
            while not self.stop.is_set():
                start = time.perf_counter()
                try:
                    client.ask(self.agent_id, "get")
                    self.samples.append((start, (time.perf_counter() - start) * 1000))
                except Exception:
                    self.errors += 1
                self.stop.wait(self.interval)


def overload(
    node: Node,
    client: Client,
    delivery: str,
    seconds: float,
    rate: float,
    workers: int,
) -> dict[str, Any]:
    """Flood one Slow agent at ``rate`` msg/s for ``seconds``; RSS and a neighbour's latency."""
    slow = "Slow/flood"
    index = owner_index(slow, workers)
    control = owned_key("Slow/ctl", index, workers)
    probe = owned_key("Tally/probe", index, workers)
    pid = next(w["pid"] for w in client.status()["workers"] if w["index"] == index)
    wait_outboxes_empty(client)  # no earlier scenario's re-sends in these counters
    done_before = read_counts(client, [slow])[slow]
    refused_before = _stat_total(client, "refused")
    sampler = _Sampler(pid)
    rss_before = sampler.proc.memory_info().rss
    prober = _Prober(node.endpoint, probe)
    prober.start()
    time.sleep(0.3)  # a few asks before the flood: the neighbour's latency when idle
    sampler.start()
    sent = _flood(client, slow, delivery, seconds, rate)
    flood_s = time.perf_counter() - sampler.t0
    refused_flood = _stat_total(client, "refused") - refused_before
    prober.stop.set()
    prober.join(60)
    idle_ms = [ms for start, ms in prober.samples if start + ms / 1000 < sampler.t0]
    busy_ms = [ms for start, ms in prober.samples if start >= sampler.t0]
    flood_samples = list(sampler.samples)
    # Drain: no more sleeping, then wait until the flood agent has run everything.
    client.ask(control, "set_delay", seconds=0.0, timeout=60)
    t_drain = time.perf_counter()
    if delivery != "at_most_once":
        client.flush(timeout=180)
    refused = _stat_total(client, "refused") - refused_before
    target = done_before + sent - (refused if delivery == "at_most_once" else 0)
    counts, _, stalled = _wait_counts(client, [slow], {slow: target})
    drain_s = time.perf_counter() - t_drain
    time.sleep(0.3)
    sampler.stop.set()
    sampler.join(5)
    rss_after = sampler.proc.memory_info().rss
    client.ask(control, "set_delay", seconds=1.0 / SLOW_RATE, timeout=60)
    done = counts[slow] - done_before
    return {
        "delivery": delivery,
        "rate": sent / flood_s,
        "sent": sent,
        "flood_s": flood_s,
        "overload_factor": sent / flood_s / SLOW_RATE,
        "ran": done,
        "refused": refused,
        "refused_rate": refused_flood / flood_s,
        "duplicates": max(0, done - sent) if delivery != "at_most_once" else 0,
        "stalled": stalled,
        "drain_s": drain_s,
        **_rss_figures(rss_before, flood_samples, rss_after, seconds),
        **_latency_figures(busy_ms, prober.errors, idle_ms),
    }


def _flood(client: Client, agent_id: str, delivery: str, seconds: float, rate: float) -> int:
    """``tell_many`` of ``work`` in chunks of FLOOD_CHUNK, paced at ``rate`` msg/s."""
    calls: Calls = [(agent_id, "work", {})] * FLOOD_CHUNK
    sent = 0
    t0 = time.perf_counter()
    while (now := time.perf_counter()) - t0 < seconds:
        if sent < rate * (now - t0):
            sent += client.tell_many(calls, delivery=delivery)
        else:
            time.sleep(0.001)
    return sent


def _rss_figures(
    before: int, samples: list[tuple[float, int]], after: int, seconds: float
) -> dict[str, Any]:
    mib = 1024 * 1024
    flood = [rss for t, rss in samples if t <= seconds] or [before]
    half = [rss for t, rss in samples if t <= seconds / 2] or flood
    second = [rss for t, rss in samples if seconds / 2 < t <= seconds] or flood
    return {
        "rss_before_mib": before / mib,
        "rss_peak_growth_mib": (max(flood) - before) / mib,
        "rss_growth_first_half_mib": (max(half) - before) / mib,
        "rss_growth_second_half_mib": (max(second) - before) / mib,
        "rss_after_growth_mib": (after - before) / mib,
        "rss_samples": len(samples),
    }


def _latency_figures(samples: list[float], errors: int, idle: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    return {
        "neighbour_idle_p50_ms": percentile(sorted(idle), 0.5),
        "neighbour_asks": len(samples),
        "neighbour_errors": errors,
        "neighbour_p50_ms": percentile(ordered, 0.5),
        "neighbour_p99_ms": percentile(ordered, 0.99),
        "neighbour_max_ms": ordered[-1] if ordered else float("nan"),
    }


def _overload_check(result: dict[str, Any], flood_bound_mib: float) -> dict[str, Any]:
    """What the user checks: all accounted for, memory bounded, the neighbour served."""
    if result["delivery"] == "at_most_once":
        accounted = result["ran"] + result["refused"] == result["sent"]
    else:
        accounted = result["ran"] >= result["sent"]
    bounded = result["rss_peak_growth_mib"] <= flood_bound_mib
    served = result["neighbour_asks"] > 0 and result["neighbour_errors"] == 0
    return {
        "scenario": f"overload_{'amo' if result['delivery'] == 'at_most_once' else 'alo'}",
        "ok": accounted and bounded and served and not result["stalled"],
        "accounted": accounted,
        "rss_bounded": bounded,
        "neighbour_served": served,
        "sent": result["sent"],
        "ran": result["ran"],
        "refused": result["refused"],
    }


# --- the run --------------------------------------------------------------------------------


def run_bench(
    workers: int = 2,
    seconds: float = 2.0,
    repeat: int = 3,
    keys: int = 1000,
    listeners: int = 10,
    events: int = 5000,
    flood_seconds: float = 4.0,
    flood_rate: float = 10 * SLOW_RATE,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every scenario ``repeat`` times; return figures, ratios, targets and checks."""
    say = log or (lambda _msg: None)
    tallies = Tallies([f"Tally/bench{i}" for i in range(keys)])
    sentinels = [owned_key("Tally/sentinel", w, workers) for w in range(workers)]
    samples: dict[str, list[dict[str, Any]]] = {}
    checks: list[dict[str, Any]] = []
    # Headroom over the mailbox (SLOW_MAILBOX["capacity"] messages) and the client's
    # credit window (10,000 messages in the worker's socket buffers), both ~1 KiB each.
    flood_bound_mib = 64.0

    def record(name: str, result: dict[str, Any]) -> None:
        samples.setdefault(name, []).append(result)
        say(f"  {name:<22} {result['rate']:>12,.0f}/s")

    _agents_importable()
    node = Node(workers=workers, durability="durable", agents=AGENTS, entry_points=False)
    node.start()
    clients: list[Client] = []
    try:
        client = node.client(timeout=60)
        clients.append(client)
        no_retry = node.client(timeout=60, retry=_NO_RETRY)
        clients.append(no_retry)
        pids = [w["pid"] for w in sorted(client.status()["workers"], key=lambda w: w["index"])]
        groups = subscribe_listeners(client, listeners)
        heard: dict[str, int] = dict.fromkeys(groups["amo"] + groups["alo"], 0)
        # Activate every agent (and connect both clients) before anything is timed.
        read_counts(client, tallies.keys + sentinels + list(heard))
        read_counts(no_retry, tallies.keys[:1])
        for r in range(repeat):
            say(f"round {r + 1}/{repeat}")
            n = max(2_000, int(seconds * _PUSH_PULL_RATE))
            record("raw_push_pull", {"rate": raw_push_pull_msgpack(n)})
            n = max(1_000, int(seconds * _RT100_RATE))
            record("raw_rt100", {"rate": raw_dealer_router_roundtrip(n, 100, "tcp")})
            for name, delivery, cl in (
                ("tells_amo", "at_most_once", client),
                ("tells_alo", "at_least_once", client),
                ("tells_alo_noretry", "at_least_once", no_retry),
                ("tells_eo", "exactly_once", client),
            ):
                dup_before = _stat_total(client, "duplicates")
                result = tells(cl, tallies, delivery, seconds, sentinels, CpuMeter(pids))
                result["dedup_hits"] = _stat_total(client, "duplicates") - dup_before
                record(name, result)
                exact = delivery != "at_least_once" or cl is no_retry
                checks.append(tallies.verify(client, name, exact, dedup_hits=result["dedup_hits"]))
            for short in ("amo", "alo"):
                name = f"fanout_{short}"
                result = fanout(client, groups[short], heard, short, events, CpuMeter(pids))
                record(name, result)
                # Counted once the workers' outboxes are empty: nothing more can come.
                ok = not result["lost"]
                if short == "amo":
                    ok = ok and not result["duplicates"] and not result["stalled"]
                checks.append(
                    {"scenario": name, "ok": ok, "lost": result["lost"],
                     "duplicates": result["duplicates"], "deliveries": result["deliveries"]}
                )  # fmt: skip
            for delivery in ("at_most_once", "at_least_once"):
                result = overload(node, client, delivery, flood_seconds, flood_rate, workers)
                name = f"overload_{'amo' if delivery == 'at_most_once' else 'alo'}"
                record(name, result)
                checks.append(_overload_check(result, flood_bound_mib))
    finally:
        for opened in clients:
            opened.close()
        code = node.stop()
    config = {
        "workers": workers,
        "seconds": seconds,
        "repeat": repeat,
        "keys": keys,
        "listeners": listeners,
        "events": events,
        "flood_seconds": flood_seconds,
        "flood_rate": flood_rate,
        "slow_mailbox": SLOW_MAILBOX,
        "rss_bound_mib": flood_bound_mib,
        "durability": "durable",
    }
    return _summary(config, samples, checks, code)


def _agents_importable() -> None:
    """The node process imports ``bench.agents``: put the repository root on its path.

    The node inherits this process's environment; ``python -m`` only adds the
    current directory, which is the repository root only when run from there.
    """
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if _ROOT not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [_ROOT, *paths] if p)


def _summary(
    config: dict[str, Any],
    samples: dict[str, list[dict[str, Any]]],
    checks: list[dict[str, Any]],
    stop_code: int | None,
) -> dict[str, Any]:
    figures: dict[str, dict[str, Any]] = {}
    for name, results in samples.items():
        fig: dict[str, Any] = {
            "rate": _median(results, "rate"),
            "rates": [r["rate"] for r in results],
        }
        for field, value in results[0].items():
            if field in fig or field in ("delivery",):
                continue
            if isinstance(value, bool):
                fig[field] = any(r[field] for r in results)
            elif field in _SUMMED:
                fig[field] = sum(r[field] for r in results)
            elif field.endswith(("_max_ms", "_peak_growth_mib")):
                fig[field] = max(r[field] for r in results)
            elif isinstance(value, int | float):
                fig[field] = _median(results, field)
        figures[name] = fig
    push, rt100 = figures["raw_push_pull"]["rate"], figures["raw_rt100"]["rate"]
    ratios = {
        name: figures[name]["rate"] / push
        for name in figures
        if name.startswith(("tells_", "fanout_"))
    }
    ratios["raw_rt100/raw_push_pull"] = rt100 / push
    targets = {
        name: {
            "ratio": figures[name]["rate"] / figures[base]["rate"],
            "baseline": base,
            "minimum": minimum,
            "pass": figures[name]["rate"] / figures[base]["rate"] >= minimum,
        }
        for name, (base, minimum) in TARGETS.items()
    }
    return {
        "config": config,
        "environment": environment(config["workers"]),
        "figures": figures,
        "ratios": ratios,
        "targets": targets,
        "checks": checks,
        "node_stop_code": stop_code,
        "ok": all(c["ok"] for c in checks) and stop_code == 0,
    }


def _median(results: list[dict[str, Any]], field: str) -> float:
    return float(statistics.median(r[field] for r in results))


# --- output ---------------------------------------------------------------------------------


def format_table(report: dict[str, Any]) -> str:
    f, r, cfg, env = report["figures"], report["ratios"], report["config"], report["environment"]

    def cpu(name: str) -> str:
        return f"cpu/msg: workers {f[name]['cpu_us_workers']:.1f} us, client " + (
            f"{f[name]['cpu_us_client']:.1f} us"
        )

    rows = [
        ("raw PUSH->PULL ipc, msgpack both sides", f["raw_push_pull"]["rate"], "msg/s", "1", ""),
        ("raw DEALER->ROUTER tcp, 100 in flight", f["raw_rt100"]["rate"], "rt/s",
         f"{r['raw_rt100/raw_push_pull']:.3f} of push", ""),
    ]  # fmt: skip
    for name, label in (
        ("tells_amo", "tells at_most_once, until run"),
        ("tells_alo", "tells at_least_once, until acked"),
        ("tells_alo_noretry", "  same, client retry after 30 s"),
        ("tells_eo", "tells exactly_once, until acked"),
    ):
        fig = f[name]
        detail = (
            f"send {fig['send_rate']:,.0f}/s, drain {fig['drain_s']:.2f} s; {cpu(name)}; "
            f"dedup hits {fig['dedup_hits']}"
        )
        rows.append((label, fig["rate"], "msg/s", f"{r[name]:.3f} of push", detail))
    for name, label in (
        ("fanout_amo", f"fan-out at_most_once x{cfg['listeners']}"),
        ("fanout_alo", f"fan-out at_least_once x{cfg['listeners']}"),
    ):
        fig = f[name]
        detail = (
            f"{fig['publish_rate']:,.0f} publishes/s; lost {fig['lost']}, duplicates "
            f"{fig['duplicates']}, outboxes empty after +{fig['settle_s']:.1f} s; {cpu(name)}"
        )
        rows.append((label, fig["rate"], "deliv/s", f"{r[name]:.3f} of push", detail))
    lines = [
        f"Phoenix messaging bench: {cfg['workers']} workers (durable), {cfg['keys']} Tally "
        f"agents, {cfg['seconds']} s per tell scenario, median of {cfg['repeat']} rounds",
        f"Python {env['python']}, pyzmq {env['pyzmq']}, libzmq {env['libzmq']}, "
        f"msgpack {env['msgpack']}, lmdb {env['lmdb']}; CPUs {env['usable_cpus']}",
    ]
    if env["client_shares_cpus"]:
        lines.append("NOTE: the client shares the CPUs with the workers.")
    lines += ["", f"{'scenario':<40} {'figure':>12} {'unit':<8} {'ratio':<16} detail", "-" * 130]
    for label, rate, unit, ratio, detail in rows:
        lines.append(f"{label:<40} {rate:>12,.0f} {unit:<8} {ratio:<16} {detail}")
    lines.append("")
    lines.append(
        f"overload: Slow agent ({SLOW_RATE:,.0f} msg/s, mailbox {SLOW_MAILBOX['capacity']} "
        f"{SLOW_MAILBOX['strategy']}) flooded for {cfg['flood_seconds']} s"
    )
    for name in ("overload_amo", "overload_alo"):
        fig = f[name]
        lines.append(
            f"  {name}: {fig['rate']:,.0f} msg/s offered ({fig['overload_factor']:.1f}x), "
            f"sent {fig['sent']}, ran {fig['ran']} ({fig['duplicates']} twice), refused "
            f"{fig['refused']} ({fig['refused_rate']:,.0f}/s during the flood); worker RSS "
            f"{fig['rss_before_mib']:.1f} MiB, growth peak {fig['rss_peak_growth_mib']:.1f} MiB "
            f"(1st half {fig['rss_growth_first_half_mib']:.1f}, 2nd half "
            f"{fig['rss_growth_second_half_mib']:.1f}), after drain "
            f"{fig['rss_after_growth_mib']:.1f}; neighbour ask p50 {fig['neighbour_p50_ms']:.1f} "
            f"ms, p99 {fig['neighbour_p99_ms']:.1f} ms, max {fig['neighbour_max_ms']:.1f} ms "
            f"({fig['neighbour_asks']} asks, {fig['neighbour_errors']} errors); drain "
            f"{fig['drain_s']:.1f} s"
        )
    lines.append("")
    for name, t in report["targets"].items():
        verdict = "PASS" if t["pass"] else "FAIL"
        lines.append(
            f"target {name} / {t['baseline']} >= {t['minimum']:.2f}: {t['ratio']:.3f} {verdict}"
        )
    failed = [c for c in report["checks"] if not c["ok"]]
    lines.append(
        f"verification: {len(report['checks']) - len(failed)}/{len(report['checks'])} checks "
        f"passed; node stopped with {report['node_stop_code']}"
    )
    for c in failed:
        lines.append(f"  FAILED: {c}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per tell scenario")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; figures are medians")
    parser.add_argument("--keys", type=int, default=1000, help="Tally agents")
    parser.add_argument("--listeners", type=int, default=10, help="subscribers per guarantee")
    parser.add_argument("--events", type=int, default=5000, help="events published per round")
    parser.add_argument("--flood-seconds", type=float, default=4.0, help="overload duration")
    parser.add_argument(
        "--flood-rate", type=float, default=10 * SLOW_RATE, help="overload msg/s (default 10x)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round (smoke test)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    for name in ("workers", "repeat", "keys", "listeners", "events"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    for name in ("seconds", "flood_seconds", "flood_rate"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if args.quick:
        args.seconds, args.repeat, args.keys = 0.3, 1, 100
        args.listeners, args.events, args.flood_seconds = 4, 300, 1.0
    log = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    report = run_bench(
        args.workers, args.seconds, args.repeat, args.keys, args.listeners, args.events,
        args.flood_seconds, args.flood_rate, log=log,
    )  # fmt: skip
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
