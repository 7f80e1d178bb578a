"""What the standard health service says, in every serving process.

NOT_SERVING until the first warehouse sync has landed (seen through LMDB),
then SERVING, except while the LMDB map is nearly full: when its pages in
use reach ``nearly_full`` of the map, writes are about to fail
(MDB_MAP_FULL), so load balancers should send traffic elsewhere until an
operator grows ``storage.map_size_gb``. Graceful shutdown (the servicer's
``enter_graceful_shutdown``) turns everything NOT_SERVING for good.

The same poll feeds the LMDB map gauges.
"""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health_pb2

from ..domain.ports import RecordReader
from ..observability import metrics

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def watch_health(reader: RecordReader, health_servicer, names: list[str], nearly_full: float,
                       poll: float = 0.05, every: float = 1.0) -> None:
    """Runs for the life of the server; see the module docstring."""
    while reader.generation == 0:
        await asyncio.sleep(poll)
    serving = None
    while True:
        used, size = reader.map_usage()
        metrics.lmdb_map(used, size)
        ok = used < nearly_full * size
        if ok is not serving:
            if serving is not None or not ok:
                log.log(logging.INFO if ok else logging.WARNING,
                        "the LMDB map is %.1f%% full (%d of %d bytes): health %s", 100 * used / size, used, size,
                        "SERVING again" if ok else "NOT_SERVING until storage.map_size_gb grows")
            serving = ok
            for name in names:
                await health_servicer.set(name, SERVING if ok else NOT_SERVING)
        await asyncio.sleep(every)
