"""The single LMDB writer: one thread, group commit, acknowledgement after fsync.

Every write to the environment in the serving process goes through this
thread: ingest batches, and whatever else is handed to ``submit`` (the
warehouse sync, timers, audience changes). LMDB allows one write transaction
per environment at a time, and its write transactions belong to the thread
that began them, so one owner thread is both the simplest and the only safe
arrangement.

Group commit. ``ingest`` calls from every RPC are queued; the thread takes
everything queued (up to ``max_txn_events``) into ONE write transaction:
append to the log, run the ``on_events`` hook (evaluation), prune the dedupe
index, commit (with sync on, the fsync: a hundred concurrent small batches
cost one). Futures resolve after the commit, so an acknowledgement means
durable; if the hook or the commit raises, every request in the transaction
fails and the thread goes on. ``after_commit`` callbacks run once their
transaction committed (membership changes reach the live feed in commit
order, never from a rolled-back one).

Backpressure. At most ``max_pending`` events wait (queued or in the running
transaction). Past that, ``ingest`` awaits space rather than buffering: the
streaming RPC then stops reading its request stream and HTTP/2 flow control
slows the sender. A single request larger than the limit is admitted when
nothing else waits, so it cannot starve.

``submit(fn)`` runs ``fn(txn)`` in a write transaction of its own, in queue
order with the ingest batches (a submitted job is a barrier: it never shares a
transaction, so its failure cannot fail events), and returns a
concurrent.futures.Future of its result, set after the commit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lmdb

from ..clock import wall_clock_us
from ..domain.errors import QualifyError, StorageUnavailable
from ..domain.events import MatchedEvent
from ..observability import metrics
from .eventlog import EventLog

log = logging.getLogger(__name__)

EventsHook = Callable[[lmdb.Transaction, list[MatchedEvent], int], None]


@dataclass(frozen=True, slots=True)
class IngestResult:
    """Per event of one ``ingest`` call, in order: True when it was a duplicate; and the log position.

    ``position`` is the event log's last sequence when the transaction
    committed: a reader that sees it sees these events evaluated (the
    consistency token, see domain/consistency.py). Duplicates get it too: the
    first copy committed at or before it.
    """

    duplicate: tuple[bool, ...]
    position: int = 0

    @property
    def accepted(self) -> int:
        return len(self.duplicate) - sum(self.duplicate)

    @property
    def duplicates(self) -> int:
        return sum(self.duplicate)


@dataclass(slots=True)
class _Ingest:
    events: Sequence[MatchedEvent]
    loop: asyncio.AbstractEventLoop | None  # None: future is a concurrent.futures.Future
    future: Any


@dataclass(slots=True)
class _Job:
    fn: Callable[[lmdb.Transaction], Any]
    future: concurrent.futures.Future


def _settle(pairs) -> None:
    """On the event loop: resolves asyncio futures (skipping cancelled ones)."""
    for fut, value, failed in pairs:
        if fut.done():
            continue
        if failed:
            fut.set_exception(value)
        else:
            fut.set_result(value)


class Writer:
    """The writer thread of one LMDB environment. See the module docstring."""

    def __init__(self, env: lmdb.Environment, *, clock_us: Callable[[], int] = wall_clock_us,
                 max_txn_events: int = 10_000, max_pending: int = 50_000, prune_min: int = 1_000):
        self.env = env
        self.clock_us = clock_us
        self.max_txn_events = max_txn_events
        self.max_pending = max_pending
        self.prune_min = prune_min
        #: Called in the ingest transaction after the append, with the accepted events (seq set) and the
        #: transaction's clock reading. Raising fails the whole transaction.
        self.on_events: EventsHook | None = None
        #: Called after every transaction with (bytes of the map in use, map size), so that health sees a
        #: fast fill at the commit that made it. A MapFullError reports the map as full.
        self.on_map_use: Callable[[int, int], None] | None = None
        self._psize = 0
        self._committed: list[Callable[[], None]] = []  # after_commit callbacks of the running transaction
        self.log: EventLog | None = None
        self._cond = threading.Condition()
        self._queue: deque = deque()
        self._pending = 0
        self._space: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._background: Callable[[lmdb.Transaction, Callable[[], bool]], bool] | None = None
        self._background_due = False  # the background has more to do
        # Counters, read without the lock (they only grow).
        self.transactions = 0
        self.events_logged = 0
        self.duplicates = 0
        self.failures = 0

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        """Starts the thread and creates the event log's databases (committed before returning)."""
        if self._thread is not None:
            raise RuntimeError("the writer is already running")
        self._thread = threading.Thread(target=self._run, name="qualify-writer", daemon=True)
        self._thread.start()

        def open_log(txn):
            self.log = EventLog(self.env, txn)

        self.submit(open_log).result()

    def stop(self, timeout: float | None = None) -> None:
        """Refuses new work, finishes everything queued, and joins the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._wake_space()

    def set_background(self, fn: Callable[[lmdb.Transaction, Callable[[], bool]], bool]) -> None:
        """Background work in bounded slices: ``fn(txn, waiting)`` runs one, True if more remain.

        ``waiting()`` says whether queued work waits, for the slice to end
        early. With nothing queued, slices run back to back; ingest that
        queues during one ends it and joins its transaction, and under
        ingest a short slice rides in each batch's. Either way one commit
        serves both (one part nested: its failure leaves the other), and an
        acknowledgement waits a slice's few milliseconds at most.
        ``wake_background`` says there is work (again).
        """
        self._background = fn

    def wake_background(self) -> None:
        with self._cond:
            self._background_due = True
            self._cond.notify()

    @property
    def pending(self) -> int:
        """Events queued or in the running transaction."""
        return self._pending

    # -- entry points ----------------------------------------------------------------

    def after_commit(self, fn: Callable[[], None]) -> None:
        """From work in a transaction: ``fn`` on the writer thread once it committed (dropped if it aborts)."""
        self._committed.append(fn)

    async def ingest(self, events: Sequence[MatchedEvent]) -> IngestResult:
        """Makes events durable; resolves after the commit. Raises StorageUnavailable on failure."""
        n = len(events)
        if n == 0:
            return IngestResult(())
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._stopping:
                    raise StorageUnavailable("the server is shutting down; nothing was written")
                if self._pending == 0 or self._pending + n <= self.max_pending:
                    self._pending += n
                    future = loop.create_future()
                    self._queue.append(_Ingest(events, loop, future))
                    self._cond.notify()
                    break
                space = loop.create_future()
                self._space.append((loop, space))
            await space
        return await future

    def ingest_blocking(self, events: Sequence[MatchedEvent]) -> concurrent.futures.Future:
        """``ingest`` for threads without an event loop: a Future of the IngestResult.

        Blocks (a thread, not a loop) while the queue is full.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        n = len(events)
        if n == 0:
            future.set_result(IngestResult(()))
            return future
        with self._cond:
            while not self._stopping and self._pending and self._pending + n > self.max_pending:
                self._cond.wait(0.05)
            if self._stopping:
                future.set_exception(StorageUnavailable("the server is shutting down; nothing was written"))
                return future
            self._pending += n
            self._queue.append(_Ingest(events, None, future))
            self._cond.notify()
        return future

    def submit(self, fn: Callable[[lmdb.Transaction], Any]) -> concurrent.futures.Future:
        """Runs ``fn(txn)`` in a write transaction on the writer thread; a Future of its result.

        The result is set after the commit; if ``fn`` or the commit raises,
        the transaction is aborted and the Future holds the exception.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                future.set_exception(RuntimeError("the writer is stopped"))
                return future
            self._queue.append(_Job(fn, future))
            self._cond.notify()
        return future

    # -- the thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping and not self._background_due:
                    self._cond.wait()
                if not self._queue and self._stopping:
                    return  # stopping, and drained
                head = group = None
                if self._queue and type(self._queue[0]) is _Job:
                    head = self._queue.popleft()
                else:
                    group = self._take_ingest()
            if head is not None:
                self._run_job(head)
            elif group is not None:
                self._run_ingest(*group)
            else:
                self._run_background()

    def _take_ingest(self) -> tuple[list[_Ingest], int] | None:
        """The ingest requests queued at the head, up to ``max_txn_events`` (with the lock held)."""
        group, n = [], 0
        while self._queue and type(self._queue[0]) is _Ingest:
            nxt = len(self._queue[0].events)
            if group and n + nxt > self.max_txn_events:
                break
            group.append(self._queue.popleft())
            n += nxt
        return (group, n) if group else None

    def _waiting(self) -> bool:
        return bool(self._queue)  # (a racy read is fine: it only ends a slice sooner or later)

    def _background_within(self, txn) -> None:
        mark = len(self._committed)
        more = True
        try:
            with self.env.begin(write=True, parent=txn) as nested:
                more = self._background(nested, lambda: True)
        except Exception:  # noqa: BLE001 - the batch commits without it
            del self._committed[mark:]
            log.exception("background slice failed")
        with self._cond:
            self._background_due = self._background_due and more

    def _run_background(self) -> None:
        """One slice alone; ingest that queued meanwhile rides in its transaction (one commit for both)."""
        fn = self._background
        more = False
        txn = self.env.begin(write=True)
        try:
            more = fn(txn, self._waiting) if fn is not None else False
        except BaseException as exc:  # noqa: BLE001 - logged; woken again by its owner
            txn.abort()
            self._after(False, isinstance(exc, lmdb.MapFullError))
            log.exception("background slice failed")
        else:
            with self._cond:
                riders = self._take_ingest()
            if riders is not None:
                self._run_ingest(*riders, within=txn)
            else:
                try:
                    txn.commit()
                except lmdb.Error as exc:
                    self._after(False, isinstance(exc, lmdb.MapFullError))
                    log.error("background slice failed to commit: %s", exc)
                else:
                    self._after(True)
        with self._cond:
            self._background_due = self._background_due and more

    def _run_job(self, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            with self.env.begin(write=True) as txn:
                result = job.fn(txn)
        except BaseException as exc:  # noqa: BLE001 - handed to the submitter
            self._after(False, isinstance(exc, lmdb.MapFullError))
            job.future.set_exception(exc)
        else:
            self._after(True)
            job.future.set_result(result)

    def _map_use(self, full: bool = False) -> None:
        hook = self.on_map_use
        if hook is None:
            return
        info = self.env.info()  # reads the meta page: no I/O, a few hundred ns
        if not self._psize:
            self._psize = self.env.stat()["psize"]
        size = info["map_size"]
        try:
            hook(size if full else (info["last_pgno"] + 1) * self._psize, size)
        except Exception:  # noqa: BLE001 - a hook never fails the writer
            log.exception("map use hook failed")

    def _after(self, committed: bool, full: bool = False) -> None:
        self._map_use(full)
        callbacks, self._committed = self._committed, []
        if not committed:
            return
        for fn in callbacks:
            try:
                fn()
            except Exception:  # noqa: BLE001 - what committed stays committed
                log.exception("after-commit callback failed")

    def _run_ingest(self, group: list[_Ingest], n: int, within: lmdb.Transaction | None = None) -> None:
        """Appends and evaluates a group of requests in one transaction, commits, then acknowledges them.

        ``within``: a background slice's open transaction, which the group
        joins (nested: the group's failure leaves the slice) and commits.
        """
        events = [e for req in group for e in req.events] if len(group) > 1 else list(group[0].events)
        now = self.clock_us()
        error: Callable[[], BaseException] | None = None  # makes one exception per request
        committed = full = False
        dup = [False] * len(events)
        position = 0
        try:
            with self.env.begin(write=True) if within is None else within as outer:
                if within is None:
                    position = self._append(outer, events, now, dup, n)
                    if self._background_due and self._background is not None:
                        self._background_within(outer)
                else:
                    mark = len(self._committed)
                    try:
                        with self.env.begin(write=True, parent=outer) as txn:
                            position = self._append(txn, events, now, dup, n)
                    except Exception as exc:  # noqa: BLE001 - the group fails, the slice commits
                        del self._committed[mark:]
                        error, full = self._failed(exc, n)
            committed = True
        except Exception as exc:  # noqa: BLE001 - the hook's failure fails the batch, not the writer
            error, full = self._failed(exc, n)
        self._after(committed, full)
        if error is None:
            # The first event queued is the oldest: its wait is the transaction's evaluation lag.
            metrics.evaluation_lag((self.clock_us() - events[0].event.received_us) / 1e6)
            self.transactions += 1
            self.events_logged += len(events) - sum(dup)
            self.duplicates += sum(dup)
        else:
            self.failures += 1
        # Resolve after the commit (or abort), one loop wakeup per loop.
        by_loop: dict = {}
        start = 0
        for req in group:
            k = len(req.events)
            value = error() if error is not None else IngestResult(tuple(dup[start:start + k]), position)
            start += k
            if req.loop is None:
                if error is None:
                    req.future.set_result(value)
                else:
                    req.future.set_exception(value)
            else:
                by_loop.setdefault(req.loop, []).append((req.future, value, error is not None))
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, pairs)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass
        with self._cond:
            self._pending -= n
            self._cond.notify_all()
        self._wake_space()

    def _append(self, txn, events: list[MatchedEvent], now: int, dup: list[bool], n: int) -> int:
        """The group's events into the log and the engine (marking duplicates); the log's position after them."""
        accepted, duplicates = self.log.append(txn, events, now)
        for i in duplicates:
            dup[i] = True
        if accepted and self.on_events is not None:
            self.on_events(txn, [events[i] for i in accepted] if duplicates else events, now)
        self.log.prune_dedupe(txn, now, max(self.prune_min, 2 * n))
        return self.log.last_seq(txn)

    @staticmethod
    def _failed(exc: Exception, n: int) -> tuple[Callable[[], BaseException], bool]:
        """(what each request of a failed group gets, whether the map is full), logged once."""
        if isinstance(exc, lmdb.Error):
            log.error("event log write failed, %d events not acknowledged: %s", n, exc)
            what = type(exc).__name__
            return (lambda: StorageUnavailable(
                f"the event log could not be written ({what}); nothing in this batch was acknowledged"),
                isinstance(exc, lmdb.MapFullError))
        # Logged here, once, with the traceback; callers get an INTERNAL error that leaks nothing.
        log.exception("on_events hook failed, %d events not acknowledged", n)
        return (lambda: QualifyError(
            "evaluating the batch failed; nothing in it was acknowledged (see the server log)"), False)

    def _wake_space(self) -> None:
        with self._cond:
            waiters, self._space = self._space, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_settle, [(fut, None, False)])
            except RuntimeError:
                pass
