"""AudienceService.WatchMemberships: the changelog as a resumable stream.

A watch starts from now, after a given sequence, or with a snapshot of the
current members (one consistent LMDB read) followed by a marker. Each reply
carries the changes that are ready together (up to 500), so a burst costs a
few messages rather than one per change. It first
catches up from the log in LMDB, then follows the live feed. The two meet
without a gap or a repeat: before each read of the log the live buffer is
reset, so every row committed after that read is in the buffer, and rows in
both are told apart by sequence.

Memory per watch is bounded: the live buffer holds at most ``watch_buffer``
changes. When a burst (a warehouse sync that moves many people at once) or a
slow consumer overflows it, the watch goes back to reading the log, at the
consumer's pace. A consumer more than ``watch_max_lag`` changes behind the
head is told so: the watch ends with RESOURCE_EXHAUSTED (WATCH_FELL_BEHIND)
and the last sequence sent, and the consumer resumes from the log with
WATCH_START_SEQUENCE when it is ready.
"""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from qualify.v1 import audience_pb2, membership_pb2

from ..delivery.feed import ChangeFeed, Row
from ..domain.errors import AudienceNotFound, FieldViolation, InvalidRequest, WatchFellBehind
from ..storage.realtime import RealtimeStore, changelog_head, current_members
from .errors import reject_malformed

READ_BATCH = 1000
MESSAGE_CHANGES = 500  # changes per reply message, at most
ENTER = membership_pb2.DIRECTION_ENTER


def timestamp(us: int) -> Timestamp:
    ts = Timestamp()
    seconds, micros = divmod(us, 1_000_000)
    ts.seconds, ts.nanos = seconds, micros * 1000
    return ts


def change_message(seq: int, row: list) -> membership_pb2.MembershipChange:
    audience, person, direction, effective_us, cause, message_id = row
    return membership_pb2.MembershipChange(sequence=seq, audience_id=audience, person_key=person,
                                           direction=direction, effective_time=timestamp(effective_us),
                                           cause=cause, message_id=message_id)


def _messages(rows: list[Row], wanted: frozenset[str] | None):
    """Reply messages for committed rows (those of the wanted audiences), in order."""
    changes = [change_message(seq, row) for seq, row in rows if wanted is None or row[0] in wanted]
    for i in range(0, len(changes), MESSAGE_CHANGES):
        yield audience_pb2.WatchMembershipsResponse(changes=changes[i:i + MESSAGE_CHANGES])


class Watch:
    """WatchMemberships over the live feed and the log."""

    def __init__(self, feed: ChangeFeed, store: RealtimeStore, buffer: int, max_lag: int):
        self.feed = feed
        self.store = store
        self.buffer = buffer
        self.max_lag = max_lag

    def _check_lag(self, after: int) -> None:
        if self.feed.head - after > self.max_lag:
            raise WatchFellBehind(
                f"the consumer fell more than {self.max_lag} changes behind the live changelog; resume with "
                f"WATCH_START_SEQUENCE after_sequence={after} to replay from the log",
                metadata={"last_sequence": str(after)})

    async def watch(self, request: audience_pb2.WatchMembershipsRequest, context):
        reject_malformed(request)
        wanted = frozenset(request.audience_ids) or None
        start = request.start or audience_pb2.WATCH_START_NOW
        env = self.feed.env
        with env.begin() as txn:
            known = [a for a in self.store.catalog_bits(txn) if a is not None]
            head = changelog_head(txn, self.store.meta)
        for i, aid in enumerate(request.audience_ids):
            if aid not in known:
                raise AudienceNotFound(f"no audience {aid!r}", metadata={"audience": aid},
                                       violations=[FieldViolation(f"audience_ids[{i}]", "no such audience")])
        if start == audience_pb2.WATCH_START_SEQUENCE:
            after = request.after_sequence
            if after > head:
                raise InvalidRequest(
                    f"after_sequence {after} is beyond the changelog, whose last sequence is {head}",
                    violations=[FieldViolation("after_sequence", f"must be at most {head}")])
        elif start == audience_pb2.WATCH_START_SNAPSHOT:
            after = None
        elif start == audience_pb2.WATCH_START_NOW:
            after = head
        else:
            raise InvalidRequest(f"unknown start {start}", violations=[FieldViolation("start", "is not a WatchStart value")])

        sub = self.feed.subscribe(wanted, self.buffer)
        try:
            if after is None:  # the snapshot: one read transaction, then the marker
                with env.begin() as txn:
                    after = changelog_head(txn, self.store.meta)
                    chunk = []
                    for aid in sorted(wanted or known):
                        for key, enter_us in current_members(txn, self.store, aid):
                            chunk.append(membership_pb2.MembershipChange(
                                audience_id=aid, person_key=key, direction=ENTER, effective_time=timestamp(enter_us)))
                            if len(chunk) == MESSAGE_CHANGES:
                                yield audience_pb2.WatchMembershipsResponse(changes=chunk)
                                chunk = []
                    if chunk:
                        yield audience_pb2.WatchMembershipsResponse(changes=chunk)
                yield audience_pb2.WatchMembershipsResponse(snapshot_end_sequence=after)
            live = False
            while True:
                # From the log: at the start, and whenever the live buffer overflowed.
                while True:
                    sub.reset()
                    rows = self.feed.read(after, READ_BATCH)
                    if rows:
                        after = rows[-1][0]
                    for message in _messages(rows, wanted):
                        yield message
                    if len(rows) < READ_BATCH:
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
                    rows = [r for r in sub.drain() if r[0] > after]
                    if rows:
                        after = rows[-1][0]
                    for message in _messages(rows, None):  # the buffer holds only wanted rows
                        yield message
        finally:
            self.feed.unsubscribe(sub)
