"""Node benchmark: asks and tells against a real node, as ratios to raw baselines.

Routing, as measured here: a client sends HELLO once to the node's public
endpoint (the control process) and learns every worker's tcp endpoint; from
then on it computes the owner of each agent (jump hash of the agent id, the
same function the node uses) and sends straight to that worker's ROUTER. No
process is a hop that every message crosses. A client built with
``route=False`` sends everything to the control process instead, which forwards
the undecoded frames to the owner over ipc and relays the reply: one extra hop,
measured here as the "via control" rows. The control process's ``forwarded``
counter (read live through STATUS) shows how many messages crossed it in each
scenario: 0 for the direct ones.

Each round runs, in this order, in the same run:

- the raw baselines (:mod:`bench.baselines`): PUSH->PULL ipc with msgpack on
  both sides; DEALER->ROUTER tcp round trips with 100 in flight; the same with
  one in flight (p50/p99);
- asks direct to the owning worker: ``Client.ask_many`` in chunks of 100 over
  ``--keys`` Counter agents, then the same through the control process;
- ask latency, one at a time, direct and via control;
- tells one-way (``Client.tell`` in a loop), timed until one ask per worker,
  sent after them on the same connection, has come back (so every tell before
  it was run and committed), direct and via control;

and after each node scenario checks that every counter equals the number of
increments acknowledged (asks) or sent (tells). Figures are medians over
``--repeat`` rounds. The node runs with durable commits (fsync per batch).

Run: ``.venv/bin/python bench/node_bench.py [--workers W] [--seconds S] [--json]``.
The client side runs in this process, which is not one of the node's; on a
machine with fewer CPUs than workers + 1 it shares the CPUs with the workers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import lmdb  # noqa: E402
import msgpack  # noqa: E402
import zmq  # noqa: E402

from bench.baselines import (  # noqa: E402
    peer_cpus,
    percentile,
    raw_dealer_router_latency,
    raw_dealer_router_roundtrip,
    raw_push_pull_msgpack,
)
from phoenix_node import Client, Node  # noqa: E402
from workers.placement import owner_index  # noqa: E402

__all__ = ["main", "run_bench"]

CHUNK = 100  # asks in flight per ask_many call
# Expected rates, used only to size the fixed-count baselines to about --seconds each.
_PUSH_PULL_RATE, _RT100_RATE, _RT1_RATE = 750_000, 120_000, 10_000

Calls = list[tuple[str, str, dict[str, Any]]]


class Counters:
    """The expected value of every counter: what the node acknowledged or was sent."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.expected = dict.fromkeys(keys, 0)

    def verify(self, client: Client, name: str, **extra: Any) -> dict[str, Any]:
        """Read every counter back (``get``) and compare with the expected values."""
        observed: dict[str, Any] = {}
        for i in range(0, len(self.keys), CHUNK):
            part = self.keys[i : i + CHUNK]
            observed.update(zip(part, client.ask_many([(k, "get", {}) for k in part]), strict=True))
        bad = [k for k in self.keys if observed[k] != self.expected[k]]
        got = sum(v for v in observed.values() if isinstance(v, int))
        return {
            "scenario": name,
            "ok": not bad and not extra.get("errors") and not extra.get("wrong_replies"),
            "expected_total": sum(self.expected.values()),
            "observed_total": got,
            "mismatched_keys": len(bad),
            **extra,
        }


# --- scenarios ----------------------------------------------------------------------------


def _chunks(keys: list[str], action: str) -> list[Calls]:
    return [[(k, action, {}) for k in keys[i : i + CHUNK]] for i in range(0, len(keys), CHUNK)]


def asks_pipelined(client: Client, counters: Counters, seconds: float) -> dict[str, Any]:
    """``ask_many`` of ``inc`` in chunks of 100 until ``seconds`` have passed."""
    chunks = _chunks(counters.keys, "inc")
    expected = counters.expected
    done = errors = wrong = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    i = 0
    while True:
        calls = chunks[i % len(chunks)]
        i += 1
        for (key, _, _), result in zip(calls, client.ask_many(calls), strict=True):
            if isinstance(result, Exception):
                errors += 1
                continue
            expected[key] += 1
            wrong += result != expected[key]  # inc returns the new value
        done += len(calls)
        if time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - t0
    return {"rate": (done - errors) / elapsed, "asks": done, "errors": errors, "wrong": wrong}


def asks_one_at_a_time(client: Client, counters: Counters, seconds: float) -> dict[str, Any]:
    """``ask`` of ``inc``, one in flight, until ``seconds`` have passed: p50/p99."""
    keys, expected = counters.keys, counters.expected
    ask, clock = client.ask, time.perf_counter_ns
    samples: list[int] = []
    errors = wrong = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    i = 0
    while time.perf_counter() < deadline or i == 0:
        key = keys[i % len(keys)]
        i += 1
        start = clock()
        try:
            value = ask(key, "inc")
        except Exception:
            errors += 1
            continue
        samples.append(clock() - start)
        expected[key] += 1
        wrong += value != expected[key]
    elapsed = time.perf_counter() - t0
    samples.sort()
    us = [s / 1000 for s in samples]
    return {
        "rate": len(samples) / elapsed,
        "asks": i,
        "errors": errors,
        "wrong": wrong,
        "p50_us": percentile(us, 0.50),
        "p99_us": percentile(us, 0.99),
    }


def tells_until_processed(
    client: Client, counters: Counters, seconds: float, sentinels: list[str]
) -> dict[str, Any]:
    """``tell`` of ``inc`` for ``seconds``, then one ``get`` per worker; timed to its reply.

    The sentinels go on the same connections as the tells, after them, and each
    worker runs one connection's messages in order: when every sentinel has
    answered, every tell was run and committed.
    """
    keys, expected = counters.keys, counters.expected
    tell = client.tell
    n_keys = len(keys)
    sent = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(1000):
            tell(keys[sent % n_keys], "inc")
            sent += 1
        if time.perf_counter() >= deadline:
            break
    t_sent = time.perf_counter()
    results = client.ask_many([(k, "get", {}) for k in sentinels], timeout=60)
    t_done = time.perf_counter()
    for i in range(sent):
        expected[keys[i % n_keys]] += 1
    errors = sum(isinstance(r, Exception) for r in results)
    return {
        "rate": sent / (t_done - t0),
        "tells": sent,
        "send_rate": sent / (t_sent - t0),
        "drain_s": t_done - t_sent,
        "errors": errors,
        "wrong": 0,
    }


def _settle(
    client: Client, counters: Counters, name: str, result: dict[str, Any]
) -> dict[str, Any]:
    """Verify the counters; if tells were not all run yet, wait (bounded) and say so."""
    check = counters.verify(client, name, errors=result["errors"], wrong_replies=result["wrong"])
    if check["ok"] or "tells" not in result:
        return check
    deadline = time.monotonic() + 10
    while not check["ok"] and time.monotonic() < deadline:
        time.sleep(0.05)
        check = counters.verify(client, name, errors=result["errors"], wrong_replies=0)
    check["fifo_held"] = False  # the sentinel came back before every tell was run
    return check


# --- the run ----------------------------------------------------------------------------


def _owned_key(names: list[str], index: int, workers: int) -> str:
    """An agent id that worker ``index`` owns (a bench key if one is, else a new one)."""
    for name in names:
        if owner_index(name, workers) == index:
            return name
    return next(
        f"Counter/sentinel{i}"
        for i in range(1_000_000)
        if owner_index(f"Counter/sentinel{i}", workers) == index
    )


def _control_forwarded(client: Client) -> int:
    return int(client.status()["control"]["forwarded"])


def environment(workers: int) -> dict[str, Any]:
    usable = sorted(os.sched_getaffinity(0))
    return {
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "lmdb": f"{lmdb.__version__} (LMDB {'.'.join(map(str, lmdb.version()))})",
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "baseline_cpus": list(peer_cpus()),
        "workers": workers,
        "client_shares_cpus": len(usable) < workers + 1,
    }


def run_bench(
    workers: int = 2,
    seconds: float = 2.0,
    repeat: int = 3,
    keys: int = 1000,
    log: Callable[[str], None] | None = None,
    durability: str = "durable",
) -> dict[str, Any]:
    """Run every scenario ``repeat`` times; return figures, ratios, routing and checks."""
    say = log or (lambda _msg: None)
    names = [f"Counter/bench{i}" for i in range(keys)]
    counters = Counters(names)
    sentinels = [_owned_key(names, w, workers) for w in range(workers)]
    samples: dict[str, list[dict[str, Any]]] = {}
    checks: list[dict[str, Any]] = []
    routing: dict[str, list[int]] = {}

    def record(name: str, result: dict[str, Any]) -> None:
        samples.setdefault(name, []).append(result)
        say(f"  {name:<22} {result['rate']:>12,.0f}/s")

    node = Node(workers=workers, durability=durability)
    node.start()
    clients: list[Client] = []
    try:
        direct = node.client(route=True, timeout=30)
        clients.append(direct)
        via_control = node.client(route=False, timeout=30)
        clients.append(via_control)
        # Activate every agent (load from LMDB, on_start) before anything is timed.
        counters.verify(direct, "warm-up")
        counters.verify(via_control, "warm-up")
        for r in range(repeat):
            say(f"round {r + 1}/{repeat}")
            n = max(2_000, int(seconds * _PUSH_PULL_RATE))
            record("raw_push_pull", {"rate": raw_push_pull_msgpack(n)})
            n = max(1_000, int(seconds * _RT100_RATE))
            record("raw_rt100", {"rate": raw_dealer_router_roundtrip(n, 100, "tcp")})
            n = max(200, int(seconds * _RT1_RATE))
            record("raw_rt1", raw_dealer_router_latency(n, "tcp"))
            scenarios: list[tuple[str, Client, Callable[[Client], dict[str, Any]]]] = [
                ("asks_direct", direct, lambda c: asks_pipelined(c, counters, seconds)),
                ("asks_control", via_control, lambda c: asks_pipelined(c, counters, seconds)),
                ("latency_direct", direct, lambda c: asks_one_at_a_time(c, counters, seconds)),
                (
                    "latency_control",
                    via_control,
                    lambda c: asks_one_at_a_time(c, counters, seconds),
                ),
                (
                    "tells_direct",
                    direct,
                    lambda c: tells_until_processed(c, counters, seconds, sentinels),
                ),
                (
                    "tells_control",
                    via_control,
                    lambda c: tells_until_processed(c, counters, seconds, sentinels),
                ),
            ]
            for name, client, scenario in scenarios:
                before = _control_forwarded(direct)
                result = scenario(client)
                result["control_forwarded"] = _control_forwarded(direct) - before
                record(name, result)
                routing.setdefault(name, []).append(result["control_forwarded"])
                checks.append(_settle(direct, counters, name, result))
    finally:
        for opened in clients:
            opened.close()
        code = node.stop()
    report = _summary(workers, seconds, repeat, keys, samples, checks, routing, code)
    report["config"]["durability"] = durability
    return report


def _median(results: list[dict[str, Any]], field: str) -> float:
    return float(statistics.median(r[field] for r in results))


def _summary(
    workers: int,
    seconds: float,
    repeat: int,
    keys: int,
    samples: dict[str, list[dict[str, Any]]],
    checks: list[dict[str, Any]],
    routing: dict[str, list[int]],
    stop_code: int | None,
) -> dict[str, Any]:
    figures: dict[str, dict[str, Any]] = {}
    for name, results in samples.items():
        fig: dict[str, Any] = {
            "rate": _median(results, "rate"),
            "rates": [r["rate"] for r in results],
        }
        for field in ("p50_us", "p99_us", "drain_s", "send_rate"):
            if field in results[0]:
                fig[field] = _median(results, field)
        for field in ("asks", "tells", "errors", "wrong", "control_forwarded"):
            if field in results[0]:
                fig[field] = sum(r[field] for r in results)
        figures[name] = fig
    rt100, rt1, push = (figures[k]["rate"] for k in ("raw_rt100", "raw_rt1", "raw_push_pull"))
    ratios = {
        "asks_direct/raw_rt100": figures["asks_direct"]["rate"] / rt100,
        "asks_control/raw_rt100": figures["asks_control"]["rate"] / rt100,
        "asks_control/asks_direct": figures["asks_control"]["rate"]
        / figures["asks_direct"]["rate"],
        "latency_direct/raw_rt1": figures["latency_direct"]["rate"] / rt1,
        "latency_control/raw_rt1": figures["latency_control"]["rate"] / rt1,
        "tells_direct/raw_push_pull": figures["tells_direct"]["rate"] / push,
        "tells_control/raw_push_pull": figures["tells_control"]["rate"] / push,
    }
    direct_hops = sum(sum(routing[k]) for k in routing if k.endswith("_direct"))
    sent_via_control = {
        k: figures[k].get("asks", figures[k].get("tells", 0))
        for k in routing
        if k.endswith("_control")
    }
    # The control process counts frames; a pipelined batch of messages is one frame.
    routing_ok = direct_hops == 0 and all(sum(routing[k]) > 0 for k in sent_via_control)
    return {
        "config": {"workers": workers, "seconds": seconds, "repeat": repeat, "keys": keys},
        "environment": environment(workers),
        "figures": figures,
        "ratios": ratios,
        "routing": {
            "control_forwarded_direct": direct_hops,
            "control_forwarded_via_control": {k: sum(routing[k]) for k in sent_via_control},
            "sent_via_control": sent_via_control,
            "ok": routing_ok,
        },
        "checks": checks,
        "node_stop_code": stop_code,
        "ok": all(c["ok"] for c in checks) and routing_ok and stop_code == 0,
    }


# --- output ---------------------------------------------------------------------------------


def format_table(report: dict[str, Any]) -> str:
    f, r, env = report["figures"], report["ratios"], report["environment"]

    def lat(name: str) -> str:
        return f"p50 {f[name]['p50_us']:7.1f} us  p99 {f[name]['p99_us']:8.1f} us"

    def tell_detail(name: str) -> str:
        return f"send {f[name]['send_rate']:,.0f}/s, drain {f[name]['drain_s']:.2f} s"

    rows = [
        ("raw PUSH->PULL ipc, msgpack both sides", f["raw_push_pull"]["rate"], "msg/s", "1", ""),
        ("raw DEALER->ROUTER tcp, 100 in flight", f["raw_rt100"]["rate"], "rt/s", "1", ""),
        ("raw DEALER->ROUTER tcp, 1 in flight", f["raw_rt1"]["rate"], "rt/s", "1", lat("raw_rt1")),
        (
            "asks direct, ask_many x100",
            f["asks_direct"]["rate"],
            "asks/s",
            f"{r['asks_direct/raw_rt100']:.3f} of raw rt100",
            "",
        ),
        (
            "asks via control, ask_many x100",
            f["asks_control"]["rate"],
            "asks/s",
            f"{r['asks_control/raw_rt100']:.3f} of raw rt100",
            f"{r['asks_control/asks_direct']:.2f} of direct",
        ),
        (
            "ask latency direct, 1 in flight",
            f["latency_direct"]["rate"],
            "asks/s",
            f"{r['latency_direct/raw_rt1']:.3f} of raw rt1",
            lat("latency_direct"),
        ),
        (
            "ask latency via control, 1 in flight",
            f["latency_control"]["rate"],
            "asks/s",
            f"{r['latency_control/raw_rt1']:.3f} of raw rt1",
            lat("latency_control"),
        ),
        (
            "tells direct, until processed",
            f["tells_direct"]["rate"],
            "tells/s",
            f"{r['tells_direct/raw_push_pull']:.3f} of raw push",
            tell_detail("tells_direct"),
        ),
        (
            "tells via control, until processed",
            f["tells_control"]["rate"],
            "tells/s",
            f"{r['tells_control/raw_push_pull']:.3f} of raw push",
            tell_detail("tells_control"),
        ),
    ]
    cfg = report["config"]
    lines = [
        f"Phoenix node bench: {cfg['workers']} workers ({cfg['durability']}), "
        f"{cfg['keys']} Counter agents, {cfg['seconds']} s per scenario, "
        f"median of {cfg['repeat']} rounds",
        f"Python {env['python']}, pyzmq {env['pyzmq']}, libzmq {env['libzmq']}, "
        f"msgpack {env['msgpack']}, lmdb {env['lmdb']}",
        f"CPUs: {env['cpu_count']} (usable {env['usable_cpus']}); baseline peers pinned to "
        f"{env['baseline_cpus']}; workers pinned round-robin, control process and client unpinned",
    ]
    if env["client_shares_cpus"]:
        lines.append(
            f"NOTE: {len(env['usable_cpus'])} usable CPUs for {cfg['workers']} workers + the "
            "client (+ the control process): the client shares the CPUs with the workers."
        )
    lines.append("")
    lines.append(f"{'scenario':<40} {'figure':>12} {'unit':<8} {'ratio':<22} detail")
    lines.append("-" * 120)
    for label, rate, unit, ratio, detail in rows:
        lines.append(f"{label:<40} {rate:>12,.0f} {unit:<8} {ratio:<22} {detail}")
    routing = report["routing"]
    lines.append("")
    lines.append(
        f"routing: messages that crossed the control process in direct scenarios: "
        f"{routing['control_forwarded_direct']}; via-control scenarios: "
        f"{routing['control_forwarded_via_control']} (sent {routing['sent_via_control']})"
    )
    failed = [c for c in report["checks"] if not c["ok"]]
    lines.append(
        f"correctness: {len(report['checks']) - len(failed)}/{len(report['checks'])} checks passed "
        f"(every counter == acknowledged/sent increments; final total "
        f"{report['checks'][-1]['observed_total'] if report['checks'] else 0}); "
        f"node stopped with {report['node_stop_code']}"
    )
    for c in failed:
        lines.append(f"  FAILED: {c}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per scenario")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; figures are medians")
    parser.add_argument("--keys", type=int, default=1000, help="Counter agents")
    parser.add_argument(
        "--durability",
        choices=("durable", "buffered"),
        default="durable",
        help="node durability (default durable: fsync per commit); buffered to diagnose",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    log = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    report = run_bench(
        args.workers, args.seconds, args.repeat, args.keys, log=log, durability=args.durability
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
