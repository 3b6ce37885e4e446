"""Smoke test of bench/cluster_bench.py: every scenario runs and every check passes.

Tiny sizes (``--quick``), no timing assertions: figures only have to be positive. The
checks are the bench's own: every ask answered with the count its agent must hold,
the counts read back through the other node, requests really forwarded between nodes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from types import ModuleType

import pytest

from ..conftest import REPO_ROOT


def _load_cluster_bench() -> ModuleType:
    path = os.path.join(REPO_ROOT, "bench", "cluster_bench.py")
    spec = importlib.util.spec_from_file_location("phoenix_bench_cluster_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(240)
def test_cluster_bench_runs_every_scenario_and_every_check_passes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench = _load_cluster_bench()
    code = bench.main(["--quick", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"], report["checks"]
    assert report["checks"] == {"wrong_answers": 0, "consistent_via_other_node": True}
    figures = report["figures"]
    for name in ("raw_rt100", "asks_local", "asks_cross", "latency_cross"):
        assert figures[name]["rate"] > 0, name
    assert 0 < figures["latency_cross"]["p50_us"] <= figures["latency_cross"]["p99_us"]
    assert report["forwarded"] > 0
    assert 0 < report["detection"]["p50_s"] < 30
    assert 0.2 < report["moved_on_join"] < 0.5
