"""Smoke test of bench/cluster_bench.py: every scenario runs and every check passes.

Tiny sizes (``--quick``), no timing assertions: figures only have to be positive. The
checks are the bench's own: every ask answered with the count its agent must hold,
the counts read back through the other node, requests really forwarded between nodes.
"""

from __future__ import annotations

import json

import pytest

from ._load import load_bench


@pytest.mark.timeout(240)
def test_cluster_bench_runs_every_scenario_and_every_check_passes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench = load_bench("cluster_bench")
    code = bench.main(["--quick", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"], report["checks"]
    assert report["checks"] == {
        "wrong_answers": 0,
        "consistent_via_other_node": True,
        "replicated": True,
        "migration_exact": True,
        "deltas_smaller": True,
        "agent_tells_exact": True,
    }
    assert report["replication_of_b"]["ack"] == "replicas"
    figures = report["figures"]
    for name in ("raw_rt100", "asks_local", "asks_cross", "reads_cross", "latency_cross"):
        assert figures[name]["rate"] > 0, name
    assert 0 < figures["latency_cross"]["p50_us"] <= figures["latency_cross"]["p99_us"]
    assert report["forwarded"] > 0
    assert 0 < report["detection"]["p50_s"] < 30
    assert 0.2 < report["moved_on_join"] < 0.5
    migration = report["migration"]
    assert migration["moves"] == 2 and migration["acked"] > 0 and migration["errors"] == 0
    assert migration["final"] == migration["acked"]
    shipping = report["state_shipping"]
    assert shipping["deltas"]["keys"] == shipping["whole"]["keys"] == 1000
    assert shipping["deltas"]["deltas"] >= 19 and shipping["whole"]["deltas"] == 0
    assert 0 < shipping["ratio"] < 0.5
    assert shipping["pipelined"]["writes"] == 200 and 0 < shipping["pipelined_ratio"] < 0.5
    tells = report["agent_tells"]
    assert tells["tells"] == 200 and tells["exact"]
    assert tells["local"]["rate"] > 0 and tells["cross"]["rate"] > 0
