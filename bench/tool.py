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
import sys
import tempfile
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import _audiences, _inputs, _proc, _target, report
from ._runner import Runner
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
    g.add_argument("--min-token", action="store_true",
                   help="e2e --via get: one Get with the Track's consistency token (min_token) instead of polling")
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


@dataclass
class _Started:
    """What a run has started so far: ``_clean_up`` stops it whatever step failed."""

    target: dict = field(default_factory=dict)
    address: str = ""
    server: Any = None  # a ._server.Server when the bench started the server
    tmp: tempfile.TemporaryDirectory | None = None
    runner: Runner | None = None
    created: list[str] = field(default_factory=list)  # audiences to delete from a --target afterwards


def run(args, progress=None) -> dict:
    """Runs the bench described by parsed ``args``; ``progress(event, **kw)`` hears phase starts and ends."""
    inputs, mix = _inputs_and_mix(args)
    run_id = uuid.uuid4().hex[:8]
    started = datetime.datetime.now(datetime.timezone.utc)
    s = _Started()
    try:
        _start_target(args, inputs, s)
        _start_load(args, inputs, s, progress)
        extra, background = _prepare_scenario(args, inputs, mix, run_id, s)
        phases = _run_phases(args, inputs, mix, s.runner, extra, background, run_id)
    finally:
        _clean_up(s)
    return _result(args, inputs, mix, run_id, started, s.target, s.address, phases)


def _inputs_and_mix(args) -> tuple[_inputs.Inputs, dict]:
    """The inputs file with the command line's overrides, and the scenario's mix; settles --batch."""
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
    return replace(inputs, **overrides), mix


def _start_target(args, inputs: _inputs.Inputs, s: _Started) -> None:
    """The --target as given, or a demo server started in --workdir (default a temporary folder)."""
    if args.target:
        s.address = args.target
        s.target = {"address": s.address, "started_by_bench": False}
        return
    from ._server import Server

    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        s.tmp = tempfile.TemporaryDirectory(prefix="qualify-bench-")
        workdir = Path(s.tmp.name)
    s.server = Server(workdir, inputs.key_count, args.workers, nice=args.nice).start()
    s.address = s.server.address
    s.target = {"address": s.address, "started_by_bench": True, "people": inputs.key_count,
                "workers": args.workers, "startup_s": round(s.server.startup_seconds, 2)}


def _start_load(args, inputs: _inputs.Inputs, s: _Started, progress) -> None:
    """Starts the load processes, then finds the server processes whose CPU to count."""
    s.runner = Runner(args, inputs, s.address, [], progress)
    worker_pids = s.runner.start()
    if s.server is not None:
        pids = s.server.pids()
    elif args.server_pid:
        pids = sorted({p for r in args.server_pid for p in [r, *_proc.children(r)]})
    else:
        pids = _target.server_tree(worker_pids) if _target.is_local(s.address) else []
    s.runner.server_pids = pids
    s.target["server_pids"] = pids
    s.target["cpu_measured"] = bool(pids)


def _prepare_scenario(args, inputs: _inputs.Inputs, mix: dict, run_id: str, s: _Started) -> tuple[dict, dict | None]:
    """The scenario's own setup on the server: the phase spec's extras, and the e2e background load's spec."""
    extra: dict = {"id_prefix": run_id}
    background = None
    if args.scenario in HTTP_SCENARIOS:
        extra["http"] = s.server.http_address if s.server is not None else args.http_target
        if not extra["http"]:
            raise BenchError(f"{args.scenario} needs the server's HTTP API: --http-target HOST:PORT")
        s.target["http_address"] = extra["http"]
    if args.scenario in ("ingest", "ingest-http"):
        n = args.audiences if args.audiences is not None else (0 if args.target else 100)
        s.created = _audiences.create(s.address, n, f"bench_{run_id}_") if n else []
        s.target["audiences_created"] = len(s.created)
    if args.scenario == "e2e":
        background = _prepare_e2e(args, inputs, mix, run_id, s, extra)
    return extra, background


def _prepare_e2e(args, inputs: _inputs.Inputs, mix: dict, run_id: str, s: _Started, extra: dict) -> dict | None:
    """Creates the e2e audience (into ``extra["e2e"]``); returns the background load's spec, if any."""
    args.warmup = 0.0  # each request needs a person not yet in the audience
    schedule = _spec(args, inputs, mix, args.duration)["schedule"]
    persons = int(Schedule.parse(schedule).total(args.duration)) + 1 if schedule else inputs.key_count - 4
    if persons + 4 > inputs.key_count and not inputs.key_file:
        raise BenchError(f"e2e needs one person per request: {persons:,} requests but {inputs.key_count:,} "
                         f"keys (lower --rate or --duration, or raise --people)")
    extra["e2e"] = _audiences.setup_e2e(s.address, inputs, persons, run_id, args.via, args.min_token)
    s.created = [extra["e2e"]["audience_id"]]
    s.target["e2e_measures"] = {
        "watch": "event -> MembershipChange on WatchMemberships",
        "get": "event -> first Get showing the membership (--via get)",
        "get-token": "event -> a Get with the Track's consistency token as min_token (--via get --min-token)",
        "get-fallback": "event -> first Get showing the membership (the server answered WatchMemberships "
                        "UNIMPLEMENTED)"}[extra["e2e"].pop("why", extra["e2e"]["mode"])]
    background = None
    if args.background_rate > 0:
        background = _spec(args, inputs, {"ingest": 1.0}, args.duration, {"id_prefix": run_id + "bg"})
        background.update(schedule=f"constant:{args.background_rate / 100:g}", concurrency=None, batch=100)
    return background


def _run_phases(args, inputs: _inputs.Inputs, mix: dict, runner: Runner, extra: dict, background: dict | None,
                run_id: str) -> list[dict]:
    """The scenario (and with --floor the Noop floor), each after its unrecorded warmup."""
    phases = []
    plan = [(args.scenario, "scenario", mix)] + ([("noop floor", "floor", {"noop": 1.0})] if args.floor else [])
    for name, role, phase_mix in plan:
        if args.warmup > 0:
            runner.phase("warmup", "warmup", _spec(args, inputs, phase_mix, args.warmup,
                                                   {**extra, "id_prefix": run_id + "w"}))
        phases.append(runner.phase(name, role, _spec(args, inputs, phase_mix, args.duration, extra),
                                   background if role == "scenario" else None))
    return phases


def _clean_up(s: _Started) -> None:
    """Stops what the run started, in reverse: load processes, audiences on a --target, the server, its folder."""
    if s.runner is not None:
        s.runner.stop()
    if s.created and s.server is None:  # a started server is thrown away, with its audiences
        try:
            _audiences.delete(s.address, s.created)
        except Exception:  # noqa: BLE001 - the server may be gone; the run's result still stands
            pass
    if s.server is not None:
        s.target["exit_code"] = s.server.stop()
        if s.target["exit_code"] != 0:
            s.target["log_tail"] = s.server.log_tail(40).splitlines()
    if s.tmp is not None:
        s.tmp.cleanup()


def _result(args, inputs: _inputs.Inputs, mix: dict, run_id: str, started: datetime.datetime, target: dict,
            address: str, phases: list[dict]) -> dict:
    """The run's JSON: what ran, against what, on which machine, and the phases' results."""
    machine = _proc.machine_note()
    # The note describes this project's development machine; a user's run says where the server ran.
    machine["note"] = ("the server ran on this machine" if target.get("started_by_bench") or _target.is_local(address)
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
