"""The benchmark must not rot: `benchmarks/throughput.py --quick` runs and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARK = ROOT / "benchmarks" / "throughput.py"

# Every figure of the README's performance table, and the columns that must have a number for it.
THROUGHPUT = ["upload_1", "download_1", "upload_8", "download_8"]
WITH_DIRECT = [*THROUGHPUT, "rtt_median", "rtt_p99", "setup_seq", "setup_conc"]
FORWARDER_ONLY = [
    "cpu_upload_1", "cpu_download_1", "cpu_upload_8", "cpu_download_8", "cpu_per_conn",
    "rss_idle_0", "rss_idle_small", "kib_per_tunnel", "tunnels_held",
]
SKIPPED_IN_QUICK = ["rss_idle_large"]  # the 10,000-tunnel step: present, with a reason
GFORWARD = ["process", "app"]


@pytest.mark.timeout(60)
def test_quick_benchmark_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--json", str(out), "--deadline", "45"],
        cwd=ROOT, capture_output=True, text=True, timeout=55, check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "| figure" in proc.stdout  # the table
    assert "upload_1" in proc.stderr  # progress went to stderr

    data = json.loads(out.read_text())
    figures = data["figures"]
    for key in WITH_DIRECT:
        for column in ["direct", *GFORWARD]:
            value = figures[key][column]
            assert isinstance(value, (int, float)) and value > 0, (key, column, value)
        for column in GFORWARD:
            assert figures[key][f"ratio_{column}"] > 0, (key, column)
    for key in FORWARDER_ONLY:
        assert figures[key]["direct"] is None, key
        for column in GFORWARD:
            value = figures[key][column]
            assert isinstance(value, (int, float)) and value >= 0, (key, column, value)
    for key in SKIPPED_IN_QUICK:
        for column in GFORWARD:
            assert figures[key][column] is None
            assert figures[key]["skipped"][column], (key, column)
    for column in GFORWARD:
        assert figures["tunnels_held"][column] == 100
    for key in ["upload_1", "rtt_median", "setup_seq", "kib_per_tunnel"]:
        assert "target" in figures[key], key
    for key in THROUGHPUT:
        for column in ["direct", *GFORWARD]:
            assert data["raw"][column][key]["bytes"] > 0
