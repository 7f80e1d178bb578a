"""The live edge of the changelog, fanned out on the event loop.

The changelog in LMDB is the record of every membership change; it is what
consumers resume from. This module is its live edge: after each committed
write transaction the writer thread hands the rows it appended to
``ChangeFeed.publish`` (through the event loop), which

- moves ``head`` and wakes everyone waiting for a sequence beyond it (the
  sync runners, which then read the log themselves), and
- appends the rows to each watch subscription's buffer.

A subscription's buffer is bounded. When it would overflow, the
subscription is marked ``overflowed`` and gets nothing more until its reader
resets it: a stalled consumer costs the server at most its buffer, and its
reader goes back to the log (see transport/watch.py).
"""

from __future__ import annotations

import asyncio
from collections import deque

import lmdb

from ..storage.realtime import CHANGELOG, changelog_head, read_changelog
from ..storage.lmdb_store import META

Row = tuple[int, list]  # (sequence, [audience, person, direction, effective_us, cause, message_id])


class Subscription:
    """One live consumer's buffer of committed rows (filtered by audience)."""

    __slots__ = ("audiences", "capacity", "rows", "overflowed", "_wake")

    def __init__(self, audiences: frozenset[str] | None, capacity: int):
        self.audiences = audiences
        self.capacity = capacity
        self.rows: deque[Row] = deque()
        self.overflowed = False
        self._wake = asyncio.Event()

    def _offer(self, rows: list[Row]) -> None:
        if self.overflowed:
            return
        wanted = rows if self.audiences is None else [r for r in rows if r[1][0] in self.audiences]
        if not wanted:
            return
        if len(self.rows) + len(wanted) > self.capacity:
            self.overflowed = True
            self.rows.clear()
        else:
            self.rows.extend(wanted)
        self._wake.set()

    async def wait(self) -> None:
        """Returns once rows are buffered or the subscription overflowed."""
        while not self.rows and not self.overflowed:
            self._wake.clear()
            await self._wake.wait()

    def reset(self) -> None:
        """Forgets what is buffered: the reader is about to read the log instead."""
        self.rows.clear()
        self.overflowed = False

    def drain(self) -> list[Row]:
        rows = list(self.rows)
        self.rows.clear()
        return rows


class ChangeFeed:
    """Committed changelog rows: the head sequence, waiters, live subscriptions."""

    def __init__(self, env: lmdb.Environment):
        self.env = env
        with env.begin() as txn:
            self._meta = env.open_db(META, txn=txn, create=False)
            self._log = env.open_db(CHANGELOG, txn=txn, create=False)
            self.head = changelog_head(txn, self._meta)
        self._subs: set[Subscription] = set()
        self._waiters: list[tuple[int, asyncio.Future]] = []

    # -- the writer side (on the loop) -------------------------------------------
    def publish(self, rows: list[Row]) -> None:
        if not rows:
            return
        self.head = max(self.head, rows[-1][0])
        for sub in self._subs:
            sub._offer(rows)
        if self._waiters:
            keep = []
            for seq, fut in self._waiters:
                if self.head > seq:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    keep.append((seq, fut))
            self._waiters = keep

    # -- the consumer side -----------------------------------------------------------
    def subscribe(self, audiences: frozenset[str] | None, capacity: int) -> Subscription:
        sub = Subscription(audiences, capacity)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    async def wait_beyond(self, seq: int, timeout: float | None = None) -> bool:
        """Waits until a change after ``seq`` has committed; False on timeout."""
        if self.head > seq:
            return True
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, fut))
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            self._waiters = [(s, f) for s, f in self._waiters if f is not fut]

    def head_in(self, txn) -> int:
        """The last committed sequence as ``txn`` sees it."""
        return changelog_head(txn, self._meta)

    def read(self, after: int, limit: int) -> list[Row]:
        """Committed rows with sequence > after, oldest first, from the log."""
        with self.env.begin() as txn:
            return read_changelog(txn, self._log, after, limit)
