"""Failure-detector soak: false suspicions among live nodes over a lossy network.

Three real nodes (``Node``, one worker each) on loopback joined through a seed,
with the default failure-detector settings (probe every 0.5 s, suspicion x4),
each dropping ``--drop`` (10 %) of everything it sends to its peers (fault
injection inside the transport, as ``tc netem`` is not available). For
``--seconds`` a client asks agents across the cluster every 50 ms (cross-node
traffic while the detector runs). No node dies, so every suspicion is false
and every ``down`` is a false failure.

Figures, from each node's membership counters: probes, suspicions raised,
suspicions refuted, downs declared; the asks answered and failed.
Verification: no member declared down, every node still sees all three up,
and the asks failed only while a request was lost (at_most_once asks, lost
with the dropped messages: they are counted, not a failure).

Run: ``.venv/bin/python bench/soak_bench.py [--seconds 600] [--drop 0.1] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from phoenix_node import Node  # noqa: E402
from phoenix_node.errors import PhoenixError  # noqa: E402

__all__ = ["main", "run_soak"]

AGENTS = ["bench.agents:Tally"]


def _states(node: Node) -> dict[str, str]:
    with node.client(timeout=5) as c:
        return {m["address"]: m["state"] for m in c.cluster_status()["members"]}


def run_soak(seconds: float, drop: float, say: Any = None) -> dict[str, Any]:
    say = say or (lambda _m: None)
    tmp = tempfile.mkdtemp(prefix="phoenix-soak-")
    settings = {"workers": 1, "agents": AGENTS, "entry_points": False, "fault_injection": True}
    nodes = [Node(data=os.path.join(tmp, "n0"), **settings).start()]
    try:
        for i in (1, 2):
            nodes.append(
                Node(data=os.path.join(tmp, f"n{i}"), seeds=[nodes[0].endpoint], **settings).start()
            )
        want = {n.endpoint for n in nodes}
        deadline = time.monotonic() + 30
        while any({a for a, s in _states(n).items() if s == "up"} != want for n in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the three nodes did not come up")
            time.sleep(0.05)
        for n in nodes:
            with n.client(timeout=5) as c:
                c.inject_faults(drop=drop)
        say(f"soaking {seconds:.0f} s with {drop:.0%} of peer messages dropped")
        answered = failed = 0
        t0 = time.monotonic()
        with nodes[0].client(timeout=2) as c:
            i = 0
            while time.monotonic() - t0 < seconds:
                try:
                    c.ask(f"Tally/soak{i % 300}", "get")
                    answered += 1
                except PhoenixError:
                    failed += 1
                i += 1
                time.sleep(0.05)
        for n in nodes:
            with n.client(timeout=5) as c:
                c.inject_faults()
        per_node = []
        for n in nodes:
            with n.client(timeout=5) as c:
                status = c.cluster_status()
            stats = status["membership"]
            per_node.append(
                {
                    "node": n.endpoint,
                    "probes": stats["probes"],
                    "suspicions": stats["suspicions"],
                    "refuted_suspicions": stats["refuted_suspicions"],
                    "downs": stats["downs"],
                    "all_up": {m["address"] for m in status["members"] if m["state"] == "up"}
                    == want,
                }
            )
    finally:
        for n in nodes:
            n.stop(timeout=10)
    downs = sum(p["downs"] for p in per_node)
    return {
        "seconds": seconds,
        "drop": drop,
        "nodes": per_node,
        "suspicions": sum(p["suspicions"] for p in per_node),
        "probes": sum(p["probes"] for p in per_node),
        "false_downs": downs,
        "asks": {"answered": answered, "failed": failed},
        "ok": downs == 0 and all(p["all_up"] for p in per_node) and answered > 0,
    }


def format_table(r: dict[str, Any]) -> str:
    lines = [
        f"Phoenix failure-detector soak: 3 nodes, {r['seconds']:.0f} s, "
        f"{r['drop']:.0%} of peer messages dropped, probe 0.5 s, suspicion x4",
        f"probes {r['probes']:,}  false suspicions {r['suspicions']}  "
        f"false downs {r['false_downs']}",
        f"asks answered {r['asks']['answered']:,}, lost with dropped messages "
        f"{r['asks']['failed']:,}",
    ]
    for p in r["nodes"]:
        lines.append(
            f"  {p['node']}: probes {p['probes']:,}, suspicions {p['suspicions']} "
            f"(refuted seen {p['refuted_suspicions']}), downs {p['downs']}"
        )
    lines.append("checks: " + ("ok" if r["ok"] else "FAIL"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="how long to soak")
    parser.add_argument("--drop", type=float, default=0.1, help="share of messages dropped")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or not 0 <= args.drop < 1:
        parser.error("--seconds must be > 0 and --drop in [0, 1)")
    say = None if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    report = run_soak(args.seconds, args.drop, say)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
