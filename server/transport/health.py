"""What the standard health service says, in every serving process.

NOT_SERVING until the first warehouse sync has landed (seen through LMDB),
then SERVING, except while the LMDB map is nearly full: when its pages in
use reach ``nearly_full`` of the map, writes are about to fail
(MDB_MAP_FULL), so load balancers should send traffic elsewhere until an
operator grows ``storage.map_size_gb``. Graceful shutdown (the servicer's
``enter_graceful_shutdown``) turns everything NOT_SERVING for good.

With ``--workers N`` a serving process is also NOT_SERVING while its
writer does not answer (``writer_probe``: the writer's own health over its
Unix socket): at startup on an existing data folder the last sync is visible
at once, seconds before the writer listens, and Ingest, Audience and Sync
calls in that gap would fail with UNAVAILABLE; the same holds while the
supervisor replaces a writer that died, or one that hangs.

The writing process does not wait for the poll to see a fast fill: its
writer reports the map's use after every transaction to a ``MapAlarm``,
which wakes the poll at once when the use crosses ``nearly_full`` (or a write
failed with MapFull), so health flips with the commit that filled the map.

The same poll feeds the LMDB map gauges.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..domain.ports import RecordReader
from ..observability import metrics

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class MapAlarm:
    """Told the map's use after each transaction (on the writer thread); wakes ``watch_health`` on a crossing."""

    def __init__(self, loop: asyncio.AbstractEventLoop, nearly_full: float):
        self.loop, self.nearly_full = loop, nearly_full
        self.full = False
        self.wake = asyncio.Event()

    def __call__(self, used: int, size: int) -> None:
        full = used >= self.nearly_full * size
        if full is not self.full:  # one loop wakeup per crossing, not per commit
            self.full = full
            self.loop.call_soon_threadsafe(self.wake.set)


def writer_probe(address: str, timeout: float = 0.5) -> Callable[[], Awaitable[bool]]:
    """An async check: does the writer at ``address`` answer its health with SERVING?"""
    channel = grpc.aio.insecure_channel(address)
    stub = health_pb2_grpc.HealthStub(channel)

    async def answers() -> bool:
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == SERVING

    return answers


async def watch_health(reader: RecordReader, health_servicer, names: list[str], nearly_full: float,
                       poll: float = 0.05, every: float = 1.0,
                       writer: Callable[[], Awaitable[bool]] | None = None, alarm: MapAlarm | None = None) -> None:
    """Runs for the life of the server; see the module docstring."""
    while reader.generation == 0 or (writer is not None and not await writer()):
        await asyncio.sleep(poll)
    serving = map_was = None
    writer_ok = True
    while True:
        used, size = reader.map_usage()
        metrics.lmdb_map(used, size)
        map_ok = used < nearly_full * size and not (alarm is not None and alarm.full)
        if map_ok is not map_was and (map_was is not None or not map_ok):
            log.log(logging.INFO if map_ok else logging.WARNING,
                    "the LMDB map is %.1f%% full (%d of %d bytes): health %s", 100 * used / size, used, size,
                    "SERVING again" if map_ok else "NOT_SERVING until storage.map_size_gb grows")
        map_was = map_ok
        if writer is not None and serving is not None:
            was, writer_ok = writer_ok, await writer()
            if was is not writer_ok:
                log.log(logging.INFO if writer_ok else logging.WARNING, "the writer %s: health %s",
                        "answers SERVING again" if writer_ok else "does not answer SERVING",
                        "SERVING" if writer_ok and map_ok else "NOT_SERVING")
        ok = map_ok and writer_ok
        if ok is not serving:
            serving = ok
            for name in names:
                await health_servicer.set(name, SERVING if ok else NOT_SERVING)
        if alarm is None:
            await asyncio.sleep(every)
        else:
            try:
                await asyncio.wait_for(alarm.wake.wait(), every)
            except asyncio.TimeoutError:
                pass
            alarm.wake.clear()
