"""What this machine's CPU lets a target reach, by a model fed with the run's own figures.

Every process of a run shares the machine's cores: load generator, forwarder,
daemon and guest. While a workload keeps every core busy, it runs at about
cores / (the pipeline's CPU per operation), so its ratio to the peer is about
the peer's pipeline CPU over gforward's, of which the forwarder is one term.
For each rate-like target against the peer this prints, round by round and
then the median:

* the ratio that model predicts, beside the measured one, and how many cores
  the two columns kept busy, processes and softirqs (an upper estimate: see
  below); below nearly all of them, the model does not hold and no verdict is
  given: a single stage, not the sum, sets the pace;
* the ratio with a forwarder of no CPU, the rest held at gforward's figures
  (a forwarder's way of writing can change the daemon's cost too: the model
  is a guide, not a bound);
* the forwarder CPU per operation the target asks for, beside what it spends
  now and the kernel's part of that at today's system calls per operation.

The kernel's softirqs (much of loopback TCP) count towards the cores busy but
not towards the pipeline: a kernel without IRQ time accounting (tick-based,
as here) already charges most of them to the process they interrupted. Left
out, a cost both columns share makes the model optimistic, so a target it puts
out of reach is out of reach. For a target on the forwarder's own CPU, the
same comparison with the target's budget. Figures of a few clock ticks
(`--quick`) are indicative only.
"""

from __future__ import annotations

from statistics import median
from typing import Any, NamedTuple

from benchmarks.columns import PROCESS, Column
from benchmarks.report import PROCESSES, TARGETS, cpu_per_unit
from benchmarks.session import Run

# Rate-like targets against the peer whose workloads may keep every core busy.
RATES = ("upload_1", "upload_8", "download_1", "download_8", "requests_64", "requests_512",
         "requests_4096", "pipelined", "per_request", "setup_conc", "tls_upload_1",
         "tls_download_1")
# Targets on the forwarder's own CPU: figure key -> workload key.
CPU_TARGETS = {"cpu_requests_64": "requests_64", "cpu_requests_512": "requests_512",
               "cpu_requests_4096": "requests_4096", "cpu_pipelined": "pipelined",
               "cpu_frames": "frames"}
BUSY = 0.9  # of the machine's cores: below this, a column was not CPU-bound


class Ceiling(NamedTuple):
    """What the CPU model says of one rate-like target."""

    model: float  # the peer's pipeline CPU per operation over ours: the ratio it predicts
    best: float  # the same with a forwarder that costs no CPU
    budget: float  # the forwarder CPU per operation the target asks for (<= 0: none will do)


def rate_ceiling(ours: dict[str, float], theirs: dict[str, float], target: float) -> Ceiling:
    """The model for CPU per operation of each process (PROCESSES) in both columns."""
    total = sum(ours[n] for n in PROCESSES)
    peer_total = sum(theirs[n] for n in PROCESSES)
    rest = total - ours["forwarder"]
    return Ceiling(peer_total / total, peer_total / rest, peer_total / target - rest)


def print_ceilings(run: Run, table: dict[str, dict[str, Any]]) -> None:
    """The section described in the module's docstring; nothing without a peer."""
    if not run.peers or not run.has("process"):
        return
    peer, cores = run.peers[0], run.info["cpus"]
    lines = []
    for key in RATES:
        rounds = _paired(run, peer, key)
        if not rounds:
            continue
        target = TARGETS[key]
        assert target.vs_peer
        unit = rounds[0][0]
        ceilings = [rate_ceiling(ours, theirs, target.value) for _, ours, theirs in rounds]
        busy = min(median([c["cores"] for _, c, _ in rounds]),
                   median([c["cores"] for _, _, c in rounds]))
        now = _spent(rounds)
        text = (f"  {key:<17} {unit:<5} measured {_x(table.get(key, {}).get('vs_peer_process'))},"
                f" CPU model {median([c.model for c in ceilings]):.2f}x"
                f" ({busy:.1f} of {cores} cores busy)")
        if busy < BUSY * cores:
            text += "; not CPU-bound: the model does not hold"
        else:
            text += (f", with a forwarder of no CPU {median([c.best for c in ceilings]):.2f}x;"
                     f" >= {target.value:g}x needs a forwarder of"
                     f" {_budget(median([c.budget for c in ceilings]), now)}")
        lines.append(text)
    for fig_key, key in CPU_TARGETS.items():
        rounds = _paired(run, peer, key)
        if not rounds:
            continue
        target = TARGETS[fig_key]
        assert target.vs_peer
        theirs = median([peer_cpu["forwarder"] for _, _, peer_cpu in rounds])
        now = _spent(rounds)
        lines.append(f"  {fig_key:<17} {rounds[0][0]:<5} <= {target.value:g}x {peer.title}'s"
                     f" {theirs:.2f} needs a forwarder of {_budget(target.value * theirs, now)}")
    if lines:
        quick = "; --quick: indicative only" if run.args.quick else ""
        print(f"\nWhat the CPU allows, by a model (benchmarks/ceilings.py: {PROCESS.title}"
              f" against {peer.title}, CPU per operation or GiB, medians over rounds{quick}):")
        print("\n".join(lines))


def _paired(run: Run, peer: Column, key: str) -> list[tuple[str, dict[str, float],
                                                            dict[str, float]]]:
    """(unit, our CPU figures, the peer's) of each round where both columns have every
    part of the pipeline measured."""
    pairs = []
    for mine, theirs in zip(run.raw[PROCESS.key].get(key, []), run.raw[peer.key].get(key, [])):
        ours_cpu = cpu_per_unit(mine) if mine is not None else None
        peer_cpu = cpu_per_unit(theirs) if theirs is not None else None
        if ours_cpu is None or peer_cpu is None:
            continue
        (unit, ours), (_, peers) = ours_cpu, peer_cpu
        if (all(n in ours for n in (*PROCESSES, "forwarder sys", "cores"))
                and all(n in peers for n in (*PROCESSES, "cores"))):
            pairs.append((unit, ours, peers))
    return pairs


def _spent(rounds: list[tuple[str, dict[str, float], dict[str, float]]]) -> dict[str, float]:
    """gforward's forwarder CPU and its system part, medians over `rounds`."""
    return {name: median([ours[name] for _, ours, _ in rounds])
            for name in ("forwarder", "forwarder sys")}


def _budget(needed: float, now: dict[str, float]) -> str:
    """A forwarder CPU budget beside what gforward's forwarder spends, and its kernel part."""
    spent = f"(now {now['forwarder']:.2f}, of it sys {now['forwarder sys']:.2f})"
    if needed <= 0:
        return f"less than no CPU {spent}: out of reach by the model"
    below = ("; below its kernel time at today's system calls per operation"
             if needed < now["forwarder sys"] else "")
    return f"<= {needed:.2f} {spent}{below}"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"
