"""Who owns which partition: leases in a JetStream key-value bucket, and the live nodes that share them.

A lease is the key ``p.<partition>`` of ``qualify-leases`` holding
``{"node", "expires_us"}``. It is taken with compare-and-set on the key's
revision: ``create`` when the key is absent (or deleted), ``update(last=
revision)`` over a lease whose ``expires_us`` has passed, and kept by
``update(last=my revision)`` every third of the TTL. Two nodes racing for a
lease both send a revision; JetStream accepts one and refuses the other
("wrong last sequence"), so at most one node believes it holds a lease at a
revision. A holder that cannot refresh (NATS unreachable, the bucket
electing a leader) keeps running until a refresh is answered: by then
another node may have taken the lease, and the answer stops the holder.

Leases order work, they do not guard correctness: if two nodes ever ran a
partition at once (a holder paused past its TTL), both would derive the
same changes with the same sequences from the same stream, and the stream's
dedupe and each reader's per-partition sequence drop the copy.

Expiry compares the holder's clock (``expires_us``) with the claimer's: the
nodes' wall clocks must agree to well within the TTL (NTP does).

Nodes announce themselves in ``qualify-nodes`` (a heartbeat every second,
with what they own); a node is alive while its heartbeat is younger than
the lease TTL. Both buckets are watched, so every node has a current view
without polling.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from .jetstream import lease_key

log = logging.getLogger(__name__)


def wall_us() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True)
class Lease:
    key: str  # p.<partition>, or "deliveries" (cluster/deliveries.py)
    node: str
    expires_us: int
    revision: int

    @property
    def partition(self) -> int:
        return int(self.key.split(".", 1)[1])

    def expired(self, now_us: int) -> bool:
        return self.expires_us < now_us


def quota(node: str, alive: list[str], partitions: int) -> int:
    """How many partitions ``node`` should own: an even share, the remainder to the first nodes by id."""
    alive = sorted(set(alive) | {node})
    base, extra = divmod(partitions, len(alive))
    return base + (1 if alive.index(node) < extra else 0)


def preference(partition: int, node: str) -> int:
    """Rendezvous weight: a partition goes back to the node that had it when it can (its copy is local)."""
    return int.from_bytes(hashlib.blake2b(f"{partition}/{node}".encode(), digest_size=8).digest(), "big")


class Watched:
    """A key-value bucket mirrored into ``entries`` by a watcher task."""

    def __init__(self, bucket, decode):
        self.bucket = bucket
        self.decode = decode
        self.entries: dict[str, object] = {}
        self.ready = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            try:
                watcher = await self.bucket.watchall()
                async for entry in watcher:
                    if entry is None:  # the initial values are in
                        self.ready.set()
                        continue
                    if entry.operation in ("DEL", "PURGE") or entry.value is None:
                        self.entries.pop(entry.key, None)
                    else:
                        self.entries[entry.key] = self.decode(entry)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a NATS server went away: watch again
                log.warning("watching %s failed (%s); watching again", self.bucket._name, exc)
                await asyncio.sleep(0.5)


class Leases:
    """This node's side of the lease protocol (see the module docstring)."""

    def __init__(self, bucket, node: str, ttl: float):
        self.bucket = bucket
        self.node = node
        self.ttl_us = int(ttl * 1_000_000)
        self.view = Watched(bucket, self._decode)

    @staticmethod
    def _decode(entry) -> Lease:
        d = json.loads(entry.value)
        return Lease(entry.key, d["node"], d["expires_us"], entry.revision)

    def _value(self) -> bytes:
        return json.dumps({"node": self.node, "expires_us": wall_us() + self.ttl_us}).encode()

    def holder(self, partition: int | str) -> Lease | None:
        return self.view.entries.get(lease_key(partition) if isinstance(partition, int) else partition)

    def claimable(self, partition: int | str) -> bool:
        lease = self.holder(partition)
        return lease is None or lease.expired(wall_us())

    async def claim(self, partition: int | str) -> Lease | None:
        """The lease (of a partition, or any key), if it was free or expired and this node won it."""
        key = lease_key(partition) if isinstance(partition, int) else partition
        current = self.holder(key)
        try:
            if current is None:
                revision = await self.bucket.create(key, self._value())
            elif current.expired(wall_us()):
                revision = await self.bucket.update(key, self._value(), last=current.revision)
            else:
                return None
        except KeyWrongLastSequenceError:  # another node got there first, or the view is behind the bucket
            await self._reread(key)
            return None
        return Lease(key, self.node, wall_us() + self.ttl_us, revision)

    async def _reread(self, key: str) -> None:
        """The key as the bucket has it now, into the view: a watcher that fell behind (its NATS server
        restarted) must not leave this node claiming with a revision that can never match."""
        try:
            entry = await self.bucket.get(key)
        except KeyNotFoundError:
            self.view.entries.pop(key, None)
            return
        except Exception:  # noqa: BLE001 - NATS away: the next round asks again
            return
        if entry.value:
            self.view.entries[key] = self._decode(entry)
        else:
            self.view.entries.pop(key, None)

    async def refresh(self, lease: Lease) -> Lease | None:
        """The renewed lease; None when another node holds it now (raises when NATS does not answer)."""
        value = self._value()
        try:
            revision = await self.bucket.update(lease.key, value, last=lease.revision)
        except KeyWrongLastSequenceError:
            # An update of ours whose answer was lost (a NATS server died before replying) moved the
            # revision on too: the lease is still ours when the latest entry names this node.
            try:
                entry = await self.bucket.get(lease.key)
            except KeyNotFoundError:
                return None
            if entry.value is None or json.loads(entry.value).get("node") != self.node:
                return None
            revision = await self.bucket.update(lease.key, value, last=entry.revision)
        return Lease(lease.key, self.node, wall_us() + self.ttl_us, revision)

    async def release(self, lease: Lease) -> None:
        try:
            await self.bucket.delete(lease.key, last=lease.revision)
        except (KeyWrongLastSequenceError, KeyNotFoundError):
            pass
        except Exception as exc:  # noqa: BLE001 - it expires by itself after the TTL
            log.warning("releasing the lease %s failed (%s); it expires by itself", lease.key, exc)
