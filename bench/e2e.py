"""Event acknowledged -> membership visible in Get, under background ingest load.

    python -m bench e2e --json [--rate 5000] [--probes 500] [--duration 20]

Starts ``qualify serve`` on the embedded demo with one audience (a /pricing
page view within 10 minutes, on the free plan). A separate process streams
page views of other paths at ``--rate`` events/s. Meanwhile probes send one
/pricing view for a free-plan person who is not yet a member, with Track, and
then call Get until the membership shows: the time from the acknowledgement
(and from the send) to the first Get that shows it. A Noop round trip,
measured in the same loop, is the transport floor.
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

TARGETS = {"ack_to_visible_p50_ms_max": 2.0, "ack_to_visible_p99_ms_max": 10.0}
AUDIENCE = {"and": {"conditions": [
    {"event": {"event_model": "page_views", "scope": "SCOPE_WITHIN", "window": "600s",
               "filters": [{"property": "path", "operator": "OPERATOR_EQ", "value": {"string_value": "/pricing"}}],
               "comparison": "COMPARISON_GE", "threshold": 1}},
    {"attribute": {"attribute": "plan", "operator": "OPERATOR_EQ", "value": {"string_value": "free"}}}]}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--rate", type=float, default=5000, help="background events/s (default 5000)")
    p.add_argument("--probes", type=int, default=500, help="probes (default 500)")
    p.add_argument("--people", type=int, default=100_000, help="people in the demo warehouse (default 100000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", help="where the server runs (default a new temp dir)")
    return p


def _background(address: str, rate: float, people: int, seed: int, stop) -> None:
    """Streams page views (not /pricing) at ``rate`` events/s until told to stop."""
    import grpc

    from qualify.clients.emitter import new_message_id
    from qualify.v1 import event_pb2, ingest_pb2, ingest_pb2_grpc

    rng = random.Random(seed)
    per_batch = max(1, int(rate / 100))  # a batch every 10 ms

    def requests():
        n, t = 0, time.perf_counter()
        while not stop.is_set():
            n += 1
            req = ingest_pb2.StreamEventsRequest(batch_number=n)
            for _ in range(per_batch):
                e = req.events.add(message_id=new_message_id(), type=event_pb2.EVENT_TYPE_PAGE,
                                   user_id=f"user-{rng.randint(1, people)}")
                e.properties.update({"path": rng.choice(["/home", "/docs", "/blog"])})
                e.timestamp.GetCurrentTime()
            yield req
            t += 0.01
            time.sleep(max(0.0, t - time.perf_counter()))

    with grpc.insecure_channel(address) as channel:
        for _ in ingest_pb2_grpc.IngestServiceStub(channel).StreamEvents(requests()):
            pass


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(q * len(xs) + 0.5) - 1))]


def stats_ms(xs: list[float]) -> dict:
    return {"p50_ms": round(percentile(xs, 0.5) * 1e3, 3), "p90_ms": round(percentile(xs, 0.9) * 1e3, 3),
            "p99_ms": round(percentile(xs, 0.99) * 1e3, 3), "max_ms": round(max(xs) * 1e3, 3), "n": len(xs)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import duckdb
    import grpc
    from google.protobuf import json_format

    from qualify.clients.emitter import new_message_id
    from qualify.v1 import (audience_pb2, audience_pb2_grpc, diagnostics_pb2, diagnostics_pb2_grpc, event_pb2,
                            ingest_pb2, ingest_pb2_grpc, personalize_pb2, personalize_pb2_grpc)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="qualify-bench-e2e-"))
    out = {"scenario": "e2e", "date": datetime.date.today().isoformat(),
           "config": {k: v for k, v in vars(args).items() if k != "json"}, "machine": _proc.machine_note()}
    with Server(workdir, args.people) as server:
        out["server"] = server_note(server)
        warehouse = next((workdir / "data").glob("demo-warehouse-*.duckdb"))
        with duckdb.connect(str(warehouse), read_only=True) as con:
            free = [r[0] for r in con.execute("SELECT user_id FROM customers WHERE plan = 'free' ORDER BY random()").fetchall()]
        channel = grpc.insecure_channel(server.address)
        audience = audience_pb2.Audience(id="e2e_pricing")
        json_format.ParseDict(AUDIENCE, audience.condition)
        audience_pb2_grpc.AudienceServiceStub(channel).CreateAudience(audience_pb2.CreateAudienceRequest(audience=audience))
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)
        get = personalize_pb2_grpc.PersonalizeServiceStub(channel).Get
        noop = diagnostics_pb2_grpc.DiagnosticsServiceStub(channel).Noop
        ctx = multiprocessing.get_context("spawn")
        stop = ctx.Event()
        bg = ctx.Process(target=_background, args=(server.address, args.rate, args.people, args.seed, stop))
        bg.start()
        time.sleep(2.0)  # let the background load settle
        ack_to_visible, send_to_visible, noops, polls = [], [], [], []
        for person in free[: args.probes]:
            event = event_pb2.Event(message_id=new_message_id(), type=event_pb2.EVENT_TYPE_PAGE, user_id=person)
            event.properties.update({"path": "/pricing"})
            event.timestamp.GetCurrentTime()
            t_send = time.perf_counter()
            ingest.Track(ingest_pb2.TrackRequest(event=event), timeout=10)
            t_ack = time.perf_counter()
            n = 0
            while True:
                n += 1
                reply = get(personalize_pb2.GetRequest(collection="customers", key=person), timeout=10)
                if any(m.audience_id == "e2e_pricing" for m in reply.record.memberships):
                    break
                if time.perf_counter() - t_ack > 5:
                    raise RuntimeError(f"{person} not a member 5 s after the acknowledgement")
            t_vis = time.perf_counter()
            ack_to_visible.append(t_vis - t_ack)
            send_to_visible.append(t_vis - t_send)
            polls.append(n)
            t0 = time.perf_counter()
            noop(diagnostics_pb2.NoopRequest(), timeout=10)
            noops.append(time.perf_counter() - t0)
            time.sleep(0.02)
        stop.set()
        bg.join(30)
        channel.close()
    out["ack_to_visible"] = stats_ms(ack_to_visible)
    out["send_to_visible"] = stats_ms(send_to_visible)
    out["noop_round_trip"] = stats_ms(noops)
    out["gets_until_visible_max"] = max(polls)
    out["targets"] = {**TARGETS, "pass": {
        "p50": out["ack_to_visible"]["p50_ms"] <= TARGETS["ack_to_visible_p50_ms_max"],
        "p99": out["ack_to_visible"]["p99_ms"] <= TARGETS["ack_to_visible_p99_ms_max"]}}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        a = out["ack_to_visible"]
        print(f"ack -> visible in Get at {args.rate:,.0f} events/s: p50 {a['p50_ms']} ms, p99 {a['p99_ms']} ms "
              f"(Noop round trip p50 {out['noop_round_trip']['p50_ms']} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
