"""Ingest: validate decoded events, match them to event models, make the good ones durable.

Every event is checked on its own (limits, then the event-model contract),
and a bad one is reported with its reason while its neighbours go on: a
batch never fails because of one event. Matching runs here, beside
validation and off the writer thread; the writer receives ``MatchedEvent``s
and answers once their transaction committed, so every acknowledgement
means durable.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from ..config.operations import Limits
from ..domain.errors import BatchTooLarge, FieldViolation
from ..domain.events import (Event, EventModel, EventRejected, MatchedEvent, Rejection, check_limits,
                             compile_models, matching_models, validate)
from ..domain.ports import EventWriter
from ..observability import metrics


@dataclass(frozen=True, slots=True)
class Rejected:
    """One event left out of a batch: its index in the batch, and why."""

    index: int
    message_id: str
    rejection: Rejection


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    accepted: int
    duplicates: int
    rejected: list[Rejected]
    position: int = 0  # the event log position after the commit (0: nothing was written)


class IngestService:
    """The ingest use case over the writer; one instance per writing process."""

    def __init__(self, writer: EventWriter, models: Sequence[EventModel], clock_us, limits: Limits = Limits()):
        self.writer = writer
        self.models = compile_models(models)
        self.clock_us = clock_us
        self.limits = limits

    def check_batch_size(self, n: int, field: str, which: str = "") -> None:
        limit = self.limits.max_batch_events
        if n > limit:
            raise BatchTooLarge(f"{n} events in one batch{which}; the limit is {limit}",
                                violations=[FieldViolation(field, f"must hold at most {limit} events, not {n}")])

    def _prepare(self, events: Sequence[tuple[Event, int]]) -> tuple[list[MatchedEvent], list[Rejected]]:
        """``events`` are (event, encoded size) pairs; returns the good ones matched, and the rest."""
        now = self.clock_us()
        models = self.models
        max_properties, max_string = self.limits.max_event_properties, self.limits.max_string_bytes
        good: list[MatchedEvent] = []
        rejected: list[Rejected] = []
        for i, (event, size) in enumerate(events):
            rejection = check_limits(event, max_properties, max_string) or validate(event, models, now, size)
            if rejection is not None:
                rejected.append(Rejected(i, event.message_id, rejection))
            else:
                good.append(MatchedEvent(event, tuple(matching_models(event, models)) if len(models) else ()))
        return good, rejected

    async def ingest(self, events: Sequence[tuple[Event, int]]) -> IngestOutcome:
        """Makes the valid events durable; the outcome counts them and lists the rejected."""
        good, rejected = self._prepare(events)
        duplicates = position = 0
        if good:
            result = await self.writer.ingest(good)
            duplicates, position = result.duplicates, result.position
        _count(len(good) - duplicates, duplicates, rejected)
        return IngestOutcome(len(good) - duplicates, duplicates, rejected, position)

    async def track(self, event: Event, size: int) -> tuple[bool, int]:
        """One event, which must be valid (EventRejected otherwise): (was it a duplicate, the log position)."""
        good, rejected = self._prepare([(event, size)])
        if rejected:
            _count(0, 0, rejected)
            r = rejected[0].rejection
            raise EventRejected(f"the event was rejected: {r.description}",
                                violations=[FieldViolation(f"event.{r.field}" if r.field else "event", r.description)],
                                metadata={"rejection": f"REJECTION_REASON_{r.reason.name}", "message_id": event.message_id})
        result = await self.writer.ingest(good)
        _count(1 - result.duplicates, result.duplicates, ())
        return bool(result.duplicates), result.position


def _count(accepted: int, duplicates: int, rejected: Sequence[Rejected]) -> None:
    metrics.events(accepted, duplicates, Counter(r.rejection.reason.name for r in rejected))
