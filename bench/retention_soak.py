"""Retention soak: ingest past event_retention; the event log levels off; a stalled sync holds the changelog back.

    python -m bench retention-soak --json [--duration 270] [--event-retention 120] [--changelog-retention 60]
                                          [--stall 120] [--rate 500] [--people 20000] [--sample-every 5]

Serves a project file over the demo warehouse with ``[realtime]
event_retention`` and ``changelog_retention`` set to the given seconds, and
three audiences over page views (within 10 s, 3+ within 60 s, ever; no
window longer than the retention). A load
process streams page views of ``--persons`` people at ``--rate`` events/s
(a batch every 10 ms) for ``--duration`` seconds. A webhook sync on the
10-second audience posts to a local receiver that answers 503 for the first
``--stall`` seconds and 204 after: while it refuses, the sync's cursor holds
the changelog back past its retention; once it has caught up, compaction
trims the changelog to its retention again.

Every ``--sample-every`` seconds the bench reads, read-only from LMDB, the
event log's database (entries, pages) and the changelog's (entries, pages,
age of the oldest change), the data file's size, the sync's status
(GetSync: lag, holds_changelog) and the server's anonymous RSS. The JSON
says whether the event log's pages and entries stay within ±15% (``--band``)
of their mean over the second half of the run, whether the changelog was
held back while the receiver refused, and whether it was compacted back to
its retention after the sync caught up.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import _proc
from ._project import demo_project_file
from ._server import Server, server_note
from ._steady import stream_paced

SECRET = "bench-soak-secret-0123456789"


def _page(window: str, threshold: int, scope: str = "SCOPE_WITHIN") -> dict:
    body = {"event_model": "page_views", "scope": scope, "comparison": "COMPARISON_GE", "threshold": threshold}
    if scope == "SCOPE_WITHIN":
        body["window"] = window
    return {"event": body}


def audiences(event_retention: float) -> dict[str, dict]:
    """Within 10 s (the synced one: each event of someone quiet for 10 s enters, a lapse exits), 3+ within 60 s, ever."""
    return {"soak_recent": _page(f"{min(10.0, event_retention):g}s", 1),
            "soak_engaged": _page(f"{min(60.0, event_retention):g}s", 3),
            "soak_ever": _page("", 1, "SCOPE_EVER")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench retention-soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--duration", type=float, default=270, help="seconds of ingest (default 270)")
    p.add_argument("--event-retention", type=float, default=120, help="[realtime] event_retention, s (default 120)")
    p.add_argument("--changelog-retention", type=float, default=60,
                   help="[realtime] changelog_retention, s (default 60)")
    p.add_argument("--stall", type=float, default=120, help="seconds the webhook receiver refuses (default 120)")
    p.add_argument("--rate", type=float, default=500, help="events/s (default 500)")
    p.add_argument("--people", type=int, default=20_000, help="demo warehouse people (default 20000)")
    p.add_argument("--persons", type=int, default=20_000, help="distinct people sending events (default 20000)")
    p.add_argument("--sample-every", type=float, default=5, help="seconds between samples (default 5)")
    p.add_argument("--band", type=float, default=0.15, help="the second half must stay within mean ± this (0.15)")
    p.add_argument("--workdir", help="where the server runs (default a new temp dir)")
    return p


def _load(address: str, rate: float, persons: int, stop) -> None:
    """Page views of random people at ``rate`` events/s, a batch every 10 ms, over one StreamEvents."""
    rng = random.Random(7)

    def fill(e, n: int, i: int) -> None:
        e.name, e.user_id = "/p", f"user-{rng.randrange(persons)}"
        e.properties.update({"path": "/pricing"})

    stream_paced(address, rate, 0.01, stop, fill)


class Receiver:
    """A webhook receiver on its own thread: 503 until ``accept_at`` (monotonic), 204 after; counts both."""

    def __init__(self, accept_at: float):
        from aiohttp import web

        self.accept_at = accept_at
        self.refused = self.accepted_requests = self.accepted_changes = 0
        self.loop = asyncio.new_event_loop()
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/hook", self._hook)
        self.runner = web.AppRunner(app, access_log=None)
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.url = f"http://127.0.0.1:{self.port}/hook"

    async def _start(self) -> int:
        from aiohttp import web

        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    async def _hook(self, request):
        from aiohttp import web

        body = await request.read()
        if time.monotonic() < self.accept_at:
            self.refused += 1
            return web.Response(status=503, text="stalled on purpose")
        self.accepted_requests += 1
        self.accepted_changes += len(json.loads(body)["changes"])
        return web.Response(status=204)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


class Sampler:
    """Read-only looks at the server's LMDB: the event log, the changelog, the file."""

    def __init__(self, lmdb_dir: Path):
        import lmdb

        from qualify.server.storage.lmdb_store import open_env

        self.lmdb, self.path = lmdb, lmdb_dir
        self.env = open_env(lmdb_dir, 0, readonly=True)
        self.events = self.env.open_db(b"events", create=False)
        self.changelog = self.env.open_db(b"changelog", create=False)

    def sample(self) -> dict:
        from qualify.server.storage.realtime import read_changelog

        try:
            with self.env.begin() as txn:
                ev, ch = txn.stat(self.events), txn.stat(self.changelog)
                oldest = read_changelog(txn, self.changelog, 0, 1)
        except self.lmdb.MapResizedError:  # the server grew the map: adopt its size
            self.env.set_mapsize(0)
            return self.sample()
        pages = lambda s: s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]  # noqa: E731
        now_us = time.time_ns() // 1000
        return {"events_entries": ev["entries"], "events_pages": pages(ev), "events_bytes": pages(ev) * ev["psize"],
                "changelog_entries": ch["entries"], "changelog_pages": pages(ch),
                "oldest_change_age_s": round((now_us - oldest[0].effective_us) / 1e6, 1) if oldest else None,
                "data_file_bytes": (self.path / "data.mdb").stat().st_size}

    def close(self) -> None:
        self.env.close()


def _sync_status(syncs, sync_pb2) -> dict:
    s = syncs.GetSync(sync_pb2.GetSyncRequest(id="soak_hook"), timeout=10).sync.status
    return {"sync_lag_s": round(s.lag.seconds + s.lag.nanos / 1e9, 1), "holds_changelog": s.holds_changelog,
            "delivered": s.delivered, "dead_lettered": s.dead_lettered, "retries": s.retries}


def _setup(address: str, url: str, event_retention: float):
    import grpc
    from google.protobuf import json_format

    from qualify.v1 import audience_pb2, audience_pb2_grpc, sync_pb2, sync_pb2_grpc

    channel = grpc.insecure_channel(address)
    aud = audience_pb2_grpc.AudienceServiceStub(channel)
    for aid, definition in audiences(event_retention).items():
        a = audience_pb2.Audience(id=aid)
        json_format.ParseDict(definition, a.condition)
        aud.CreateAudience(audience_pb2.CreateAudienceRequest(audience=a), timeout=120)
    syncs = sync_pb2_grpc.SyncServiceStub(channel)
    syncs.CreateSync(sync_pb2.CreateSyncRequest(sync=sync_pb2.Sync(
        id="soak_hook", audience_ids=["soak_recent"],
        webhook=sync_pb2.WebhookDestination(url=url, secret=SECRET, max_batch_size=1000, max_attempts=1000))),
        timeout=10)
    return channel, syncs, sync_pb2


def _band(values: list[float], band: float) -> dict:
    mean = sum(values) / len(values)
    dev = max(abs(v - mean) for v in values) / mean if mean else 0.0
    return {"mean": round(mean), "min": min(values), "max": max(values),
            "max_deviation_pct": round(dev * 100, 1), "levels_off": dev <= band}


def summarize(samples: list[dict], args) -> dict:
    """The verdicts: the event log levels off over the second half; the changelog held back, then compacted."""
    half = [s for s in samples if s["t_s"] >= args.duration / 2]
    stalled = [s for s in samples if s["t_s"] < args.stall]
    after = [s for s in samples if s["t_s"] >= args.stall]
    caught_up = next((s["t_s"] for s in after if not s["holds_changelog"] and s["sync_lag_s"] < 5), None)
    settled = [s for s in after if caught_up is not None and s["t_s"] >= caught_up + 2 * args.sample_every]
    limit = args.changelog_retention + 2 * args.sample_every  # compaction runs every second
    out = {
        "event_log": {"ingest_longer_than_retention": args.duration > args.event_retention,
                      "second_half_samples": len(half),
                      "pages": _band([s["events_pages"] for s in half], args.band) if half else None,
                      "entries": _band([s["events_entries"] for s in half], args.band) if half else None},
        "changelog": {
            "held_back_while_stalled": any(s["holds_changelog"] for s in stalled),
            "oldest_change_age_s_max_while_stalled": max((s["oldest_change_age_s"] or 0 for s in stalled), default=None),
            "entries_max": max(s["changelog_entries"] for s in samples),
            "sync_caught_up_at_s": caught_up,
            "oldest_change_age_s_after_catch_up_max": max((s["oldest_change_age_s"] or 0 for s in settled),
                                                          default=None),
            "entries_at_end": samples[-1]["changelog_entries"],
        },
    }
    ch = out["changelog"]
    ch["compacted_after_catch_up"] = bool(settled) and ch["oldest_change_age_s_after_catch_up_max"] <= limit
    ev = out["event_log"]
    out["pass"] = {"event_log_levels_off": bool(half) and ev["pages"]["levels_off"] and ev["entries"]["levels_off"]
                   and ev["ingest_longer_than_retention"],
                   "changelog_held_back_while_stalled": ch["held_back_while_stalled"]
                   and (ch["oldest_change_age_s_max_while_stalled"] or 0) > args.changelog_retention,
                   "changelog_compacted_after_catch_up": ch["compacted_after_catch_up"],
                   "nothing_dead_lettered": samples[-1]["dead_lettered"] == 0}
    return out


def run(args) -> dict:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="qualify-bench-soak-"))
    project = demo_project_file(workdir, args.people, {
        "realtime": {"event_retention": f"{args.event_retention:g}s",
                     "changelog_retention": f"{args.changelog_retention:g}s"},
        "delivery": {"retry_initial": "100ms", "retry_max": "1s"}})
    out = {"scenario": "retention-soak", "date": datetime.date.today().isoformat(),
           "config": {k: v for k, v in vars(args).items() if k not in ("json", "workdir")},
           "machine": _proc.machine_note()}
    receiver = Receiver(accept_at=float("inf"))
    with Server(workdir, args.people, project=project) as server:
        out["server"] = server_note(server)
        channel, syncs, sync_pb2 = _setup(server.address, receiver.url, args.event_retention)
        sampler = Sampler(workdir / "data" / "lmdb")
        ctx = multiprocessing.get_context("spawn")
        stop = ctx.Event()
        load = ctx.Process(target=_load, args=(server.address, args.rate, args.persons, stop))
        t0 = time.monotonic()
        receiver.accept_at = t0 + args.stall
        load.start()
        samples = []
        try:
            while (t := time.monotonic() - t0) < args.duration:
                row = {"t_s": round(t, 1), **sampler.sample(), **_sync_status(syncs, sync_pb2),
                       "rss_anon_mib": round(_proc.rss_split_kib(server.pid)[0] / 1024, 1),
                       "receiver_refused": receiver.refused, "receiver_accepted_changes": receiver.accepted_changes}
                samples.append(row)
                if not args.json:
                    print(json.dumps(row), file=sys.stderr)
                if not load.is_alive():
                    raise RuntimeError(f"the load process ended early (exit {load.exitcode})")
                time.sleep(max(0.0, args.sample_every - (time.monotonic() - t0 - t)))
        finally:
            stop.set()
            load.join(30)
            sampler.close()
            channel.close()
            receiver.close()
    out["samples"] = samples
    out.update(summarize(samples, args))
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = run(args)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(json.dumps({k: out[k] for k in ("event_log", "changelog", "pass")}, indent=2))
    return 0 if all(out["pass"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
