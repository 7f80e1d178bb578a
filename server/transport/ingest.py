"""IngestService: decode events, validate them, hand the good ones to the writer.

Each RPC validates every event on the event loop (cheap, and off the writer
thread), then awaits ``Writer.ingest`` for the valid ones; the reply is sent
only after their transaction committed. A bad event is reported in the reply
and never fails its neighbours.

StreamEvents keeps at most ``MAX_IN_FLIGHT`` batches of one stream between
"read from the stream" and "acknowledged": it does not read the next request
until an acknowledgement has been written, so when the writer falls behind
(its queue is bounded too) gRPC's flow control stops the sender. Batches of
one stream are validated and queued concurrently, so a stream still gets
group commit across its own batches, and acknowledgements leave in batch
order.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence

import grpc
from google.protobuf import struct_pb2

from qualify.v1 import ingest_pb2

from ..domain.errors import BatchTooLarge, FieldViolation, QualifyError
from ..domain.events import (MAX_EVENT_BYTES, Event, EventModel, EventRejected, Rejection, check_limits,
                             compile_models, matching_models, validate)
from ..observability import metrics
from ..config.operations import Limits
from ..storage.writer import Writer, wall_clock_us
from .errors import guarded, internal_status, lenient, reject_malformed, status_of

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 4  # batches per stream between read and acknowledgement

_REJECTION_NAMES = {v.number: v.name for v in ingest_pb2.RejectionReason.DESCRIPTOR.values}


# -- qualify.v1.Event -> domain Event ------------------------------------------------

_SCALARS = frozenset(("string_value", "number_value", "bool_value"))


def _value(v: struct_pb2.Value, _which=struct_pb2.Value.WhichOneof, _scalars=_SCALARS):
    kind = _which(v, "kind")
    if kind in _scalars:
        return getattr(v, kind)
    if kind == "struct_value":
        return {k: _value(x) for k, x in v.struct_value.fields.items()}
    if kind == "list_value":
        return [_value(x) for x in v.list_value.values]
    return None  # null_value, or unset


def struct_to_dict(s: struct_pb2.Struct) -> dict:
    """A Struct as plain values (numbers stay floats: the event model types them)."""
    return {k: _value(v) for k, v in s.fields.items()}


def event_from_proto(pb, received_us: int) -> Event:
    # HasField before touching a Struct: most events carry no traits or
    # context, and skipping them is most of the cost of an empty field.
    has = pb.HasField
    if has("timestamp"):
        ts = pb.timestamp
        timestamp_us = ts.seconds * 1_000_000 + ts.nanos // 1000
    else:
        timestamp_us = 0
    return Event(
        message_id=pb.message_id,
        type=pb.type,
        name=pb.name,
        user_id=pb.user_id,
        anonymous_id=pb.anonymous_id,
        timestamp_us=timestamp_us,
        received_us=received_us,
        properties=struct_to_dict(pb.properties) if has("properties") else {},
        traits=struct_to_dict(pb.traits) if has("traits") else {},
        session_id=pb.session_id,
        previous_id=pb.previous_id,
        context=struct_to_dict(pb.context) if has("context") else {},
    )


class Ingest:
    """Handlers over a Writer; one instance per writing server process."""

    def __init__(self, writer: Writer, models: Sequence[EventModel], clock_us=wall_clock_us,
                 limits: Limits = Limits()):
        self.writer = writer
        self.models = compile_models(models)
        self.clock_us = clock_us
        self.limits = limits

    def _prepare(self, pbs) -> tuple[list[Event], list[tuple[int, Event, Rejection]]]:
        """The valid events (with ``matches`` set), and (batch index, event, why) for the rest."""
        now = self.clock_us()
        models = self.models
        max_properties, max_string = self.limits.max_event_properties, self.limits.max_string_bytes
        good: list[Event] = []
        rejected = []
        for i, pb in enumerate(pbs):
            size = pb.ByteSize()
            if size > MAX_EVENT_BYTES:  # rejected before the (costly) conversion of a huge event
                event = Event(message_id=pb.message_id, type=pb.type)
            else:
                event = event_from_proto(pb, now)
            rejection = check_limits(event, max_properties, max_string) or validate(event, models, now, size)
            if rejection is not None:
                rejected.append((i, event, rejection))
                continue
            event.matches = matching_models(event, models) if len(models) else []
            good.append(event)
        return good, rejected

    async def _ingest(self, pbs) -> tuple[int, int, list[ingest_pb2.EventRejection]]:
        good, rejected = self._prepare(pbs)
        duplicates = 0
        if good:
            result = await self.writer.ingest(good)
            duplicates = result.duplicates
        rejections = [ingest_pb2.EventRejection(index=i, message_id=e.message_id, reason=int(r.reason),
                                                description=r.description) for i, e, r in rejected]
        _count(len(good) - duplicates, duplicates, rejected)
        return len(good) - duplicates, duplicates, rejections

    # -- RPCs -------------------------------------------------------------------------

    async def track(self, request: ingest_pb2.TrackRequest, context) -> ingest_pb2.TrackResponse:
        reject_malformed(request)
        good, rejected = self._prepare([request.event])
        if rejected:
            _count(0, 0, rejected)
            _, _, r = rejected[0]
            name = _REJECTION_NAMES[int(r.reason)]
            raise EventRejected(f"the event was rejected: {r.description}",
                                violations=[FieldViolation(f"event.{r.field}" if r.field else "event", r.description)],
                                metadata={"rejection": name, "message_id": request.event.message_id})
        result = await self.writer.ingest(good)
        _count(1 - result.duplicates, result.duplicates, ())
        return ingest_pb2.TrackResponse(duplicate=bool(result.duplicates))

    async def track_batch(self, request: ingest_pb2.TrackBatchRequest, context) -> ingest_pb2.TrackBatchResponse:
        reject_malformed(request)
        self._check_size(len(request.events), "events")
        accepted, duplicates, rejections = await self._ingest(request.events)
        return ingest_pb2.TrackBatchResponse(accepted=accepted, duplicates=duplicates, rejections=rejections)

    async def stream_events(self, requests, context):
        """Acknowledges each numbered batch once durable, in order; see the module docstring."""
        slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        queue: asyncio.Queue = asyncio.Queue()  # bounded by the semaphore

        async def ack(request):
            accepted, duplicates, rejections = await self._ingest(request.events)
            return ingest_pb2.StreamEventsResponse(batch_number=request.batch_number, accepted=accepted,
                                                   duplicates=duplicates, rejections=rejections)

        async def read():
            try:
                it = requests.__aiter__()
                while True:
                    await slots.acquire()  # not reading is what slows the sender
                    try:
                        request = await it.__anext__()
                    except StopAsyncIteration:
                        queue.put_nowait(None)
                        return
                    try:
                        reject_malformed(request)
                        self._check_size(len(request.events), "events", f" (batch {request.batch_number})")
                    except QualifyError as err:
                        # Earlier batches are still acknowledged (the queue is
                        # in order); then the stream ends with this error.
                        queue.put_nowait(err)
                        return
                    queue.put_nowait(asyncio.ensure_future(ack(request)))
            except BaseException as exc:  # noqa: BLE001 - handed to the writing side
                queue.put_nowait(exc)
                raise

        reader = asyncio.ensure_future(read())
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                response = await item
                yield response
                slots.release()
        except QualifyError as err:
            await context.abort_with_status(status_of(err))
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - the one place surprises are caught
            await context.abort_with_status(internal_status(exc, "IngestService.StreamEvents"))
        finally:
            reader.cancel()
            while not queue.empty():  # batches read but never acknowledged: nothing to answer
                item = queue.get_nowait()
                if isinstance(item, asyncio.Future):
                    item.cancel()

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        def unary(fn, request_type, response_type, name):
            return grpc.unary_unary_rpc_method_handler(
                guarded(name)(fn), request_deserializer=lenient(request_type),
                response_serializer=response_type.SerializeToString)

        return [grpc.method_handlers_generic_handler("qualify.v1.IngestService", {
            "Track": unary(self.track, ingest_pb2.TrackRequest, ingest_pb2.TrackResponse, "IngestService.Track"),
            "TrackBatch": unary(self.track_batch, ingest_pb2.TrackBatchRequest, ingest_pb2.TrackBatchResponse,
                                "IngestService.TrackBatch"),
            "StreamEvents": grpc.stream_stream_rpc_method_handler(
                self.stream_events, request_deserializer=lenient(ingest_pb2.StreamEventsRequest),
                response_serializer=ingest_pb2.StreamEventsResponse.SerializeToString),
        })]


    def _check_size(self, n: int, field: str, which: str = "") -> None:
        limit = self.limits.max_batch_events
        if n > limit:
            raise BatchTooLarge(f"{n} events in one batch{which}; the limit is {limit}",
                                violations=[FieldViolation(field, f"must hold at most {limit} events, not {n}")])


def _count(accepted: int, duplicates: int, rejected) -> None:
    """Metrics: ``rejected`` holds (index, event, Rejection) triples."""
    metrics.events(accepted, duplicates, Counter(r.reason.name for _, _, r in rejected))
