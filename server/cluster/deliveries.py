"""Realtime syncs in a cluster: one node delivers, from its read copy, with a cursor every node understands.

A node's read copy numbers each change ``(CHANGES stream sequence << 16) |
index`` (cluster/readcopy.py): the same number on every node. So a sync's
cursor means the same thing everywhere, and delivering is a job for one
node at a time, which holds the ``deliveries`` lease (the partitions'
protocol, cluster/leases.py). That node runs the single-node delivery
runners (delivery/runner.py) over its read copy, unchanged: at least once,
in order per person (a person's changes are one partition's, in its order,
and the stream keeps that order).

The cursors are mirrored into ``qualify-cluster`` as ``sync.<id>`` every
MIRROR_EVERY seconds. A node that takes the lease over (the holder died or
left) starts each sync from the mirrored cursor, or its own if that is
further: at most MIRROR_EVERY seconds of changes (plus what was in flight)
are delivered again, with the same sequences, which receivers dedupe on.

The syncs are the project file's ``[[syncs]]`` (the same on every node);
SyncService's create, update and delete are not served in a cluster.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict, replace

from nats.js.errors import KeyNotFoundError

from ..domain.syncs import SyncState
from .leases import Leases

log = logging.getLogger(__name__)

LEASE = "deliveries"
MIRROR_EVERY = 0.5


class DeliveryLeader:
    def __init__(self, res, leases: Leases, make_deliveries, specs: list, ttl: float):
        self.res = res
        self.leases = leases
        self.make = make_deliveries  # () -> a new, unstarted Deliveries over this node's read copy
        self.specs = specs
        self.ttl = ttl
        self.deliveries = None
        self.lease = None
        self._task: asyncio.Task | None = None
        self._bucket = None

    def start(self) -> None:
        if self.specs:
            self.leases.view.start()
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            await self._step_down(release=True)
            await self.leases.view.stop()

    async def _run(self) -> None:
        self._bucket = await self.res.js.key_value("qualify-cluster")
        await self.leases.view.ready.wait()
        while True:
            try:
                if self.lease is None:
                    await self._try_lead()
                else:
                    await self._mirror()
                    renewed = await self.leases.refresh(self.lease)
                    if renewed is None:
                        log.warning("another node delivers the realtime syncs now")
                        await self._step_down(release=False)
                    else:
                        self.lease = renewed
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - NATS away: the next round
                log.warning("realtime syncs: %s", exc)
            await asyncio.sleep(MIRROR_EVERY if self.lease is not None else self.ttl / 4)

    async def _try_lead(self) -> None:
        if not self.leases.claimable(LEASE):
            return
        lease = await self.leases.claim(LEASE)
        if lease is None:
            return
        mirrored = {}
        for spec in self.specs:
            try:
                mirrored[spec.id] = json.loads((await self._bucket.get(f"sync.{spec.id}")).value)
            except KeyNotFoundError:
                pass
        deliveries = self.make()

        def adopt(txn):  # the mirrored cursor, unless this node's own is further
            tables = deliveries.tables
            local = {spec.id: st for spec, st in tables.load(txn)}
            for spec in self.specs:
                state = mirrored.get(spec.id)
                if state is not None and (spec.id not in local or local[spec.id].cursor < state["cursor"]):
                    tables.put_spec(txn, spec)
                    tables.put_state(txn, spec.id, SyncState(**state))

        await deliveries.write(adopt)
        await deliveries.start(list(self.specs))
        self.deliveries, self.lease = deliveries, lease
        log.info("delivering %d realtime syncs from this node", len(self.specs))

    async def _mirror(self) -> None:
        if self.deliveries is None:
            return
        for sid, runner in list(self.deliveries.runners.items()):
            await self._bucket.put(f"sync.{sid}", json.dumps(asdict(replace(runner.state))).encode())

    async def _step_down(self, release: bool) -> None:
        deliveries, lease = self.deliveries, self.lease
        self.deliveries = self.lease = None
        if deliveries is not None:
            await deliveries.close()
            if release:
                try:
                    self.deliveries = deliveries
                    await self._mirror()
                except Exception:  # noqa: BLE001 - the next leader redelivers a little more
                    pass
                finally:
                    self.deliveries = None
        if release and lease is not None:
            await self.leases.release(lease)
