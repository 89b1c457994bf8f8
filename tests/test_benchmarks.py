"""The benchmarks must not rot: `benchmarks/throughput.py --quick` runs every workload, with
the gforward command line run a second time as a `--peer`, and reports every figure (the
in-app forwarder in each isolation among them); with `--rounds 2`, figures are medians over
rounds and ratios medians of each round's ratio."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.ceilings import CPU_TARGETS, RATES, _budget, rate_ceiling
from benchmarks.columns import expand, peer_column
from benchmarks.framesdaemon import frames

ROOT = Path(__file__).resolve().parent.parent
BENCHMARK = ROOT / "benchmarks" / "throughput.py"
SELF_PEER = "self={python} -m gforward {vm} {spec} --url {url} --token {token}"

THROUGHPUT = ["upload_1", "download_1", "upload_8", "download_8"]
REQUESTS = ["requests_64", "requests_512", "requests_4096", "pipelined", "per_request"]
WITH_DIRECT = [*THROUGHPUT, *REQUESTS, "rtt_median", "rtt_p99", "setup_seq", "setup_conc",
               "busy_idle_median", "busy_idle_p99", "busy_median", "busy_p99",
               "busy_idle_requests", "busy_requests"]
FORWARDER_ONLY = [
    "cpu_upload_1", "cpu_download_1", "cpu_upload_8", "cpu_download_8", "cpu_per_conn",
    "cpu_requests_64", "cpu_requests_512", "cpu_requests_4096", "cpu_pipelined",
    "cpu_per_request", "frames", "cpu_frames", "tls_upload_1", "tls_download_1",
    "rss_idle_0", "rss_idle_small", "kib_per_tunnel", "tunnels_held",
]
SKIPPED_IN_QUICK = ["rss_idle_large"]  # the 10,000-tunnel step: present, with a reason
IN_APP_ONLY = ["start_first", "start_later", "close", "start_memory"]  # what start() costs
GFORWARD = ["process", "app", "isolated"]  # the CLI, then start() in each isolation
FORWARDERS = [*GFORWARD, "peer:self"]
VS_PEER = ["upload_1", "rtt_median", "setup_conc", "requests_64", "cpu_requests_64",
           "pipelined", "per_request", "cpu_frames", "tls_download_1", "busy_median",
           "busy_requests"]


@pytest.mark.timeout(150)
def test_quick_benchmark_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--json", str(out), "--deadline", "120",
         "--peer", SELF_PEER],
        cwd=ROOT, capture_output=True, text=True, timeout=140, check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "| figure" in proc.stdout and "vs self (proc / app / iso)" in proc.stdout  # the table
    assert "gforward (in-app, isolated)" in proc.stdout
    assert "upload_1" in proc.stderr  # progress went to stderr

    data = json.loads(out.read_text())
    assert data["failures"] == []
    figures = data["figures"]
    for key in WITH_DIRECT:
        for column in ["direct", *FORWARDERS]:
            value = figures[key][column]
            assert isinstance(value, (int, float)) and value > 0, (key, column, value)
        for column in GFORWARD:
            assert figures[key][f"ratio_{column}"] > 0, (key, column)
    for key in FORWARDER_ONLY:
        assert figures[key]["direct"] is None, key
        for column in FORWARDERS:
            value = figures[key][column]
            assert isinstance(value, (int, float)) and value >= 0, (key, column, value)
    for key in SKIPPED_IN_QUICK:
        for column in FORWARDERS:
            assert figures[key][column] is None
            assert figures[key]["skipped"][column], (key, column)
    for column in FORWARDERS:
        assert figures["tunnels_held"][column] == 100
    for key in IN_APP_ONLY:
        for column in ["app", "isolated"]:
            value = figures[key][column]
            assert isinstance(value, (int, float)) and value > 0, (key, column, value)
        for column in ["direct", "process", "peer:self"]:
            assert figures[key][column] is None, (key, column)
    [thread], [isolated] = data["raw"]["app"]["start"], data["raw"]["isolated"]["start"]
    assert thread["helper_kib"] == 0 and isolated["helper_kib"] > 0
    for key in VS_PEER:  # targets against the first peer, decided either way
        row = figures[key]
        assert row["target_vs_peer"] and row["peer"] == "peer:self", key
        for column in GFORWARD:
            assert row[f"vs_peer_{column}"] is not None, (key, column)
            assert row[f"met_{column}"] in (True, False), (key, column)
    for key in ["kib_per_tunnel", "tunnels_held"]:
        assert not figures[key]["target_vs_peer"], key
    for key in THROUGHPUT:
        for column in ["direct", *FORWARDERS]:
            [result] = data["raw"][column][key]  # --quick: one round
            assert result["bytes"] > 0
    allows = {line.split()[0]: line for line in
              proc.stdout.split("What the CPU allows", 1)[1].splitlines()[1:] if line}
    for key in RATES:  # a line each, its ratio against the peer found
        assert "measured -" not in allows[key] and "CPU model" in allows[key], allows[key]
        assert "needs a forwarder of" in allows[key] or "not CPU-bound" in allows[key]
    for key in CPU_TARGETS:
        assert "needs a forwarder of" in allows[key], allows[key]


@pytest.mark.timeout(90)
def test_rounds_give_medians_of_per_round_ratios(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--rounds", "2", "--only", "requests",
         "--json", str(out), "--deadline", "60", "--peer", SELF_PEER],
        cwd=ROOT, capture_output=True, text=True, timeout=80, check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "2 rounds of each rate-like workload" in proc.stdout

    data = json.loads(out.read_text())
    assert data["failures"] == [] and data["params"]["rounds"] == 2
    columns = ["direct", *FORWARDERS]
    for column in columns:
        results = data["raw"][column]["requests_64"]
        assert [r["round"] for r in results] == [1, 2]
    firsts = {c: data["raw"][c]["requests_64"][0]["position"] for c in columns}
    seconds = {c: data["raw"][c]["requests_64"][1]["position"] for c in columns}
    assert firsts != seconds  # the order rotates
    row = data["figures"]["requests_64"]
    for column in columns:
        assert len(row["rounds"][column]) == 2
        assert row[column] == pytest.approx(sum(row["rounds"][column]) / 2)
    for name in ["ratio_process", "vs_peer_process", "vs_peer_app", "vs_peer_isolated"]:
        per_round = row[f"{name}_rounds"]
        assert len(per_round) == 2 and all(v > 0 for v in per_round), name
        assert row[name] == pytest.approx(sum(per_round) / 2), name  # their median
    mine, theirs = row["rounds"]["process"], row["rounds"]["peer:self"]
    assert row["vs_peer_process_rounds"] == pytest.approx([a / b for a, b in zip(mine, theirs)])
    assert row["met_process"] == (row["vs_peer_process"] >= row["target"])


def test_cpu_model_of_a_rate_target() -> None:
    """Both columns share the cores, so a ratio is about the peer's pipeline CPU over ours;
    what is left for the forwarder is what the target's share of that allows."""
    ours = {"forwarder": 33.0, "daemon": 42.0, "guest": 16.0, "load generator": 15.0}
    theirs = {"forwarder": 49.0, "daemon": 49.0, "guest": 17.5, "load generator": 17.5}
    model, best, budget = rate_ceiling(ours, theirs, 1.2)
    assert model == pytest.approx(133 / 106)
    assert best == pytest.approx(133 / 73)  # the forwarder at no CPU
    assert budget == pytest.approx(133 / 1.2 - 73)
    assert rate_ceiling(ours, theirs, 2.0).budget < 0  # beyond even a free forwarder
    # softirqs, already charged to the processes on a tick-accounting kernel, stay out
    assert rate_ceiling({**ours, "softirq": 27.0}, theirs, 1.2) == rate_ceiling(ours, theirs, 1.2)


def test_a_budget_says_when_the_kernel_alone_spends_more() -> None:
    now = {"forwarder": 33.0, "forwarder sys": 21.0}
    assert _budget(38.0, now) == "<= 38.00 (now 33.00, of it sys 21.00)"
    assert _budget(15.0, now).endswith("below its kernel time at today's system calls per"
                                       " operation")
    assert _budget(-1.0, now).endswith("out of reach by the model")


INSTRUCTIONS = ROOT / "benchmarks" / "instructions.py"


@pytest.mark.parametrize("direct", [False, True], ids=["through a pump", "direct"])
def test_the_instruction_counts_program_runs(direct: bool) -> None:
    """What benchmarks/instructions.py runs under callgrind (too slow for the suite itself):
    kept from rotting."""
    proc = subprocess.run([sys.executable, str(INSTRUCTIONS), "--pump-run", "200",
                           *(["--direct"] if direct else [])],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


def test_instruction_counts_say_what_they_need(tmp_path: Path) -> None:
    python = Path(sys.executable)
    proc = subprocess.run([str(python), str(INSTRUCTIONS)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False,
                          env={"PATH": str(tmp_path)})  # no valgrind on it
    assert proc.returncode == 2
    assert "needs valgrind" in proc.stderr


def test_command_templates() -> None:
    peer = peer_column(SELF_PEER)
    assert (peer.key, peer.title) == ("peer:self", "self")
    argv = expand("fwd --spec={spec} '{url}/x y' {other}", {"spec": "1:2:3", "url": "http://u"})
    assert argv == ["fwd", "--spec=1:2:3", "http://u/x y", "{other}"]
    for bad in ["no-equals-sign", "=cmd", "a b=cmd", "x={nope}", "x='unclosed"]:
        with pytest.raises(ValueError):
            peer_column(bad)


def test_frames_are_32_kib_binary_frames() -> None:
    run = frames(32 * 1024, 2)
    assert len(run) == 2 * (4 + 32 * 1024)
    assert run[:4] == bytes([0x82, 126, 0x80, 0x00])
