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
reader goes back to the log (see services/watch.py).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from ..domain.changes import MembershipChange


class Subscription:
    """One live consumer's buffer of committed changes (filtered by audience)."""

    __slots__ = ("audiences", "capacity", "rows", "overflowed", "_wake")

    def __init__(self, audiences: frozenset[str] | None, capacity: int):
        self.audiences = audiences
        self.capacity = capacity
        self.rows: deque[MembershipChange] = deque()
        self.overflowed = False
        self._wake = asyncio.Event()

    def _offer(self, rows: list[MembershipChange]) -> None:
        if self.overflowed:
            return
        wanted = rows if self.audiences is None else [c for c in rows if c.audience_id in self.audiences]
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

    def drain(self) -> list[MembershipChange]:
        rows = list(self.rows)
        self.rows.clear()
        return rows


class ChangeFeed:
    """Committed changes: the head sequence, waiters, live subscriptions."""

    def __init__(self, head: int):
        self.head = head
        self._subs: set[Subscription] = set()
        self._waiters: list[tuple[int, asyncio.Future]] = []

    # -- the writer side (on the loop) -------------------------------------------
    def publish(self, rows: list[MembershipChange]) -> None:
        if rows:
            self.advance(rows[-1].sequence, lambda: rows)

    def advance(self, head: int, rows: Callable[[], list[MembershipChange]]) -> None:
        """``publish`` for a writer that builds the changes only if a subscription wants them: ``rows()``
        makes the committed changes up to ``head``; it is not called while nobody watches."""
        self.head = max(self.head, head)
        if self._subs:
            made = rows()
            for sub in self._subs:
                sub._offer(made)
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
