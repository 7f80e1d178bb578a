"""The emitter's sending thread: one StreamEvents stream, its acknowledgements, and reconnecting.

The thread sends unacknowledged batches again (under their numbers) before
new ones, reconnects with backoff while the server is unavailable, and on
a permanent failure hands the batches in flight to _isolation before the
stream reopens. See the qualify.clients.emitter docstring ("How it works").
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import grpc

from qualify.server.domain.consistency import decode_token
from qualify.v1 import event_pb2, ingest_pb2, ingest_pb2_grpc

from ._call import Backoff, Metadata, pause
from ._retry_policy import BATCH, CALLER, TRANSIENT, failure_kind

# One logger for the whole emitter (see _batching).
log = logging.getLogger("qualify.clients.emitter")

_REASONS = frozenset(v.number for v in ingest_pb2.RejectionReason.DESCRIPTOR.values)


class Connection:
    """One StreamEvents call; ``dead`` ends its request generator."""

    __slots__ = ("dead", "call")

    def __init__(self) -> None:
        self.dead = False
        self.call = None


class StreamSender:
    """EventEmitter's sending-thread methods (a mixin: the state is the emitter's, set in its __init__)."""

    # The emitter's attributes these methods use (annotations only: no class attributes).
    max_delay: float
    max_in_flight: int
    on_rejection: Callable[[event_pb2.Event, str, str], None] | None
    last_error: grpc.RpcError | None
    last_token: bytes
    sent: int
    resent: int
    accepted: int
    duplicates: int
    rejected: int
    reconnects: int
    _backoff: Backoff
    _cond: threading.Condition
    _queue: deque[tuple[event_pb2.Event, int]]
    _first_at: float
    _unacked: dict[int, list[event_pb2.Event]]
    _held: int
    _next_batch: int
    _flushing: int
    _closing: bool
    _stopped: bool
    _limit_known: bool
    _last_position: int
    _conn: Connection | None
    _stub: ingest_pb2_grpc.IngestServiceStub
    _metadata: Metadata

    def _requests(self, conn: Connection):
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
                        if self._full_batch_queued() or self._flushing or self._closing or now >= due:
                            break
                        wait = due - now
                    self._cond.wait(wait)
                events = self._take_batch()
                number = self._next_batch
                self._next_batch += 1
                self._unacked[number] = events
                if self._queue:
                    self._first_at = time.monotonic()  # the rest may have waited already: send soon
            self.sent += len(events)
            yield ingest_pb2.StreamEventsRequest(batch_number=number, events=events)

    def _acknowledge(self, response: ingest_pb2.StreamEventsResponse) -> None:
        with self._cond:
            events = self._unacked.pop(response.batch_number, None)
        if events is not None:
            self._settled(events, response.accepted, response.duplicates, response.rejections,
                          response.consistency_token)

    def _settled(self, events: list[event_pb2.Event], accepted: int, duplicates: int, rejections,
                 token: bytes = b"") -> None:
        """Counts ``events`` as done (acknowledged or rejected) and reports the rejections."""
        # Acknowledgements of several connections may arrive out of commit order: keep the latest position.
        position = decode_token(token) if token else 0
        with self._cond:
            if position > self._last_position:
                self._last_position, self.last_token = position, token
            self.accepted += accepted
            self.duplicates += duplicates
            self.rejected += len(rejections)
            self._held -= len(events)
            self._cond.notify_all()
        for r in rejections:
            reason = ingest_pb2.RejectionReason.Name(r.reason) if r.reason in _REASONS else str(r.reason)
            event = events[r.index] if r.index < len(events) else None
            log.debug("event %s rejected: %s: %s", r.message_id, reason, r.description)
            self._report(event, reason, r.description)

    def _report(self, event: event_pb2.Event | None, reason: str, text: str) -> None:
        if self.on_rejection is not None:
            try:
                self.on_rejection(event, reason, text)
            except Exception:  # noqa: BLE001 - a callback must not stop delivery
                log.exception("on_rejection callback failed")

    def _pause(self, err: grpc.RpcError | None, retry: int) -> None:
        """Backs off before retry ``retry``; only close cuts it short."""
        delay = pause(err, retry, self._backoff) if err is not None else self._backoff.delay(retry)
        with self._cond:
            self._cond.wait_for(lambda: self._stopped, delay)

    def _finished(self) -> bool:
        return self._stopped or (self._closing and self._held == 0)

    def _run(self) -> None:
        retry = 0
        while True:
            if not self._limit_known and not self._stopped:
                self._learn_limit()
            with self._cond:
                if self._finished():
                    return
                conn = self._conn = Connection()
            got_ack = False
            kind = None
            try:
                conn.call = self._stub.StreamEvents(self._requests(conn), metadata=self._metadata)
                for response in conn.call:
                    self._acknowledge(response)
                    got_ack = True
                    retry = 0
            except grpc.RpcError as err:
                self.last_error = err
                if not self._stopped:
                    kind = failure_kind(err)
                    level = logging.WARNING if retry == 0 else logging.DEBUG
                    log.log(level, "event stream failed (%s: %s); %s", err.code(), err.details(),
                            "reconnecting" if kind == TRANSIENT else "sending its batches one by one")
            except ValueError:  # the channel was closed by close()
                pass
            finally:
                with self._cond:
                    conn.dead = True
                    self._cond.notify_all()
            if self._finished():
                return
            if kind in (CALLER, BATCH):
                # Resending the stream as it was would fail the same way.
                if self._isolate() == 0:
                    self._pause(self.last_error, retry)  # nothing to blame (refused at the start): back off
                    retry += 1
                    with self._cond:  # and reopen only when there is something to send
                        self._cond.wait_for(lambda: self._queue or self._finished())
                if self._finished():
                    return
            elif not got_ack:  # the server is unavailable: back off (only close cuts it short)
                self._pause(self.last_error, retry)
                retry += 1
            self.reconnects += 1
