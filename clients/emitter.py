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
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any

import grpc

from qualify.v1 import event_pb2, ingest_pb2, ingest_pb2_grpc

from ._call import CHANNEL_OPTIONS, Backoff, Metadata, Pem, call_metadata, channel_credentials, open_channel, pause

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # the server's limit per batch

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


class _Connection:
    """One StreamEvents call; ``dead`` ends its request generator."""

    __slots__ = ("dead", "call")

    def __init__(self) -> None:
        self.dead = False
        self.call = None


class EventEmitter:
    """Streams events to Qualify in acknowledged batches; see the module docstring.

    Counters (events): ``sent`` (first sends), ``resent`` (sent again after a
    reconnect), ``accepted`` (new in the log), ``duplicates`` (already in the
    log), ``acknowledged`` (``accepted + duplicates``: durable on the server),
    ``rejected``; and ``reconnects``.

    Connection options as for ``Client``: ``api_key`` (a key with the
    ``ingest`` scope), ``tls``, ``root_certificates``, ``certificate_chain``
    and ``private_key``, or ready-made ``credentials``.
    """

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        batch_size: int = 500,
        max_delay: float = 0.05,
        max_queue: int = 100_000,
        max_in_flight: int = 8,
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
        if max_delay < 0:
            raise ValueError("max_delay must be >= 0")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if max_queue < batch_size:
            raise ValueError("max_queue must be at least batch_size")
        self.batch_size = batch_size
        self.max_delay = max_delay
        self.max_queue = max_queue
        self.max_in_flight = max_in_flight
        self.on_rejection = on_rejection
        self._backoff = backoff
        self._metadata = call_metadata(metadata, api_key)
        credentials = channel_credentials(credentials, tls, root_certificates, certificate_chain, private_key)
        self._channel = open_channel(address, credentials, _EMITTER_CHANNEL_OPTIONS)
        self._stub = ingest_pb2_grpc.IngestServiceStub(self._channel)
        self._cond = threading.Condition()
        self._queue: deque[event_pb2.Event] = deque()
        self._first_at = 0.0  # when the oldest queued event arrived (monotonic)
        self._unacked: dict[int, list[event_pb2.Event]] = {}  # batch number -> events, in order
        self._held = 0  # queued + unacknowledged events
        self._next_batch = 1
        self._flushing = 0
        self._closing = False
        self._stopped = False
        self._conn: _Connection | None = None
        self.last_error: grpc.RpcError | None = None
        self.sent = 0
        self.resent = 0
        self.accepted = 0
        self.duplicates = 0
        self.rejected = 0
        self.reconnects = 0
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
            self._queue.append(event)
            self._held += 1
            if len(self._queue) >= self.batch_size or len(self._queue) == 1:
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
        """Flushes (waiting up to ``timeout``), then stops; True if everything was acknowledged.

        Events still unacknowledged after the timeout are dropped; they
        remain counted in ``pending``.
        """
        with self._cond:
            if self._stopped:
                return self._held == 0
            self._closing = True
            self._cond.notify_all()
            done = self._cond.wait_for(lambda: self._held == 0, timeout)
            self._stopped = True
            self._cond.notify_all()
            conn = self._conn
        if conn is not None and conn.call is not None:
            conn.call.cancel()
        self._thread.join()
        self._channel.close()
        return done

    def __enter__(self) -> EventEmitter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- the sending thread ------------------------------------------------------------

    def _requests(self, conn: _Connection):
        """The request stream of one connection: unacknowledged batches first, then new ones."""
        with self._cond:
            resend = list(self._unacked.items())
        for number, events in resend:
            if conn.dead:
                return
            self.resent += len(events)
            yield ingest_pb2.StreamEventsRequest(batch_number=number, events=events)
        while True:
            with self._cond:
                while True:
                    if conn.dead or self._stopped:
                        return
                    if self._closing and self._held == 0:
                        return  # everything acknowledged: half-close, the server ends the stream
                    wait = None
                    if self._queue and len(self._unacked) < self.max_in_flight:
                        due = self._first_at + self.max_delay
                        now = time.monotonic()
                        if len(self._queue) >= self.batch_size or self._flushing or self._closing or now >= due:
                            break
                        wait = due - now
                    self._cond.wait(wait)
                n = min(self.batch_size, len(self._queue))
                events = [self._queue.popleft() for _ in range(n)]
                number = self._next_batch
                self._next_batch += 1
                self._unacked[number] = events
                if self._queue:
                    self._first_at = time.monotonic()  # the rest may have waited already: send soon
            self.sent += n
            yield ingest_pb2.StreamEventsRequest(batch_number=number, events=events)

    def _acknowledge(self, response: ingest_pb2.StreamEventsResponse) -> None:
        with self._cond:
            events = self._unacked.pop(response.batch_number, None)
            if events is None:
                return
            self.accepted += response.accepted
            self.duplicates += response.duplicates
            self.rejected += len(response.rejections)
            self._held -= len(events)
            self._cond.notify_all()
        if response.rejections:
            for r in response.rejections:
                reason = ingest_pb2.RejectionReason.Name(r.reason) if r.reason in _REASONS else str(r.reason)
                event = events[r.index] if r.index < len(events) else None
                log.debug("event %s rejected: %s: %s", r.message_id, reason, r.description)
                if self.on_rejection is not None:
                    try:
                        self.on_rejection(event, reason, r.description)
                    except Exception:  # noqa: BLE001 - a callback must not stop delivery
                        log.exception("on_rejection callback failed")

    def _run(self) -> None:
        retry = 0
        while True:
            with self._cond:
                if self._stopped or (self._closing and self._held == 0):
                    return
                conn = self._conn = _Connection()
            got_ack = False
            try:
                conn.call = self._stub.StreamEvents(self._requests(conn), metadata=self._metadata)
                for response in conn.call:
                    self._acknowledge(response)
                    got_ack = True
                    retry = 0
            except grpc.RpcError as err:
                self.last_error = err
                if not self._stopped:
                    level = logging.WARNING if retry == 0 else logging.DEBUG
                    log.log(level, "event stream failed (%s: %s); reconnecting", err.code(), err.details())
            finally:
                with self._cond:
                    conn.dead = True
                    self._cond.notify_all()
            with self._cond:
                if self._stopped or (self._closing and self._held == 0):
                    return
                if not got_ack:  # the server is unavailable: back off (only close cuts it short)
                    delay = pause(self.last_error, retry, self._backoff) if self.last_error else self._backoff.delay(retry)
                    self._cond.wait_for(lambda: self._stopped, delay)
                    retry += 1
                self.reconnects += 1


_REASONS = frozenset(v.number for v in ingest_pb2.RejectionReason.DESCRIPTOR.values)


def new_message_id() -> str:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits.

    Time-ordered ids keep the server's deduplication index cheap: new keys
    land together at the end of its B-tree instead of one page write each
    (see qualify.server.storage.eventlog). Any unique string works; this is
    the fast kind.
    """
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = ((ms & 0xFFFF_FFFF_FFFF) << 80) | (0x7 << 76) | (((rand >> 62) & 0xFFF) << 64) \
        | (0b10 << 62) | (rand & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def make_event(
    type_: int,
    name: str = "",
    *,
    user_id: str = "",
    anonymous_id: str = "",
    properties: Mapping[str, Any] | None = None,
    traits: Mapping[str, Any] | None = None,
    context: Mapping[str, Any] | None = None,
    timestamp: datetime | float | None = None,
    session_id: str = "",
    previous_id: str = "",
    message_id: str | None = None,
) -> event_pb2.Event:
    """A qualify.v1.Event with a fresh message_id (UUIDv7) and, by default, the current time.

    ``timestamp`` is an aware datetime or seconds since the epoch.
    """
    event = event_pb2.Event(type=type_, name=name, user_id=user_id, anonymous_id=anonymous_id,
                            session_id=session_id, previous_id=previous_id,
                            message_id=message_id or new_message_id())
    if timestamp is None:
        event.timestamp.FromNanoseconds(time.time_ns())
    elif isinstance(timestamp, datetime):
        event.timestamp.FromDatetime(timestamp)
    else:
        event.timestamp.FromNanoseconds(int(timestamp * 1e9))
    if properties:
        event.properties.update(properties)
    if traits:
        event.traits.update(traits)
    if context:
        event.context.update(context)
    return event
