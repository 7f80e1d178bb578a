"""Partition snapshots in JetStream's object store: an LMDB copy and the stream sequence it covers.

A snapshot is ``mdb_env_copy`` with compaction of the partition's
environment (a consistent read transaction's view, taken beside the running
writer), uploaded as ``p.<partition>`` with a description naming the stream
sequence applied, the partition time and the node that took it. The object
store keeps the latest per name, replicated like the streams. A node taking
a partition over downloads it (unless its own copy on disk is as recent),
opens it, and replays the stream from the sequence after.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb
from nats.js import api
from nats.js.errors import NotFoundError, ObjectNotFoundError

from .apply import CLUSTER_DB, PartitionState
from .jetstream import snapshot_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SnapshotInfo:
    partition: int
    applied: int  # the stream sequence it covers
    now_us: int
    node: str
    taken_at: float  # wall-clock seconds
    size: int


def open_partition_env(path: Path, map_size: int, readonly: bool = False) -> lmdb.Environment:
    """A partition's environment. No fsync per commit: the stream is the durable record, and a process
    that dies (even kill -9) loses nothing LMDB wrote; after a machine crash the partition restores
    from its snapshot and the stream instead of trusting the local copy."""
    if not readonly:
        path.mkdir(parents=True, exist_ok=True)
    return lmdb.open(str(path), map_size=map_size, max_dbs=64, max_readers=126, lock=True, readahead=False,
                     sync=False, metasync=False, readonly=readonly, subdir=True, max_spare_txns=4)


def stored_state(path: Path, partition: int, map_size: int) -> PartitionState | None:
    """What a partition directory on disk covers (None: nothing usable there)."""
    if not (path / "data.mdb").exists():
        return None
    try:
        env = open_partition_env(path, map_size, readonly=True)
    except lmdb.Error:
        return None
    try:
        with env.begin() as txn:
            db = env.open_db(CLUSTER_DB, txn=txn, create=False)
            return PartitionState.load(txn, db, partition)
    except (lmdb.Error, ValueError):
        return None
    finally:
        env.close()


async def latest(store, partition: int) -> SnapshotInfo | None:
    try:
        info = await store.get_info(snapshot_name(partition))
    except (ObjectNotFoundError, NotFoundError):
        return None
    d = json.loads(info.description or "{}")
    return SnapshotInfo(partition, d.get("applied", 0), d.get("now_us", 0), d.get("node", ""),
                        d.get("taken_at", 0.0), info.size or 0)


def _copy(env: lmdb.Environment, partition: int, map_size: int) -> tuple[str, PartitionState]:
    folder = tempfile.mkdtemp(prefix=f"qualify-snap-{partition}-")
    env.copy(folder, compact=True)
    state = stored_state(Path(folder), partition, map_size)
    return folder, state


def transfer_timeout(size: int) -> float:
    """Seconds an upload or download of ``size`` bytes may take before it counts as failed: a transfer whose
    NATS server went away mid-way never ends by itself (nats-py's object store waits for chunks forever),
    and a partition start or handover waiting on it held its node's balancing with it."""
    return 30.0 + size / 20e6


async def take(store, env: lmdb.Environment, partition: int, node: str, map_size: int) -> SnapshotInfo:
    """Copies the environment (in a thread) and uploads it; returns what the snapshot covers."""
    loop = asyncio.get_running_loop()
    folder, state = await loop.run_in_executor(None, _copy, env, partition, map_size)
    try:
        info = SnapshotInfo(partition, state.applied, state.now_us, node, time.time(),
                            os.path.getsize(os.path.join(folder, "data.mdb")))
        description = json.dumps({"applied": info.applied, "now_us": info.now_us, "node": node,
                                  "taken_at": info.taken_at})
        with open(os.path.join(folder, "data.mdb"), "rb") as f:
            await asyncio.wait_for(store.put(snapshot_name(partition), f, meta=api.ObjectMeta(description=description)),
                                   transfer_timeout(info.size))
        return info
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def restore(store, partition: int, path: Path, size: int) -> None:
    """Replaces ``path`` with the latest snapshot of ``partition`` (of ``size`` bytes)."""
    tmp = path.with_name(path.name + ".restoring")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / "data.mdb", "wb") as f:
        await asyncio.wait_for(store.get(snapshot_name(partition), writeinto=f), transfer_timeout(size))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
