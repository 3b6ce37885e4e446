"""Smoke test of bench/soak_bench.py: a few seconds of lossy network, the report complete.

No figure is asserted beyond its being counted: a soak this short proves the script
runs and reads each node's failure-detector counters, not the detector's quality (the
bench itself, run for minutes, reports that)."""

from __future__ import annotations

import json

import pytest

from ._load import load_bench


@pytest.mark.timeout(120)
def test_soak_bench_runs_and_reports_every_node(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench("soak_bench")
    bench.main(["--seconds", "3", "--drop", "0.05", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert len(report["nodes"]) == 3
    assert report["probes"] > 0 and report["asks"]["answered"] > 0
    assert all(p["probes"] > 0 for p in report["nodes"])
    assert set(report) >= {"suspicions", "false_downs", "ok"}
