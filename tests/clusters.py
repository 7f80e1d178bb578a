"""Qualify clusters for tests: N ``qualify serve`` nodes with [cluster] over a NatsCluster (tests/natsd.py).

Every node is the real command on port 0 with its own data folder; they
share the demo warehouse and, when given, a test clock file, so a cluster
and a single node fed the same events at the same clock readings must
derive the same changes to the microsecond.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import textwrap
import time
from collections import defaultdict
from pathlib import Path

import lmdb

from conftest import QualifyServer, wait_serving, write_realtime_project
from natsd import NATS_SERVER, NatsCluster, purge_qualify
from qualify.server.cluster.partitioning import partition_of
from qualify.server.storage.realtime import read_changelog
from test_audiences import CLOCK_ENV, Api

__all__ = ["NATS_SERVER", "NatsCluster", "QualifyCluster", "changelog_rows", "cluster_toml", "nats_json"]


def cluster_toml(urls: list[str], node_id: str, partitions: int = 16, replicas: int = 3, lease_ttl: str = "2s",
                 snapshot_interval: str = "2s", extra: str = "") -> str:
    return textwrap.dedent(f"""\
        [cluster]
        nats_url = {json.dumps(urls)}
        node_id = "{node_id}"
        partitions = {partitions}
        replicas = {replicas}
        lease_ttl = "{lease_ttl}"
        snapshot_interval = "{snapshot_interval}"
        event_retention = "10m"
        {extra}
        """)


class QualifyCluster:
    """``size`` nodes over ``nats``; ``apis[i]`` talks to node i."""

    def __init__(self, workdir: Path, nats: NatsCluster, warehouse: Path, size: int = 3, clock=None,
                 project_extra: str = "", env: dict | None = None, **settings):
        self.workdir, self.nats, self.warehouse = workdir, nats, warehouse
        self.project_extra, self.env = project_extra, env or {}
        self.size, self.clock, self.settings = size, clock, settings
        self.nodes: list[QualifyServer | None] = [None] * size
        self.apis: list[Api | None] = [None] * size
        self.rng = random.Random(7)

    def node_dir(self, i: int) -> Path:
        return self.workdir / f"node-{i}"

    def server(self, i: int) -> QualifyServer:
        folder = self.node_dir(i)
        folder.mkdir(parents=True, exist_ok=True)
        project = write_realtime_project(folder, self.warehouse,
                                         cluster_toml(self.nats.urls, f"n{i}", **self.settings) + self.project_extra)
        env = dict(self.env, **({CLOCK_ENV: str(self.clock.path)} if self.clock is not None else {}))
        return QualifyServer(folder, "--project", str(project), env=env)

    def start(self, *which: int) -> "QualifyCluster":
        which = which or tuple(range(self.size))
        servers = {i: self.server(i) for i in which}
        for i, s in servers.items():  # started together: they settle their shares at once
            s._log = open(s.log_path, "wb")
            s.proc = subprocess.Popen(s.args, cwd=s.workdir, stdout=s._log, stderr=subprocess.STDOUT, env=s.env)
        try:
            for i, s in servers.items():
                _wait_started(s)
                self.nodes[i], self.apis[i] = s, Api(s.address)
        except BaseException:  # none of them may outlive the test
            for s in servers.values():
                s.kill()
            raise
        return self

    def live(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n is not None and n.proc.poll() is None]

    def api(self) -> Api:
        """A random live node's stubs."""
        return self.apis[self.rng.choice(self.live())]

    def kill(self, i: int) -> None:
        self.apis[i].close()
        self.nodes[i].kill()
        self.nodes[i] = self.apis[i] = None

    def stop(self) -> list[int]:
        codes = []
        for i in self.live():
            self.apis[i].close()
            codes.append(self.nodes[i].stop(30))
        return codes

    def logs(self) -> str:
        return "\n".join(f"--- node {i}\n{n.log()[-3000:]}" for i, n in enumerate(self.nodes) if n is not None)

    def lmdb(self, i: int) -> Path:
        return self.node_dir(i) / "data" / "lmdb"


def _wait_started(s: QualifyServer, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not s.ready_file.exists():
        if s.proc.poll() is not None:
            raise AssertionError(f"qualify serve exited with {s.proc.returncode}:\n{s.log()}")
        if time.monotonic() > deadline:
            s.kill()
            raise AssertionError(f"qualify serve not ready in {timeout}s:\n{s.log()}")
        time.sleep(0.02)
    info = json.loads(s.ready_file.read_text())
    s.address, s.port, s.http_port = info["address"], info["port"], info.get("http_port")
    wait_serving(s.address, deadline - time.monotonic())


def changelog_rows(lmdb_dir: Path) -> list[tuple[int, list]]:
    """(sequence, [audience, person, direction, effective_us, cause, message_id]) of a running node's changelog."""
    env = lmdb.open(str(lmdb_dir), readonly=True, lock=True, max_dbs=64)
    try:
        db = env.open_db(b"changelog", create=False)
        with env.begin() as txn:
            return [(c.sequence, [c.audience_id, c.person_key, int(c.direction), c.effective_us, int(c.cause),
                                  c.message_id]) for c in read_changelog(txn, db, 0, limit=10**9)]
    finally:
        env.close()


def nats_json(url: str, bucket: str) -> dict:
    """Every key of a key-value bucket, decoded as JSON (as `qualify cluster status` reads them)."""
    import nats

    from qualify.server.cluster.status import bucket_entries

    async def read():
        nc = await nats.connect(url)
        try:
            return await bucket_entries(nc.jetstream(), bucket)
        finally:
            await nc.close()

    return asyncio.run(read())


def fresh_nats(nats: NatsCluster) -> None:
    asyncio.run(purge_qualify(nats.urls[0]))


def per_person(rows) -> dict[str, list]:
    """Changelog rows (changelog_rows) as each person's changes in order, sequences left out."""
    out: dict[str, list] = defaultdict(list)
    for _, (aid, person, direction, eff, cause, mid) in rows:
        out[person].append((aid, direction, eff, cause, mid))
    return dict(out)


def anon_for(user: str, n: int, same: bool, partitions: int, prefix: str = "v") -> str:
    """An anonymous id that hashes to the user's partition (``same``) or to another one."""
    return next(f"{prefix}{n}-{i}" for i in range(10_000)
                if (partition_of(f"anon:{prefix}{n}-{i}", partitions) == partition_of(user, partitions)) == same)
