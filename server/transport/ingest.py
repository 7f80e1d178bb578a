"""IngestService over gRPC: decode events, hand them to the ingest use case, encode the answer.

The use case (services/ingest.py) validates every event on the event loop
and awaits the writer for the valid ones; the reply is sent only after their
transaction committed. A bad event is reported in the reply and never fails
its neighbours.

StreamEvents keeps at most ``MAX_IN_FLIGHT`` batches of one stream between
"read from the stream" and "acknowledged": it does not read the next request
until an acknowledgement has been written, so when the writer falls behind
(its queue is bounded too) gRPC's flow control stops the sender. Batches of
one stream are validated and queued concurrently, so a stream still gets
group commit across its own batches, and acknowledgements leave in batch
order.

On graceful shutdown ``drain`` stops every stream's reading at once: the
batches already read are still acknowledged, in order, and then the stream
ends UNAVAILABLE (SHUTTING_DOWN), so the sender resends the rest elsewhere
(or after the restart; message ids make that safe) instead of the server
waiting out its grace period for a stream that never ends.
"""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf import struct_pb2

from qualify.v1 import ingest_pb2

from ..domain.consistency import encode_token
from ..domain.errors import QualifyError, ShuttingDown
from ..domain.events import MAX_EVENT_BYTES, Event
from ..services.ingest import IngestService
from .errors import internal_status, reject_malformed, status_of

MAX_IN_FLIGHT = 4  # batches per stream between read and acknowledgement
_DRAINED = object()  # queued by a stream's reader that drain() stopped


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


def decode_events(pbs, received_us: int) -> list[tuple[Event, int]]:
    """(event, encoded size) pairs; an event over the size limit is not converted (it is rejected by size)."""
    out = []
    for pb in pbs:
        size = pb.ByteSize()
        out.append((Event(message_id=pb.message_id, type=pb.type) if size > MAX_EVENT_BYTES
                    else event_from_proto(pb, received_us), size))
    return out


def event_from_proto(pb, received_us: int) -> Event:
    # HasField before touching a Struct: most events carry no traits or
    # context, and skipping them is most of the cost of an empty field.
    has = pb.HasField
    if has("timestamp"):
        ts = pb.timestamp
        nanos = ts.nanos
        # None: validation rejects it (INVALID_TIMESTAMP) rather than carry nanos into the seconds.
        timestamp_us = ts.seconds * 1_000_000 + nanos // 1000 if 0 <= nanos < 1_000_000_000 else None
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
    """IngestService: decode, the ingest use case, encode."""

    def __init__(self, service: IngestService):
        self.service = service
        self.draining = False
        self._readers: set[asyncio.Task] = set()

    def drain(self) -> None:
        """Graceful shutdown: streams read no more batches; see the module docstring."""
        self.draining = True
        for reader in list(self._readers):
            reader.cancel()

    async def _ingest(self, pbs) -> tuple[int, int, list[ingest_pb2.EventRejection], bytes]:
        outcome = await self.service.ingest(decode_events(pbs, self.service.clock_us()))
        rejections = [ingest_pb2.EventRejection(index=r.index, message_id=r.message_id, reason=int(r.rejection.reason),
                                                description=r.rejection.description) for r in outcome.rejected]
        return outcome.accepted, outcome.duplicates, rejections, encode_token(outcome.position)

    # -- RPCs -------------------------------------------------------------------------

    async def track(self, request: ingest_pb2.TrackRequest, context) -> ingest_pb2.TrackResponse:
        reject_malformed(request)
        [(event, size)] = decode_events([request.event], self.service.clock_us())
        duplicate, position = await self.service.track(event, size)
        return ingest_pb2.TrackResponse(duplicate=duplicate, consistency_token=encode_token(position))

    async def track_batch(self, request: ingest_pb2.TrackBatchRequest, context) -> ingest_pb2.TrackBatchResponse:
        reject_malformed(request)
        self.service.check_batch_size(len(request.events), "events")
        accepted, duplicates, rejections, token = await self._ingest(request.events)
        return ingest_pb2.TrackBatchResponse(accepted=accepted, duplicates=duplicates, rejections=rejections,
                                             consistency_token=token)

    async def stream_events(self, requests, context):
        """Acknowledges each numbered batch once durable, in order; see the module docstring."""
        slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        queue: asyncio.Queue = asyncio.Queue()  # bounded by the semaphore

        async def ack(request):
            accepted, duplicates, rejections, token = await self._ingest(request.events)
            return ingest_pb2.StreamEventsResponse(batch_number=request.batch_number, accepted=accepted,
                                                   duplicates=duplicates, rejections=rejections,
                                                   consistency_token=token)

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
                        self.service.check_batch_size(len(request.events), "events", f" (batch {request.batch_number})")
                    except QualifyError as err:
                        # Earlier batches are still acknowledged (the queue is
                        # in order); then the stream ends with this error.
                        queue.put_nowait(err)
                        return
                    queue.put_nowait(asyncio.ensure_future(ack(request)))
            except asyncio.CancelledError:
                if self.draining:  # what was read is acknowledged first: the queue is in order
                    queue.put_nowait(_DRAINED)
                    return
                raise
            except BaseException as exc:  # noqa: BLE001 - handed to the writing side
                queue.put_nowait(exc)
                raise

        if self.draining:
            await context.abort_with_status(status_of(ShuttingDown("the server is shutting down")))
        reader = asyncio.ensure_future(read())
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if item is _DRAINED:
                    raise ShuttingDown("the server is shutting down; the batches acknowledged are durable, "
                                       "resend the rest")
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
