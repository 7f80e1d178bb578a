"""``qualify cluster status``: a cluster's nodes, partition owners, lag and snapshot age (cluster/status.py)."""

from __future__ import annotations

import asyncio
import json
import sys


def cmd_cluster_status(args) -> int:
    from .cli import _project
    from .cluster.status import gather, render

    project = _project(args)
    if project.cluster is None:
        print("qualify cluster status: the project has no [cluster] table", file=sys.stderr)
        return 1
    try:
        status = asyncio.run(gather(project.cluster, args.timeout))
    except Exception as exc:  # noqa: BLE001 - NATS unreachable, or no cluster created there yet
        print(f"qualify cluster status: cannot read the cluster from NATS: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if args.json else render(status))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("cluster", help="a cluster's nodes, partition owners, lag and snapshots (read from NATS)")
    actions = p.add_subparsers(dest="cluster_command", required=True)
    s = actions.add_parser("status", help="nodes, who owns which partition, lag and snapshot age")
    s.add_argument("--project", help="the project file with [cluster] (default ./qualify.toml)")
    s.add_argument("--json", action="store_true", help="print it as JSON")
    s.add_argument("--timeout", type=float, default=5.0, help="NATS deadline in seconds (default 5)")
    s.set_defaults(func=cmd_cluster_status, data_dir="qualify-data", demo_people=100_000)
