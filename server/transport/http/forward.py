"""Ingest from a serving process of ``--workers N``: the events go to the writer over its socket.

A serving process has no writer of its own; its gRPC side forwards
IngestService calls as bytes (transport/proxy.py). Its HTTP side decodes the
Segment JSON here (validation included, for the answer's sake), then sends
the events as one ``TrackBatch`` to the writer, with the caller's key (the
writer checks it again, as for every forwarded call) and request id. The
writer validates and deduplicates again and answers after its commit, so a
200 from a serving process means durable exactly as it does from the writer.

An error the writer answers is raised here as the domain error of the same
reason (found among the domain's own error classes), so the HTTP answer is
what the writer's own HTTP listener would have said.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence

import grpc
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from qualify.v1 import event_pb2, ingest_pb2

from ...config.operations import Limits
from ...domain.consistency import decode_token
from ...domain.errors import FieldViolation, QualifyError
from ...domain.events import MAX_EVENT_BYTES, Event, EventRejected, Rejection, RejectionReason
from ...observability.logs import REQUEST_ID
from ...services.ingest import IngestOutcome, IngestService, Rejected

TRACK_BATCH = "/qualify.v1.IngestService/TrackBatch"
TOKEN: contextvars.ContextVar[str | None] = contextvars.ContextVar("qualify_http_token", default=None)


def _struct(values: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def event_to_proto(e: Event) -> event_pb2.Event:
    pb = event_pb2.Event(message_id=e.message_id, type=e.type, name=e.name, user_id=e.user_id,
                         anonymous_id=e.anonymous_id, session_id=e.session_id, previous_id=e.previous_id)
    if e.timestamp_us:
        pb.timestamp.FromMicroseconds(e.timestamp_us)
    for field, values in (("properties", e.properties), ("traits", e.traits), ("context", e.context)):
        if values:
            getattr(pb, field).CopyFrom(_struct(values))
    return pb


def _classes() -> dict[str, type[QualifyError]]:
    seen, todo = {}, [QualifyError]
    while todo:
        cls = todo.pop()
        seen.setdefault(cls.reason, cls)
        todo.extend(cls.__subclasses__())
    return seen


def domain_error(err: grpc.aio.AioRpcError) -> QualifyError:
    """The writer's status as the domain error with its reason (INTERNAL_ERROR when it has none)."""
    status = rpc_status.from_call(err)
    reason, metadata = "INTERNAL_ERROR", {}
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            reason, metadata = info.reason, dict(info.metadata)
    cls = _classes().get(reason, QualifyError)
    return cls(err.details() or "the writer refused the call", metadata=metadata)


class ForwardedIngest:
    """The ingest use case's face (clock_us, check_batch_size, ingest, track) over the writer's socket."""

    def __init__(self, channel: grpc.aio.Channel, limits: Limits, clock_us):
        self.call = channel.unary_unary(TRACK_BATCH, request_serializer=ingest_pb2.TrackBatchRequest.SerializeToString,
                                        response_deserializer=ingest_pb2.TrackBatchResponse.FromString)
        self.limits = limits
        self.clock_us = clock_us
        self.check_batch_size = IngestService(None, (), clock_us, limits).check_batch_size  # one wording

    async def ingest(self, events: Sequence[tuple[Event, int]]) -> IngestOutcome:
        """Too-large events are rejected here (their size is the JSON's); the writer judges the rest."""
        sent, rejected = [], []
        for i, (event, size) in enumerate(events):
            if size > MAX_EVENT_BYTES:
                rejected.append(Rejected(i, event.message_id, Rejection(
                    RejectionReason.TOO_LARGE, f"the event is {size} bytes encoded; the limit is {MAX_EVENT_BYTES}")))
            else:
                sent.append(i)
        metadata = [("x-request-id", REQUEST_ID.get())] if REQUEST_ID.get() else []
        if TOKEN.get():
            metadata.append(("authorization", f"Bearer {TOKEN.get()}"))
        if not sent:
            return IngestOutcome(0, 0, rejected)
        request = ingest_pb2.TrackBatchRequest(events=[event_to_proto(events[i][0]) for i in sent])
        try:
            reply = await self.call(request, metadata=metadata, timeout=30)
        except grpc.aio.AioRpcError as err:
            raise domain_error(err) from None
        rejected += [Rejected(sent[r.index], r.message_id, Rejection(RejectionReason(r.reason), r.description))
                     for r in reply.rejections]
        rejected.sort(key=lambda r: r.index)
        return IngestOutcome(reply.accepted, reply.duplicates, rejected,
                             decode_token(reply.consistency_token, "consistency_token"))

    async def track(self, event: Event, size: int) -> tuple[bool, int]:
        """As IngestService.track: (whether it was a duplicate, the log position after the commit)."""
        outcome = await self.ingest([(event, size)])
        if outcome.rejected:
            r = outcome.rejected[0].rejection
            raise EventRejected(f"the event was rejected: {r.description}",
                                violations=[FieldViolation("event", r.description)],
                                metadata={"rejection": f"REJECTION_REASON_{r.reason.name}",
                                          "message_id": event.message_id})
        return bool(outcome.duplicates), outcome.position
