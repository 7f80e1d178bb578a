"""The load processes of one bench run, and the phases they run together.

A phase is prepared in every load process, started at one instant chosen
here, and timed against the server's CPU between the first send and the last
reply; the processes' parts are then merged (bench/_merge.py).
"""

from __future__ import annotations

import time

from . import _inputs, _proc
from ._loadgen import LoadProcess
from ._merge import merge


class Runner:
    def __init__(self, args, inputs: _inputs.Inputs, address: str, server_pids: list[int], progress=None):
        self.args, self.inputs, self.address = args, inputs, address
        self.server_pids = server_pids
        self.progress = progress or (lambda event, **kw: None)
        self.load: list[LoadProcess] = []
        self.background: LoadProcess | None = None

    def start(self) -> list[int]:
        a = self.args
        self.load = [LoadProcess(self.address, a.connections, i, a.processes, a.timeout, a.nice)
                     for i in range(a.processes)]
        if a.scenario == "e2e" and a.background_rate > 0:
            self.background = LoadProcess(self.address, 1, 0, 1, a.timeout, a.nice)
        return [p for lp in self.load for p in lp.worker_pids]

    def stop(self) -> None:
        for lp in self.load + ([self.background] if self.background else []):
            lp.stop()

    def phase(self, name: str, role: str, spec: dict, background: dict | None = None) -> dict:
        a = self.args
        groups = [(self.load, spec)] + ([([self.background], background)] if background else [])
        for procs, s in groups:
            for lp in procs:
                lp.send("prepare", spec=s)
        for procs, _ in groups:
            for lp in procs:
                lp.recv(600.0)
        t0 = time.perf_counter() + 0.2
        self.progress("phase_start", name=name, t0=t0, duration=spec["duration"])
        for procs, _ in groups:
            for lp in procs:
                lp.send("run", t0=t0)
        time.sleep(max(0.0, t0 - time.perf_counter()))
        before = _proc.CpuSnapshot.take(self.server_pids)
        budget = spec["duration"] + a.timeout + 60.0
        for procs, _ in groups:
            for lp in procs:
                lp.recv(budget)  # drained
        after = _proc.CpuSnapshot.take(self.server_pids)
        parts = [[lp.recv(60.0)["result"] for lp in procs] for procs, _ in groups]
        result = merge(name, role, spec, parts[0], after.wall - before.wall)
        if background:
            bg = merge("background", "background", background, parts[1], after.wall - before.wall)
            result["background"] = {k: bg[k] for k in ("target_rps", "achieved_rps", "items_per_s", "errors")}
        client = sum(r["client_cpu_seconds"] for part in parts for r in part)
        wall = after.wall - before.wall
        server = after.server - before.server
        requests = max(1, result["completed"])
        result["cpu"] = {
            "measured": bool(self.server_pids),
            "server_us_per_request": round(server / requests * 1e6, 1) if self.server_pids else None,
            "server_us_per_item": round(server / max(1, result["items"]) * 1e6, 2) if self.server_pids else None,
            "server_cores": round(server / wall, 2) if self.server_pids else None,
            "client_us_per_request": round(client / requests * 1e6, 1),
            "client_cores": round(client / wall, 2),
            # what neither the server nor the generators used: other work on a shared machine
            # (/proc counts in 10 ms ticks, so a short phase can come out a little below zero: shown as 0)
            "other_cores": max(0.0, round((after.machine_busy - before.machine_busy - server - client) / wall, 2))
            if self.server_pids else None,
            "machine_cores_busy": round((after.machine_busy - before.machine_busy) / wall, 2),
        }
        self.progress("phase_end", name=name)
        return result
