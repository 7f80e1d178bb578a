"""AudienceService.SimulateAudience: decode the span, run the simulation service, encode the timeline."""

from __future__ import annotations

from qualify.v1 import audience_pb2, membership_pb2

from ..services.simulate import SimulateService
from .audience import condition_to_dict
from .errors import reject_malformed
from .watch import timestamp


class Simulation:
    """The SimulateAudience handler (Audiences exposes it)."""

    def __init__(self, service: SimulateService):
        self.service = service

    async def simulate_audience(self, request: audience_pb2.SimulateAudienceRequest, context):
        reject_malformed(request)
        target = request.WhichOneof("target")
        timeline = await self.service.simulate(
            request.id if target == "id" else None,
            condition_to_dict(request.condition) if target == "condition" else None,
            request.start_time.ToMicroseconds() if request.HasField("start_time") else None,
            request.end_time.ToMicroseconds() if request.HasField("end_time") else None,
            request.bucket.ToMicroseconds() if request.HasField("bucket") else None,
            request.sample_size, request.last.ToMicroseconds() if request.HasField("last") else None)
        reply = audience_pb2.SimulateAudienceResponse(
            start_time=timestamp(timeline.start_us), end_time=timestamp(timeline.end_us),
            members_at_start=timeline.members_at_start, events_replayed=timeline.events_replayed,
            buckets=[audience_pb2.SimulatedBucket(start_time=timestamp(b.start_us), members=b.members,
                                                  enters=b.enters, exits=b.exits) for b in timeline.buckets],
            sample=[audience_pb2.SimulatedPerson(person_key=key, changes=[
                membership_pb2.MembershipChange(person_key=key, direction=int(d), effective_time=timestamp(t))
                for d, t in changes]) for key, changes in sorted(timeline.sample.items())])
        if timeline.replayed_from_us is not None:
            reply.replayed_from.CopyFrom(timestamp(timeline.replayed_from_us))
        return reply
