"""AudienceService.WatchMemberships over gRPC: batches of changes as reply messages.

The stream's logic (log, snapshot, live feed, bounded buffers) is the watch
use case's (services/watch.py); this module decodes the request and encodes
each batch of changes as one reply.
"""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from qualify.v1 import audience_pb2, membership_pb2

from ..domain.changes import MembershipChange
from ..services.watch import SnapshotEnd, WatchService
from .errors import reject_malformed


def timestamp(us: int) -> Timestamp:
    ts = Timestamp()
    seconds, micros = divmod(us, 1_000_000)
    ts.seconds, ts.nanos = seconds, micros * 1000
    return ts


def change_message(c: MembershipChange) -> membership_pb2.MembershipChange:
    return membership_pb2.MembershipChange(sequence=c.sequence, audience_id=c.audience_id, person_key=c.person_key,
                                           direction=int(c.direction), effective_time=timestamp(c.effective_us),
                                           cause=int(c.cause), message_id=c.message_id)


class Watch:
    def __init__(self, service: WatchService):
        self.service = service

    async def watch_memberships(self, request: audience_pb2.WatchMembershipsRequest, context):
        reject_malformed(request)
        async for item in self.service.watch(list(request.audience_ids), request.start, request.after_sequence):
            if type(item) is SnapshotEnd:
                yield audience_pb2.WatchMembershipsResponse(snapshot_end_sequence=item.sequence)
            else:
                yield audience_pb2.WatchMembershipsResponse(changes=[change_message(c) for c in item])
