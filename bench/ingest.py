"""StreamEvents throughput, durably acknowledged, with audiences evaluated.

    python -m bench ingest --json [--audiences 100] [--batch 500] [--duration 10] [--streams 1]

Starts ``qualify serve`` on the embedded demo, creates N audiences on the
``page_views`` model (windowed counts with path filters, sessions, ever, each
ANDed with a warehouse attribute), then streams page views for random demo
people from a separate process over ``StreamEvents``, in numbered batches,
keeping a few batches in flight. Every event counts only once acknowledged
(committed to the LMDB event log, memberships evaluated in the same
transaction). The same run against a second server with no audiences is the
floor: logging alone on the same server stack. Server CPU comes from /proc.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import random
import sys
import tempfile
import time
from pathlib import Path

from . import _proc
from ._server import Server, server_note

TARGET_EVENTS_PER_CORE = 50_000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench ingest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--audiences", type=int, default=100, help="audiences on page_views (default 100)")
    p.add_argument("--batch", type=int, default=500, help="events per StreamEvents batch, 100-1000 (default 500)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per phase (default 10)")
    p.add_argument("--streams", type=int, default=1, help="concurrent streams, one process each (default 1)")
    p.add_argument("--in-flight", type=int, default=4, help="unacknowledged batches per stream (default 4)")
    p.add_argument("--people", type=int, default=100_000, help="people in the demo warehouse (default 100000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", help="where the server runs (default a new temp dir)")
    return p


def audience_definitions(n: int, aggregate_property: str | None = None) -> list[dict]:
    """n audiences over page_views and warehouse attributes: windowed counts with a path
    filter, session counts, ever counts, and (given a numeric property) windowed SUMs,
    each ANDed with a warehouse condition."""
    paths = ["/pricing", "/home", "/docs", "/blog", "/cart"]
    kinds = 4 if aggregate_property else 3
    out = []
    for i in range(n):
        event = {"event_model": "page_views", "comparison": "COMPARISON_GE", "threshold": 1 + i % 5}
        kind = i % kinds
        if kind == 3:
            event.update(scope="SCOPE_WITHIN", window="600s", aggregation="AGGREGATION_SUM",
                         property=aggregate_property, threshold=float(30 + i))
        elif kind == 0:
            event.update(scope="SCOPE_WITHIN", window=f"{60 * (1 + i % 30)}s",
                         filters=[{"property": "path", "operator": "OPERATOR_EQ",
                                   "value": {"string_value": paths[i % len(paths)]}}])
        elif kind == 1:
            event.update(scope="SCOPE_SESSION")
        else:
            event.update(scope="SCOPE_EVER", filters=[{"property": "path", "operator": "OPERATOR_STARTS_WITH",
                                                       "value": {"string_value": "/p"}}])
        attr = [{"attribute": {"attribute": "plan", "operator": "OPERATOR_EQ", "value": {"string_value": "free"}}},
                {"attribute": {"attribute": "ltv", "operator": "OPERATOR_GT", "value": {"float_value": float(40 * i)}}},
                {"attribute": {"attribute": "country", "operator": "OPERATOR_IN",
                               "values": [{"string_value": "US"}, {"string_value": "GB"}]}}][i % 3]
        out.append({"and": {"conditions": [{"event": event}, attr]}})
    return out


def create_audiences(address: str, definitions: list[dict], prefix: str) -> float:
    import grpc
    from google.protobuf import json_format

    from qualify.v1 import audience_pb2, audience_pb2_grpc

    t0 = time.perf_counter()
    with grpc.insecure_channel(address) as channel:
        stub = audience_pb2_grpc.AudienceServiceStub(channel)
        for i, definition in enumerate(definitions):
            a = audience_pb2.Audience(id=f"{prefix}{i}")
            json_format.ParseDict(definition, a.condition)
            stub.CreateAudience(audience_pb2.CreateAudienceRequest(audience=a), timeout=120)
    return time.perf_counter() - t0


def _stream(address: str, batch: int, duration: float, in_flight: int, people: int, seed: int, tag: str, out,
            ready, go) -> None:
    """One StreamEvents stream at full speed for ``duration``; reports acknowledged events."""
    import threading

    import grpc

    from qualify.clients.emitter import new_message_id
    from qualify.v1 import event_pb2, ingest_pb2, ingest_pb2_grpc

    rng = random.Random(seed)
    paths = ["/pricing", "/home", "/docs", "/blog", "/cart"]
    # Pre-built batches (unique message ids), so the generator spends its time sending.
    n_batches = int(duration * 80_000 / batch) + 8
    now = time.time()
    batches = []
    for b in range(n_batches):
        req = ingest_pb2.StreamEventsRequest(batch_number=b + 1)
        for _ in range(batch):
            e = req.events.add(message_id=new_message_id(), type=event_pb2.EVENT_TYPE_PAGE, name="Page",
                               user_id=f"user-{rng.randint(1, people)}")
            e.properties.update({"path": paths[rng.randrange(5)]})
            e.timestamp.FromSeconds(int(now))
        batches.append(req)
    window = threading.Semaphore(in_flight)
    stop_at = [0.0]
    sent = [0]

    def requests():
        stop_at[0] = time.perf_counter() + duration
        for req in batches:
            window.acquire()
            if time.perf_counter() >= stop_at[0]:
                return
            sent[0] += 1
            yield req

    acked = events = rejected = 0
    ready.put(True)
    go.wait()
    with grpc.insecure_channel(address) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        t0 = time.perf_counter()
        for ack in stub.StreamEvents(requests(), timeout=duration + 120):
            acked += 1
            events += ack.accepted + ack.duplicates
            rejected += len(ack.rejections)
            window.release()
        elapsed = time.perf_counter() - t0
    out.put({"tag": tag, "events": events, "rejected": rejected, "batches": acked, "seconds": elapsed,
             "exhausted": sent[0] >= len(batches)})


def phase(server: Server, args, tag: str) -> dict:
    ctx = multiprocessing.get_context("spawn")
    out, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_stream, args=(server.address, args.batch, args.duration, args.in_flight,
                                               args.people, args.seed + i, tag, out, ready, go))
             for i in range(args.streams)]
    for p in procs:
        p.start()
    for _ in procs:  # generators build their batches first; CPU counts from when the load starts
        ready.get(timeout=600)
    before = _proc.CpuSnapshot.take(server.pids())
    go.set()
    results = [out.get(timeout=args.duration + 600) for _ in procs]
    after = _proc.CpuSnapshot.take(server.pids())
    for p in procs:
        p.join(30)
    events = sum(r["events"] for r in results)
    seconds = max(r["seconds"] for r in results)
    cpu = after.server - before.server
    return {"events": events, "seconds": round(seconds, 2), "events_per_second": round(events / seconds),
            "server_cpu_seconds": round(cpu, 2), "server_cores_used": round(cpu / seconds, 2),
            "events_per_server_core_second": round(events / cpu) if cpu else None,
            "server_cpu_us_per_event": round(cpu / events * 1e6, 2) if events else None,
            "rejected": sum(r["rejected"] for r in results),
            "generator_exhausted": any(r["exhausted"] for r in results)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="qualify-bench-ingest-"))
    out = {"scenario": "ingest", "date": datetime.date.today().isoformat(),
           "config": {k: v for k, v in vars(args).items() if k != "json"}, "machine": _proc.machine_note()}
    for sub in ("audiences", "floor"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    # Two fresh servers on the same stack: audience changes replay the event
    # log, so the audiences are created while it is still empty.
    with Server(workdir / "audiences", args.people) as server:
        out["server"] = server_note(server)
        out["create_audiences_seconds"] = round(create_audiences(server.address, audience_definitions(args.audiences), "bench"), 2)
        out["with_audiences"] = phase(server, args, f"{args.audiences} audiences")
    with Server(workdir / "floor", args.people) as server:
        out["floor"] = phase(server, args, "no audiences")
    w, f = out["with_audiences"], out["floor"]
    out["ratio_events_per_second"] = round(w["events_per_second"] / f["events_per_second"], 3)
    out["target"] = {"events_per_server_core_second_min": TARGET_EVENTS_PER_CORE,
                     "pass": (w["events_per_server_core_second"] or 0) >= TARGET_EVENTS_PER_CORE}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"StreamEvents, batches of {args.batch}, {args.streams} stream(s):")
        print(f"  {args.audiences} audiences: {w['events_per_second']:,} events/s, "
              f"{w['events_per_server_core_second']:,} per server core-second ({w['server_cores_used']} cores)")
        print(f"  floor, no audiences: {f['events_per_second']:,} events/s, "
              f"{f['events_per_server_core_second']:,} per server core-second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
