"""Smoke test of bench/messaging_bench.py: every scenario runs and every check passes.

Tiny sizes (``--quick``), no timing assertions: figures only have to be positive. The
checks are the bench's own: every counter read back matches what was sent or
acknowledged, no fan-out delivery is lost, memory stays bounded under the flood.
"""

from __future__ import annotations

import json

import pytest

from ._load import load_bench

NODE_SCENARIOS = (
    "tells_amo",
    "tells_alo",
    "tells_alo_noretry",
    "tells_eo",
    "fanout_amo",
    "fanout_alo",
    "overload_amo",
    "overload_alo",
)


@pytest.mark.timeout(240)
def test_messaging_bench_runs_every_scenario_and_every_check_passes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench = load_bench("messaging_bench")
    code = bench.main(["--quick", "--json"])
    report = json.loads(capsys.readouterr().out)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert code == 0 and not failed, failed
    figures = report["figures"]
    for name in NODE_SCENARIOS:
        assert figures[name]["rate"] > 0, name
    assert {c["scenario"] for c in report["checks"]} == set(NODE_SCENARIOS)
    fanout = [c for c in report["checks"] if c["scenario"].startswith("fanout")]
    assert fanout and all(c["lost"] == 0 for c in fanout), fanout
    assert set(report["targets"]) == {"tells_alo", "tells_eo"}
