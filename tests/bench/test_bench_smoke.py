"""Smoke test of bench/state_bench.py: it runs, measures every scenario and verifies them.

No timing assertions: throughput depends on the machine; the bench itself reports
ratios against a baseline measured in the same run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import state_bench


@pytest.mark.timeout(60)
def test_state_bench_runs_and_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--updates", "3000", "--agents", "100", "--repeat", "1", "--json"]
    assert state_bench.main([*argv, "--dir", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)

    assert set(result["scenarios"]) == {"baseline", "A-g", "A", "B", "C"}
    for name, figures in result["scenarios"].items():
        assert figures["updates_per_s"] > 0, name
        assert figures["ratio"] > 0, name
        assert figures["verified_runs"] == 1, name
    assert result["scenarios"]["baseline"]["ratio"] == 1.0
    assert result["correctness_checked"] is True
    assert result["params"]["updates"] == 3000
    assert isinstance(result["target"]["pass"], bool)
    for key in ("python", "lmdb", "msgpack", "cpu_count"):
        assert result["environment"][key]
    assert list(tmp_path.iterdir()) == []  # every scenario's directory was removed
