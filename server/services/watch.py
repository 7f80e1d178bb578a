"""Watching changes: the changelog as a resumable stream of batches of MembershipChange.

A watch starts from now, after a given sequence, or with a snapshot of the
current members (one consistent read) followed by a marker. It first catches
up from the log, then follows the live feed. The two meet without a gap or
a repeat: before each read of the log the live buffer is reset, so every
change committed after that read is in the buffer, and changes in both are
told apart by sequence.

Memory per watch is bounded: the live buffer holds at most ``buffer``
changes. When a burst (a warehouse sync that moves many people at once) or a
slow consumer overflows it, the watch goes back to reading the log, at the
consumer's pace. A consumer more than ``max_lag`` changes behind the head is
told so: WatchFellBehind, with the last sequence sent, and the consumer
resumes from the log when it is ready.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..domain.changes import Cause, Direction, MembershipChange
from ..domain.errors import AudienceNotFound, FieldViolation, InvalidRequest, WatchFellBehind
from ..domain.ports import ChangelogReader
from .feed import ChangeFeed

READ_BATCH = 1000
BATCH_CHANGES = 500  # changes per batch, at most


class Start(enum.IntEnum):
    """qualify.v1.WatchStart."""

    NOW = 1
    SEQUENCE = 2
    SNAPSHOT = 3


@dataclass(frozen=True, slots=True)
class SnapshotEnd:
    """Every current member has been sent; live changes after ``sequence`` follow."""

    sequence: int


def _batches(changes: list[MembershipChange]):
    for i in range(0, len(changes), BATCH_CHANGES):
        yield changes[i:i + BATCH_CHANGES]


class WatchService:
    """Watches over the live feed and the changelog."""

    def __init__(self, feed: ChangeFeed, changelog: ChangelogReader, buffer: int, max_lag: int,
                 catch_up: float = 0.0):
        """``catch_up``: how long a resume after a sequence this changelog has not reached yet waits for it.

        On one node such a sequence never existed (0: refused at once). On a
        cluster node it may be one another node's copy applied first.
        """
        self.feed = feed
        self.changelog = changelog
        self.buffer = buffer
        self.max_lag = max_lag
        self.catch_up = catch_up

    def _check_lag(self, after: int) -> None:
        if self.feed.head - after > self.max_lag:
            raise WatchFellBehind(
                f"the consumer fell more than {self.max_lag} changes behind the live changelog; resume with "
                f"WATCH_START_SEQUENCE after_sequence={after} to replay from the log",
                metadata={"last_sequence": str(after)})

    def _start(self, audience_ids: list[str], start: int, after_sequence: int) -> tuple[list[str], int | None]:
        """Checks the request; returns the audiences known and where to start (None: with a snapshot)."""
        known, head = self.changelog.audiences()
        for i, aid in enumerate(audience_ids):
            if aid not in known:
                raise AudienceNotFound(f"no audience {aid!r}", metadata={"audience": aid},
                                       violations=[FieldViolation(f"audience_ids[{i}]", "no such audience")])
        if start == Start.SEQUENCE:
            if after_sequence > head:
                raise InvalidRequest(
                    f"after_sequence {after_sequence} is beyond the changelog, whose last sequence is {head}",
                    violations=[FieldViolation("after_sequence", f"must be at most {head}")])
            first = self.changelog.start()
            if first and after_sequence < first - 1:
                raise InvalidRequest(
                    f"changes up to sequence {first - 1} are past [realtime] changelog_retention and were "
                    f"compacted; resume from a snapshot (WATCH_START_SNAPSHOT)",
                    violations=[FieldViolation("after_sequence", f"must be at least {first - 1}")])
            return known, after_sequence
        if start == Start.SNAPSHOT:
            return known, None
        if start == Start.NOW:
            return known, head
        raise InvalidRequest(f"unknown start {start}", violations=[FieldViolation("start", "is not a WatchStart value")])

    async def watch(self, audience_ids: list[str], start: int, after_sequence: int = 0) -> AsyncIterator:
        """Yields lists of changes in sequence order (and one SnapshotEnd after a snapshot)."""
        wanted = frozenset(audience_ids) or None
        if start == Start.SEQUENCE and self.catch_up and after_sequence > self.feed.head:
            await self.feed.wait_beyond(after_sequence - 1, self.catch_up)
        known, after = self._start(audience_ids, start or Start.NOW, after_sequence)
        sub = self.feed.subscribe(wanted, self.buffer)
        try:
            if after is None:
                snapshot = self.changelog.snapshot(sorted(wanted or known))
                after = next(snapshot)
                chunk = []
                for aid, key, enter_us in snapshot:
                    chunk.append(MembershipChange(aid, key, Direction.ENTER, enter_us, Cause.UNSPECIFIED))
                    if len(chunk) == BATCH_CHANGES:
                        yield chunk
                        chunk = []
                if chunk:
                    yield chunk
                yield SnapshotEnd(after)
            live = False
            while True:
                # From the log: at the start, and whenever the live buffer overflowed.
                while True:
                    sub.reset()
                    changes = self.changelog.read(after, READ_BATCH)
                    if changes:
                        after = changes[-1].sequence
                    for batch in _batches([c for c in changes if wanted is None or c.audience_id in wanted]):
                        yield batch
                    if len(changes) < READ_BATCH:
                        break
                    if live:
                        self._check_lag(after)
                live = True
                # Live, until the buffer overflows.
                while True:
                    await sub.wait()
                    if sub.overflowed:
                        self._check_lag(after)
                        break
                    changes = [c for c in sub.drain() if c.sequence > after]  # the buffer holds only wanted ones
                    if changes:
                        after = changes[-1].sequence
                    for batch in _batches(changes):
                        yield batch
        finally:
            self.feed.unsubscribe(sub)
