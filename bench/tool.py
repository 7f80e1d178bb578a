"""``qualify bench SCENARIO`` / ``python -m bench SCENARIO``: the load bench.

    qualify bench personalize --target 127.0.0.1:50051 --rate 2000 --duration 30s
    python -m bench personalize --floor --report run.html --json > run.json
    python -m bench mixed --mix get=90,track=10 --schedule ramp:100:3000
    python -m bench personalize --concurrency 32          # closed loop, flat out
    python -m bench e2e --rate 100 --compare old.json

Without ``--target`` the bench starts ``qualify serve`` on the embedded demo in
a temporary folder and stops it afterwards; with it, it loads a server that is
already running (and measures that server's CPU when it runs on this machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

from . import _audiences, _inputs, _proc, report
from ._loadgen import LoadProcess, encode, new_histogram
from ._schedule import Schedule, ScheduleError

SCENARIOS = {
    "personalize": ({"get": 1.0}, "PersonalizeService.Get of one seeded key"),
    "batch-get": ({"batch-get": 1.0}, "PersonalizeService.BatchGet of --batch seeded keys"),
    "ingest": ({"ingest": 1.0}, "IngestService.StreamEvents: a request is one batch of --batch events "
                                "from the event mix, acknowledged once durable"),
    "e2e": ({"e2e": 1.0}, "an event that makes a person enter an audience, to the membership change on "
                          "AudienceService.WatchMemberships (to the first Get showing it where the server has no "
                          "watch stream); the Track acknowledgement is the 'ack' series"),
    "mixed": (None, "reads and writes in the ratios of --mix (or the inputs file's [mix]): get, batch-get, "
                    "track, noop"),
    "noop": ({"noop": 1.0}, "DiagnosticsService.Noop: the gRPC transport floor of this server stack"),
    "personalize-http": ({"get-http": 1.0}, "GET /v1/collections/{collection}/records/{key} of one seeded key "
                                            "(the HTTP API, same server)"),
    "ingest-http": ({"ingest-http": 1.0}, "POST /v1/batch of --batch events from the event mix (the Segment "
                                          "tracking API), answered once durable"),
}
HTTP_SCENARIOS = ("personalize-http", "ingest-http")
LAG_WARN_US = 1000.0
BEHIND_RATIO = 0.95


def _seconds(text: str) -> float:
    """``10``, ``10s``, ``500ms``, ``2m`` -> seconds."""
    t = text.strip().lower()
    for suffix, scale in (("ms", 1e-3), ("s", 1.0), ("m", 60.0)):
        if t.endswith(suffix):
            return float(t[: -len(suffix)]) * scale
    return float(t)


def build_parser(prog: str = "python -m bench") -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:12} {text}" for name, (_, text) in SCENARIOS.items())
    listing += "\n\nbenches of their own (python -m bench only): sync, evaluator, syncs"
    p = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=f"scenarios:\n{listing}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=list(SCENARIOS), metavar="SCENARIO", help=", ".join(SCENARIOS))
    g = p.add_argument_group("target")
    g.add_argument("--target", metavar="HOST:PORT", help="a running server (default: start one on the embedded demo)")
    g.add_argument("--people", type=int, help="people in the started demo server, and the keys used "
                                              "(default: the inputs file's keys.count, 100000)")
    g.add_argument("--workers", type=int, default=1, help="serving processes of the started server (default 1)")
    g.add_argument("--http-target", metavar="HOST:PORT",
                   help="the HTTP API of the --target server, for personalize-http and ingest-http")
    g.add_argument("--server-pid", type=int, action="append", default=[],
                   help="a local server process whose CPU to count (default: found through GetServerInfo)")
    g = p.add_argument_group("load")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=float, help="open loop: requests/s (default 1000; shorthand for constant:R)")
    mode.add_argument("--schedule", help="open loop: constant:R, step:R1,R2,... or ramp:R0:R1 requests/s")
    g.add_argument("--concurrency", "-c", type=int,
                   help="closed loop: C requests in flight, each sent when one returns; with --rate/--schedule, "
                        "paced to it, dropping the ticks missed while every slot is busy")
    g.add_argument("--duration", "-d", type=_seconds, default=10.0, help="measured seconds: 10, 10s, 500ms, 2m (default 10s)")
    g.add_argument("--warmup", type=_seconds, default=1.0, help="unrecorded seconds of the same load first (default 1s)")
    g.add_argument("--processes", "-p", type=int, default=1, help="load generator processes (default 1)")
    g.add_argument("--connections", type=int, default=1, help="connections per load process (default 1)")
    g.add_argument("--timeout", type=_seconds, default=5.0, help="deadline per request (default 5s)")
    g.add_argument("--floor", action="store_true", help="then run the same load with Noop: the transport floor beside it")
    g.add_argument("--nice", type=int, default=0, help="nice value of the load processes (and a started server)")
    g = p.add_argument_group("inputs")
    g.add_argument("--inputs", metavar="FILE", help="keys, event mix and read/write mix (default bench/storefront.toml)")
    g.add_argument("--keys", choices=("uniform", "zipf"), help="key distribution (default from the inputs file)")
    g.add_argument("--zipf-exponent", type=float, help="Zipf exponent s: rank r has weight 1/r^s (default 1.0)")
    g.add_argument("--seed", type=int, default=1, help="seed of every random choice (default 1)")
    g.add_argument("--batch", type=int, default=None, help="keys per BatchGet (default 10), events per ingest batch (default 100)")
    g.add_argument("--mix", help="mixed: NAME=RATIO,... of get, batch-get, track, noop")
    g.add_argument("--audiences", type=int, help="ingest: create this many audiences first, deleted after "
                                                 "(default 100 on a started server, 0 on a --target)")
    g.add_argument("--via", choices=("watch", "get"), help="e2e: see the change on the watch stream, or poll Get until "
                   "the membership shows (default: watch, or get where the server has no watch stream)")
    g.add_argument("--background-rate", type=float, default=0.0,
                   help="e2e: also stream this many events/s from the event mix, from one more process (default 0)")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print the result as JSON (histograms included) instead of text")
    g.add_argument("--report", metavar="FILE", help="write plots: FILE.html (summary and plots) or FILE.png")
    g.add_argument("--compare", metavar="OLD.json", help="show the change against an earlier --json run")
    g.add_argument("--threshold", type=float, default=10.0,
                   help="with --compare: a change worse than this many percent is a regression (default 10)")
    g.add_argument("--fail-on-regression", action="store_true", help="with --compare: exit 3 on a regression")
    g.add_argument("--workdir", help="where a started server keeps its data (default a new temp dir)")
    return p


class BenchError(RuntimeError):
    pass


# Target --------------------------------------------------------------------


def _is_local(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        return any(ip.startswith("127.") or ip == "::1"
                   for *_, sa in socket.getaddrinfo(host, None) for ip in [sa[0]])
    except OSError:
        return False


def _server_tree(worker_pids: list[int]) -> list[int]:
    """A local server's processes: the one that answered, or its supervisor and all its children."""
    roots = set()
    for pid in set(worker_pids):
        fields = _proc._stat_fields(pid)
        if fields is None:
            continue
        parent = int(fields[1])
        try:
            cmdline = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
        except OSError:
            cmdline = []
        roots.add(parent if b"serve" in cmdline and any(b"qualify" in c for c in cmdline) else pid)
    return sorted({p for r in roots for p in [r, *_proc.children(r)]})


# Phases --------------------------------------------------------------------


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


def _latency(hist) -> dict:
    if hist.get_total_count() == 0:
        return {}
    out = {f"p{q:g}".replace(".", "_"): hist.get_value_at_percentile(q) for q in report.PERCENTILES}
    out.update(min=hist.get_min_value(), max=hist.get_max_value(), mean=round(hist.get_mean_value(), 1))
    return out


def merge(name: str, role: str, spec: dict, parts: list[dict], wall: float) -> dict:
    """One phase's result from its load processes: histograms added, counts summed."""
    duration, interval = spec["duration"], spec["interval"]
    series: dict[str, dict] = {}
    for part in parts:
        for sname, s in part["series"].items():
            m = series.setdefault(sname, {"hist": new_histogram(), "codes": {}, "count": 0, "in_window": 0, "iv": {}})
            if s["hist"]:
                m["hist"].decode_and_add(s["hist"])
            m["count"] += s["count"]
            m["in_window"] += s["completed_in_window"]
            for code, n in s["codes"].items():
                m["codes"][code] = m["codes"].get(code, 0) + n
            for i, iv in s["intervals"].items():
                slot = m["iv"].setdefault(int(i), [new_histogram(2), 0, 0])
                if iv["hist"]:
                    slot[0].decode_and_add(iv["hist"])
                slot[1] += iv["count"]
                slot[2] += iv["errors"]
    lag = new_histogram()
    for part in parts:
        if part.get("lag"):
            lag.decode_and_add(part["lag"])
    items_per = {"batch-get": spec["batch"], "ingest": spec["batch"], "ingest-http": spec["batch"]}
    out_series = {}
    for sname, m in series.items():
        h = m["hist"]
        out_series[sname] = {
            "count": m["count"], "errors": sum(m["codes"].values()), "error_codes": m["codes"],
            "rps": round(m["in_window"] / duration, 1),
            "latency_us": _latency(h),
            "hist": encode(h),
            "timeline": [{"t": round(i * interval, 3), "count": c, "errors": e,
                          "p50_us": hh.get_value_at_percentile(50), "p99_us": hh.get_value_at_percentile(99),
                          "max_us": hh.get_max_value()}
                         for i, (hh, c, e) in sorted(m["iv"].items()) if c],
        }
    main_names = [s for s in out_series if s != "ack"]
    primary_name = main_names[0] if len(main_names) == 1 else "all"
    if primary_name == "all":
        total = new_histogram()
        for sname in main_names:
            total.add(series[sname]["hist"])
        out_series["all"] = {"count": sum(out_series[s]["count"] for s in main_names),
                             "errors": sum(out_series[s]["errors"] for s in main_names),
                             "error_codes": {}, "rps": round(sum(out_series[s]["rps"] for s in main_names), 1),
                             "latency_us": _latency(total),
                             "hist": encode(total), "timeline": []}
        for sname in main_names:
            for code, n in out_series[sname]["error_codes"].items():
                out_series["all"]["error_codes"][code] = out_series["all"]["error_codes"].get(code, 0) + n
    sched = Schedule.parse(spec["schedule"]) if spec["schedule"] else None
    scheduled = int(sum(len(sched.offsets(duration)[i::len(parts)]) for i in range(len(parts)))) if sched else None
    sent = sum(p["sent"] for p in parts)
    completed = sum(out_series[s]["count"] for s in main_names)
    in_window = sum(series[s]["in_window"] for s in main_names)
    items = sum(out_series[s]["count"] * items_per.get(s, 1) for s in main_names)
    result = {
        "name": name, "role": role, "primary": primary_name,
        "mode": ("closed" if spec.get("concurrency") else "open"),
        "schedule": spec["schedule"], "concurrency": spec.get("concurrency"),
        "duration_s": duration, "wall_s": round(wall, 3), "interval_s": interval,
        "target_rps": round(sched.total(duration) / duration, 1) if sched else None,
        "scheduled": scheduled, "sent": sent, "completed": completed,
        "dropped": sum(p["dropped"] for p in parts), "no_reply": sum(p["no_reply"] for p in parts),
        "sent_after_window": sum(p["sent_after_window"] for p in parts),
        "achieved_rps": round(in_window / duration, 1),
        "items": items, "items_per_request": items_per.get(primary_name, 1),
        "items_per_s": round(sum(series[s]["in_window"] * items_per.get(s, 1) for s in main_names) / duration, 1),
        "errors": sum(out_series[s]["errors"] for s in main_names),
        "rejected_events": sum(p.get("rejected_events", 0) for p in parts),
        "series": out_series,
        "generator_lag_us": _latency(lag),
        "client_rss_mb_max": max(p.get("client_rss_mb", 0) for p in parts),
    }
    warnings = []
    if sched and not spec.get("concurrency"):
        lag_p99 = result["generator_lag_us"].get("p99", 0)
        if lag_p99 > LAG_WARN_US or result["sent_after_window"] > 0.05 * max(1, scheduled):
            warnings.append(f"the load generator fell behind the schedule: send lag p99 {lag_p99 / 1000:.1f} ms, "
                            f"{result['sent_after_window']:,} requests sent after the run's end; the latencies "
                            f"still count from the intended send times, but add load processes (--processes) or "
                            f"lower the rate to load the server as scheduled")
    if sched and spec.get("concurrency") and result["dropped"]:
        warnings.append(f"closed loop: {result['dropped']:,} of {scheduled:,} scheduled requests were never sent "
                        f"because all {spec['concurrency']} slots were busy; its latencies count from the actual "
                        f"sends, so they leave out the waiting those requests would have seen (coordinated omission)")
    if result["errors"]:
        warnings.append(f"{result['errors']:,} requests failed: " +
                        ", ".join(f"{k} {v:,}" for k, v in sorted(out_series[primary_name]["error_codes"].items())))
    result["warnings"] = warnings
    return result


# Orchestration --------------------------------------------------------------


def _spec(args, inputs: _inputs.Inputs, mix: dict, duration: float, extra: dict | None = None) -> dict:
    if args.concurrency and not (args.rate or args.schedule):
        schedule = None
    else:
        schedule = args.schedule or f"constant:{args.rate or 1000:g}"
    interval = max(0.05, min(10.0, duration / 100))
    return {"inputs": inputs, "mix": mix, "schedule": schedule, "concurrency": args.concurrency,
            "duration": duration, "interval": interval, "seed": args.seed, "batch": args.batch,
            **(extra or {})}


def run(args, progress=None) -> dict:
    """Runs the bench described by parsed ``args``; ``progress(event, **kw)`` hears phase starts and ends."""
    inputs = _inputs.load_inputs(args.inputs)
    overrides = {}
    if args.people:
        overrides["key_count"] = args.people
    if args.keys:
        overrides["distribution"] = args.keys
    if args.zipf_exponent is not None:
        overrides["zipf_exponent"] = args.zipf_exponent
    mix = SCENARIOS[args.scenario][0] or (_inputs.parse_mix(args.mix) if args.mix else inputs.mix)
    mix = {k: v for k, v in mix.items() if v > 0}
    if args.batch is None:
        args.batch = 100 if args.scenario in ("ingest", "ingest-http") else 10
    if not 1 <= args.batch <= 1000:
        raise BenchError("--batch must be between 1 and 1000")
    from dataclasses import replace

    inputs = replace(inputs, **overrides)
    run_id = uuid.uuid4().hex[:8]
    started = datetime.datetime.now(datetime.timezone.utc)
    server = tmp = None
    created: list[str] = []
    runner = None
    phases = []
    target: dict = {}
    try:
        if args.target:
            address = args.target
            target = {"address": address, "started_by_bench": False}
        else:
            from ._server import Server

            if args.workdir:
                workdir = Path(args.workdir)
                workdir.mkdir(parents=True, exist_ok=True)
            else:
                tmp = tempfile.TemporaryDirectory(prefix="qualify-bench-")
                workdir = Path(tmp.name)
            server = Server(workdir, inputs.key_count, args.workers, nice=args.nice).start()
            address = server.address
            target = {"address": address, "started_by_bench": True, "people": inputs.key_count,
                      "workers": args.workers, "startup_s": round(server.startup_seconds, 2)}
        runner = Runner(args, inputs, address, [], progress)
        worker_pids = runner.start()
        if server is not None:
            pids = server.pids()
        elif args.server_pid:
            pids = sorted({p for r in args.server_pid for p in [r, *_proc.children(r)]})
        else:
            pids = _server_tree(worker_pids) if _is_local(address) else []
        runner.server_pids = pids
        target["server_pids"] = pids
        target["cpu_measured"] = bool(pids)
        extra: dict = {"id_prefix": run_id}
        background = None
        if args.scenario in HTTP_SCENARIOS:
            extra["http"] = server.http_address if server is not None else args.http_target
            if not extra["http"]:
                raise BenchError(f"{args.scenario} needs the server's HTTP API: --http-target HOST:PORT")
            target["http_address"] = extra["http"]
        if args.scenario in ("ingest", "ingest-http"):
            n = args.audiences if args.audiences is not None else (0 if args.target else 100)
            created = _audiences.create(address, n, f"bench_{run_id}_") if n else []
            target["audiences_created"] = len(created)
        if args.scenario == "e2e":
            args.warmup = 0.0  # each request needs a person not yet in the audience
            schedule = _spec(args, inputs, mix, args.duration)["schedule"]
            persons = int(Schedule.parse(schedule).total(args.duration)) + 1 if schedule else inputs.key_count - 4
            if persons + 4 > inputs.key_count and not inputs.key_file:
                raise BenchError(f"e2e needs one person per request: {persons:,} requests but {inputs.key_count:,} "
                                 f"keys (lower --rate or --duration, or raise --people)")
            extra["e2e"] = _audiences.setup_e2e(address, inputs, persons, run_id, args.via)
            created = [extra["e2e"]["audience_id"]]
            target["e2e_measures"] = {
                "watch": "event -> MembershipChange on WatchMemberships",
                "get": "event -> first Get showing the membership (--via get)",
                "get-fallback": "event -> first Get showing the membership (the server answered WatchMemberships "
                                "UNIMPLEMENTED)"}[extra["e2e"].pop("why", extra["e2e"]["mode"])]
            if args.background_rate > 0:
                background = _spec(args, inputs, {"ingest": 1.0}, args.duration, {"id_prefix": run_id + "bg"})
                background.update(schedule=f"constant:{args.background_rate / 100:g}", concurrency=None, batch=100)
        plan = [(args.scenario, "scenario", mix)] + ([("noop floor", "floor", {"noop": 1.0})] if args.floor else [])
        for name, role, phase_mix in plan:
            if args.warmup > 0:
                runner.phase("warmup", "warmup", _spec(args, inputs, phase_mix, args.warmup,
                                                       {**extra, "id_prefix": run_id + "w"}))
            phases.append(runner.phase(name, role, _spec(args, inputs, phase_mix, args.duration, extra),
                                       background if role == "scenario" else None))
    finally:
        if runner is not None:
            runner.stop()
        if created and server is None:  # a started server is thrown away, with its audiences
            try:
                _audiences.delete(address, created)
            except Exception:  # noqa: BLE001 - the server may be gone; the run's result still stands
                pass
        if server is not None:
            target["exit_code"] = server.stop()
            if target["exit_code"] != 0:
                target["log_tail"] = server.log_tail(40).splitlines()
        if tmp is not None:
            tmp.cleanup()
    machine = _proc.machine_note()
    # The note describes this project's development machine; a user's run says where the server ran.
    machine["note"] = ("the server ran on this machine" if target.get("started_by_bench") or _is_local(address)
                       else "the load generator's machine; the server ran elsewhere")
    return {
        "tool": "qualify bench", "format": 1, "scenario": args.scenario, "run_id": run_id,
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0]) if sys.argv else "bench", *sys.argv[1:]]),
        "description": SCENARIOS[args.scenario][1],
        "target": target,
        "config": {"schedule": phases[0]["schedule"] if phases else None, "concurrency": args.concurrency,
                   "duration_s": args.duration, "warmup_s": args.warmup, "processes": args.processes,
                   "connections": args.connections, "timeout_s": args.timeout, "seed": args.seed,
                   "keys": {"distribution": inputs.distribution, "zipf_exponent": inputs.zipf_exponent,
                            "count": inputs.key_count, "file": inputs.key_file},
                   "inputs": inputs.source, "mix": mix, "batch": args.batch,
                   "background_rate": args.background_rate or None},
        "machine": machine,
        "phases": phases,
    }


def main(argv: list[str] | None = None, prog: str = "python -m bench") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        if args.rate is not None and args.rate <= 0:
            raise BenchError("--rate must be positive")
        if args.schedule:
            Schedule.parse(args.schedule)
        if args.concurrency is not None and args.concurrency < 1:
            raise BenchError("--concurrency must be at least 1")
        if args.duration <= 0 or args.processes < 1 or args.connections < 1:
            raise BenchError("--duration, --processes and --connections must be positive")
        old = report.load_run(args.compare) if args.compare else None
        result = run(args)
    except (BenchError, ScheduleError, _inputs.InputsError, report.ReportError, RuntimeError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if old is not None:
        result["compare"] = report.compare(old, result, args.threshold)
    if args.report:
        try:
            report.write_report(result, args.report, old)
        except report.ReportError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(result, indent=1) if args.json else report.text(result))
    if old is not None and args.fail_on_regression and result["compare"]["regressions"]:
        return 3
    return 0
