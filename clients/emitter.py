"""EventEmitter: queue events and stream them to IngestService.StreamEvents.

For edge gateways and backends that produce events continuously:

>>> from qualify.clients import EventEmitter
>>> with EventEmitter("127.0.0.1:50051") as emitter:
...     emitter.page("Pricing", user_id="user-42", properties={"path": "/pricing"})
...     emitter.track("Product Viewed", anonymous_id="anon-7", properties={"sku": "A-1"})
... # leaving the block flushes: every event acknowledged (durable) or reported

How it works. ``emit`` appends to a bounded in-memory queue and returns. One
background thread holds one ``StreamEvents`` stream and sends the queue in
numbered batches: a batch leaves when it has ``batch_size`` events or when its
oldest event has waited ``max_delay`` seconds (or at once on ``flush``). At most
``max_in_flight`` batches wait for their acknowledgement; the server
acknowledges each once durable. Unacknowledged batches are kept, and when the
stream breaks (the server restarts, the network drops) the thread reconnects,
with exponential backoff and full jitter while the server is unavailable, and
sends them again, under their original numbers, before anything new. The
server drops a message_id it has seen within 24 hours, so an event that was
committed just before the break is not logged twice: ``duplicates`` counts
those. Rejected events (bad type, missing identity, ...) are not retried; they
go to ``on_rejection(event, reason, description)``.

Batch size. A batch holds at most ``batch_size`` events and at most
``max_batch_bytes`` of encoded events. By default that cap is 90% of the
server's ``max_message_bytes`` (asked once with ``GetServerInfo``; 4 MiB, the
server's default, when it does not say, or refuses, e.g. to a key without the
admin scope): gRPC refuses a larger message before the server reads it. An
event bigger than the cap travels alone.

Retry policy. A failure is either transient, and resending can fix it, or
permanent, and resending the same events cannot:
  * transient: UNAVAILABLE (no server, NOT_READY, STORAGE_UNAVAILABLE),
    DEADLINE_EXCEEDED, CANCELLED, ABORTED, and RESOURCE_EXHAUSTED with the
    reason RATE_LIMITED, TOO_MANY_STREAMS or RESOURCE_EXHAUSTED (overload).
    The batches are resent after a backoff (full jitter, at least the
    server's RetryInfo), for as long as the emitter is open;
  * permanent, about the caller: UNAUTHENTICATED, PERMISSION_DENIED,
    UNIMPLEMENTED. No part of the batch can succeed: every event in it goes
    to ``on_rejection`` and is dropped;
  * permanent, about the batch: anything else (INVALID_ARGUMENT, INTERNAL,
    UNKNOWN, RESOURCE_EXHAUSTED without a reason, which is gRPC's "message
    larger than max"...). One bad event fails its whole batch, so the batch
    is split in halves, down to single events, to isolate it: the good
    neighbours are acknowledged, and an event that fails alone goes to
    ``on_rejection`` (the reason is the ErrorInfo reason, e.g.
    "INTERNAL_ERROR", or the status code's name) and is dropped. A size
    refusal also lowers ``max_batch_bytes`` to half the refused batch, so
    later batches fit a server whose limit was not known.
A permanent failure ends the stream, and which of the batches in flight
caused it is not known, so every unacknowledged batch is then settled on
its own through the unary ``TrackBatch`` (same deduplication, same
acknowledgement), splitting as above, before the stream reopens. A
permanent failure therefore costs an event at most log2(batch_size) + 2
sends; nothing loops forever: transient failures are retried only until
``close``'s bound. (A BATCH_TOO_LARGE answer also lowers ``batch_size``.)

Closing. ``close()`` (and leaving the ``with`` block) flushes for at most
``close_timeout`` seconds (default 10), then stops. Events still
unacknowledged at that bound are dropped: ``unacknowledged`` counts them and
a warning is logged.

Delivery is at least once from the emitter and exactly once in the server's
log, for as long as the process lives: the queue is in memory, so events not
yet acknowledged when the process dies are lost (``close`` flushes).

The queue holds at most ``max_queue`` events, counting those sent but not yet
acknowledged. When it is full, ``emit`` blocks until there is room (the
server's flow control reaches the producer this way); with ``block=False``, or
once ``timeout`` seconds have passed, it raises ``queue.Full`` instead.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import grpc

from qualify.v1 import diagnostics_pb2_grpc, event_pb2, ingest_pb2_grpc

from ._batching import DEFAULT_MAX_MESSAGE_BYTES, EVENT_OVERHEAD, MAX_BATCH, BatchAssembly, cap_for
from ._call import CHANNEL_OPTIONS, Backoff, Metadata, Pem, call_metadata, channel_credentials, open_channel
from ._events import make_event
from ._events import new_message_id as new_message_id  # re-exported: this module was its home
from ._isolation import Isolation
from ._retry_policy import BATCH as BATCH, CALLER as CALLER, TRANSIENT as TRANSIENT  # re-exported, as above
from ._retry_policy import failure_kind as failure_kind  # re-exported, as above
from ._stream import Connection, StreamSender

log = logging.getLogger(__name__)

RejectionCallback = Callable[[event_pb2.Event, str, str], None]

# Reconnect quickly once the server is back: gRPC's default reconnect backoff
# (1 s growing to 120 s) would keep the channel failing calls long after the
# server returned. Our own backoff paces the attempts.
_EMITTER_CHANNEL_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

# EventEmitter's machinery lives in mixins over the one object's state, by
# concern, so that each module stays readable: _stream (the sending thread),
# _isolation (splitting batches after a permanent failure), _batching (batch
# assembly by count and bytes); _retry_policy classifies the failures.
class EventEmitter(StreamSender, Isolation, BatchAssembly):
    """Streams events to Qualify in acknowledged batches; see the module docstring.

    Batches hold at most ``batch_size`` events and ``max_batch_bytes`` bytes
    (default: 90% of the server's max_message_bytes from GetServerInfo, else
    of 4 MiB). Transient failures (UNAVAILABLE, DEADLINE_EXCEEDED, the
    RATE_LIMITED and STORAGE_UNAVAILABLE reasons, ...) are resent with
    backoff while the emitter is open. Permanent ones are never resent as
    they were: a batch is split in halves down to single events, and an
    event that fails alone, or any event refused for the caller's key
    (UNAUTHENTICATED, PERMISSION_DENIED), goes to ``on_rejection(event,
    reason, text)`` and is dropped. ``close()`` and the context manager end
    within ``close_timeout`` seconds (default 10); what is unacknowledged
    then is counted in ``unacknowledged`` and logged as a warning.

    Counters (events): ``sent`` (first sends), ``resent`` (sent again after a
    reconnect or to isolate a bad event), ``accepted`` (new in the log),
    ``duplicates`` (already in the log), ``acknowledged`` (``accepted +
    duplicates``: durable on the server), ``rejected`` (reported through
    ``on_rejection``), of which ``failed`` were given up after a permanent
    error; ``unacknowledged`` (dropped by ``close``); and ``reconnects``.

    Connection options as for ``Client``: ``api_key`` (a key with the
    ``ingest`` scope), ``tls``, ``root_certificates``, ``certificate_chain``
    and ``private_key``, or ready-made ``credentials``.
    """

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        batch_size: int = 500,
        max_batch_bytes: int | None = None,
        max_delay: float = 0.05,
        max_queue: int = 100_000,
        max_in_flight: int = 8,
        close_timeout: float = 10.0,
        call_timeout: float = 10.0,
        on_rejection: RejectionCallback | None = None,
        backoff: Backoff = Backoff(base=0.05, cap=2.0),
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Metadata | None = None,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: Pem | None = None,
        certificate_chain: Pem | None = None,
        private_key: Pem | None = None,
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be from 1 to {MAX_BATCH}")
        if max_batch_bytes is not None and max_batch_bytes < 1:
            raise ValueError("max_batch_bytes must be >= 1")
        if max_delay < 0:
            raise ValueError("max_delay must be >= 0")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if max_queue < batch_size:
            raise ValueError("max_queue must be at least batch_size")
        if close_timeout < 0 or call_timeout <= 0:
            raise ValueError("close_timeout must be >= 0 and call_timeout > 0")
        self.batch_size = batch_size
        #: The byte cap per batch; learned from the server unless given.
        self.max_batch_bytes = max_batch_bytes or cap_for(DEFAULT_MAX_MESSAGE_BYTES)
        self._limit_known = max_batch_bytes is not None  # given, or asked already
        self.max_delay = max_delay
        self.max_queue = max_queue
        self.max_in_flight = max_in_flight
        self.close_timeout = close_timeout
        self.call_timeout = call_timeout
        self.on_rejection = on_rejection
        self._backoff = backoff
        self._metadata = call_metadata(metadata, api_key)
        credentials = channel_credentials(credentials, tls, root_certificates, certificate_chain, private_key)
        self._channel = open_channel(address, credentials, _EMITTER_CHANNEL_OPTIONS)
        self._stub = ingest_pb2_grpc.IngestServiceStub(self._channel)
        self._diagnostics = diagnostics_pb2_grpc.DiagnosticsServiceStub(self._channel)
        self._cond = threading.Condition()
        self._queue: deque[tuple[event_pb2.Event, int]] = deque()  # (event, encoded size)
        self._queued_bytes = 0
        self._first_at = 0.0  # when the oldest queued event arrived (monotonic)
        self._unacked: dict[int, list[event_pb2.Event]] = {}  # batch number -> events, in order
        self._held = 0  # queued + unacknowledged events
        self._next_batch = 1
        self._flushing = 0
        self._closing = False
        self._stopped = False
        self._conn: Connection | None = None
        self.last_error: grpc.RpcError | None = None
        self.sent = 0
        self.resent = 0
        self.accepted = 0
        self.duplicates = 0
        self.rejected = 0
        self.failed = 0
        self.unacknowledged = 0
        self.reconnects = 0
        #: The consistency_token of the latest write acknowledged (b"": none yet):
        #: pass it as min_token to a read to see every event acknowledged so far.
        self.last_token = b""
        self._last_position = 0
        self._thread = threading.Thread(target=self._run, name="qualify-emitter", daemon=True)
        self._thread.start()

    # -- producing ---------------------------------------------------------------------

    @property
    def acknowledged(self) -> int:
        return self.accepted + self.duplicates

    @property
    def pending(self) -> int:
        """Events queued or sent but not acknowledged yet."""
        return self._held

    def emit(self, event: event_pb2.Event, *, block: bool = True, timeout: float | None = None) -> None:
        """Queues one event (sent as is: set message_id, type and an identity).

        Blocks while the queue is full; raises queue.Full when ``block`` is
        False or ``timeout`` passes first, RuntimeError after ``close``.
        """
        size = event.ByteSize() + EVENT_OVERHEAD  # outside the lock: a big event takes a while
        with self._cond:
            if self._closing:
                raise RuntimeError("the emitter is closed")
            if self._held >= self.max_queue:
                if not block:
                    raise queue.Full("the emitter's queue is full")
                if not self._cond.wait_for(lambda: self._held < self.max_queue or self._closing, timeout):
                    raise queue.Full(f"the emitter's queue stayed full for {timeout} s")
                if self._closing:
                    raise RuntimeError("the emitter is closed")
            if not self._queue:
                self._first_at = time.monotonic()
            self._queue.append((event, size))
            self._queued_bytes += size
            self._held += 1
            if len(self._queue) == 1 or self._full_batch_queued():
                self._cond.notify_all()

    def track(self, name: str, *, user_id: str = "", anonymous_id: str = "",
              properties: Mapping[str, Any] | None = None, **kw: Any) -> str:
        """Emits a track event; returns its message_id. See ``make_event`` for the other fields."""
        return self._emit(event_pb2.EVENT_TYPE_TRACK, name, user_id, anonymous_id, properties=properties, **kw)

    def page(self, name: str = "", *, user_id: str = "", anonymous_id: str = "",
             properties: Mapping[str, Any] | None = None, **kw: Any) -> str:
        """Emits a page view (put the path in ``properties["path"]``); returns its message_id."""
        return self._emit(event_pb2.EVENT_TYPE_PAGE, name, user_id, anonymous_id, properties=properties, **kw)

    def screen(self, name: str = "", *, user_id: str = "", anonymous_id: str = "",
               properties: Mapping[str, Any] | None = None, **kw: Any) -> str:
        """Emits a screen view; returns its message_id."""
        return self._emit(event_pb2.EVENT_TYPE_SCREEN, name, user_id, anonymous_id, properties=properties, **kw)

    def identify(self, user_id: str = "", *, anonymous_id: str = "", traits: Mapping[str, Any] | None = None,
                 **kw: Any) -> str:
        """Emits an identify (links anonymous_id to user_id); returns its message_id."""
        return self._emit(event_pb2.EVENT_TYPE_IDENTIFY, "", user_id, anonymous_id, traits=traits, **kw)

    def alias(self, user_id: str, previous_id: str, **kw: Any) -> str:
        """Emits an alias (merges previous_id into user_id); returns its message_id."""
        return self._emit(event_pb2.EVENT_TYPE_ALIAS, "", user_id, "", previous_id=previous_id, **kw)

    def _emit(self, type_: int, name: str, user_id: str, anonymous_id: str, *, block: bool = True,
              timeout: float | None = None, **fields: Any) -> str:
        event = make_event(type_, name, user_id=user_id, anonymous_id=anonymous_id, **fields)
        self.emit(event, block=block, timeout=timeout)
        return event.message_id

    def flush(self, timeout: float | None = None) -> bool:
        """Sends everything queued now and waits for the acknowledgements; False on timeout."""
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: self._held == 0 or self._stopped, timeout) and self._held == 0
            finally:
                self._flushing -= 1

    def close(self, timeout: float | None = None) -> bool:
        """Flushes for at most ``timeout`` (default ``close_timeout``) seconds, then stops.

        Returns True if everything was acknowledged or reported. Events still
        unacknowledged at the bound are dropped: they are counted in
        ``unacknowledged`` (and stay in ``pending``) and a warning is logged.
        """
        bound = self.close_timeout if timeout is None else timeout
        with self._cond:
            if self._stopped:
                return self._held == 0
            self._closing = True
            self._cond.notify_all()
            done = self._cond.wait_for(lambda: self._held == 0, bound)
            self._stopped = True
            self.unacknowledged = self._held
            self._cond.notify_all()
            conn = self._conn
        if not done:
            log.warning("EventEmitter closed after %.1f s with %d events unacknowledged; they are dropped",
                        bound, self.unacknowledged)
        if conn is not None and conn.call is not None:
            conn.call.cancel()
        self._channel.close()  # also cancels a TrackBatch or GetServerInfo in flight
        self._thread.join(1.0)
        return done

    def __enter__(self) -> EventEmitter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
