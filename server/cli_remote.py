"""``qualify`` commands that ask a running server: audiences, syncs, dead letters, replay.

Each prints a table (or ``--json``) from the server's own RPCs, and a clean
one-line error (no stack trace) when the call fails.
"""

from __future__ import annotations

import json
import os
import sys


def connection(args) -> dict:
    """Client options from --api-key (or $QUALIFY_API_KEY) and the --tls-* files."""
    return {"api_key": args.api_key or os.environ.get("QUALIFY_API_KEY") or None,
            "root_certificates": args.tls_ca, "certificate_chain": args.tls_cert, "private_key": args.tls_key}


def connection_args(p) -> None:
    p.add_argument("--api-key", help="API key (default $QUALIFY_API_KEY)")
    p.add_argument("--tls-ca", help="TLS: the PEM CA certificate that signed the server's (implies TLS)")
    p.add_argument("--tls-cert", help="mutual TLS: this client's PEM certificate")
    p.add_argument("--tls-key", help="mutual TLS: this client's PEM private key")


def _rpc(args, service: str, method: str, request):
    """One call of ``service`` (SyncService, AudienceService); prints a clean error and returns None on failure."""
    import grpc

    from qualify.clients._call import call_metadata, channel_credentials, open_channel
    from qualify.clients._errors import error_from_rpc_error
    from qualify.v1 import audience_pb2_grpc, sync_pb2_grpc

    stub = {"SyncService": sync_pb2_grpc.SyncServiceStub, "AudienceService": audience_pb2_grpc.AudienceServiceStub}
    conn = connection(args)
    credentials = channel_credentials(None, False, conn["root_certificates"], conn["certificate_chain"],
                                      conn["private_key"])
    try:
        with open_channel(args.address, credentials) as channel:
            return getattr(stub[service](channel), method)(
                request, timeout=args.timeout, metadata=call_metadata(None, conn["api_key"]))
    except grpc.RpcError as exc:
        print(f"qualify {args.command}: {error_from_rpc_error(exc)}", file=sys.stderr)
        return None


def _sync_call(args, method: str, request):
    return _rpc(args, "SyncService", method, request)


def _table(rows: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell; the last one is not."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


def cmd_audiences(args) -> int:
    from google.protobuf import json_format

    from qualify.v1 import audience_pb2

    audiences, token = [], ""
    while True:
        reply = _rpc(args, "AudienceService", "ListAudiences",
                     audience_pb2.ListAudiencesRequest(page_size=100, page_token=token))
        if reply is None:
            return 1
        audiences += reply.audiences
        token = reply.next_page_token
        if not token:
            break
    if args.json:
        print(json.dumps([json_format.MessageToDict(a, preserving_proto_field_name=True) for a in audiences],
                         indent=2))
        return 0
    rows = [("AUDIENCE", "STATE", "MEMBERS", "NAME")]
    for a in audiences:
        state = "live" if a.state == audience_pb2.Audience.LIVE else f"backfilling {a.backfill_progress:.0%}"
        rows.append((a.id, state, f"{a.member_count:,}", a.display_name))
    _table(rows)
    return 0


def _age(duration) -> str:
    ms = duration.ToMilliseconds()
    return f"{ms}ms" if ms < 10_000 else f"{ms / 1000:.0f}s"


def cmd_syncs(args) -> int:
    from google.protobuf import json_format

    from qualify.v1 import sync_pb2

    syncs, token = [], ""
    while True:
        reply = _sync_call(args, "ListSyncs", sync_pb2.ListSyncsRequest(page_size=1000, page_token=token))
        if reply is None:
            return 1
        syncs += reply.syncs
        token = reply.next_page_token
        if not token:
            break
    if args.json:
        print(json.dumps([json_format.MessageToDict(s, preserving_proto_field_name=True) for s in syncs], indent=2))
        return 0
    rows = [("SYNC", "DESTINATION", "AUDIENCES", "DELIVERED", "LAG", "RETRIES", "DEAD", "LAST ERROR")]
    for s in syncs:
        dest = s.webhook.url if s.WhichOneof("destination") == "webhook" else f"{s.nats.url} {s.nats.subject}"
        st = s.status
        error = ""
        if st.last_error:
            error = f"{st.last_error_time.ToDatetime():%Y-%m-%d %H:%M:%S}Z {st.last_error}"
        lag = _age(st.lag) + (" (holds the changelog)" if st.holds_changelog else "")
        rows.append((s.id, dest, ",".join(s.audience_ids), f"{st.delivered:,}", lag, f"{st.retries:,}",
                     f"{st.dead_lettered:,}", error))
    _table(rows)
    return 0


def cmd_dead_letters(args) -> int:
    from qualify.v1 import sync_pb2

    token, count = "", 0
    while True:
        reply = _sync_call(args, "ListDeadLetters", sync_pb2.ListDeadLettersRequest(id=args.sync, page_size=1000,
                                                                                      page_token=token))
        if reply is None:
            return 1
        for dl in reply.dead_letters:
            c = dl.change
            direction = "enter" if c.direction == 1 else "exit"
            print(f"{c.sequence}\t{c.audience_id}\t{c.person_key}\t{direction}\t"
                  f"{dl.dead_letter_time.ToDatetime():%Y-%m-%d %H:%M:%S}Z\t{dl.attempts} attempts\t{dl.error}")
            count += 1
        token = reply.next_page_token
        if not token:
            break
    print(f"{count} dead letter(s) in sync {args.sync}", file=sys.stderr)
    return 0


def cmd_replay(args) -> int:
    from qualify.v1 import sync_pb2

    reply = _sync_call(args, "ReplayDeadLetters", sync_pb2.ReplayDeadLettersRequest(id=args.sync))
    if reply is None:
        return 1
    print(f"{reply.replayed} dead letter(s) of sync {args.sync} queued for delivery again")
    return 0


def add_remote_parsers(sub) -> None:
    """The ``audiences`` and ``syncs`` subcommands."""
    def address_args(p):
        p.add_argument("--address", default="127.0.0.1:50051", help="server address (default 127.0.0.1:50051)")
        p.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds (default 10)")
        connection_args(p)

    p = sub.add_parser("syncs", help="realtime syncs: status table, dead letters, replay")
    address_args(p)
    p.add_argument("--json", action="store_true", help="print the syncs as JSON")
    p.set_defaults(func=cmd_syncs)
    actions = p.add_subparsers(dest="action")
    a = actions.add_parser("dead-letters", help="list a sync's dead-lettered changes (tab-separated)")
    a.add_argument("sync")
    address_args(a)
    a.set_defaults(func=cmd_dead_letters)
    a = actions.add_parser("replay", help="send a sync's dead-lettered changes again")
    a.add_argument("sync")
    address_args(a)
    a.set_defaults(func=cmd_replay)

    p = sub.add_parser("audiences", help="realtime audiences: state (backfilling or live) and member counts")
    address_args(p)
    p.add_argument("--json", action="store_true", help="print the audiences as JSON")
    p.set_defaults(func=cmd_audiences)
    from .cli_simulate import add_parser as add_simulate_parser

    add_simulate_parser(p.add_subparsers(dest="action"), address_args)
