"""One owned partition, running: restore, consume the stream in order, publish changes, ask for ticks, snapshot.

Started when this node wins the partition's lease and stopped when it loses
or releases it (cluster/leases.py). Around the ``Applier`` (cluster/apply.py,
on the partition's own writer thread) it runs three tasks on the event loop:

- the consumer: an ordered push consumer on ``qualify.events.<p>`` from the
  sequence after the last one applied; messages are buffered and applied in
  batches of up to BATCH, one write transaction each. The ordered consumer
  recreates itself from the last sequence it delivered if NATS drops a
  message or a server fails, so delivery is gapless and in stream order.
- the outbox: after each commit it reads the partition's changelog past
  what was published and publishes it to ``qualify.changes.<p>``, one
  message per batch, waiting for each PubAck before the next (order). On
  start it reads the subject's last message to learn what an earlier owner
  already published, and publishes only what comes after: a replay derives
  the same changes with the same sequences (cluster/messages.py), so nothing
  is published twice with different content.
- the timer: when the engine's earliest timer is due on this node's clock,
  it publishes a tick to the partition's stream and the timer fires when
  the tick is applied, at the tick's time. Time enters a partition only
  through its stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from pathlib import Path

from nats.js import api
from nats.js.errors import NotFoundError

from ..storage.writer import Writer
from . import explain, queries, snapshots
from .apply import APPLYING, Applier
from .jetstream import CHANGES, EVENTS, changes_subject, events_subject, resubscribe
from .messages import MAX_CHANGES_PER_MESSAGE, Kind, change_batch, control, decode, decode_changes

log = logging.getLogger(__name__)

BATCH = 2000  # stream messages per write transaction
BUFFER = 20_000  # delivered messages waiting to be applied before the consumer is held back
FRESH_KEPT = 100_000  # committed changes held in memory for the outbox
TICK_RETRY = 0.5  # seconds before a tick that was not applied yet is asked for again
# At most one tick per TICK_EVERY: a tick fires every timer due by its time, each at its own instant (the
# exits' effective times are exact); only their visibility waits up to this long, and a partition with
# timers due all the time sends 50 ticks a second rather than one per instant.
TICK_EVERY = 0.02
INFO_TIMEOUT = 2.0  # a consumer_info the stream's leader election leaves unanswered counts as a failure
STALLED = 5.0  # seconds without a delivery, with messages waiting, before the consumer is replaced
STUCK = 10.0  # seconds without applying anything, with messages in the stream, before the partition is reopened


class Partition:
    """See the module docstring. ``node`` is the NodeContext (cluster/node.py)."""

    def __init__(self, number: int, node):
        self.number = number
        self.node = node
        self.path: Path = node.data_dir / "partitions" / f"p{number:04d}"
        self.env = None
        self.writer: Writer | None = None
        self.applier: Applier | None = None
        self.published = 0
        self.snapshot_seq = 0  # the stream sequence the latest snapshot covers
        self.snapshot_at = 0.0
        self.started_at = 0.0
        self.failed = False
        self._buffer: list = []
        self._arrived = asyncio.Event()
        self._space = asyncio.Event()
        self._committed = asyncio.Event()
        self._fresh: deque = deque()  # committed changes not published yet (see _unpublished)
        self._deadline = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._sub = None
        self._explain_sub = None  # ExplainMembership's questions for this partition (cluster/explain.py)
        self._query_sub = None  # PreviewAudience's and SimulateAudience's (cluster/queries.py)
        self._tick_asked: tuple[int, float] | None = None
        self.pending = 0  # stream messages not applied yet (JetStream's count for the consumer, and the buffer)
        self._delivered_at = time.monotonic()

    # -- life cycle ------------------------------------------------------------------
    async def start(self) -> None:
        t0 = time.monotonic()
        node = self.node
        restored = await self._restore()
        self.env = snapshots.open_partition_env(self.path, node.project.map_size)
        self.writer = Writer(self.env, clock_us=lambda: self.applier.state.now_us)
        self.writer.start()
        loop = asyncio.get_running_loop()

        def publish(changes) -> None:
            if changes:
                batch = list(changes)
                self.writer.after_commit(lambda: loop.call_soon_threadsafe(self._handed, batch))

        self.applier = Applier(self.number, node.res.partitions, self.env, self.writer, node.project, publish)
        self.applier.notify = lambda: self.writer.after_commit(lambda: loop.call_soon_threadsafe(self._committed.set))
        await asyncio.wrap_future(self.writer.submit(self.applier.open))
        self.applier.engine.on_deadline = lambda: loop.call_soon_threadsafe(self._deadline.set)
        self.published = await self._last_published()
        self.applier.published = self.published
        state = self.applier.state
        self._tasks = [asyncio.create_task(t) for t in (self._apply_loop(), self._outbox(), self._timer(),
                                                        self._measure_lag())]
        self._committed.set()  # whatever the restored changelog holds past the stream's last change
        await self._subscribe()
        self._explain_sub = await explain.serve(node.res.nc, self)
        self._query_sub = await queries.serve(node.res.nc, self)
        if not state.synced and state.applied == 0:
            await self._publish_control(Kind.SYNC)  # a fresh partition learns its people at once
        self.started_at = time.time()
        log.info("partition %d: owned (%s at sequence %d, %.2fs)", self.number, restored, state.applied,
                 time.monotonic() - t0)

    async def _subscribe(self) -> None:
        """An ordered consumer from the sequence after the last one applied (or buffered)."""
        start = max([self.applier.state.applied] + [seq for seq, _, _ in self._buffer[-1:]]) + 1
        self._sub = await self.node.res.js.subscribe(
            events_subject(self.number), cb=self._deliver, ordered_consumer=True, idle_heartbeat=2.0,
            config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                                      opt_start_seq=start, inactive_threshold=30.0))
        self._delivered_at = time.monotonic()

    async def _restore(self) -> str:
        """Brings the partition's directory to the latest state known: the local copy or the snapshot."""
        node = self.node
        local = await asyncio.to_thread(snapshots.stored_state, self.path, self.number, node.project.map_size)
        snap = await snapshots.latest(node.res.snapshots, self.number)
        if snap is not None:
            self.snapshot_seq, self.snapshot_at = snap.applied, snap.taken_at
        if snap is not None and (local is None or snap.applied > local.applied):
            await snapshots.restore(node.res.snapshots, self.number, self.path, snap.size)
            return f"restored the snapshot of {snap.node}"
        return "resumed the local copy" if local is not None else "new"

    async def stop(self, snapshot: bool) -> None:
        """Stops consuming; ``snapshot``: a handover, so the next owner replays only a short tail."""
        for sub in (self._query_sub, self._explain_sub, self._sub):
            if sub is None:
                continue
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection may be gone; the consumer expires on its own
                pass
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.writer is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.writer.stop)
            try:  # what the last transactions derived (a later owner would publish the same)
                await asyncio.wait_for(self._publish_pending(), 10)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - the next owner publishes them
                log.warning("partition %d: changes left unpublished at stop", self.number)
            if snapshot and not self.failed:
                try:
                    await self.take_snapshot()
                except Exception:  # noqa: BLE001 - the next owner replays a longer tail
                    log.exception("partition %d: the handover snapshot failed", self.number)
        if self.env is not None:
            self.env.close()
            self.env = None

    # -- the consumer ----------------------------------------------------------------
    async def _deliver(self, msg) -> None:
        self._delivered_at = time.monotonic()
        seq = msg.metadata.sequence.stream
        if self._buffer and seq <= self._buffer[-1][0]:
            return  # a resubscription delivers again what was buffered
        self._buffer.append((seq, msg.data, msg.headers))
        self._arrived.set()
        while len(self._buffer) > BUFFER:  # holds the subscription back: flow control slows JetStream
            self._space.clear()
            await self._space.wait()

    async def _apply_loop(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self._buffer:
                raw, self._buffer = self._buffer[:BATCH], self._buffer[BATCH:]
                self._space.set()
                try:
                    await asyncio.wrap_future(self.writer.submit(lambda txn, raw=raw: self._apply(txn, raw)))
                except Exception:  # noqa: BLE001 - the engine's memory may be off now: the node reopens us
                    log.exception("partition %d: applying stream messages failed; reopening it", self.number)
                    self.failed = True
                    self.node.reopen(self.number)
                    return

    def _apply(self, txn, raw) -> None:
        applied = self.applier.state.applied
        with APPLYING:
            items = [item for seq, data, headers in raw if seq > applied for item in decode(seq, data, headers)]
            if items:
                self.applier.apply(txn, items)

    # -- the outbox --------------------------------------------------------------------
    async def _last_published(self) -> int:
        try:
            msg = await self.node.res.js.get_last_msg(CHANGES, changes_subject(self.number))
        except NotFoundError:
            return 0
        _, first, changes = decode_changes(msg.data)
        return changes[-1].sequence if changes else first - 1

    def _handed(self, changes: list) -> None:
        """Changes just committed, kept for the outbox so it need not read them back from LMDB."""
        if len(self._fresh) < FRESH_KEPT:  # (past it, NATS is away: the outbox reads the changelog)
            self._fresh.extend(changes)
        self._committed.set()

    def _unpublished(self) -> list:
        """The next changes to publish: the ones handed over in memory when they follow on from what
        was published, else (after a restart, or past FRESH_KEPT) read from the partition's changelog."""
        fresh, after = self._fresh, self.published
        while fresh and fresh[0].sequence <= after:
            fresh.popleft()
        if fresh and fresh[0].sequence == after + 1:
            out = []
            while fresh and len(out) < MAX_CHANGES_PER_MESSAGE and fresh[0].sequence == after + 1 + len(out):
                out.append(fresh.popleft())
            return out
        fresh.clear()
        with self.env.begin() as txn:
            return self.applier.store.changes_after(txn, self.published, MAX_CHANGES_PER_MESSAGE)

    async def _outbox(self) -> None:
        while True:
            await self._committed.wait()
            self._committed.clear()
            await self._publish_pending()

    async def _publish_pending(self) -> None:
        while messages := self._outgoing():  # identity handovers and forwards (cluster/handover.py)
            for number, subject, payload, headers in messages:
                await self._publish_retrying(subject, payload, headers)
                self.applier.outbox_published = number
        while changes := self._unpublished():
            payload, headers = change_batch(self.number, changes)
            await self._publish_retrying(changes_subject(self.number), payload, headers)
            self.published = self.applier.published = changes[-1].sequence

    async def _publish_retrying(self, subject: str, payload: bytes, headers: dict) -> None:
        while True:
            try:
                await self.node.res.js.publish(subject, payload, headers=dict(headers), timeout=5)
                return
            except Exception as exc:  # noqa: BLE001 - NATS unreachable: what waits stays in the tables
                log.warning("partition %d: publishing to %s failed (%s); retrying", self.number, subject, exc)
                await asyncio.sleep(0.5)

    def _outgoing(self) -> list:
        with self.env.begin() as txn:
            return self.applier.handovers.outbox(txn, self.applier.outbox_published)

    # -- time ------------------------------------------------------------------------------
    async def _publish_control(self, kind: Kind, *fields) -> None:
        payload, headers = control(kind, self.node.clock(), *fields)
        await self.node.res.js.publish(events_subject(self.number), payload, headers=headers, timeout=5)

    async def request_sync(self) -> None:
        """A warehouse sync of the partition's slice, when the message is applied."""
        await self._publish_control(Kind.SYNC)

    async def _timer(self) -> None:
        node = self.node
        while True:
            deadline = self.applier.engine.next_deadline()
            now = node.clock()
            if deadline is not None and deadline <= now:
                asked = self._tick_asked
                since = time.monotonic() - asked[1] if asked else TICK_RETRY
                if asked is None or (self.applier.state.now_us >= asked[0] and since >= TICK_EVERY) \
                        or since > TICK_RETRY:
                    self._tick_asked = (now, time.monotonic())
                    try:
                        await self._publish_control(Kind.TICK)
                    except Exception as exc:  # noqa: BLE001 - asked again shortly
                        log.warning("partition %d: publishing a tick failed (%s)", self.number, exc)
                delay = TICK_EVERY if not node.test_clock else 0.002
            elif deadline is None:
                delay = 3600.0
            else:
                delay = (deadline - now) / 1e6
            if node.test_clock:
                delay = min(delay, 0.005)
            self._deadline.clear()
            try:
                await asyncio.wait_for(self._deadline.wait(), timeout=max(0.001, delay))
            except asyncio.TimeoutError:
                pass

    # -- snapshots -----------------------------------------------------------------------
    async def take_snapshot(self) -> None:
        state = self.applier.state if self.applier else None
        if state is None or state.applied <= self.snapshot_seq or self.env is None:
            return
        info = await snapshots.take(self.node.res.snapshots, self.env, self.number, self.node.node_id,
                                    self.node.project.map_size)
        self.snapshot_seq, self.snapshot_at = info.applied, info.taken_at
        log.info("partition %d: snapshot at sequence %d (%d bytes)", self.number, info.applied, info.size)

    async def _measure_lag(self) -> None:
        """Every second: JetStream's count of what waits for us; and the consumer's watchdog.

        nats-py's ordered consumer recreates itself when it misses heartbeats,
        but a recreation that fails while a stream elects its leader can leave
        it dead for good. A consumer that JetStream no longer knows, or one
        with messages waiting and nothing delivered for STALLED seconds, is
        replaced by a new subscription from the sequence after the last one
        buffered (what was delivered twice is dropped by sequence).
        """
        failures = 0
        progress = (self.applier.state.applied, time.monotonic())
        while True:
            await asyncio.sleep(1.0)
            if await self._stuck(progress):
                return
            if self.applier.state.applied != progress[0]:
                progress = (self.applier.state.applied, time.monotonic())
            stalled = time.monotonic() - self._delivered_at > STALLED
            try:
                waiting = (await asyncio.wait_for(self._sub.consumer_info(), INFO_TIMEOUT)).num_pending
                self.pending, failures = waiting + len(self._buffer), 0
            except Exception:  # noqa: BLE001 - a NATS server away, or the consumer is gone
                waiting, failures = None, failures + 1
            if stalled and (waiting or failures >= STALLED) and \
                    await resubscribe(self._sub, self._subscribe, f"partition {self.number}: the stream consumer"):
                failures = 0

    async def _stuck(self, progress: tuple[int, float]) -> bool:
        """Whether the partition applied nothing for STUCK seconds while its stream has more: then the
        node reopens it (a new consumer, buffer and tasks from what LMDB holds), whatever got stuck."""
        applied, since = progress
        if self.applier.state.applied != applied or time.monotonic() - since < STUCK:
            return False
        try:
            last = (await self.node.res.js.get_last_msg(EVENTS, events_subject(self.number))).seq
        except Exception:  # noqa: BLE001 - NATS away: nothing to apply anyway
            return False
        if last <= applied:
            return False
        log.warning("partition %d: stuck at sequence %d while the stream has %d; reopening it",
                    self.number, applied, last)
        self.failed = True
        self.node.reopen(self.number)
        return True

    def status(self) -> dict:
        state = self.applier.state if self.applier else None
        return {"applied": state.applied if state else 0, "now_us": state.now_us if state else 0,
                "pending": self.pending, "published": self.published, "snapshot_seq": self.snapshot_seq,
                "snapshot_at": self.snapshot_at}
