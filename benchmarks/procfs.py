"""What /proc says about the run's processes and the machine: CPU, memory, descriptors.

A forwarder is measured as a process tree (its root and every descendant), so
that a peer started through a wrapper (a shell, `go run`) is counted whole.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import struct
import time
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")

Snapshot = dict[str, Any]


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        return f.read().rsplit(")", 1)[1].split()


def proc_cpu_parts(pid: int) -> tuple[float, float]:
    """(user, system) seconds of a process, its threads and reaped children included."""
    fields = _stat(pid)
    user = int(fields[11]) + int(fields[13])
    system = int(fields[12]) + int(fields[14])
    return user / TICK, system / TICK


def descendants(pid: int) -> list[int]:
    """`pid` and every process under it, parents first."""
    found, index = [pid], 0
    while index < len(found):
        parent = found[index]
        index += 1
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{task}/children", encoding="ascii") as f:
                    found.extend(int(child) for child in f.read().split())
    return found


def tree_cpu_parts(pid: int) -> tuple[float, float]:
    """(user, system) seconds of a process tree; a process gone meanwhile counts as 0."""
    user = system = 0.0
    for member in descendants(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            u, s = proc_cpu_parts(member)
            user, system = user + u, system + s
    return user, system


def tree_cpu(pid: int) -> float:
    return sum(tree_cpu_parts(pid))


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (its peak) of a process, in KiB."""
    found = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
    if "VmRSS" not in found:
        raise OSError(f"no VmRSS for process {pid}")
    return found


def rss_kib(pid: int) -> int:
    return memory_kib(pid)["VmRSS"]


def tree_rss_kib(pid: int, *, itself: bool = True) -> int:
    """RSS of a process tree; without the root when not `itself` (its helpers alone)."""
    total = 0
    for member in descendants(pid)[0 if itself else 1:]:
        with contextlib.suppress(OSError):
            total += rss_kib(member)
    return total


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def machine_cpu() -> tuple[float, float, float]:
    """(process time, irq + softirq time, steal) of the whole machine so far.

    Loopback TCP does much of its work in softirqs, which the kernel may count apart
    from any process: that is the run's own work, not other load.
    """
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    steal = fields[7] if len(fields) > 7 else 0
    return (user + nice + system) / TICK, (irq + softirq) / TICK, steal / TICK


def listening(port: int) -> bool:
    """Whether something listens on TCP `port` (any address): no connection needed, so
    probing a forwarder this way opens no tunnel."""
    try:
        return port in _listening_ports()
    except OSError:  # no sock_diag: /proc/net/tcp lists every socket, slowly, but works
        wanted = f":{port:04X}"
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError), open(table, encoding="ascii") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A" and fields[1].endswith(wanted):
                        return True
        return False


def _listening_ports() -> set[int]:
    """Local ports of every listening TCP socket, from the kernel's sock_diag (netlink):
    it lists only listeners, where /proc/net/tcp would list every TIME_WAIT too."""
    ports: set[int] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4) as nl:  # NETLINK_SOCK_DIAG
        for family in (socket.AF_INET, socket.AF_INET6):
            # inet_diag_req_v2: family, protocol, ext, pad, states (1 << TCP_LISTEN), sockid
            request = struct.pack("=BBBBI48x", family, socket.IPPROTO_TCP, 0, 0, 1 << 10)
            # nlmsghdr: length, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, pid
            nl.send(struct.pack("=LHHLL", 16 + len(request), 20, 0x301, 1, 0) + request)
            done = False
            while not done:
                data = nl.recv(65536)
                offset = 0
                while offset + 16 <= len(data):
                    length, kind = struct.unpack_from("=LH", data, offset)
                    if kind == 3:  # NLMSG_DONE
                        done = True
                        break
                    if kind == 2:  # NLMSG_ERROR
                        raise OSError("sock_diag refused the request")
                    ports.add(struct.unpack_from("!H", data, offset + 16 + 4)[0])
                    offset += (length + 3) & ~3
                if not data:
                    break
    return ports


def raise_nofile(want: int) -> int:
    """Raise RLIMIT_NOFILE towards `want` (the hard limit too, where allowed); the new soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
        return want
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def snapshot(pids: dict[str, int], run_root: int) -> Snapshot:
    """One edge of a measured window: CPU of each named process tree, of the whole run
    (the tree under `run_root`) and of the machine."""
    parts = {}
    for name, pid in pids.items():
        with contextlib.suppress(OSError):
            parts[name] = tree_cpu_parts(pid)
    busy, irq, steal = machine_cpu()
    return {"t": time.monotonic(), "parts": parts, "run": tree_cpu(run_root), "machine": busy,
            "irq": irq, "steal": steal}


def window(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    """What happened between two snapshots: CPU per name (and of it system time), CPU the
    machine spent outside the run ("other_cpu"), softirqs, steal, and the seconds."""
    cpu, system = {}, {}
    for name, (user0, sys0) in before["parts"].items():
        if name in after["parts"]:
            user1, sys1 = after["parts"][name]
            cpu[name] = user1 + sys1 - user0 - sys0
            system[name] = sys1 - sys0
    run = after["run"] - before["run"]
    return {"cpu": cpu, "cpu_sys": system,
            "other_cpu": max(after["machine"] - before["machine"] - run, 0.0),
            "irq": after["irq"] - before["irq"], "steal": after["steal"] - before["steal"],
            "window": after["t"] - before["t"]}
