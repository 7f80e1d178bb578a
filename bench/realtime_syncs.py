"""Change -> delivery latency: the watch stream and a local webhook, at a steady change rate.

    python -m bench realtime-syncs --json [--rate 1000] [--duration 20]

Starts ``qualify serve`` on the embedded demo with one audience that every
page view enters (so each event of a new anonymous person is one ENTER
change). A load process streams page views at ``--rate`` events/s, in
batches every 5 ms as an edge gateway would. Two consumer processes, a
WatchMemberships stream and a local HTTP receiver that a webhook sync (batch
up to 100, no added delay) posts to, record for every change the time
from its effective time (the writing transaction's clock, before the fsync)
to its arrival. The receiver's process also times Noop round trips during the run: the
transport floor under the same load. All clocks are this machine's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import sys
import tempfile
import time
import uuid
from pathlib import Path

from . import _proc
from ._server import Server, server_note
from ._stats import stats_ms
from ._steady import stream_paced

TARGETS = {"watch_p99_ms_max": 10.0, "webhook_p99_ms_max": 25.0}
AUDIENCE = {"event": {"event_model": "page_views", "scope": "SCOPE_EVER", "comparison": "COMPARISON_GE", "threshold": 1}}
SECRET = "bench-secret-0123456789"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench realtime-syncs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--rate", type=float, default=1000, help="changes/s (default 1000)")
    p.add_argument("--duration", type=float, default=20, help="measured seconds (default 20)")
    p.add_argument("--warmup", type=float, default=3, help="seconds before measuring (default 3)")
    p.add_argument("--people", type=int, default=100_000, help="people in the demo warehouse (default 100000)")
    p.add_argument("--workdir", help="where the server runs (default a new temp dir)")
    return p


def _load(address: str, rate: float, stop) -> None:
    """Page views by new anonymous people at ``rate`` events/s, a batch every 5 ms."""
    tag = uuid.uuid4().hex[:8]

    def fill(e, n: int, i: int) -> None:
        e.anonymous_id = f"{tag}-{n}-{i}"
        e.properties.update({"path": "/"})

    stream_paced(address, rate, 0.005, stop, fill)


def _consume(role: str, address: str, port: int, ready, start_at: float, end_at: float, results) -> None:
    """One consumer per process, so neither delays the other's arrivals.

    ``watch``: a WatchMemberships stream. ``webhook``: the HTTP receiver the
    sync posts to, plus Noop round trips every 10 ms. Puts {series: [seconds]}.
    """
    import asyncio

    import grpc
    from aiohttp import web

    from qualify.v1 import audience_pb2, audience_pb2_grpc, diagnostics_pb2, diagnostics_pb2_grpc

    lat: dict[str, list[float]] = {role: []} if role == "watch" else {"webhook": [], "noop": []}

    def effective_us(ts: str) -> int:
        return int(datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1e6)

    async def hook(request):
        now = time.time_ns() // 1000
        body = await request.json()
        if start_at <= time.time() <= end_at:
            lat["webhook"] += [(now - effective_us(c["effective_time"])) / 1e6 for c in body["changes"]]
        return web.Response(status=204)

    async def watch(channel):
        call = audience_pb2_grpc.AudienceServiceStub(channel).WatchMemberships(audience_pb2.WatchMembershipsRequest())
        ready.set()
        async for message in call:
            now = time.time_ns() // 1000
            if start_at <= time.time() <= end_at:
                lat["watch"] += [(now - (c.effective_time.seconds * 1_000_000 + c.effective_time.nanos // 1000)) / 1e6
                                 for c in message.changes]
            elif time.time() > end_at:
                return

    async def noops(channel):
        noop = diagnostics_pb2_grpc.DiagnosticsServiceStub(channel).Noop
        while time.time() < end_at:
            t0 = time.perf_counter()
            await noop(diagnostics_pb2.NoopRequest(), timeout=10)
            if time.time() >= start_at:
                lat["noop"].append(time.perf_counter() - t0)
            await asyncio.sleep(0.01)

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            if role == "watch":
                await asyncio.wait_for(watch(channel), timeout=end_at - time.time() + 30)
                return
            app = web.Application()
            app.router.add_post("/hook", hook)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            ready.set()
            await noops(channel)
            await asyncio.sleep(0.5)  # the last deliveries of the window
            await runner.cleanup()

    asyncio.run(main())
    results.put(lat)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import socket

    import grpc
    from google.protobuf import json_format

    from qualify.v1 import audience_pb2, audience_pb2_grpc, sync_pb2, sync_pb2_grpc

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="qualify-bench-syncs-"))
    out = {"scenario": "realtime-syncs", "date": datetime.date.today().isoformat(),
           "config": {k: v for k, v in vars(args).items() if k != "json"}, "machine": _proc.machine_note()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Server(workdir, args.people) as server:
        out["server"] = server_note(server)
        channel = grpc.insecure_channel(server.address)
        audience = audience_pb2.Audience(id="bench_viewers")
        json_format.ParseDict(AUDIENCE, audience.condition)
        audience_pb2_grpc.AudienceServiceStub(channel).CreateAudience(audience_pb2.CreateAudienceRequest(audience=audience))
        syncs = sync_pb2_grpc.SyncServiceStub(channel)
        syncs.CreateSync(sync_pb2.CreateSyncRequest(sync=sync_pb2.Sync(
            id="bench_hook", audience_ids=["bench_viewers"],
            webhook=sync_pb2.WebhookDestination(url=f"http://127.0.0.1:{port}/hook", secret=SECRET))))
        ctx = multiprocessing.get_context("spawn")
        stop, results = ctx.Event(), ctx.Queue()
        start_at = time.time() + args.warmup + 3.0
        end_at = start_at + args.duration
        consumers = []
        for role in ("watch", "webhook"):
            ready = ctx.Event()
            consumers.append(ctx.Process(target=_consume, args=(role, server.address, port, ready, start_at, end_at, results)))
            consumers[-1].start()
            if not ready.wait(30):
                raise RuntimeError(f"the {role} consumer did not start")
        cpu0 = _proc.CpuSnapshot.take(server.pids())
        load = ctx.Process(target=_load, args=(server.address, args.rate, stop))
        load.start()
        lat = {}
        for _ in consumers:
            lat.update(results.get(timeout=args.warmup + args.duration + 120))
        stop.set()
        load.join(30)
        for c in consumers:
            c.join(30)
        cpu1 = _proc.CpuSnapshot.take(server.pids())
        status = syncs.GetSync(sync_pb2.GetSyncRequest(id="bench_hook")).sync.status
        channel.close()
    out["watch"] = stats_ms(lat["watch"])
    out["webhook"] = stats_ms(lat["webhook"])
    out["noop_round_trip"] = stats_ms(lat["noop"])
    out["achieved_changes_per_s"] = round(len(lat["watch"]) / args.duration, 1)
    out["server_cpu_cores"] = round((cpu1.server - cpu0.server) / max(1e-9, cpu1.wall - cpu0.wall), 3)
    out["webhook_sync_status"] = {"delivered": status.delivered, "retries": status.retries,
                                  "dead_lettered": status.dead_lettered, "last_error": status.last_error}
    out["targets"] = {**TARGETS, "pass": {"watch_p99": out["watch"]["p99_ms"] <= TARGETS["watch_p99_ms_max"],
                                          "webhook_p99": out["webhook"]["p99_ms"] <= TARGETS["webhook_p99_ms_max"]}}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        w, h, n = out["watch"], out["webhook"], out["noop_round_trip"]
        print(f"change -> delivery at {args.rate:,.0f} changes/s: watch p50 {w['p50_ms']} / p99 {w['p99_ms']} ms; "
              f"webhook p50 {h['p50_ms']} / p99 {h['p99_ms']} ms (Noop round trip p50 {n['p50_ms']} / p99 {n['p99_ms']} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
