"""A node's partitions: heartbeats, claiming and releasing leases to an even share, snapshots on a schedule.

Every node runs the same loop every BALANCE_EVERY seconds:

- the live nodes are those whose heartbeat (``qualify-nodes``) is younger
  than the lease TTL; this node's share is ``quota`` (cluster/leases.py):
  ``partitions // nodes``, one more for the first ``partitions % nodes``
  nodes by id, so max/mean owned is at most ``ceil(P/N) / (P/N)``;
- above its share it releases one partition per round (a snapshot first,
  then the lease is deleted, so the next owner starts at once from a short
  tail); below it, it claims free or expired leases, those it has the
  highest rendezvous weight for first (a node that comes back gets its old
  partitions, whose copies are still on its disk);
- leases are refreshed every third of the TTL by a task of their own (a
  partition that takes long to restore must not lose its lease meanwhile);
  a lease another node took is given up at once; one NATS does not answer
  for is kept (see ``_refresh``).

A node that starts waits SETTLE seconds before its first claim, so nodes
started together see each other and do not all claim everything first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .jetstream import Resources, retry
from .leases import Lease, Leases, Watched, preference, quota, wall_us
from .partition import Partition

log = logging.getLogger(__name__)

BALANCE_EVERY = 0.25
HEARTBEAT_EVERY = 1.0
SETTLE = 1.5
STARTS_AT_ONCE = 8


@dataclass
class NodeContext:
    """What a partition needs from its node."""

    project: object
    res: Resources
    node_id: str
    clock: object  # the server clock (a test clock in tests): partition time, ticks
    test_clock: bool
    data_dir: Path
    reopen: object  # reopen(partition): a partition that failed asks to be restarted


class Node:
    def __init__(self, project, res: Resources, clock, test_clock: bool, address: str = "", read_position=None):
        s = res.settings
        self.settings = s
        self.res = res
        self.address = address
        self.read_position = read_position or (lambda: 0)  # the read copy's CHANGES sequence (cluster/readcopy.py)
        self.ctx = NodeContext(project, res, s.node_id, clock, test_clock, Path(project.data_dir) / "cluster",
                               self.reopen)
        self.leases = Leases(res.leases, s.node_id, s.lease_ttl)
        self.nodes = Watched(res.nodes, lambda e: json.loads(e.value))
        self.owned: dict[int, tuple[Lease, Partition]] = {}
        self.starting: set[int] = set()
        self.started_us = wall_us()
        self._tasks: list[asyncio.Task] = []
        self._refreshed = time.monotonic()
        self._unanswered = False  # a whole TTL without a refresh answered (logged once)
        self._reopen: set[int] = set()
        self.stopping = False

    # -- life cycle ----------------------------------------------------------------------
    async def start(self) -> None:
        self.leases.view.start()
        self.nodes.start()
        await retry(self._heartbeat_once, "the first heartbeat")  # a new bucket may still elect its leader
        await asyncio.wait_for(asyncio.gather(self.leases.view.ready.wait(), self.nodes.ready.wait()), 30)
        self._tasks = [asyncio.create_task(t) for t in
                       (self._balance(), self._refresh(), self._heartbeats(), self._snapshots())]

    async def stop(self) -> None:
        """Hands every partition over: snapshot, release; the others claim them at once."""
        self.stopping = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        handover = self.res.nc.is_connected  # without NATS there is nothing to hand over to
        await asyncio.gather(*(self._give_up(p, snapshot=handover) for p in list(self.owned)), return_exceptions=True)
        try:
            await self.res.nodes.delete(self.settings.node_id)
        except Exception:  # noqa: BLE001 - its heartbeat ages out
            pass
        await self.leases.view.stop()
        await self.nodes.stop()

    def reopen(self, partition: int) -> None:
        self._reopen.add(partition)

    # -- who is alive, what is mine ------------------------------------------------------
    def alive(self) -> list[str]:
        # Three missed heartbeats at least: a node stalled for a second (a loaded machine) is not gone, and
        # counting it out would make the others claim, then hand back, its share.
        now, ttl = wall_us(), int(max(self.settings.lease_ttl, 3 * HEARTBEAT_EVERY) * 1_000_000)
        out = {n for n, hb in self.nodes.entries.items() if now - hb.get("heartbeat_us", 0) < ttl}
        return sorted(out | {self.settings.node_id})

    def status(self) -> dict:
        return {"node": self.settings.node_id, "address": self.address, "started_us": self.started_us,
                "heartbeat_us": wall_us(), "read_position": self.read_position(),
                "partitions": {str(p): part.status() for p, (_, part) in sorted(self.owned.items())
                               if p not in self.starting},
                "starting": sorted(self.starting)}

    async def _heartbeat_once(self) -> None:
        await self.res.nodes.put(self.settings.node_id, json.dumps(self.status()).encode())

    async def _heartbeats(self) -> None:
        while True:
            try:
                await self._heartbeat_once()
            except Exception as exc:  # noqa: BLE001 - NATS away: the next beat
                log.warning("heartbeat failed (%s)", exc)
            await asyncio.sleep(HEARTBEAT_EVERY)

    # -- balancing ------------------------------------------------------------------------------
    async def _balance(self) -> None:
        await asyncio.sleep(SETTLE)
        while True:
            try:
                await self._balance_once()
            except Exception:  # noqa: BLE001 - the next round tries again; the log says why
                log.exception("balancing partitions failed")
            await asyncio.sleep(BALANCE_EVERY)

    async def _balance_once(self) -> None:
        for p in list(self._reopen):
            self._reopen.discard(p)
            if p in self.owned:
                lease, part = self.owned.pop(p)
                await part.stop(snapshot=False)
                await self.leases.release(lease)
        alive = self.alive()
        me = self.settings.node_id
        share = quota(me, alive, self.res.partitions)
        held = len(self.owned) + len(self.starting)
        if held > share and not self.starting:
            others = [n for n in alive if n != me]
            # The partition some other node is most preferred for goes first.
            worst = min(self.owned, key=lambda p: preference(p, me) - max((preference(p, n) for n in others),
                                                                          default=0))
            log.info("releasing partition %d: %d owned, a share of %d among %d nodes", worst, held, share, len(alive))
            await self._give_up(worst, snapshot=True)
            return
        want = share - held
        if want <= 0 or self.stopping:  # (a node shutting down claims nothing more: it would have to hand it back)
            return
        free = [p for p in range(self.res.partitions)
                if p not in self.owned and p not in self.starting and self.leases.claimable(p)]
        free.sort(key=lambda p: -preference(p, me))
        claims = []
        for p in free[:min(want, STARTS_AT_ONCE)]:
            lease = await self.leases.claim(p)
            if lease is not None:
                self.starting.add(p)
                claims.append(self._take(lease))
        if claims:
            await asyncio.gather(*claims)

    async def _take(self, lease: Lease) -> None:
        p = lease.partition
        part = Partition(p, self.ctx)
        self.owned[p] = (lease, part)  # refreshed from now on, while it starts
        try:
            await part.start()
        except Exception:  # noqa: BLE001 - released; it (or another node) tries again
            log.exception("partition %d: starting failed; releasing it", p)
            self.owned.pop(p, None)
            await part.stop(snapshot=False)
            await self.leases.release(lease)
        finally:
            self.starting.discard(p)

    async def _give_up(self, p: int, snapshot: bool) -> None:
        lease, part = self.owned.pop(p)
        try:
            await part.stop(snapshot=snapshot)
        finally:
            await self.leases.release(lease)

    # -- leases ------------------------------------------------------------------------------
    async def _refresh(self) -> None:
        every = self.settings.lease_ttl / 3
        while True:
            await asyncio.sleep(every)
            ok = True
            for p, (lease, part) in list(self.owned.items()):
                try:
                    renewed = await self.leases.refresh(lease)
                except Exception as exc:  # noqa: BLE001 - NATS away: retried next round
                    log.warning("refreshing partition %d's lease failed (%s)", p, exc)
                    ok = False
                    continue
                if renewed is None:
                    log.warning("partition %d: another node holds the lease now; stopping", p)
                    self.owned.pop(p, None)
                    await part.stop(snapshot=False)
                elif p in self.owned:
                    self.owned[p] = (renewed, part)
            # A refresh that got no answer (the bucket electing a leader after a NATS server died, or
            # NATS out of reach) keeps the partition running: no other node can take a lease the bucket
            # does not answer for, and one that takes it once the bucket answers again makes this
            # node's next refresh fail, which stops it here (two owners meanwhile derive the same
            # changes from the same stream: leases.py). Giving every partition up after a TTL without
            # answers turned a bucket's few seconds of election into every partition of every node
            # stopping and restarting while the streams elected too: 15 s and more of evaluation lag.
            if ok:
                self._refreshed, self._unanswered = time.monotonic(), False
            elif time.monotonic() - self._refreshed > self.settings.lease_ttl and not self._unanswered:
                self._unanswered = True
                log.warning("no lease refreshed for a whole TTL: the partitions keep running until another "
                            "node is seen to hold their leases")

    async def _snapshots(self) -> None:
        while True:
            await asyncio.sleep(self.settings.snapshot_interval)
            for p, (_, part) in list(self.owned.items()):
                if p not in self.starting:
                    try:
                        await part.take_snapshot()
                    except Exception:  # noqa: BLE001 - the next interval tries again
                        log.exception("partition %d: snapshot failed", p)
