"""SimulateAudience over a long log: replay speed, and what it costs a steady ingest stream.

    python -m bench simulate --json [--events 1000000] [--people 100000] [--persons 100000] [--steady 1000]

One server on the embedded demo. ``--events`` events are logged over
StreamEvents (page views, product views, cart adds and orders over 20 skus,
timestamps spread over the last day, received now). Then, beside a steady
``--steady`` events/s TrackBatch stream (bench/_steady.py), the bench
measures the stream's acknowledgement latencies, ``--rounds`` times, for a
quiet stretch and then during one SimulateAudience of the checkout
abandoners (a cart add, then no order of the same sku within 30 minutes)
over the whole log in hourly buckets. The quiet windows' latencies are
pooled, and the busy ones' (alternating them keeps the machine's drift out
of the ratio). It reports the replay's events per second (events replayed /
wall time of the call) and the CPU it took in the server and in the
server's simulation process (started by the first simulation, so the first
run's wall time includes its start).

Targets (issue 15): at least 200,000 events/s, and the stream's ack p99
during the simulation within 2x its quiet p99.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

from . import _proc
from ._server import Server
from ._stats import percentile
from ._steady import Steady

S = 1_000_000
TARGETS = {"events_per_s_min": 200_000, "ack_p99_ratio_max": 2.0}
ABANDONERS = {"absence": {"after": {"event_model": "cart_adds"}, "absent": {"event_model": "orders"},
                          "within": "1800s", "same": ["sku"], "scope": "SCOPE_WITHIN", "window": "86400s"}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench simulate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--events", type=int, default=1_000_000, help="events logged before the simulation")
    p.add_argument("--people", type=int, default=100_000, help="demo warehouse people (default 100000)")
    p.add_argument("--persons", type=int, default=100_000, help="distinct people sending events")
    p.add_argument("--steady", type=int, default=1000, help="events/s of the steady stream (default 1000)")
    p.add_argument("--quiet", type=float, default=5.0, help="seconds of the stream alone before each simulation (default 5)")
    p.add_argument("--rounds", type=int, default=3,
                   help="(quiet stretch, simulation) rounds; the windows' latencies are pooled (default 3)")
    p.add_argument("--workdir", default=None, help="keep the server's folder here (default: a temporary one)")
    p.add_argument("--logged", action="store_true",
                   help="--workdir already holds the events (of an earlier run, within a day): log none")
    return p


def _event(i: int, persons: int, ts_us: int):
    from qualify.v1 import event_pb2

    # kind and person from independent bits of i: the same person adds to cart and orders
    kind = (i * 2654435761 >> 11) % 10
    user = f"user-{i * 7919 % persons}"
    if kind < 5:
        e = event_pb2.Event(message_id=uuid.uuid4().hex, type=event_pb2.EVENT_TYPE_PAGE, name="/p", user_id=user)
        e.properties.update({"path": "/pricing" if i % 3 else "/home"})
    else:
        name, props = {5: ("Product Viewed", {}), 6: ("Product Viewed", {}), 7: ("Product Added", {}),
                       8: ("Product Added", {}), 9: ("Order Completed", {"total": 10.0})}[kind]
        e = event_pb2.Event(message_id=uuid.uuid4().hex, type=event_pb2.EVENT_TYPE_TRACK, name=name, user_id=user)
        e.properties.update({"sku": f"sku-{(i * 40503 >> 5) % 20:02d}", **props, **({"price": 10.0} if kind < 9 else {})})
    e.timestamp.FromMicroseconds(ts_us)
    return e


def _ingest(ingest, n: int, persons: int, now_s: float) -> None:
    from qualify.v1 import ingest_pb2

    def batches():
        for b, first in enumerate(range(0, n, 500)):
            events = [_event(i, persons, int((now_s - (n - i) * 86400 / n) * S)) for i in range(first, min(first + 500, n))]
            yield ingest_pb2.StreamEventsRequest(batch_number=b + 1, events=events)

    for reply in ingest.StreamEvents(batches(), timeout=7200):
        if reply.rejections:
            raise RuntimeError(f"events rejected: {reply.rejections[0]}")


def _cpu_tree(pid: int) -> tuple[float, dict[int, float]]:
    """CPU seconds of the server process, and of each of its descendants (the simulation process)."""
    return _proc.cpu_seconds(pid), {c: _proc.cpu_seconds(c) for c in _proc.children(pid)}


def _simulate(aud, req, server) -> dict:
    """One SimulateAudience: its wall time, the CPU of the server and of its simulation process, the reply."""
    cpu0, kids0 = _cpu_tree(server.pid)
    t0 = time.perf_counter()
    reply = aud.SimulateAudience(req, timeout=3600)
    seconds = time.perf_counter() - t0
    cpu1, kids1 = _cpu_tree(server.pid)
    replay_cpu = sum(c - kids0.get(pid, 0.0) for pid, c in kids1.items())
    return {"seconds": round(seconds, 2), "events_replayed": reply.events_replayed,
            "events_per_s": round(reply.events_replayed / seconds), "server_cpu_s": round(cpu1 - cpu0, 2),
            "replay_process_cpu_s": round(replay_cpu, 2),
            "events_per_cpu_s": round(reply.events_replayed / max(1e-9, cpu1 - cpu0 + replay_cpu)),
            "buckets": len(reply.buckets), "members_at_start": reply.members_at_start,
            "enters": sum(b.enters for b in reply.buckets), "exits": sum(b.exits for b in reply.buckets)}


def _rounds(server, aud, req, args) -> tuple[list[dict], list[float], list[float], int]:
    """``--rounds`` of (quiet stretch, simulation) beside one steady stream; the two windows' latencies, pooled."""
    quiet, during, runs = [], [], []
    with Steady(server.address, args.steady, args.persons) as steady:
        for _ in range(args.rounds):
            cpu0 = _proc.cpu_seconds(server.pid)
            time.sleep(args.quiet)
            quiet += steady.take()
            quiet_cpu = (_proc.cpu_seconds(server.pid) - cpu0) / args.quiet
            runs.append(_simulate(aud, req, server))
            runs[-1]["server_cpu_per_s_quiet"] = round(quiet_cpu, 3)
            runs[-1]["server_cpu_per_s_during"] = round(runs[-1]["server_cpu_s"] / runs[-1]["seconds"], 3)
            xs = steady.take()
            runs[-1]["ack_during"] = _stats(xs)
            during += xs
        errors = steady.errors
    return runs, quiet, during, errors


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {"calls": 0}
    ms = [x * 1000 for x in xs]
    return {"calls": len(ms), "p50_ms": round(percentile(ms, 0.5), 2), "p99_ms": round(percentile(ms, 0.99), 2),
            "max_ms": round(max(ms), 2)}


def measure(args) -> dict:
    import grpc
    from google.protobuf import json_format

    from qualify.v1 import audience_pb2, audience_pb2_grpc, ingest_pb2_grpc

    work = Path(args.workdir or tempfile.mkdtemp(prefix="qualify-bench-simulate-"))
    work.mkdir(parents=True, exist_ok=True)
    server = Server(work, args.people, log_level="INFO").start()
    try:
        channel = grpc.insecure_channel(server.address)
        aud, ingest = audience_pb2_grpc.AudienceServiceStub(channel), ingest_pb2_grpc.IngestServiceStub(channel)
        t0 = time.perf_counter()
        if not args.logged:
            _ingest(ingest, args.events, args.persons, time.time())
        ingest_s = time.perf_counter() - t0
        req = audience_pb2.SimulateAudienceRequest(sample_size=10)
        json_format.ParseDict(ABANDONERS, req.condition)
        req.last.FromMicroseconds(2 * 86400 * S)
        req.bucket.FromMicroseconds(3600 * S)
        runs, quiet, during, errors = _rounds(server, aud, req, args)
        channel.close()
    finally:
        server.stop()
    rate = sum(r["events_replayed"] for r in runs) / sum(r["seconds"] for r in runs)
    q, d = _stats(quiet), _stats(during)
    ratio = d["p99_ms"] / q["p99_ms"] if q.get("p99_ms") and d.get("p99_ms") else None
    return {"scenario": "simulate", "date": datetime.date.today().isoformat(), "machine": _proc.machine_note(),
            "config": {"events": args.events, "people": args.people, "persons": args.persons, "steady": args.steady,
                       "rounds": args.rounds, "quiet_s": args.quiet},
            "ingest_events_per_s": None if args.logged else round(args.events / ingest_s),
            "simulations": runs, "events_per_s": round(rate),
            "ack_quiet": q, "ack_during_simulation": d, "steady_errors": errors,
            "targets": {**TARGETS, "pass": {"events_per_s": rate >= TARGETS["events_per_s_min"],
                                            "ack_p99": ratio is not None and ratio <= TARGETS["ack_p99_ratio_max"]},
                        "ack_p99_ratio": round(ratio, 2) if ratio is not None else None}}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = measure(args)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for s in out["simulations"]:
            print(f"simulated {s['events_replayed']:,} events in {s['seconds']} s: {s['events_per_s']:,} events/s")
        print(f"{out['events_per_s']:,} events/s over {len(out['simulations'])} simulations; steady ack p99 "
              f"{out['ack_quiet'].get('p99_ms')} ms quiet, {out['ack_during_simulation'].get('p99_ms')} ms during "
              f"({out['targets']['ack_p99_ratio']}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
