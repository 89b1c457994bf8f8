"""From raw results to what a run reports: figures, targets, the table, JSON and a plot.

Each `Figure` reads one number from one column's raw results of one round.
A column's figure is the median over rounds; a ratio between two columns is
taken in each round first (the two were measured seconds apart, so that the
machine's drift cancels) and the median of those is what the table shows and
the targets are checked against. Targets are the project's: most are ratios to
the first `--peer` (another forwarder, run side by side in the same run), a few
are absolute bounds. No other forwarder's figure is ever written here: without
a peer, those targets say "needs --peer".
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

from benchmarks.columns import Column
from benchmarks.protocol import GiB
from benchmarks.scenarios import FDS_PER_TUNNEL
from benchmarks.session import Run, log

Value = Union[float, tuple[float, str]]  # a figure, or one with a note (marked *)


class Missing(Exception):
    """No figure in this column: the message says why, or `key` names the raw result that
    is not there (the run knows why: `Run.missing`)."""

    def __init__(self, reason: str, key: str = "") -> None:
        super().__init__(reason)
        self.key = key


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    digits: int
    value: Callable[[dict[str, Any]], Value]  # from one column's raw results
    direct: bool = True  # the direct column has it too


@dataclass(frozen=True)
class Target:
    value: float
    vs_peer: bool = True  # a ratio to the first peer's figure, else a bound on the figure
    note: str = ""

    def met(self, figure: Figure, measured: float) -> bool:
        return measured >= self.value if figure.higher_is_better else measured <= self.value


BULK = Target(2.0, note="today's bulk targets: 2x up, 1.5x down")
BUSY_NOTE = "beside a busy thread: within 1.1x of the peer, in the best isolation"
TARGETS: dict[str, Target] = {
    "upload_1": BULK, "upload_8": BULK,
    "download_1": Target(1.5, note=BULK.note), "download_8": Target(1.5, note=BULK.note),
    "cpu_upload_1": Target(1.0, vs_peer=False), "cpu_download_1": Target(1.0, vs_peer=False),
    "cpu_upload_8": Target(1.0, vs_peer=False), "cpu_download_8": Target(1.0, vs_peer=False),
    "rtt_median": Target(0.8),
    "setup_seq": Target(1.2), "setup_conc": Target(1.2),
    "requests_64": Target(1.2), "requests_512": Target(1.2), "requests_4096": Target(1.2),
    "cpu_requests_64": Target(0.75), "cpu_requests_512": Target(0.75),
    "cpu_requests_4096": Target(0.75),
    "pipelined": Target(1.2), "cpu_pipelined": Target(0.75),
    "per_request": Target(1.2),
    "cpu_frames": Target(0.5),
    "tls_upload_1": Target(1.5), "tls_download_1": Target(1.5),
    # Issue 14: a plain app's forwarder, in its best isolation, within 1.1x of the peer
    # run beside the app, under load.
    "busy_median": Target(1.1, note=BUSY_NOTE), "busy_requests": Target(0.91, note=BUSY_NOTE),
    "kib_per_tunnel": Target(8, vs_peer=False),
    "tunnels_held": Target(10000, vs_peer=False),
}


# Reading one number from a column's raw results -----------------------------------------


def _result(raw: dict[str, Any], key: str) -> dict[str, Any]:
    if key not in raw:
        raise Missing("not run", key)
    return dict(raw[key])


def mbps(key: str) -> Callable[[dict[str, Any]], Value]:
    return lambda raw: (r := _result(raw, key))["bytes"] / r["seconds"] / 1e6


def cpu_per_gib(key: str) -> Callable[[dict[str, Any]], Value]:
    return lambda raw: (r := _result(raw, key))["forwarder_cpu"] / (r["bytes"] / GiB)


def rate(key: str, *path: str) -> Callable[[dict[str, Any]], Value]:
    def value(raw: dict[str, Any]) -> Value:
        found = _at(raw, key, path)
        return float(found["count"]) / float(found["seconds"])

    return value


def cpu_per_op(key: str, scale: float = 1e6) -> Callable[[dict[str, Any]], Value]:
    return lambda raw: (r := _result(raw, key))["forwarder_cpu"] / r["count"] * scale


def field(key: str, *path: str) -> Callable[[dict[str, Any]], Value]:
    return lambda raw: float(_at(raw, key, path))


def _at(raw: dict[str, Any], key: str, path: tuple[str, ...]) -> Any:
    """What `path` leads to in the result of `key`."""
    found: Any = _result(raw, key)
    for name in path:
        found = found[name]
    return found


def cpu_per_connection(raw: dict[str, Any]) -> Value:
    seq, conc = _result(raw, "setup_seq"), _result(raw, "setup_conc")
    cpu, count = seq["forwarder_cpu"] + conc["forwarder_cpu"], seq["count"] + conc["count"]
    return 1000 * float(cpu) / int(count)


def idle_figure(key: str, steps: list[int]) -> Callable[[dict[str, Any]], Value]:
    """The memory figures, from the idle steps' RSS readings."""

    def value(raw: dict[str, Any]) -> Value:
        idle = _result(raw, "idle")
        measured = [s for s in idle["steps"] if "held" in s]
        if key == "rss_idle_0":
            return float(idle["rss0_kib"]) / 1024
        if key in ("rss_idle_small", "rss_idle_large"):
            index = 0 if key == "rss_idle_small" else 1
            if index >= len(steps):
                raise Missing("one idle step only (--quick or --idle)")
            if index >= len(idle["steps"]):
                raise Missing("not reached: the step before it failed")
            step = idle["steps"][index]
            if "skipped" in step:
                raise Missing(step["skipped"])
            if step["held"] < step["open"]:
                raise Missing(f"only {step['held']} held: {step['error']}")
            return step["rss_kib"] / 1024, step["note"]
        if key == "kib_per_tunnel":
            if not measured or not measured[-1]["held"]:
                raise Missing("no idle tunnel held")
            last = measured[-1]
            return float(last["rss_kib"] - idle["rss0_kib"]) / int(last["held"])
        errors = [f"stopped at {s['held']}: {s['error']}" for s in measured if s["error"]]
        notes = [s.get("note") or s.get("skipped", "") for s in idle["steps"]]
        return (float(max((s["held"] for s in measured), default=0)),
                "; ".join(errors) or next((n for n in notes if n), ""))

    return value


def figures(run: Run) -> list[Figure]:
    """Every figure the benchmark reports, in table order."""
    p = run.p
    steps = p.idle_steps
    figs = []
    for kind in ("upload", "download"):
        for streams in (1, 8):
            key = f"{kind}_{streams}"
            figs.append(Figure(key, f"{kind}, {streams} stream{'s' * (streams > 1)}", "MB/s",
                               True, 0, mbps(key)))
    for kind in ("upload", "download"):
        for streams in (1, 8):
            key = f"{kind}_{streams}"
            figs.append(Figure(f"cpu_{key}", f"forwarder CPU, {kind} {streams} stream"
                               f"{'s' * (streams > 1)}", "s/GiB", False, 2, cpu_per_gib(key),
                               direct=False))
    figs += [
        Figure("tls_upload_1", "upload through TLS, 1 stream", "MB/s", True, 0,
               mbps("tls_upload_1"), direct=False),
        Figure("tls_download_1", "download through TLS, 1 stream", "MB/s", True, 0,
               mbps("tls_download_1"), direct=False),
        Figure("frames", "download of 32 KiB frames, 1 stream", "MB/s", True, 0,
               mbps("frames"), direct=False),
        Figure("cpu_frames", "forwarder CPU, download of 32 KiB frames", "s/GiB", False, 2,
               cpu_per_gib("frames"), direct=False),
    ]
    for size in p.request_sizes:
        figs.append(Figure(f"requests_{size}", f"requests of {size} B, {p.concurrency}"
                           " keep-alive connections", "req/s", True, 0, rate(f"requests_{size}")))
    for size in p.request_sizes:
        figs.append(Figure(f"cpu_requests_{size}", f"forwarder CPU per request of {size} B",
                           "us", False, 1, cpu_per_op(f"requests_{size}"), direct=False))
    figs += [
        Figure("pipelined", f"pipelined requests of {p.pipelined_size} B, {p.depth} in flight"
               " each", "req/s", True, 0, rate("pipelined")),
        Figure("cpu_pipelined", "forwarder CPU per pipelined request", "us", False, 1,
               cpu_per_op("pipelined"), direct=False),
        Figure("per_request", f"one connection per request of {p.per_request_size} B,"
               f" {p.concurrency} at a time", "req/s", True, 0, rate("per_request")),
        Figure("cpu_per_request", "forwarder CPU per tunnel, one per request", "us", False, 0,
               cpu_per_op("per_request"), direct=False),
        Figure("rtt_median", "1-byte echo round trip, median", "us", False, 1,
               field("echo", "median_us")),
        Figure("rtt_p99", "1-byte echo round trip, p99", "us", False, 1, field("echo", "p99_us")),
        Figure("busy_idle_median", "round trip from an idle app, median", "us", False, 1,
               field("busy", "idle", "median_us")),
        Figure("busy_idle_p99", "round trip from an idle app, p99", "us", False, 1,
               field("busy", "idle", "p99_us")),
        Figure("busy_median", "round trip beside a busy thread, median", "us", False, 0,
               field("busy", "busy", "median_us")),
        Figure("busy_p99", "round trip beside a busy thread, p99", "us", False, 0,
               field("busy", "busy", "p99_us")),
        Figure("busy_idle_requests", f"requests of {p.busy_request} B from an idle app,"
               f" {p.busy_clients} connections", "req/s", True, 0,
               rate("busy", "idle_requests")),
        Figure("busy_requests", f"requests of {p.busy_request} B beside a busy thread,"
               f" {p.busy_clients} connections", "req/s", True, 0,
               rate("busy", "busy_requests")),
        Figure("setup_seq", "tunnel setup, sequential", "conn/s", True, 0, rate("setup_seq")),
        Figure("setup_conc", f"tunnel setup, {p.concurrency} concurrent", "conn/s", True, 0,
               rate("setup_conc")),
        Figure("cpu_per_conn", "forwarder CPU per connection (setup)", "ms", False, 3,
               cpu_per_connection, direct=False),
    ]
    idle = [
        ("rss_idle_0", "forwarder RSS, no tunnel", "MiB", False, 1),
        ("rss_idle_small", f"forwarder RSS, {steps[0]} idle tunnels", "MiB", False, 1),
        ("rss_idle_large", f"forwarder RSS, {steps[1] if len(steps) > 1 else 10000} idle"
         " tunnels", "MiB", False, 1),
        ("kib_per_tunnel", "forwarder memory per idle tunnel", "KiB", False, 1),
        ("tunnels_held", "idle tunnels held", "", True, 0),
    ]
    figs += [Figure(key, label, unit, better, digits, idle_figure(key, steps), direct=False)
             for key, label, unit, better, digits in idle]
    figs += [
        Figure("start_first", "start() in a fresh app (after import)", "ms", False, 1,
               field("start", "first_ms"), direct=False),
        Figure("start_later", f"start() again (median of {p.start_repeat})", "ms", False, 1,
               field("start", "later_ms"), direct=False),
        Figure("close", "close()", "ms", False, 1, field("start", "close_ms"), direct=False),
        Figure("start_memory", "memory start() adds (app + helper)", "MiB", False, 1,
               lambda raw: float(_result(raw, "start")["memory_kib"]) / 1024, direct=False),
    ]
    return figs


# The table's numbers ----------------------------------------------------------------------

GFORWARD = ("process", "app", "isolated")  # gforward's columns: ratios and targets
SHORT = {"process": "proc", "app": "app", "isolated": "iso"}  # in the table's headers
SPREAD = 0.10  # per-round ratios further apart than this (of their median) show their range


def round_views(raw: dict[str, list[dict[str, Any] | None]]) -> list[dict[str, Any]]:
    """One column's raw results as one dict a round: each workload's result of that round."""
    count = max((len(results) for results in raw.values()), default=1)
    return [{key: results[index] for key, results in raw.items()
             if index < len(results) and results[index] is not None}
            for index in range(max(count, 1))]


def cell(run: Run, column: Column, fig: Figure) -> tuple[list[float | None], str, str]:
    """(value of each round, note, why none) of one figure in one column. A figure of a
    single-shot workload has one round."""
    if column.key == "direct" and not fig.direct:
        return [], "", "no forwarder"
    raw = run.raw[column.key]
    values: list[float | None] = []
    notes: list[str] = []
    whys: list[str] = []
    for index, view in enumerate(round_views(raw)):
        try:
            value = fig.value(view)
        except Missing as exc:
            whys.append(run.missing[column.key].get(exc.key, str(exc)))
            if exc.key not in raw or index >= len(raw[exc.key]):
                break  # never run here, no such figure, or no more rounds (a single shot)
            values.append(None)  # this round failed or was not run
            continue
        except (KeyError, TypeError, ZeroDivisionError) as exc:
            values.append(None)
            whys.append(f"no figure ({type(exc).__name__}: {exc})")
            continue
        if isinstance(value, tuple):
            value, note = value
            notes.append(note)
        values.append(value)
    if all(v is None for v in values):
        return values, "", whys[0]
    return values, next((n for n in notes if n), ""), ""


def median(values: Sequence[float | None]) -> float | None:
    """The median of the values there are (None if none)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def per_round_ratios(ours: Sequence[float | None],
                     theirs: Sequence[float | None]) -> list[float | None]:
    """ours / theirs within each round: two columns measured close together in time."""
    return [a / b if a is not None and b else None for a, b in zip(ours, theirs)]


def compute(run: Run) -> tuple[list[Figure], dict[str, dict[str, Any]]]:
    """Every figure in every column (medians over rounds), ratios to direct and to the first
    peer (medians of the per-round ratios), targets."""
    figs = figures(run)
    peer = run.peers[0] if run.peers else None
    table: dict[str, dict[str, Any]] = {}
    for fig in figs:
        row: dict[str, Any] = {"label": fig.label, "unit": fig.unit, "direct": None,
                               **dict.fromkeys(GFORWARD), "rounds": {}}
        for column in run.columns:
            values, note, why = cell(run, column, fig)
            row[column.key] = median(values)
            row["rounds"][column.key] = values
            if note:
                row.setdefault("notes", {})[column.key] = note
            if why:
                row.setdefault("skipped", {})[column.key] = why
        rounds = row["rounds"]
        for mode in GFORWARD:
            ours = rounds.get(mode, [])
            if fig.direct:
                per_round = per_round_ratios(ours, rounds.get("direct", []))
                row[f"ratio_{mode}_rounds"] = per_round
                row[f"ratio_{mode}"] = median(per_round)
            else:
                row[f"ratio_{mode}"] = None
            if peer is not None:
                per_round = per_round_ratios(ours, rounds.get(peer.key, []))
                row[f"vs_peer_{mode}_rounds"] = per_round
                row[f"vs_peer_{mode}"] = median(per_round)
        if peer is not None:
            row["peer"] = peer.key
        target = TARGETS.get(fig.key)
        if target is not None:
            row.update(target=target.value, target_vs_peer=target.vs_peer,
                       target_note=target.note)
            applicable = not (fig.key == "tunnels_held" and max(run.p.idle_steps) < target.value)
            for mode in GFORWARD:
                measured = row.get(f"vs_peer_{mode}") if target.vs_peer else row[mode]
                row[f"met_{mode}"] = (target.met(fig, measured) if measured is not None
                                      and applicable else None)
        table[fig.key] = row
    return figs, table


# Printing -----------------------------------------------------------------------------------


def fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def ratio(row: dict[str, Any], name: str) -> str:
    """A median ratio, with the range of the per-round ones when they disagree much."""
    value = row.get(name)
    if value is None:
        return "-"
    text = f"{value:.2f}x"
    per_round = [v for v in row.get(f"{name}_rounds", []) if v is not None]
    if len(per_round) > 1 and (max(per_round) - min(per_round)) > SPREAD * value:
        text += f" ({min(per_round):.2f}-{max(per_round):.2f})"
    return text


def ratios(row: dict[str, Any], prefix: str, modes: Sequence[str]) -> str:
    return " / ".join(ratio(row, f"{prefix}_{mode}") for mode in modes)


def run_modes(run: Run) -> list[str]:
    """gforward's columns in this run (--modes may leave some out)."""
    return [mode for mode in GFORWARD if run.has(mode)]


def print_table(run: Run, figs: list[Figure], table: dict[str, dict[str, Any]]) -> None:
    peer = run.peers[0] if run.peers else None
    modes = run_modes(run)
    names = " / ".join(SHORT[mode] for mode in modes)
    header = ["figure", "unit", *(c.title for c in run.columns), f"vs direct ({names})"]
    if peer is not None:
        header.append(f"vs {peer.title} ({names})")
    header += ["target", f"met ({names})"]
    rows = [header]
    for fig in figs:
        row = table[fig.key]
        if all(row.get("skipped", {}).get(c.key) in ("not run", "no forwarder")
               for c in run.columns):
            continue  # a scenario --only left out
        cells = [fig.label, fig.unit]
        for column in run.columns:
            marked = column.key in row.get("notes", {})
            cells.append(fmt(row[column.key], fig.digits) + (" *" if marked else ""))
        cells.append(ratios(row, "ratio", modes) if fig.direct else "")
        if peer is not None:
            cells.append(ratios(row, "vs_peer", modes) if row.get(peer.key) is not None
                         else "")
        target, met = "", ""
        if "target" in row:
            sign = ">=" if fig.higher_is_better else "<="
            target = (f"{sign} {row['target']:g}x {peer.title if peer else 'peer'}"
                      if row["target_vs_peer"] else f"{sign} {row['target']:g}")
            if row["target_vs_peer"] and peer is None:
                met = "needs --peer"
            else:
                met = " / ".join("n/a" if row.get(f"met_{m}") is None else
                                 "met" if row[f"met_{m}"] else "NOT met" for m in modes)
        rows.append([*cells, target, met])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    numeric = set(range(2, 2 + len(run.columns)))
    print()
    print("gforward throughput benchmark" + (" (--quick: indicative only)" if run.args.quick
                                             else ""))
    info = run.info
    print(f"machine: {info['cpus']} CPUs ({info['cpu_model']}), kernel {info['kernel']}, Python"
          f" {info['python']}, gevent {info['gevent']}, websockets.speedups"
          f" {'yes' if info['websockets_speedups'] else 'no'}; gforward"
          f" {info['gforward_version']} ({info['commit'] or 'no git'})")
    p = run.p
    print(f"sizes: {p.size / 2**20:g} MiB per stream, {p.rtt_count} round trips,"
          f" {p.setup_count} connections per setup scenario, {p.seconds:g} s per request"
          f" workload, idle steps {p.idle_steps}; {p.rounds} round{'s' * (p.rounds > 1)}"
          " of each rate-like workload")
    for column in run.columns:
        if column.command:
            print(f"{column.title}: {column.command}")
    print(f"daemon: {run.args.daemon}")
    for i, cells in enumerate(rows):
        print("| " + " | ".join(c.rjust(widths[j]) if j in numeric else c.ljust(widths[j])
                                for j, c in enumerate(cells)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print_notes(run, figs, table)
    print_cpu_breakdown(run)


def print_notes(run: Run, figs: list[Figure], table: dict[str, dict[str, Any]]) -> None:
    titles = {c.key: c.title for c in run.columns}
    reasons = [f"{fig.label}, {titles[key]}: {why}" for fig in figs
               for key, why in table[fig.key].get("skipped", {}).items()
               if key in titles and why not in ("no forwarder", "not run")]
    if reasons:
        print("\nnot measured:")
        for reason in dict.fromkeys(reasons):
            print(f"  {reason}")
    marked = [f"{fig.label}, {titles[key]}: {note}" for fig in figs
              for key, note in table[fig.key].get("notes", {}).items()]
    if marked:
        print("\n* about these values:")
        for note in marked:
            print(f"  {note}")
    if run.failures:
        print("\nFAILED:")
        for failure in run.failures:
            print(f"  {failure}")
    if run.p.rounds > 1:
        print(f"\nrounds: each rate-like workload ran {run.p.rounds} times, every column once a"
              " round, the columns' order\n  rotating from round to round; a figure is the"
              " median over rounds, a ratio the median of the\n  ratios within each round,"
              f" followed by (lowest-highest) when those differ by more than {SPREAD:.0%}."
              "\n  Memory and start() ran once.")
    print("\nnotes: MB = 10^6 bytes. Ratios: gforward's figure over the other column's."
          "\n  'in-app' RSS is the whole app process (its load generator included), 'isolated'"
          " the app's\n  plus its helper's (isolation=\"process\"); in-app forwarder CPU is"
          " the app's (and its helper's)\n  less the load generator's own thread time. A"
          " peer's CPU and RSS are its whole process tree's.\n  'memory start() adds': the"
          " app's RSS growth from before `import gforward` to after start()\n  and one"
          " tunnel, plus the helper's RSS. Each idle tunnel holds 6 fds: "
          + FDS_PER_TUNNEL + f"; RLIMIT_NOFILE in every process: {run.nofile}.")
    for note in run.notes:
        print(f"  {note}")
    if run.contended:
        print("\nWARNING: other work shared this machine during these scenarios; their figures"
              " are pessimistic:")
        for line in run.contended:
            print(f"  {line}")


PROCESSES = ("forwarder", "daemon", "guest", "load generator")  # of the CPU breakdown


def print_cpu_breakdown(run: Run) -> None:
    """CPU of every process per unit of work in each workload: where the time goes (medians
    over rounds, as the table's)."""
    rounds = f", medians of {run.p.rounds} rounds" if run.p.rounds > 1 else ""
    print(f"\nCPU by process (utime+stime, of it sys), per GiB or per operation{rounds}:")
    keys = list(dict.fromkeys(k for col in run.raw.values() for k in col))
    for key in keys:
        for column in run.columns:
            found = cpu_medians(run, column, key)
            if found is None:
                continue
            unit, cpu = found
            cells = [f"{name} {cpu[name]:.2f}"
                     + (f" (sys {cpu[f'{name} sys']:.2f})" if f"{name} sys" in cpu else "")
                     for name in PROCESSES if name in cpu]
            print(f"  {key:<15} {unit:<5} {column.title:<27} " + ", ".join(cells))


def cpu_medians(run: Run, column: Column, key: str) -> tuple[str, dict[str, float]] | None:
    """(unit, each process's CPU per unit of workload `key`, and "NAME sys") in one column,
    medians over rounds; None if it has no CPU figures there."""
    measured = [m for r in run.raw[column.key].get(key, [])
                if r is not None and (m := cpu_per_unit(r)) is not None]
    if not measured:
        return None
    names = [n for name in PROCESSES for n in (name, f"{name} sys")]
    values = {name: median([cpu.get(name) for _, cpu in measured]) for name in names}
    return measured[0][0], {name: v for name, v in values.items() if v is not None}


def cpu_per_unit(r: dict[str, Any]) -> tuple[str, dict[str, float]] | None:
    """(unit, CPU per GiB or per operation of each process, and of its system time as
    "NAME sys") of one result, None if it has no CPU figures.  Also "cores": how many
    cores the processes and the machine's irqs and softirqs (much of loopback TCP's work)
    kept busy."""
    if "cpu" not in r:
        return None
    if "bytes" in r:
        per, unit = r["bytes"] / GiB, "s/GiB"
    elif r.get("count"):
        per, unit = r["count"] / 1e6, "us/op"
    else:
        return None
    cpu = {**r["cpu"], "forwarder": r.get("forwarder_cpu"), "load generator": r["loadgen_cpu"]}
    system = r.get("cpu_sys", {})
    out: dict[str, float] = {}
    for name in PROCESSES:
        if cpu.get(name) is not None:
            out[name] = cpu[name] / per
            if name in system:
                out[f"{name} sys"] = system[name] / per
    if "irq" in r and r.get("window"):
        out["cores"] = (sum(cpu.get(name) or 0.0 for name in PROCESSES) + r["irq"]) / r["window"]
    return unit, out


# Files ----------------------------------------------------------------------------------------


def write_json(path: Path, run: Run, table: dict[str, dict[str, Any]]) -> None:
    data = {
        "quick": run.args.quick,
        "params": run.p.__dict__,
        "columns": [{"key": c.key, "title": c.title, "command": c.command}
                    for c in run.columns],
        "daemon": run.args.daemon,
        "tls_daemon": run.args.tls_daemon,
        "info": run.info,
        "figures": table,
        "raw": run.raw,
        "failures": run.failures,
        "notes": run.notes,
        "contended": run.contended,
    }
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    log(f"raw figures written to {path}")


def write_plot(path: Path, run: Run, table: dict[str, dict[str, Any]]) -> None:
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        log(f"--plot {path}: matplotlib is not installed (pip install matplotlib); no plot")
        return
    keys = ["upload_1", "download_1", "upload_8", "download_8", "tls_upload_1",
            "tls_download_1", "frames"]
    labels = [table[k]["label"].replace(", ", "\n") for k in keys]
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(run.columns)
    for i, column in enumerate(run.columns):
        values = [table[k].get(column.key) or 0 for k in keys]
        offset = (i - (len(run.columns) - 1) / 2) * width
        bars = ax.bar([x + offset for x in range(len(keys))], values, width, label=column.title)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(keys)), labels, fontsize=8)
    ax.set_ylabel("MB/s (10^6 bytes/s)")
    ax.set_title("gforward throughput on loopback")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log(f"plot written to {path}")
