"""Process and machine accounting from /proc (Linux), without psutil."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may hold spaces).

    Index 0 is field 3 (state), so field n of proc(5) is at index n - 3.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(b")") + 2:].decode().split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[14 - 3]) + int(fields[15 - 3])) / CLK_TCK


def children(pid: int) -> list[int]:
    """Live descendants of ``pid``, found by scanning the ppid of every process."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                parent_of[int(entry)] = int(fields[4 - 3])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent_of.items() if pp == p]
        found += kids
        frontier += kids
    return sorted(found)


def rss_split_kib(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile + RssShmem) of a process in KiB, from /proc/PID/status; zeros if gone."""
    anon = file_ = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
                elif line.startswith(("RssFile:", "RssShmem:")):
                    file_ += int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return anon, file_


def tree_cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_seconds(p) for p in pids)


def machine_busy_seconds() -> tuple[float, float]:
    """(busy CPU seconds over all cores, wall-clock seconds) since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    ticks = [int(x) for x in parts]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / CLK_TCK, time.monotonic()


@dataclass
class CpuSnapshot:
    """Server tree, this process and the whole machine at one instant."""

    wall: float
    server: float
    client: float
    machine_busy: float

    @classmethod
    def take(cls, server_pids: list[int]) -> "CpuSnapshot":
        t = os.times()
        busy, _ = machine_busy_seconds()
        return cls(time.perf_counter(), tree_cpu_seconds(server_pids), t.user + t.system, busy)


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def machine_note() -> dict:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg": loadavg(),
        "note": "2-core shared development machine; other work runs concurrently (noisy)",
    }
