"""The ``qualify`` command: serve, sync, check, get, audiences, syncs, demo, bench, keys, cluster."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from .cli_remote import add_remote_parsers, connection, connection_args
from .config import Project, ProjectError, load_project

log = logging.getLogger("qualify")


def _project(args) -> Project:
    """The --project file, ./qualify.toml if present, or the embedded demo."""
    path = args.project
    if path is None and Path("qualify.toml").is_file():
        path = "qualify.toml"
    if path is not None:
        project = load_project(path)
        log.info("project %s", Path(path).resolve())
    else:
        from .demo import demo_project

        log.info("no project file: running the embedded demo (%d people)", args.demo_people)
        project = demo_project(Path(args.data_dir), people=args.demo_people,
                               window=getattr(args, "demo_window", None) or 10.0)
    auth = getattr(args, "auth", None)
    metrics_port = getattr(args, "metrics_port", None)
    http_port = getattr(args, "http_port", None)
    if auth is not None or metrics_port is not None or http_port is not None:
        from dataclasses import replace

        ops = project.ops
        if auth is not None:
            ops = replace(ops, auth=auth == "on")
        if metrics_port is not None:
            ops = replace(ops, metrics=replace(ops.metrics, port=metrics_port))
        if http_port is not None:  # -1: off
            ops = replace(ops, http=replace(ops.http, port=None if http_port < 0 else http_port))
        project = replace(project, ops=ops)
    overrides = {}
    if getattr(args, "port", None) is not None:
        overrides["port"] = args.port
    if getattr(args, "host", None) is not None:
        overrides["host"] = args.host
    if overrides:
        from dataclasses import replace

        project = replace(project, server=replace(project.server, **overrides))
    return project


class TerminalProgress:
    """Rows synced per table, on one rewritten line when stderr is a terminal."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.started: dict[str, float] = {}
        self.last = 0.0

    def __call__(self, table: str, rows: int) -> None:
        now = time.perf_counter()
        start = self.started.setdefault(table, now)
        if now - self.last < 0.2 or now - start < 0.05:
            return
        self.last = now
        rate = rows / max(now - start, 1e-9)
        line = f"syncing {table}: {rows:,} rows ({rate:,.0f} rows/s)"
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + line)
            sys.stderr.flush()
        else:
            log.info("%s", line)

    def done(self) -> None:
        if self.tty and self.started:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()


def cmd_serve(args) -> int:
    from .serve import serve

    project = _project(args)
    progress = TerminalProgress()
    code = serve(project, workers=args.workers, ready_file=args.ready_file, progress=progress)
    # Everything is committed and closed by now. Skip interpreter finalization:
    # tearing down grpc.aio's poller there is known to crash (grpc/grpc#40447),
    # and a crash at exit would turn a clean shutdown into exit code -11.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_sync(args) -> int:
    from .storage.lmdb_store import data_path, open_env
    from .storage.warehouse_sync import SyncError, Syncer

    project = _project(args)
    env = open_env(data_path(project.data_dir), project.map_size, readonly=False)
    progress = TerminalProgress()
    try:
        report = Syncer(env, project).run(progress)
    except SyncError as exc:
        progress.done()
        print(f"qualify sync: {exc}", file=sys.stderr)
        return 1
    finally:
        env.close()
    progress.done()
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(f"sync {report.generation} landed in {report.seconds:.2f}s: {report.people:,} people")
        for t in report.tables:
            print(f"  {t.table}: {t.rows:,} rows, {t.added:,} added, {t.changed:,} changed, "
                  f"{t.removed:,} removed, {t.unchanged:,} unchanged"
                  + (f", {t.duplicate_keys:,} duplicate keys" if t.duplicate_keys else "")
                  + (f", {t.null_keys:,} null keys skipped" if t.null_keys else ""))
    return 0


def cmd_check(args) -> int:
    from .checks import check

    return check(args.project)


def cmd_get(args) -> int:
    from qualify.clients import Client, QualifyError

    fields = [f for f in args.fields.split(",") if f] if args.fields else None
    try:
        with Client(args.address, timeout=args.timeout, **connection(args)) as client:
            record = client.get(args.key, collection=args.collection, fields=fields)
    except QualifyError as exc:
        print(f"qualify get: {exc}", file=sys.stderr)
        return 2 if exc.code.name == "NOT_FOUND" else 1
    print(json.dumps(record.to_json_dict(), indent=2, ensure_ascii=False, sort_keys=True))
    return 0


def cmd_demo(args) -> int:
    from qualify.clients import QualifyError

    try:
        if args.scenario == "abandoners":
            from qualify.clients.walkthrough_abandoners import run as run_abandoners

            run_abandoners(args.address, args.within, **connection(args))
        else:
            from qualify.clients.walkthrough import run

            run(args.address, args.window, **connection(args))
    except QualifyError as exc:
        print(f"qualify demo: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args) -> int:
    from qualify.bench.tool import main

    return main(args.bench_args, prog="qualify bench")  # qualify.bench parses its own options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qualify", description="Qualify: real-time audiences and a Personalization API over gRPC.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    parser.add_argument("--log-format", default="auto", choices=("auto", "json", "text"),
                        help="JSON lines, or text (default: text on a terminal, else JSON)")
    sub = parser.add_subparsers(dest="command", required=True)

    def project_args(p):
        p.add_argument("--project", help="the project file (default ./qualify.toml, else the embedded demo)")
        p.add_argument("--data-dir", default="qualify-data", help="where the embedded demo keeps its data (default ./qualify-data)")
        p.add_argument("--demo-people", type=int, default=100_000, help="people in the generated demo warehouse")

    p = sub.add_parser("serve", help="run the gRPC server (syncs the warehouse first)")
    project_args(p)
    p.add_argument("--host", help="address to listen on (default from the project, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default from the project, 50051; 0 picks a free one)")
    p.add_argument("--workers", type=int, help="serving processes sharing the port (default 1)")
    p.add_argument("--ready-file", help="write {address, port, pid} as JSON here once serving")
    p.add_argument("--auth", choices=("on", "off"),
                   help="require API keys (default: on with a project file, off for the embedded demo)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (default [metrics] port; 0 off)")
    p.add_argument("--http-port", type=int,
                   help="serve the HTTP API on this port (default [http] port, 8080 on the demo; 0 any free port; -1 off)")
    p.add_argument("--demo-window", type=float,
                   help="the embedded demo's /demo page: seconds its audience's window lasts (default 10)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("sync", help="run one warehouse sync now")
    project_args(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("check", help="validate a project file, its queries and the audiences stored in its data folder")
    p.add_argument("--project", help="the project file (default ./qualify.toml)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("get", help="print one record and its memberships as JSON")
    p.add_argument("key")
    p.add_argument("--collection", default="customers", help="collection (default customers)")
    p.add_argument("--address", default="127.0.0.1:50051", help="server address (default 127.0.0.1:50051)")
    p.add_argument("--fields", help="comma-separated fields to return (default all)")
    p.add_argument("--timeout", type=float, default=2.0, help="deadline in seconds (default 2)")
    connection_args(p)
    p.set_defaults(func=cmd_get)

    add_remote_parsers(sub)

    p = sub.add_parser("demo", help="walk through a realtime audience against a server on the embedded demo")
    p.add_argument("--address", default="127.0.0.1:50051", help="server address (default 127.0.0.1:50051)")
    p.add_argument("--window", type=int, default=10, help="the audience's window in seconds (default 10)")
    p.add_argument("--scenario", choices=("pricing", "abandoners"), default="pricing",
                   help="pricing: 3 views of /pricing in a window (default); abandoners: a cart add, then no order")
    p.add_argument("--within", type=int, default=5,
                   help="abandoners: seconds an order must stay away (default 5)")
    connection_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="load-test a server: qualify bench SCENARIO --target HOST:PORT (--help for more)",
                       add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    from .security.keys_cli import add_parser as add_keys_parser
    from .cluster_cli import add_parser as add_cluster_parser

    add_keys_parser(sub)
    add_cluster_parser(sub)
    return parser


def _log_options_everywhere(parser: argparse.ArgumentParser, skip: frozenset = frozenset({"bench"})) -> None:
    """--log-level and --log-format after any subcommand too (``qualify serve --log-format json``).

    SUPPRESS as the default: given before the subcommand, the value stays.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                if name in skip:
                    continue
                child.add_argument("--log-level", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
                child.add_argument("--log-format", default=argparse.SUPPRESS, choices=("auto", "json", "text"),
                                   help=argparse.SUPPRESS)
                _log_options_everywhere(child, skip)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _log_options_everywhere(parser)
    # `qualify bench` hands every option it sees to qualify.bench, --help included.
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = rest + args.bench_args
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from .observability.logs import configure

    configure(args.log_level, args.log_format)
    try:
        return args.func(args)
    except ProjectError as exc:
        print(f"qualify: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `qualify get user-42 | head`: the reader left
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
