"""Cluster benchmark: cross-node asks against the raw tcp round trip, failure detection,
and the share of agents that move when a node joins.

Two real nodes (``Node``, one worker each, durable) on loopback joined through a seed,
and, in the same run, the raw baseline of :mod:`bench.baselines`: DEALER->ROUTER
round trips over tcp, msgpack on both sides, 100 in flight. Each round measures:

- **asks_local** ``Client.ask_many`` in chunks of 100 from a client of node A to
  Tally agents that A owns (through A's public endpoint, as every client of a
  cluster node sends);
- **asks_cross** the same to agents that node B owns: each request takes the one
  extra hop A -> B and its reply B -> A, and (a write) waits for B to replicate it;
- **reads_cross** ``get`` asks to the same agents: no state change, so nothing to
  replicate: the cost of the cross-node hop alone;
- **latency_cross** one cross-node ask at a time: p50 / p99.

Then, once: **detection** ``--kills`` times a third node is started, joins, and is
killed with SIGKILL; the time until both survivors hold it ``down`` is recorded
(default failure-detector settings: probe every 0.5 s, suspicion x4);
**moved_on_join** the share of 20,000 agent ids whose owner changes when a third
node joins two (the ring, and the same check on the live members' ring);
**migration** ``--moves`` times an agent is migrated to the other node while a
client (of node A) sends it pipelined ``inc`` asks without pause: the time each move
takes (from the request to the answer), the requests that waited during moves, and
the final count against the acknowledged asks (none lost, none counted twice);
**agent_tells** a Fanout agent of node A sends ``--tells`` at-least-once tells
(10 per target per action) to Tally agents of A, then to agents of B: the rate from
the first send until every tell ran (read back), and the cross/local ratio;
**state_shipping** bytes shipped to the replica per write of a large agent (a map
of ``--keys`` keys of 20-byte values, one key changed per write, ``--writes``
writes, one at a time, then 10 times as many with 100 in flight) with deltas (nodes
A and B) and, in the same run, with
whole states (two more nodes started with ``replication_deltas=False``): the
owner's ``bytes_shipped`` per write and the ratio of the two.

Every ``inc`` is a write: with ``replication_ack=replicas`` (the nodes' default,
``--replication-ack owner`` to compare) its answer waits until the other node,
the agent's replica, holds it; the report shows node B's replication counters.

Verification: every ask of every round answered with the count the agent must
have, and node B's replica acknowledged its shipments. Exit status 1 if a check
fails. Target (from the cluster issue): cross-node asks >= 0.3 of the raw
round-trip rate, shown for writes (asks_cross) and reads (reads_cross).

Run: ``.venv/bin/python bench/cluster_bench.py [--quick] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import psutil  # type: ignore[import-untyped]  # noqa: E402

from bench.baselines import percentile, raw_dealer_router_roundtrip  # noqa: E402
from bench.node_bench import environment  # noqa: E402
from phoenix_node import Client, Node  # noqa: E402
from phoenix_node.cluster.ring import Ring, moved  # noqa: E402

__all__ = ["TARGETS", "main", "run_bench"]

AGENTS = ["bench.agents:Tally", "bench.agents:Catalog", "bench.agents:Fanout"]
CHUNK = 100
TARGETS = {"asks_cross": ("raw_rt100", 0.3), "reads_cross": ("raw_rt100", 0.3)}


def _node(tmp: str, name: str, **settings: Any) -> Node:
    settings.setdefault("durability", "durable")
    return Node(
        workers=1, agents=AGENTS, entry_points=False, data=os.path.join(tmp, name), **settings
    ).start()


def _states(node: Node) -> dict[str, str]:
    with node.client(timeout=5) as c:
        return {m["address"]: m["state"] for m in c.cluster_status()["members"]}


def _wait(predicate: Any, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - t0


def _all_up(nodes: list[Node]) -> bool:
    want = {n.endpoint for n in nodes}
    return all({a for a, s in _states(n).items() if s == "up"} == want for n in nodes)


def asks(
    client: Client,
    keys: list[str],
    seconds: float,
    expected: dict[str, int],
    action: str = "inc",
) -> dict[str, Any]:
    """Pipelined ``inc`` (or ``get``) asks in chunks of CHUNK for ``seconds``; every
    ``inc`` must answer None (an error comes back as an exception object), every ``get``
    the count so far; the counts are checked at the end."""
    n, bad, t0 = 0, 0, time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < seconds:
        chunk = keys[i % len(keys) : i % len(keys) + CHUNK] or keys[:CHUNK]
        i += CHUNK
        results = client.ask_many([(k, action, {}) for k in chunk], timeout=60)
        for k, r in zip(chunk, results, strict=True):
            if action == "inc":
                expected[k] += 1
                bad += r is not None  # inc returns nothing: anything else is an error
            else:
                bad += r != expected[k]
        n += len(chunk)
    dt = time.perf_counter() - t0
    return {"rate": n / dt, "asks": n, "wrong": bad}


def latency(client: Client, keys: list[str], n: int, expected: dict[str, int]) -> dict[str, Any]:
    times, bad = [], 0
    for j in range(n):
        k = keys[j % len(keys)]
        t = time.perf_counter()
        r = client.ask(k, "inc")
        times.append(time.perf_counter() - t)
        expected[k] += 1
        bad += r is not None
    times.sort()
    return {
        "rate": n / sum(times),
        "p50_us": percentile(times, 0.5) * 1e6,
        "p99_us": percentile(times, 0.99) * 1e6,
        "wrong": bad,
    }


def detection(tmp: str, a: Node, b: Node, kills: int) -> dict[str, Any]:
    """Start a third node, let it join, SIGKILL it; seconds until both survivors say down."""
    times = []
    for k in range(kills):
        victim = _node(tmp, f"victim{k}", seeds=[a.endpoint])
        pids = [victim.pid, *(p.pid for p in psutil.Process(victim.pid).children(recursive=True))]
        try:
            _wait(lambda v=victim: _all_up([a, b, v]), 30, "the third node to be up")
            t0 = time.monotonic()
            os.kill(victim.pid, signal.SIGKILL)
            for o in (a, b):
                _wait(lambda o=o, v=victim: _states(o).get(v.endpoint) == "down", 30, "down")
            times.append(time.monotonic() - t0)
        finally:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            victim.stop(timeout=5)
    times.sort()
    return {"p50_s": percentile(times, 0.5), "p99_s": percentile(times, 0.99), "samples": times}


def migration(a: Node, b: Node, moves: int) -> dict[str, Any]:
    """Move one agent between the nodes ``moves`` times under a stream of asks to it."""
    agent = "Tally/migrating"
    acked, errors = [0], [0]
    stop = threading.Event()

    def write() -> None:
        with a.client(timeout=60) as writer:
            while not stop.is_set():
                for r in writer.ask_many([(agent, "inc", {})] * 50, timeout=60):
                    if r is None:
                        acked[0] += 1
                    else:
                        errors[0] += 1

    thread = threading.Thread(target=write)
    times, buffered = [], 0
    with a.client(timeout=60) as client:
        client.ask(agent, "get")
        thread.start()
        try:
            time.sleep(0.3)
            for _ in range(moves):
                home = client.placement(agent)["owner"]
                target = b.endpoint if home == a.endpoint else a.endpoint
                t = time.perf_counter()
                result = client.migrate(agent, target)
                times.append(time.perf_counter() - t)
                buffered += result["buffered"]
                time.sleep(0.05)
        finally:
            stop.set()
            thread.join(60)
        final = client.ask(agent, "get")
    times.sort()
    return {
        "moves": moves,
        "p50_ms": percentile(times, 0.5) * 1e3,
        "p99_ms": percentile(times, 0.99) * 1e3,
        "buffered": buffered,
        "acked": acked[0],
        "errors": errors[0],
        "final": final,
        "exact": final == acked[0] and errors[0] == 0,
    }


def agent_tells(a: Node, b: Node, tells: int) -> dict[str, Any]:
    """An agent of node A tells (at least once) Tally agents of node A, then, in the same
    run, agents of node B: the rate from the first send until every tell has run (read
    back from the targets), and the cross-node share of the local rate."""
    ring = Ring({a.endpoint: 1.0, b.endpoint: 1.0})
    sender = next(f"Fanout/s{i}" for i in range(1000) if ring.owner(f"Fanout/s{i}") == a.endpoint)
    ids = [f"Tally/fan{i}" for i in range(400)]
    per_ask, width = 10, 10  # each send: 10 tells to each of 10 targets
    rounds = max(1, tells // (per_ask * width))
    result: dict[str, Any] = {"tells": rounds * per_ask * width}
    with a.client(timeout=60) as c:
        for name, node in (("local", a), ("cross", b)):
            targets = [k for k in ids if ring.owner(k) == node.endpoint][:width]
            before = sum(c.ask_many([(k, "get", {}) for k in targets], timeout=60))
            want = before + rounds * per_ask * width
            t0 = time.perf_counter()
            sent = c.ask_many([(sender, "send", {"targets": targets, "n": per_ask})] * rounds)
            failed = [r for r in sent if not isinstance(r, int)]
            if failed:
                raise RuntimeError(f"{len(failed)} sends failed, the first: {failed[0]}")

            def done(targets: list[str] = targets, want: int = want) -> bool:
                return sum(c.ask_many([(k, "get", {}) for k in targets], timeout=60)) >= want

            _wait(done, 120, f"every {name} tell to run")
            dt = time.perf_counter() - t0
            total = sum(c.ask_many([(k, "get", {}) for k in targets], timeout=60))
            result[name] = {
                "rate": (want - before) / dt,
                "exact": total == want,
                "extra": total - want,
            }
    result["ratio"] = result["cross"]["rate"] / result["local"]["rate"]
    result["exact"] = result["local"]["exact"] and result["cross"]["exact"]
    return result


def _replication(node: Node) -> dict[str, Any]:
    with node.client(timeout=10) as c:
        status: dict[str, Any] = c.cluster_status()["replication"]
        return status


def _settled(nodes: list[Node]) -> bool:
    return all((r := _replication(n))["pending"] == 0 and r["in_flight"] == 0 for n in nodes)


def shipping(nodes: list[Node], keys: int, writes: int, pipelined: bool = False) -> dict[str, Any]:
    """Bytes the owner of a ``keys``-key map ships per one-key write, writes one at a time
    (``pipelined``: 100 in flight, so that several commits wait for each shipment)."""
    ring = Ring(dict.fromkeys((n.endpoint for n in nodes), 1.0))
    agent = f"Catalog/bench{keys}{'p' if pipelined else ''}"
    owner = next(n for n in nodes if n.endpoint == ring.owner(agent))
    with nodes[0].client(timeout=60) as client:
        client.ask(agent, "fill", n=keys)
        _wait(lambda: _settled(nodes), 60, "the filled map to reach the replica")
        before = _replication(owner)
        t0 = time.perf_counter()
        puts = [
            (agent, "put", {"key": f"k{i * 7919 % keys}", "value": f"w{i}"}) for i in range(writes)
        ]
        if pipelined:
            for i in range(0, writes, 100):
                failed = [r for r in client.ask_many(puts[i : i + 100]) if r is not None]
                if failed:
                    raise RuntimeError(f"a put failed: {failed[0]}")
        else:
            for a, action, kwargs in puts:
                client.ask(a, action, **kwargs)
        seconds = time.perf_counter() - t0
        _wait(lambda: _settled(nodes), 60, "the writes to reach the replica")
        size = client.ask(agent, "size")
    after = _replication(owner)
    shipped = after["bytes_shipped"] - before["bytes_shipped"]
    return {
        "keys": size,
        "writes": writes,
        "bytes_per_write": shipped / writes,
        "deltas": after["deltas_shipped"] - before["deltas_shipped"],
        "whole_states": after["states_shipped"] - before["states_shipped"],
        "writes_per_s": writes / seconds,
    }


def state_shipping(tmp: str, a: Node, b: Node, keys: int, writes: int) -> dict[str, Any]:
    """:func:`shipping` on A and B (deltas), then on two nodes shipping whole states."""
    deltas = shipping([a, b], keys, writes)
    pipelined = shipping([a, b], keys, writes * 10, pipelined=True)
    wa = _node(tmp, "whole_a", replication_deltas=False)
    wb = _node(tmp, "whole_b", seeds=[wa.endpoint], replication_deltas=False)
    try:
        _wait(lambda: _all_up([wa, wb]), 30, "the whole-state pair up")
        whole = shipping([wa, wb], keys, writes)
    finally:
        wa.stop(timeout=10)
        wb.stop(timeout=10)
    return {
        "deltas": deltas,
        "pipelined": pipelined,
        "whole": whole,
        "ratio": deltas["bytes_per_write"] / whole["bytes_per_write"],
        "pipelined_ratio": pipelined["bytes_per_write"] / whole["bytes_per_write"],
    }


def run_bench(
    seconds: float, repeat: int, kills: int, say: Any = None, ack: str = "replicas",
    moves: int = 20, keys: int = 1000, writes: int = 200, tells: int = 20_000,
    durability: str = "durable",
) -> dict[str, Any]:  # fmt: skip
    say = say or (lambda _m: None)
    import tempfile

    tmp = tempfile.mkdtemp(prefix="phoenix-cluster-bench-")
    samples: dict[str, list[dict[str, Any]]] = {}
    a = _node(tmp, "a", replication_ack=ack, durability=durability)
    b = _node(tmp, "b", seeds=[a.endpoint], replication_ack=ack, durability=durability)
    try:
        _wait(lambda: _all_up([a, b]), 30, "two nodes up")
        ring = Ring({a.endpoint: 1.0, b.endpoint: 1.0})
        ids = [f"Tally/c{i}" for i in range(4000)]
        local = [k for k in ids if ring.owner(k) == a.endpoint][:1000]
        cross = [k for k in ids if ring.owner(k) == b.endpoint][:1000]
        expected = dict.fromkeys(local + cross, 0)
        with a.client(timeout=60) as client:
            for r in range(repeat):
                say(f"round {r + 1}/{repeat}")
                for name, run in (
                    ("raw_rt100", lambda: {"rate": raw_dealer_router_roundtrip(50_000)}),
                    ("asks_local", lambda: asks(client, local, seconds, expected)),
                    ("asks_cross", lambda: asks(client, cross, seconds, expected)),
                    ("reads_cross", lambda: asks(client, cross, seconds, expected, "get")),
                    ("latency_cross", lambda: latency(client, cross, 2000, expected)),
                ):
                    result = run()
                    samples.setdefault(name, []).append(result)
                    say(f"  {name:<16} {result['rate']:>12,.0f}/s")
            forwarded = client.cluster_status()["forwarded"]
        with b.client(timeout=60) as other:  # the counts, read through the other node
            final = other.ask_many([(k, "get", {}) for k in local + cross], timeout=60)
            replication = other.cluster_status()["replication"]
        consistent = final == [expected[k] for k in local + cross]
        say("migration")
        migrate = migration(a, b, moves)
        say("agent tells")
        fan = agent_tells(a, b, tells)
        say("state shipping")
        ship = state_shipping(tmp, a, b, keys, writes)
        say("detection")
        detect = detection(tmp, a, b, kills)
        three = ring.with_member("tcp://127.0.0.1:1")
        moved_share = moved(ring, three, (f"Agent/{i}" for i in range(20_000)))
    finally:
        a.stop(timeout=10)
        b.stop(timeout=10)
    figures = {
        name: {key: statistics.median(s[key] for s in runs) for key in runs[0] if key != "samples"}
        for name, runs in samples.items()
    }
    wrong = sum(s.get("wrong", 0) for runs in samples.values() for s in runs)
    ratios = {
        name: figures[name]["rate"] / figures[base]["rate"] for name, (base, _) in TARGETS.items()
    }
    ratios["asks_local"] = figures["asks_local"]["rate"] / figures["raw_rt100"]["rate"]
    return {
        "environment": environment(2),
        "durability": durability,
        "figures": figures,
        "ratios": ratios,
        "targets": {
            n: {"ratio": ratios[n], "minimum": m, "ok": ratios[n] >= m}
            for n, (_, m) in TARGETS.items()
        },
        "detection": detect,
        "moved_on_join": moved_share,
        "migration": migrate,
        "state_shipping": ship,
        "agent_tells": fan,
        "forwarded": forwarded,
        "replication_of_b": replication,
        "checks": {
            "wrong_answers": wrong,
            "consistent_via_other_node": consistent,
            "replicated": replication["acked"] > 0 and replication["hold_timeouts"] == 0,
            "migration_exact": migrate["exact"],
            "deltas_smaller": ship["ratio"] < 0.5 and ship["pipelined_ratio"] < 0.5,
            "agent_tells_exact": fan["exact"],
        },
        "ok": wrong == 0
        and consistent
        and forwarded > 0
        and replication["acked"] > 0
        and migrate["exact"]
        and ship["ratio"] < 0.5
        and ship["pipelined_ratio"] < 0.5
        and fan["exact"],
    }


def format_table(report: dict[str, Any]) -> str:
    f, r = report["figures"], report["ratios"]
    d = report["detection"]
    m = report["migration"]
    s = report["state_shipping"]
    t = report["agent_tells"]
    repl = report["replication_of_b"]
    lines = [
        f"Phoenix cluster bench: 2 nodes x 1 worker on loopback ({report['durability']}), medians",
        f"replication_ack={repl['ack']}: node B shipped {repl['shipped']:,} records "
        f"({repl['deltas_shipped']:,} deltas, {repl['states_shipped']:,} whole states), "
        f"{repl['acked']:,} acked by the replica, {repl['hold_timeouts']} hold timeouts",
        f"raw DEALER->ROUTER tcp, 100 in flight   {f['raw_rt100']['rate']:>10,.0f} rt/s",
        f"asks to agents of the node asked       {f['asks_local']['rate']:>10,.0f} /s  "
        f"{r['asks_local']:.3f} of raw",
        f"asks to agents of the other node       {f['asks_cross']['rate']:>10,.0f} /s  "
        f"{r['asks_cross']:.3f} of raw (writes, see replication_ack above)",
        f"reads of agents of the other node      {f['reads_cross']['rate']:>10,.0f} /s  "
        f"{r['reads_cross']:.3f} of raw (the cross-node hop alone)",
        f"cross-node ask latency, one at a time  p50 {f['latency_cross']['p50_us']:,.0f} us, "
        f"p99 {f['latency_cross']['p99_us']:,.0f} us",
        f"kill -9 detected down by both others   p50 {d['p50_s']:.2f} s, p99 {d['p99_s']:.2f} s "
        f"({len(d['samples'])} kills, probe 0.5 s, suspicion x4)",
        f"share of agents moved when a 3rd node joins 2: {report['moved_on_join']:.3f} "
        "(ideal 0.333)",
        f"migrate under load ({m['moves']} moves)     p50 {m['p50_ms']:.1f} ms, "
        f"p99 {m['p99_ms']:.1f} ms; {m['buffered']:,} requests waited; "
        f"count {m['final']:,} = {m['acked']:,} acknowledged: {m['exact']}",
        f"bytes shipped per write, {s['deltas']['keys']:,}-key map, one key per write: "
        f"{s['deltas']['bytes_per_write']:,.0f} with deltas "
        f"({s['deltas']['deltas']} deltas, {s['deltas']['whole_states']} whole), "
        f"{s['whole']['bytes_per_write']:,.0f} with whole states: ratio {s['ratio']:.4f}; "
        f"100 writes in flight: {s['pipelined']['bytes_per_write']:,.0f} "
        f"({s['pipelined']['deltas']:,} deltas, {s['pipelined']['whole_states']:,} whole): "
        f"ratio {s['pipelined_ratio']:.4f}",
        f"agent-to-agent tells (at least once), {t['tells']:,} each way: "
        f"{t['local']['rate']:,.0f}/s to agents of the same node, "
        f"{t['cross']['rate']:,.0f}/s to the other node's: ratio {t['ratio']:.3f}",
        f"checks: {report['checks']}",
    ]
    for name, t in report["targets"].items():
        lines.append(
            f"target {name} >= {t['minimum']}: {t['ratio']:.3f} {'ok' if t['ok'] else 'FAIL'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per ask scenario")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; figures are medians")
    parser.add_argument("--kills", type=int, default=5, help="node kills timed for detection")
    parser.add_argument("--moves", type=int, default=20, help="migrations timed under load")
    parser.add_argument("--keys", type=int, default=1000, help="keys of the large agent")
    parser.add_argument("--writes", type=int, default=200, help="writes to the large agent")
    parser.add_argument(
        "--durability",
        choices=("durable", "buffered"),
        default="durable",
        help="the two nodes' commits: fsync each (durable) or leave it to the OS",
    )
    parser.add_argument("--tells", type=int, default=20_000, help="agent tells each way")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--replication-ack",
        choices=("replicas", "owner"),
        default="replicas",
        help="when the nodes acknowledge a write (the node option replication_ack)",
    )
    args = parser.parse_args(argv)
    if min(args.repeat, args.kills, args.moves, args.writes) < 1 or args.seconds <= 0:
        parser.error("--seconds must be > 0, --repeat, --kills, --moves, --writes >= 1")
    if args.tells < 100:
        parser.error("--tells must be >= 100")
    if args.keys < 10:
        parser.error("--keys must be >= 10")
    if args.quick:
        args.seconds, args.repeat, args.kills, args.moves = 0.3, 1, 1, 2
        args.writes, args.tells = 20, 200
    say = None if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    report = run_bench(
        args.seconds, args.repeat, args.kills, say, args.replication_ack, args.moves,
        args.keys, args.writes, args.tells, args.durability,
    )  # fmt: skip
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
