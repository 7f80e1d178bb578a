"""Costs against the length of history: restart, audience changes, ingest CPU, memory, disk.

    python -m bench history --json [--sizes 100000,1000000,5000000] [--people 100000] [--audiences 20]

One server on the embedded demo; 20 audiences with windows from 10 s to a
day plus an "ever" audience; events logged in batches over StreamEvents with
timestamps spread over the last day, up to each size in turn. At each size:

* ingest: events/s and the server's CPU per event while logging the step;
* restart: SIGTERM, then ``qualify serve`` on the same folder until health
  says SERVING, and the server's own "realtime state loaded in" time;
* CreateAudience return time, then its backfill's time and events/s (until
  GetAudience says LIVE), RSS once it is done, and DeleteAudience's return
  time. The probe reuses a window the other audiences have, so the walk
  evaluates everyone's stored state; a second probe (``graft_*``) has a
  window nobody has, so the walk replays each person's retained events too;
* the acknowledgement p50/p99/max of a steady 1,000 events/s stream
  (``--steady``) in the same run: quiet, during the backfill, and during a
  PreviewAudience of a draft;
* the server's anonymous RSS, and LMDB bytes per event and per person;
  RSS before the probes per person with realtime state, from a baseline
  taken once the audiences exist and before any event, and its slope
  between sizes (``--state-cache`` bounds the people kept in memory; with
  the probes, whose restart resets memory, only at the first size: use
  ``--rss-only`` to measure it at every size).

Costs that grow with the work stay flat across sizes; costs that grow with
history show it here first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path

from . import _proc
from ._project import demo_project_file
from ._server import Server
from ._steady import Steady

S = 1_000_000
WINDOWS = ["10s", "30s", "60s", "300s", "600s", "1800s", "3600s", "7200s", "21600s", "86400s"]
# A window none of the audiences has: its backfill replays everyone's retained events.
GRAFT_PROBE = {"event": {"event_model": "page_views", "scope": "SCOPE_WITHIN", "window": "43200s",
                         "comparison": "COMPARISON_GE", "threshold": 2}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench history", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--sizes", default="100000,300000,1000000", help="events logged at each measurement")
    p.add_argument("--people", type=int, default=100_000, help="demo warehouse people (default 100000)")
    p.add_argument("--persons", type=int, default=100_000, help="distinct people sending events")
    p.add_argument("--audiences", type=int, default=20)
    p.add_argument("--steady", type=int, default=1000, help="events/s of the steady stream beside audience changes")
    p.add_argument("--state-cache", type=int, default=None,
                   help="[realtime] state_cache: people whose state stays in memory (default: the demo's 100000)")
    p.add_argument("--rss-only", action="store_true",
                   help="skip CreateAudience, DeleteAudience and the restart: ingest and memory only")
    p.add_argument("--workdir", default=None, help="keep the server's folder here (default: a temporary one)")
    return p


def _audience(i: int) -> dict:
    if i == 0:
        body = {"event_model": "page_views", "scope": "SCOPE_EVER", "comparison": "COMPARISON_GE", "threshold": 3}
    else:
        body = {"event_model": "page_views", "scope": "SCOPE_WITHIN", "window": WINDOWS[i % len(WINDOWS)],
                "comparison": "COMPARISON_GE", "threshold": 1 + i % 3}
    return {"event": body}


def _stubs(address: str):
    import grpc

    from qualify.v1 import audience_pb2_grpc, ingest_pb2_grpc

    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])
    return channel, audience_pb2_grpc.AudienceServiceStub(channel), ingest_pb2_grpc.IngestServiceStub(channel)


def _create(aud, aid: str, definition: dict) -> float:
    from google.protobuf import json_format

    from qualify.v1 import audience_pb2

    a = audience_pb2.Audience(id=aid)
    json_format.ParseDict(definition, a.condition)
    t0 = time.perf_counter()
    aud.CreateAudience(audience_pb2.CreateAudienceRequest(audience=a), timeout=600)
    return time.perf_counter() - t0


def _wait_live(aud, aid: str, timeout: float = 1800.0) -> float:
    """Seconds until the audience's backfill ends (state LIVE)."""
    from qualify.v1 import audience_pb2

    t0 = time.perf_counter()
    while aud.GetAudience(audience_pb2.GetAudienceRequest(id=aid), timeout=30).audience.state != \
            audience_pb2.Audience.LIVE:
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"audience {aid!r} still backfilling after {timeout:g}s")
        time.sleep(0.05)
    return time.perf_counter() - t0


def _ingest(ingest, n: int, persons: int, start: int, now_s: float) -> None:
    from qualify.v1 import event_pb2, ingest_pb2

    def batches():
        for b, first in enumerate(range(start, start + n, 500)):
            events = []
            for i in range(first, min(first + 500, start + n)):
                e = event_pb2.Event(message_id=uuid.uuid4().hex, type=event_pb2.EVENT_TYPE_PAGE, name="/p",
                                    user_id=f"user-{i * 7919 % persons}")
                e.timestamp.FromMicroseconds(int((now_s - (start + n - i) * 86400 / (start + n)) * S))
                e.properties.update({"path": "/pricing" if i % 3 else "/home"})
                events.append(e)
            yield ingest_pb2.StreamEventsRequest(batch_number=b + 1, events=events)

    for reply in ingest.StreamEvents(batches(), timeout=3600):
        if reply.rejections:
            raise RuntimeError(f"events rejected: {reply.rejections[0]}")


def _loaded_seconds(server: Server) -> float | None:
    found = re.findall(r"realtime state loaded in ([0-9.]+)s", server.log_path.read_text(errors="replace"))
    return float(found[-1]) if found else None


def _with_state(events: int, persons: int) -> int:
    """People with realtime state after ``events`` events: event i goes to person i * 7919 % persons."""
    return min(events, persons) if math.gcd(7919, persons) == 1 else len({i * 7919 % persons for i in range(events)})


def _memory(anon_kib: int, baseline_kib: int, people: int, before: dict | None) -> dict:
    """Anonymous RSS per person with realtime state: above the baseline, and the slope since the last size."""
    out = {"rss_anon_kib_before_probes": anon_kib, "people_with_state": people,
           "rss_anon_bytes_per_person": round((anon_kib - baseline_kib) * 1024 / people, 1)}
    if before is not None and people > before["people_with_state"]:
        grew = (anon_kib - before["rss_anon_kib_before_probes"]) * 1024
        out["rss_anon_bytes_per_added_person"] = round(grew / (people - before["people_with_state"]), 1)
    return out


def _audience_change(aud, address: str, pid: int, rate: int, persons: int, logged: int) -> dict:
    """CreateAudience, its backfill and a preview, each beside a steady ingest stream; then DeleteAudience."""
    import grpc
    from google.protobuf import json_format

    from qualify.v1 import audience_pb2

    out = {}
    with Steady(address, rate, persons) as steady:
        time.sleep(3.0)
        out["ack_quiet"] = steady.window()
        out["create_audience_s"] = round(_create(aud, "probe", _audience(3)), 4)
        backfill_s = _wait_live(aud, "probe")
        out["ack_during_backfill"] = steady.window()
        out["backfill_s"] = round(backfill_s, 2)
        out["backfill_events_per_s"] = round(logged / backfill_s)
        out["rss_anon_mib_after_backfill"] = round(_proc.rss_split_kib(pid)[0] / 1024, 1)
        draft = audience_pb2.PreviewAudienceRequest()
        json_format.ParseDict(_audience(5), draft.condition)
        t0 = time.perf_counter()
        try:
            aud.PreviewAudience(draft, timeout=600)
            out["preview_s"] = round(time.perf_counter() - t0, 2)
        except grpc.RpcError as exc:  # past [realtime] preview_timeout: say so, measure the rest
            out["preview_s"] = f"{exc.code().name} after {time.perf_counter() - t0:.1f}s"
        out["ack_during_preview"] = steady.window()
        out["graft_create_audience_s"] = round(_create(aud, "probe_graft", GRAFT_PROBE), 4)
        graft_s = _wait_live(aud, "probe_graft")
        out["ack_during_graft_backfill"] = steady.window()
        out["graft_backfill_s"] = round(graft_s, 2)
        out["graft_backfill_events_per_s"] = round(logged / graft_s)
        aud.DeleteAudience(audience_pb2.DeleteAudienceRequest(id="probe_graft"), timeout=600)
        t1 = time.perf_counter()
        aud.DeleteAudience(audience_pb2.DeleteAudienceRequest(id="probe"), timeout=600)
        out["delete_audience_s"] = round(time.perf_counter() - t1, 4)
        out["steady_errors"] = steady.errors
    return out


def _probes(server: Server, channel, aud, rate: int, persons: int, logged: int) -> tuple[dict, tuple]:
    """An audience change beside a steady stream (_audience_change), RSS, then a restart; the new stubs."""

    change = _audience_change(aud, server.address, server.pid, rate, persons, logged)
    anon_kib, _ = _proc.rss_split_kib(server.pid)
    channel.close()
    server.stop()
    t2 = time.perf_counter()
    server.start()
    restart_s = time.perf_counter() - t2
    return ({**change, "restart_to_serving_s": round(restart_s, 2), "state_loaded_s": _loaded_seconds(server),
             "rss_anon_mib": round(anon_kib / 1024, 1)}, _stubs(server.address))


def measure(args) -> dict:
    sizes = sorted(int(x) for x in args.sizes.split(","))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qualify-bench-history-"))
    work.mkdir(parents=True, exist_ok=True)
    project = None if args.state_cache is None else demo_project_file(
        work, args.people, {"realtime": {"state_cache": args.state_cache}})
    server = Server(work, args.people, log_level="INFO", project=project).start()
    rows, logged = [], 0
    try:
        channel, aud, ingest = _stubs(server.address)
        for i in range(args.audiences):
            _create(aud, f"h{i}", _audience(i))
        for i in range(args.audiences):
            _wait_live(aud, f"h{i}")
        time.sleep(1.0)
        baseline_kib, _ = _proc.rss_split_kib(server.pid)
        for size in sizes:
            cpu0, t0 = _proc.cpu_seconds(server.pid), time.perf_counter()
            _ingest(ingest, size - logged, args.persons, logged, time.time())
            seconds, cpu = time.perf_counter() - t0, _proc.cpu_seconds(server.pid) - cpu0
            step, logged = size - logged, size
            time.sleep(1.0)  # the last batch's transaction and evictions settle
            anon_kib = _proc.rss_split_kib(server.pid)[0]
            row = {"events": size, "ingest_events_per_s": round(step / seconds),
                   "server_cpu_us_per_event": round(cpu / step * S, 1), "rss_anon_kib_before_probes": anon_kib}
            if args.rss_only or not rows:  # (after a restart the baseline no longer applies)
                row.update(_memory(anon_kib, baseline_kib, _with_state(size, args.persons), rows[-1] if rows else None))
            if not args.rss_only:
                probes, (channel, aud, ingest) = _probes(server, channel, aud, args.steady, args.persons, logged)
                row.update(probes)
            mdb = (work / "data" / "lmdb" / "data.mdb").stat().st_size
            row["lmdb_file_bytes_per_event"] = round(mdb / size, 1)
            rows.append(row)
        channel.close()
    finally:
        server.stop()
    return {"scenario": "history", "date": datetime.date.today().isoformat(), "people": args.people,
            "persons": args.persons, "audiences": args.audiences, "state_cache": args.state_cache,
            "rss_baseline_anon_kib": baseline_kib, "machine": _proc.machine_note(), "sizes": rows}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = measure(args)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for r in out["sizes"]:
            print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
