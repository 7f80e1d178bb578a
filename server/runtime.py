"""The writing process's background loops: the warehouse sync schedule, the realtime timers, retention.

Both hand their work to the single writer and await its commit; neither
holds state of its own beyond what it needs to decide when to run next.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

import lmdb

from .observability import metrics
from .storage.warehouse_sync import Progress, SyncError, Syncer

log = logging.getLogger(__name__)


async def sync_schedule(env, project, engine, writer, clock, progress: Progress | None,
                        on_first: Callable[[object], None], on_fatal: Callable[[], None], reader) -> None:
    """Syncs the warehouse now and then every ``sync_interval``; each sync moves people at once.

    ``on_first(report)`` runs once the first sync landed; ``on_fatal()``
    when it fails on a data folder that never had one (nothing to serve).
    """
    first = True
    while True:
        try:
            syncer, shown = Syncer(env, project), progress if first else None

            def sync_and_reevaluate(txn):
                report = syncer.run(shown, txn=txn)
                engine.after_sync(txn, clock())  # warehouse changes move people at once
                return report

            report = await asyncio.wrap_future(writer.submit(sync_and_reevaluate))
            metrics.warehouse_sync(report.seconds, True, time.time())
            if first:
                # Everything built so far lives as long as the process: keep it out of
                # the collector's full passes, which otherwise stall a request for ms.
                gc.collect()
                gc.freeze()
                on_first(report)
        except Exception as exc:  # noqa: BLE001 - a bug must not end the schedule; the next sync may land
            metrics.warehouse_sync(None, False)
            if isinstance(exc, (SyncError, lmdb.Error)):  # lmdb.Error: the writer's commit failed
                log.error("warehouse sync failed, nothing changed: %s", exc)
            else:
                log.exception("warehouse sync failed, nothing changed")
            if first and reader.generation == 0:
                on_fatal()
                return
        first = False
        if not project.server.sync_interval:
            return
        await asyncio.sleep(project.server.sync_interval)


async def fire_timers(engine, writer, wake: asyncio.Event, clock, test_clock: bool) -> None:
    """Exits (and enters) that time alone causes, at the instant they are due.

    ``wake`` is set when an earlier deadline appears. A test clock may jump
    at any moment, so then the deadline is polled.
    """
    while True:
        deadline = engine.next_deadline()
        delay = 3600.0 if deadline is None else max(0.0, (deadline - clock()) / 1e6)
        if test_clock:
            delay = min(delay, 0.005)
        wake.clear()
        if delay > 0:
            try:
                await asyncio.wait_for(wake.wait(), timeout=delay)
                continue  # an earlier deadline appeared
            except asyncio.TimeoutError:
                pass
        try:
            await asyncio.wrap_future(writer.submit(lambda txn: engine.tick(txn, clock())))
        except Exception:  # noqa: BLE001 - a failed tick is retried; the log says why
            log.exception("timer tick failed; retrying")
            await asyncio.sleep(0.1)


async def compact(retention, writer, clock, every: float) -> None:
    """Retention in bounded slices, each a short writer job of its own between ingest batches.

    While a slice finds work the next follows at once (the writer's queue
    puts waiting ingest batches between them); otherwise every ``every`` s.
    """
    warned = 0.0
    while True:
        try:
            done = await asyncio.wrap_future(writer.submit(lambda txn: retention.compact_slice(txn, clock())))
        except Exception:  # noqa: BLE001 - retried at the next tick; the log says why
            log.exception("compaction failed; retrying")
            await asyncio.sleep(every)
            continue
        metrics.changelog_held(done.held_back_by_syncs)
        if done.held_back_by_syncs and time.monotonic() - warned > 60:
            warned = time.monotonic()
            log.warning("a realtime sync has not delivered changes older than [realtime] changelog_retention: "
                        "the changelog keeps them until it does (qualify syncs shows its lag)")
        await asyncio.sleep(0 if done.full else every)


async def backfill(engine, writer, clock) -> None:
    """Brings new and changed audiences their members: the writer runs a bounded slice between its other work.

    (See Writer.set_background: an acknowledgement waits for one slice at
    most.) A slice that failed is tried again a second later.
    """
    def slice_(txn, waiting) -> bool:
        engine.backfill_step(txn, clock(), waiting=waiting)
        return engine.backfilling is not None

    writer.set_background(slice_)
    engine.on_backfill = writer.wake_background
    while True:
        if engine.backfilling is not None:
            writer.wake_background()
        await asyncio.sleep(1.0)
