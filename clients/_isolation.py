"""Permanent failures: splitting a failing batch to isolate the bad event, and giving up.

A permanent failure ends the stream without saying which batch in flight
caused it, so every unacknowledged batch is settled on its own through the
unary TrackBatch, halving a part that fails until single events remain:
the good neighbours are acknowledged and an event that fails alone is
reported and dropped (the emitter's docstring, "Retry policy", has the
cost bound). Transient failures on this path are resent after a backoff.
"""

from __future__ import annotations

import logging
import threading

import grpc

from qualify.v1 import event_pb2, ingest_pb2, ingest_pb2_grpc

from ._batching import encoded_size, fitting
from ._call import Metadata
from ._errors import error_from_rpc_error
from ._retry_policy import BATCH, TRANSIENT, failure_kind, is_size_refusal

# One logger for the whole emitter (see _batching).
log = logging.getLogger("qualify.clients.emitter")


class Isolation:
    """EventEmitter's split/isolate methods (a mixin: the state is the emitter's, set in its __init__)."""

    # The emitter's attributes these methods use (annotations only: no class attributes).
    batch_size: int
    max_batch_bytes: int
    call_timeout: float
    last_error: grpc.RpcError | None
    resent: int
    rejected: int
    failed: int
    _held: int
    _stopped: bool
    _unacked: dict[int, list[event_pb2.Event]]
    _cond: threading.Condition
    _stub: ingest_pb2_grpc.IngestServiceStub
    _metadata: Metadata

    def _give_up(self, events: list[event_pb2.Event], err: grpc.RpcError) -> None:
        """Drops events after a permanent failure, reporting each through on_rejection."""
        error = error_from_rpc_error(err)
        reason = error.reason or error.code.name
        log.warning("dropping %d event(s) after a permanent failure: %s", len(events), error)
        with self._cond:
            self.rejected += len(events)
            self.failed += len(events)
            self._held -= len(events)
            self._cond.notify_all()
        for event in events:
            self._report(event, reason, error.message)

    def _settle_alone(self, events: list[event_pb2.Event]) -> None:
        """Sends events with TrackBatch, halving a batch that fails permanently, until each is settled."""
        work = [events]
        retry = 0
        while work and not self._stopped:
            part = work.pop()
            if len(part) > 1 and encoded_size(part) > self.max_batch_bytes:
                # Built before a size refusal lowered the cap: cut it to fit without a refused round trip.
                work += reversed(fitting(part, self.max_batch_bytes))
                continue
            try:
                response = self._stub.TrackBatch(ingest_pb2.TrackBatchRequest(events=part),
                                                 timeout=self.call_timeout, metadata=self._metadata)
            except ValueError:  # the channel was closed by close()
                return
            except grpc.RpcError as err:
                self.last_error = err
                if self._stopped:
                    return
                kind = failure_kind(err)
                if kind == TRANSIENT:
                    work.append(part)
                    self._pause(err, retry)
                    retry += 1
                elif kind == BATCH and len(part) > 1:
                    if is_size_refusal(err):
                        self._learn_from_refusal(part)
                    elif error_from_rpc_error(err).reason == "BATCH_TOO_LARGE":  # a lower [limits] max_batch_events
                        self.batch_size = max(1, min(self.batch_size, len(part) // 2))
                    half = len(part) // 2
                    work += [part[half:], part[:half]]  # the first half is sent first
                    self.resent += len(part)
                else:
                    self._give_up(part, err)
                continue
            retry = 0
            self._settled(part, response.accepted, response.duplicates, response.rejections,
                          response.consistency_token)

    def _isolate(self) -> int:
        """Settles every unacknowledged batch on its own, in order; returns how many events it settled."""
        with self._cond:
            batches = sorted(self._unacked.items())
        settled = 0
        for number, events in batches:
            if self._stopped:
                break
            self._settle_alone(events)
            if self._stopped:
                break  # what is left stays counted as unacknowledged
            with self._cond:
                self._unacked.pop(number, None)
            settled += len(events)
        return settled
