"""What this machine's CPU lets a target reach, from the run's own CPU figures.

Every process of a run shares the machine's cores: load generator, forwarder,
daemon and guest. A workload that keeps them all busy (many connections at
once, or a bulk stream through TLS) runs at about cores / (the whole
pipeline's CPU per operation), so its ratio to the peer is about the peer's
pipeline CPU over gforward's: the forwarder is only one term of that sum. For
each such target this prints that model beside the measured ratio, the best
ratio a forwarder costing no CPU at all could reach, and the forwarder CPU per
operation the target asks for, beside what it spends now and its system time
(the kernel's work for its recv and send calls, which no Python can save).
For a target on the forwarder's CPU itself, the same comparison with the
target's budget.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from benchmarks.columns import PROCESS, Column
from benchmarks.report import PROCESSES, TARGETS, cpu_medians
from benchmarks.session import Run

# Workloads whose columns each keep every core busy (a rate-like target's key).
CPU_BOUND = ("requests_64", "requests_512", "requests_4096", "pipelined", "per_request",
             "setup_conc", "tls_upload_1", "tls_download_1")
# Targets on the forwarder's own CPU: figure key -> workload key.
CPU_TARGETS = {"cpu_requests_64": "requests_64", "cpu_requests_512": "requests_512",
               "cpu_requests_4096": "requests_4096", "cpu_pipelined": "pipelined",
               "cpu_frames": "frames"}


class Ceiling(NamedTuple):
    """What the CPU model says of one rate-like target."""

    model: float  # the peer's pipeline CPU per operation over ours: the ratio it predicts
    best: float  # the same with a forwarder that costs no CPU
    budget: float  # the forwarder CPU per operation the target asks for (<= 0: none will do)


def rate_ceiling(ours: dict[str, float], theirs: dict[str, float], target: float) -> Ceiling:
    """The model for CPU per operation of each process (PROCESSES) in both columns."""
    total, peer_total = sum(ours[n] for n in PROCESSES), sum(theirs[n] for n in PROCESSES)
    rest = total - ours["forwarder"]
    return Ceiling(peer_total / total, peer_total / rest, peer_total / target - rest)


def print_ceilings(run: Run, table: dict[str, dict[str, Any]]) -> None:
    """The section described in the module's docstring; nothing without a peer."""
    if not run.peers or not run.has("process"):
        return
    ours, peer = PROCESS, run.peers[0]
    lines = []
    for key in CPU_BOUND:
        pair = _pipelines(run, ours, peer, key)
        if pair is None:
            continue
        (unit, cpu), (_, theirs) = pair
        target = TARGETS[key].value
        model, best, budget = rate_ceiling(cpu, theirs, target)
        measured = table.get(key, {}).get("vs_peer_process")
        lines.append(f"  {key:<17} {unit:<5} measured {_x(measured)}, CPU model {model:.2f}x,"
                     f" with a forwarder of no CPU {best:.2f}x; >= {target:g}x needs a"
                     f" forwarder of {_budget(budget, cpu)}")
    for fig_key, key in CPU_TARGETS.items():
        pair = _pipelines(run, ours, peer, key)
        if pair is None:
            continue
        (unit, cpu), (_, theirs) = pair
        target = TARGETS[fig_key].value
        lines.append(f"  {fig_key:<17} {unit:<5} <= {target:g}x {peer.title}'s"
                     f" {theirs['forwarder']:.2f} needs a forwarder of"
                     f" {_budget(target * theirs['forwarder'], cpu)}")
    if lines:
        print(f"\nWhat the CPU allows ({ours.title} against {peer.title}; CPU per operation or"
              " GiB, medians over rounds):")
        print("\n".join(lines))


def _pipelines(run: Run, ours: Column, peer: Column, key: str
               ) -> tuple[tuple[str, dict[str, float]], tuple[str, dict[str, float]]] | None:
    """Both columns' CPU per process for workload `key`, if every process was measured."""
    found = cpu_medians(run, ours, key), cpu_medians(run, peer, key)
    if any(f is None or any(n not in f[1] for n in PROCESSES) for f in found):
        return None
    return found  # type: ignore[return-value]  # None ruled out above


def _budget(needed: float, cpu: dict[str, float]) -> str:
    """A forwarder CPU budget beside what gforward's forwarder spends, and its kernel part."""
    now = f"(now {cpu['forwarder']:.2f}, of it sys {cpu.get('forwarder sys', 0):.2f})"
    if needed <= 0:
        return f"less than no CPU {now}: out of reach here"
    below = "; below its system time alone" if needed < cpu.get("forwarder sys", 0) else ""
    return f"<= {needed:.2f} {now}{below}"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"
