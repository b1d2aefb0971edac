"""The short soak (benchmarks/soak.py): a compressing `vllm serve` on a small KV cache
under concurrent requests of every kind, then checked for leftovers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SOAK = Path(__file__).parents[2] / "benchmarks" / "soak.py"


def test_short_soak_leaves_a_healthy_idle_server(tmp_path):
    report_path = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(SOAK), "--requests", "40", "--concurrency", "16",
         "--max-prompt", "768", "--max-model-len", "1024",
         "--kv-cache-tokens", "2048", "--seed", "1",
         "--log", str(tmp_path), "--json", str(report_path)],
        capture_output=True, text=True, timeout=1800)
    assert report_path.exists(), result.stdout + result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    # Failures name the request or the end check (leaked pages, busy gauges, a traceback).
    assert report["failures"] == []
    assert result.returncode == 0
    assert report["completed"] + report["streamed"] > 0
    assert report["aborted"] > 0 and report["rejected_400"] > 0
    assert report["pairs"] > 0 and report["pairs_identical"] == report["pairs"]
    assert report["preemptions"] > 0, "the KV cache should be small enough to preempt"
    assert report["compressions"] > 0 and report["pages_freed"] > 0
