"""Delivering each sync's changes: at least once, in order, through outages.

One ``SyncRunner`` task per sync, in the writing process's event loop:

1. read the changelog after the sync's cursor, keep its audiences' changes,
   up to ``max_batch_size`` (waiting up to ``max_delay`` for a batch to fill
   when that is set; otherwise a batch is whatever is there, so at low rates
   each change goes at once and under load changes batch up while the
   previous request is in flight);
2. send the batch; on failure retry it, after the destination's Retry-After
   or an exponential backoff with jitter, until it succeeds or used up
   ``max_attempts`` (or failed in a way a retry cannot fix), when its changes
   go to the dead-letter table, in the same transaction that moves the cursor
   past them;
3. move the cursor past the batch.

One batch is in flight per sync and batches go in changelog order, so each
person's changes arrive in order. The cursor is persisted every
``FLUSH_SECONDS`` (and at shutdown): after a crash, at most that much is sent
again, with the same sequences, which receivers deduplicate on.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import replace

from ..domain.changes import MembershipChange
from ..domain.errors import FieldViolation, QualifyError, SyncExists, SyncManagedByProject, SyncNotFound
from ..domain.ports import ChangelogReader, RecordReader, SyncStore
from ..domain.syncs import DeadLetter, SyncSpec, SyncState
from ..observability import metrics
from ..services.feed import ChangeFeed
from .destinations import DeliveryError, change_json, sender_for

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.2
SCAN_ROWS = 2000


class SyncRunner:
    """Delivers one sync's changes; see the module docstring."""

    def __init__(self, spec: SyncSpec, state: SyncState, deliveries: "Deliveries"):
        self.spec = spec
        self.state = state
        self.d = deliveries
        self.audiences = frozenset(spec.audience_ids)
        self.sender = sender_for(spec.destination, deliveries.user_agent)
        self.pending_since_us: int | None = None  # effective time of the oldest change not yet delivered
        self.replay = asyncio.Event()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"sync-{self.spec.id}")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.sender.close()

    # -- the loop --------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                if self.replay.is_set():
                    self.replay.clear()
                    await self._replay_dead_letters()
                    continue
                rows, scanned = self._next_batch()
                if not rows:
                    self.pending_since_us = None
                    if scanned > self.state.cursor:
                        self.state.cursor = scanned
                        self.d.dirty.add(self.spec.id)
                    await self._idle()
                    continue
                self.pending_since_us = rows[0].effective_us
                dest = self.spec.destination
                if dest.max_delay > 0 and len(rows) < dest.max_batch_size:
                    await self._linger(dest.max_delay)
                    rows, scanned = self._next_batch()
                await self._deliver(rows, scanned)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bug must not stop delivery for good
                log.exception("sync %s: delivery loop failed; retrying in 1s", self.spec.id)
                await asyncio.sleep(1.0)

    def _next_batch(self) -> tuple[list[MembershipChange], int]:
        """This sync's next changes after the cursor, and the last sequence looked at."""
        limit = self.spec.destination.max_batch_size
        after, batch = self.state.cursor, []
        while len(batch) < limit:
            rows = self.d.changelog.read(after, SCAN_ROWS)
            for c in rows:
                if c.audience_id in self.audiences:
                    batch.append(c)
                    if len(batch) == limit:
                        return batch, c.sequence
                after = c.sequence
            if len(rows) < SCAN_ROWS:
                break
        return batch, after

    async def _idle(self) -> None:
        waiter = asyncio.ensure_future(self.d.feed.wait_beyond(self.state.cursor, timeout=5.0))
        replay = asyncio.ensure_future(self.replay.wait())
        try:
            await asyncio.wait([waiter, replay], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            replay.cancel()

    async def _linger(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        while (left := deadline - loop.time()) > 0:
            head = self.d.feed.head
            if not await self.d.feed.wait_beyond(head, timeout=left):
                return
            if len(self._next_batch()[0]) >= self.spec.destination.max_batch_size:
                return

    async def _deliver(self, rows: list[MembershipChange], scanned: int, replaying: bool = False) -> bool:
        """Sends one batch until it is delivered (True) or dead-lettered (False); moves the cursor."""
        changes = self._payload(rows)
        dest = self.spec.destination
        attempt = 0
        while True:
            attempt += 1
            try:
                await self.sender.send(self.spec.id, changes, attempt)
            except DeliveryError as exc:
                metrics.sync_failed(self.spec.id)
                self.state.last_error = str(exc)
                self.state.last_error_us = self.d.clock()
                self.d.dirty.add(self.spec.id)
                if exc.permanent or attempt >= dest.max_attempts:
                    if not replaying:
                        await self._dead_letter(rows, scanned, attempt, str(exc))
                    log.warning("sync %s: %d change(s) dead-lettered after %d attempt(s): %s",
                                self.spec.id, len(rows), attempt, exc)
                    return False
                self.state.retries += 1
                await asyncio.sleep(exc.retry_after if exc.retry_after is not None else self.d.backoff(attempt))
                continue
            self.state.delivered += len(rows)
            metrics.sync_delivered(self.spec.id, len(rows))
            metrics.sync_lag(self.spec.id, (self.d.clock() - rows[-1].effective_us) / 1e6)
            if not replaying:
                self.state.cursor = scanned
            self.pending_since_us = None
            self.d.dirty.add(self.spec.id)
            return True

    async def _dead_letter(self, rows: list[MembershipChange], scanned: int, attempts: int, error: str) -> None:
        now = self.d.clock()
        state = replace(self.state, cursor=scanned, dead_lettered=self.state.dead_lettered + len(rows))
        await self.d.write(lambda txn: (self.d.tables.add_dead(txn, self.spec.id, rows, attempts, error, now),
                                        self.d.tables.put_state(txn, self.spec.id, state)))
        self._committed(state)

    async def _replay_dead_letters(self) -> None:
        """Sends the dead letters again, in order; each leaves the table once delivered."""
        after = 0
        while True:
            letters = self.d.tables.read(lambda txn: self.d.tables.dead_letters(
                txn, self.spec.id, after, self.spec.destination.max_batch_size))
            if not letters:
                return
            after = letters[-1].change.sequence
            rows = [dl.change for dl in letters]
            if await self._deliver(rows, self.state.cursor, replaying=True):
                state = replace(self.state, dead_lettered=max(0, self.state.dead_lettered - len(rows)))
                await self.d.write(lambda txn: (self.d.tables.remove_dead(txn, self.spec.id, [c.sequence for c in rows]),
                                                self.d.tables.put_state(txn, self.spec.id, state)))
                self._committed(state)

    def _committed(self, state: SyncState) -> None:
        """The dead-letter table changed with ``state``: status shows it only now, and the next flush keeps it."""
        self.state.cursor = max(self.state.cursor, state.cursor)
        self.state.dead_lettered = state.dead_lettered
        self.d.dirty.add(self.spec.id)

    def _payload(self, rows: list[MembershipChange]) -> list[dict]:
        fields = self.d.person_fields(self.spec.fields, [c.person_key for c in rows]) if self.spec.fields else None
        return [change_json(c, fields.get(c.person_key, {}) if fields is not None else None) for c in rows]


class Deliveries:
    """Every sync's runner, its definition and state in LMDB, and SyncService's operations."""

    def __init__(self, tables: SyncStore, jobs, feed: ChangeFeed, changelog: ChangelogReader, records: RecordReader,
                 parent: str, clock, user_agent: str, retry_initial: float = 0.2, retry_max: float = 30.0,
                 changelog_retention_us: int = 7 * 86400 * 1_000_000):
        self.tables = tables
        self.jobs = jobs
        self.feed = feed
        self.changelog = changelog
        self.records = records
        self.parent = parent
        self.clock = clock
        self.user_agent = user_agent
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.changelog_retention_us = changelog_retention_us
        self.runners: dict[str, SyncRunner] = {}
        self.dirty: set[str] = set()
        self._flusher: asyncio.Task | None = None

    async def write(self, fn):
        return await asyncio.wrap_future(self.jobs.submit(fn))

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: half fixed, half random."""
        ceiling = min(self.retry_max, self.retry_initial * 2 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    # -- life cycle ----------------------------------------------------------------------
    async def start(self, declared: list[SyncSpec]) -> None:
        """Opens the tables, applies the project file's syncs, and starts every runner."""
        def setup(txn):
            head = self.tables.changelog_head(txn)
            existing = {spec.id: (spec, state) for spec, state in self.tables.load(txn)}
            wanted = {s.id for s in declared}
            for sync_id, (spec, _) in existing.items():
                if spec.managed_by_project and sync_id not in wanted:
                    log.info("sync %s is no longer in the project file: deleted", sync_id)
                    self.tables.delete(txn, sync_id)
            for spec in declared:
                if spec.id in existing and not existing[spec.id][0].managed_by_project:
                    log.warning("sync %s in the project file replaces the one created through the API", spec.id)
                self.tables.put_spec(txn, spec)
                if spec.id not in existing:
                    self.tables.put_state(txn, spec.id, SyncState(cursor=head))
            return self.tables.load(txn)

        for spec, state in await self.write(setup):
            self._run(spec, state)
        self._flusher = asyncio.create_task(self._flush_loop(), name="sync-flush")

    def _run(self, spec: SyncSpec, state: SyncState) -> None:
        runner = SyncRunner(spec, state, self)
        self.runners[spec.id] = runner
        runner.start()

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        for runner in self.runners.values():
            await runner.stop()
        await self.flush()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 - retried at the next tick
                log.exception("persisting sync cursors failed; retrying")

    async def flush(self) -> None:
        """Persists the state of every sync that moved since the last flush."""
        if not self.dirty:
            return
        states = {sid: replace(self.runners[sid].state) for sid in self.dirty if sid in self.runners}
        self.dirty.clear()

        def put(txn):
            for sid, state in states.items():
                if self.tables.exists(txn, sid):  # not deleted meanwhile
                    self.tables.put_state(txn, sid, state)

        await self.write(put)

    # -- SyncService ---------------------------------------------------------------------
    def runner(self, sync_id: str) -> SyncRunner:
        runner = self.runners.get(sync_id)
        if runner is None:
            raise SyncNotFound(f"no sync {sync_id!r}", metadata={"sync": sync_id})
        return runner

    async def create(self, spec: SyncSpec) -> SyncRunner:
        if spec.id in self.runners:
            raise SyncExists(f"sync {spec.id!r} already exists", violations=[FieldViolation("sync.id", "already exists")])

        def create(txn):
            state = SyncState(cursor=self.tables.changelog_head(txn))  # from the next change on
            self.tables.put_spec(txn, spec)
            self.tables.put_state(txn, spec.id, state)
            return state

        self._run(spec, await self.write(create))
        return self.runners[spec.id]

    async def update(self, spec: SyncSpec) -> SyncRunner:
        old = self._changeable(spec.id)
        await old.stop()
        state = replace(old.state)
        await self.write(lambda txn: (self.tables.put_spec(txn, spec), self.tables.put_state(txn, spec.id, state)))
        self._run(spec, state)
        return self.runners[spec.id]

    async def delete(self, sync_id: str) -> None:
        runner = self._changeable(sync_id)
        await runner.stop()
        del self.runners[sync_id]
        self.dirty.discard(sync_id)
        await self.write(lambda txn: self.tables.delete(txn, sync_id))

    def _changeable(self, sync_id: str) -> SyncRunner:
        runner = self.runner(sync_id)
        if runner.spec.managed_by_project:
            raise SyncManagedByProject(f"sync {sync_id!r} is declared in the project file; change it there",
                                       metadata={"sync": sync_id})
        return runner

    def dead_letters(self, sync_id: str, after: int, limit: int) -> list[DeadLetter]:
        self.runner(sync_id)
        return self.tables.read(lambda txn: self.tables.dead_letters(txn, sync_id, after, limit))

    async def replay(self, sync_id: str) -> int:
        runner = self.runner(sync_id)
        count = runner.state.dead_lettered
        runner.replay.set()
        return count

    def lag_us(self, runner: SyncRunner) -> int:
        return max(0, self.clock() - runner.pending_since_us) if runner.pending_since_us is not None else 0

    def holds_changelog(self, runner: SyncRunner) -> bool:
        """Whether the sync's oldest undelivered change is past the changelog's retention (kept for it)."""
        return self.lag_us(runner) > self.changelog_retention_us

    # -- person fields -------------------------------------------------------------------
    def person_fields(self, names: tuple[str, ...], keys: list[str]) -> dict[str, dict]:
        """{person key: {field: value}} from the last warehouse sync (people without a record: {})."""
        by_collection: dict[str, list[str]] = {}
        for name in names:
            collection, _, column = name.rpartition(".")
            by_collection.setdefault(collection or self.parent, []).append(column)
        unique = list(dict.fromkeys(keys))
        out: dict[str, dict] = {k: {} for k in unique}
        for collection, columns in by_collection.items():
            try:
                found = self.records.field_values(collection, unique, tuple(columns))
            except QualifyError as exc:  # the collection or a field went away in a later warehouse sync
                log.warning("sync fields from %s left out: %s", collection, exc)
                continue
            prefix = "" if collection == self.parent else collection + "."
            for key, values in found.items():
                for k, v in values.items():
                    out[key][prefix + k] = v
        return out
