"""Smoke test of bench/node_bench.py: every scenario runs and the checks pass.

Tiny sizes, no timing assertions: figures only have to be positive.
"""

from __future__ import annotations

import json

import pytest

from ._load import load_bench

SCENARIOS = (
    "raw_push_pull",
    "raw_rt100",
    "raw_rt1",
    "asks_direct",
    "asks_control",
    "latency_direct",
    "latency_control",
    "tells_direct",
    "tells_control",
)


@pytest.mark.timeout(120)
def test_node_bench_runs_every_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    node_bench = load_bench("node_bench")
    code = node_bench.main(["--seconds", "0.2", "--repeat", "1", "--keys", "50", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    figures = report["figures"]
    for name in SCENARIOS:
        assert figures[name]["rate"] > 0, name
    for name in ("raw_rt1", "latency_direct", "latency_control"):
        assert 0 < figures[name]["p50_us"] <= figures[name]["p99_us"], name
    assert all(value > 0 for value in report["ratios"].values())
    # Correctness: one check per node scenario, every counter as acknowledged / sent.
    assert {c["scenario"] for c in report["checks"]} == {n for n in SCENARIOS if "raw" not in n}
    assert all(c["ok"] and c["mismatched_keys"] == 0 for c in report["checks"]), report["checks"]
    assert report["checks"][-1]["observed_total"] == report["checks"][-1]["expected_total"] > 0
    # Routing: direct clients never cross the control process; route=False ones always do.
    assert report["routing"]["ok"] and report["routing"]["control_forwarded_direct"] == 0
    assert report["node_stop_code"] == 0
    assert report["ok"]
