"""``qualify audiences simulate FILE.json``: a draft's what-if timeline, as a table or a chart.

FILE.json holds a condition in its JSON form (or an object with one under
"condition", as a project file's audience has it; ``-`` reads stdin). With
``--id`` the saved audience is simulated instead. The server replays its
retained event log over the span (SimulateAudience).
"""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime, timezone

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration_us(text: str) -> int:
    """'7d', '12h', '90m', '30s', '1w' (or a number of seconds) -> microseconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a duration such as 7d, 12h or 90m")
    return int(float(m.group(1)) * _UNITS[m.group(2) or "s"] * 1_000_000)


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def add_parser(actions, address_args) -> None:
    a = actions.add_parser("simulate", help="how a draft (or saved) audience would have moved over the retained history")
    a.add_argument("file", nargs="?", help="the definition: a condition in JSON, or {\"condition\": ...}; - for stdin")
    a.add_argument("--id", help="simulate this saved audience instead of a file")
    a.add_argument("--last", default="7d", help="the span, up to now (default 7d; 12h, 90m, 1w...)")
    a.add_argument("--bucket", default=None, help="bucket width (default: 1h, or 1d for spans over 3 days)")
    a.add_argument("--sample", type=int, default=10, help="people to list with their enters and exits (default 10)")
    a.add_argument("--plot", help="also draw the timeline to this PNG file (matplotlib)")
    a.add_argument("--json", action="store_true", help="print the response as JSON")
    address_args(a)
    a.set_defaults(func=cmd_simulate, timeout=180.0)  # a replay of the whole retained log may take a while


def _request(args):
    from google.protobuf import json_format

    from qualify.v1 import audience_pb2

    last = duration_us(args.last)
    bucket = duration_us(args.bucket) if args.bucket else (86_400_000_000 if last > 3 * 86_400_000_000 else 3_600_000_000)
    req = audience_pb2.SimulateAudienceRequest(sample_size=args.sample)
    req.last.FromMicroseconds(last)
    req.bucket.FromMicroseconds(bucket)
    if args.id:
        req.id = args.id
    else:
        raw = json.load(sys.stdin if args.file == "-" else open(args.file))
        json_format.ParseDict(raw.get("condition", raw) if "condition" in raw else raw, req.condition)
    return req


def cmd_simulate(args) -> int:
    from google.protobuf import json_format

    from .cli_remote import _rpc, _table

    if not args.id and not args.file:
        print("qualify audiences simulate: give a FILE.json or --id AUDIENCE", file=sys.stderr)
        return 2
    try:
        req = _request(args)
    except (OSError, ValueError, json_format.ParseError) as exc:
        print(f"qualify audiences simulate: {exc}", file=sys.stderr)
        return 2
    reply = _rpc(args, "AudienceService", "SimulateAudience", req)
    if reply is None:
        return 1
    if args.json:
        print(json.dumps(json_format.MessageToDict(reply, preserving_proto_field_name=True), indent=2))
    else:
        _print(reply, _table)
    if args.plot:
        plot(reply, args.plot)
    return 0


def _print(reply, table) -> None:
    start, end = reply.start_time.ToMicroseconds(), reply.end_time.ToMicroseconds()
    print(f"{_iso(start)} to {_iso(end)}: {reply.members_at_start} members at the start, "
          f"{reply.events_replayed} events replayed"
          + (f" (the log's retained history starts {_iso(reply.replayed_from.ToMicroseconds())})"
             if reply.HasField("replayed_from") else ""))
    rows = [("BUCKET", "MEMBERS", "ENTERS", "EXITS")]
    rows += [(_iso(b.start_time.ToMicroseconds()), str(b.members), str(b.enters), str(b.exits)) for b in reply.buckets]
    table(rows)
    for p in reply.sample:
        changes = ", ".join(f"{'enter' if c.direction == 1 else 'exit'} {_iso(c.effective_time.ToMicroseconds())}"
                            for c in p.changes)
        print(f"  {p.person_key}: {changes}")


def plot(reply, path: str) -> None:
    """Members at each bucket's end as a line, enters and exits as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def at(us: int) -> datetime:
        return datetime.fromtimestamp(us / 1e6, tz=timezone.utc)

    times = [at(b.start_time.ToMicroseconds()) for b in reply.buckets]
    ends = times[1:] + [at(reply.end_time.ToMicroseconds())]
    width = ends[0] - times[0]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 5), height_ratios=(2, 1))
    top.plot([times[0]] + ends, [reply.members_at_start] + [b.members for b in reply.buckets], marker=".",
             label="members")
    top.set_ylabel("members")
    top.legend(loc="upper left")
    kw = {"width": width * 0.8, "align": "edge"}
    bottom.bar(times, [b.enters for b in reply.buckets], label="enters", color="tab:green", **kw)
    bottom.bar(times, [-b.exits for b in reply.buckets], label="exits", color="tab:red", **kw)
    bottom.set_ylabel("per bucket")
    bottom.legend(loc="upper left")
    fig.suptitle("what-if timeline (SimulateAudience)")
    fig.autofmt_xdate()
    fig.savefig(path, dpi=100)
    plt.close(fig)
