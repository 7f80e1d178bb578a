"""Batch assembly for the emitter: how many events, and how many bytes, go in one batch.

A batch holds at most ``batch_size`` events and ``max_batch_bytes`` of
encoded events; the byte cap is learned from the server's
max_message_bytes (GetServerInfo) or from a size refusal. See the
qualify.clients.emitter docstring ("Batch size") for the whole story.
"""

from __future__ import annotations

import logging
from collections import deque

import grpc

from qualify.v1 import diagnostics_pb2, diagnostics_pb2_grpc, event_pb2

from ._call import Metadata
from ._retry_policy import TRANSIENT, failure_kind

# One logger for the whole emitter, whichever of its modules logs: a
# deployment that tunes "qualify.clients.emitter" keeps seeing everything.
log = logging.getLogger("qualify.clients.emitter")

MAX_BATCH = 1000  # the server's limit per batch
#: The server's max_message_bytes when it does not say (its default, 4 MiB).
DEFAULT_MAX_MESSAGE_BYTES = 4 << 20
# Per event in a batch message: the field's tag (1 byte) and length (up to 5).
EVENT_OVERHEAD = 6
# The smallest cap a size refusal can teach: below this the server could not
# take one full-sized event (32 KB) anyway, and single events go alone.
MIN_LEARNED_BYTES = 1024


class BatchAssembly:
    """EventEmitter's batch-sizing methods (a mixin: the state is the emitter's, set in its __init__)."""

    # The emitter's attributes these methods use (annotations only: no class attributes).
    batch_size: int
    max_batch_bytes: int
    call_timeout: float
    _limit_known: bool
    _queue: deque[tuple[event_pb2.Event, int]]
    _queued_bytes: int
    _diagnostics: diagnostics_pb2_grpc.DiagnosticsServiceStub
    _metadata: Metadata

    def _full_batch_queued(self) -> bool:
        return len(self._queue) >= self.batch_size or self._queued_bytes >= self.max_batch_bytes

    def _take_batch(self) -> list[event_pb2.Event]:
        """Up to batch_size events and max_batch_bytes from the queue (at least one); under the lock."""
        events: list[event_pb2.Event] = []
        size = 0
        cap = self.max_batch_bytes
        while self._queue and len(events) < self.batch_size:
            event, n = self._queue[0]
            if events and size + n > cap:
                break
            self._queue.popleft()
            events.append(event)
            size += n
        self._queued_bytes -= size
        return events

    def _learn_limit(self) -> None:
        """Sizes batches below the server's max_message_bytes, asked once (see the module docstring)."""
        try:
            info = self._diagnostics.GetServerInfo(diagnostics_pb2.GetServerInfoRequest(),
                                                   timeout=min(self.call_timeout, 2.0), metadata=self._metadata)
        except grpc.RpcError as err:
            if failure_kind(err) != TRANSIENT:  # e.g. PERMISSION_DENIED: a key without admin; keep the default
                self._limit_known = True
            log.debug("GetServerInfo failed (%s); batches stay under %d bytes", err.code(), self.max_batch_bytes)
            return
        except ValueError:  # the channel was closed by close()
            return
        self._limit_known = True
        if info.max_message_bytes:  # 0: a server that does not say
            self.max_batch_bytes = min(self.max_batch_bytes, cap_for(info.max_message_bytes))

    def _learn_from_refusal(self, events: list[event_pb2.Event]) -> None:
        size = encoded_size(events)
        cap = max(MIN_LEARNED_BYTES, size // 2)
        if cap < self.max_batch_bytes:
            log.info("the server refused a %d-byte batch as too large; batches now stay under %d bytes", size, cap)
            self.max_batch_bytes = cap


def encoded_size(events: list[event_pb2.Event]) -> int:
    return sum(e.ByteSize() + EVENT_OVERHEAD for e in events)


def fitting(events: list[event_pb2.Event], cap: int) -> list[list[event_pb2.Event]]:
    """``events`` in order, cut into runs of at most ``cap`` bytes (an event bigger than the cap alone)."""
    runs: list[list[event_pb2.Event]] = [[]]
    size = 0
    for event in events:
        n = event.ByteSize() + EVENT_OVERHEAD
        if runs[-1] and size + n > cap:
            runs.append([])
            size = 0
        runs[-1].append(event)
        size += n
    return runs


def cap_for(max_message_bytes: int) -> int:
    """The batch byte cap under a server limit: 10% headroom for the message's own fields."""
    return max(1, max_message_bytes * 9 // 10)
