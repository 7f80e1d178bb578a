"""Audiences: definitions in, membership answers out.

Definitions arrive as the JSON form of ``qualify.v1.Condition`` (the
project file's and the domain's form). Changes run on the writer thread, in
order with ingest and timers, and return at once: a new definition's
members come from a backfill in bounded slices beside ingest (the audience
is BACKFILLING until it ends, then LIVE; see domain/backfill.py). Reads (get, list, check, members) are
answered from read transactions of what has committed, on the caller's
thread, and explanations and previews from read transactions on threads of
their own: they never wait behind the writer's queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import time
from dataclasses import dataclass

from ..domain.conditions import parse_condition
from ..domain.audiences import Audience, check_audience_id
from ..domain.errors import AudienceNotFound, FieldViolation, InvalidRequest, PreviewTooSlow
from ..domain.ports import AudienceReads, Jobs, Positions
from .consistency import wait_visible

MAX_PAGE = 1000
MAX_SAMPLE = 100


def check_target(audience_id: str | None, draft: dict | None, sample: int) -> None:
    """A preview's or a simulation's request: a saved audience or a draft, and a sample size in range."""
    if not 0 <= sample <= MAX_SAMPLE:
        raise InvalidRequest("sample_size out of range",
                             violations=[FieldViolation("sample_size", f"must be from 0 to {MAX_SAMPLE}")])
    if audience_id is None and draft is None:
        raise InvalidRequest("set id or condition", violations=[FieldViolation("target", "set id or condition")])
PREVIEW_THREADS = 1  # previews at once: each holds a read snapshot and shares the interpreter with ingest
UPDATABLE = frozenset({"display_name", "description", "condition"})


@dataclass(frozen=True)
class AudienceInfo:
    """An audience's definition (as given) and how many members it has now."""

    id: str
    display_name: str
    description: str
    definition: dict
    create_us: int
    update_us: int
    member_count: int
    backfill: float | None = None  # None: LIVE; else BACKFILLING, this far (0 to 1)

    @classmethod
    def of(cls, record: dict, count: int) -> "AudienceInfo":
        return cls(record["id"], record["display_name"], record["description"], record["condition"],
                   record["create_us"], record["update_us"], max(0, count), record.get("backfill"))


def page_size(n: int, maximum: int, default: int | None = None) -> int:
    """A requested page size (0: ``default``, or else the maximum), never above ``maximum``."""
    if n < 0:
        raise InvalidRequest("page_size is negative", violations=[FieldViolation("page_size", "must not be negative")])
    return min(n or default or maximum, maximum)


def update_paths(paths: set[str], definition: dict | None) -> set[str]:
    """The fields an update replaces (an empty mask: every updatable one), checked."""
    paths = paths or set(UPDATABLE)
    unknown = paths - UPDATABLE
    if unknown:
        raise InvalidRequest("update_mask names fields that cannot be updated",
                             violations=[FieldViolation("update_mask.paths", f"{p!r} is not updatable")
                                         for p in sorted(unknown)])
    if "condition" in paths and definition is None:
        raise InvalidRequest("audience.condition is required",
                             violations=[FieldViolation("audience.condition", "is required when updated")])
    return paths


def _require_person(person_key: str) -> None:
    if not person_key:
        raise InvalidRequest("person_key is empty", violations=[FieldViolation("person_key", "is required")])


class AudienceService:
    """The audience use cases over the engine, through the writer thread."""

    def __init__(self, engine, jobs: Jobs, reads: AudienceReads, clock, positions: Positions | None = None,
                 preview_seconds: float = 10.0):
        self.engine = engine
        self.jobs = jobs
        self.reads = reads
        self.clock = clock
        self.positions = positions  # what a CheckMembership min_token waits for
        self.preview_seconds = preview_seconds
        self._previews = concurrent.futures.ThreadPoolExecutor(PREVIEW_THREADS, thread_name_prefix="qualify-preview")

    async def _run(self, fn):
        return await asyncio.wrap_future(self.jobs.submit(fn))

    def _info(self, audience: Audience) -> AudienceInfo:
        backfilling, progress = self.engine.audience_state(audience.id)
        return AudienceInfo.of({**audience.record(), "backfill": progress if backfilling else None},
                               self.engine.counts.get(audience.id, 0))

    async def create(self, audience_id: str, display_name: str, description: str, definition: dict | None) -> AudienceInfo:
        check_audience_id(audience_id)
        if definition is None:
            raise InvalidRequest("audience.condition is required",
                                 violations=[FieldViolation("audience.condition", "is required")])
        audience, _ = await self._run(lambda txn: self.engine.put_audience(
            txn, audience_id, display_name, description, definition, self.clock(), create=True))
        return self._info(audience)

    async def update(self, audience_id: str, paths: set[str], display_name: str, description: str,
                     definition: dict | None) -> AudienceInfo:
        """Replaces the fields named in ``paths`` (empty: every updatable field)."""
        paths = update_paths(paths, definition)

        def update(txn):
            current = self.engine.audience(audience_id)
            return self.engine.put_audience(
                txn, audience_id,
                display_name if "display_name" in paths else current.display_name,
                description if "description" in paths else current.description,
                definition if "condition" in paths else current.definition,
                self.clock(), create=False)

        audience, _ = await self._run(update)
        return self._info(audience)

    async def delete(self, audience_id: str) -> None:
        await self._run(lambda txn: self.engine.delete_audience(txn, audience_id, self.clock()))

    async def get(self, audience_id: str) -> AudienceInfo:
        record, count = self.reads.audience(audience_id)
        if record is None:
            raise AudienceNotFound(f"no audience {audience_id!r}", metadata={"audience": audience_id})
        return AudienceInfo.of(record, count)

    async def list(self, size: int, token: str) -> tuple[list[AudienceInfo], str]:
        """A page of audiences in id order after ``token``, and the next page's token ("" at the end)."""
        size = page_size(size, 100)
        audiences = [AudienceInfo.of(r, c) for r, c in self.reads.all()]  # in id order (LMDB key order)
        page = [a for a in audiences if a.id > token][:size]
        more = len(page) == size and any(a.id > page[-1].id for a in audiences)
        return page, page[-1].id if more else ""

    async def preview(self, audience_id: str | None, draft: dict | None, sample: int) -> tuple[int, list[str]]:
        """How many people qualify now under a saved audience or a draft definition, and some of their keys.

        It runs on a read snapshot in a pool of PREVIEW_THREADS, beside
        ingest (never on the writer), and gives up after ``preview_seconds``.
        """
        check_target(audience_id, draft, sample)
        if draft is None:
            condition = self.engine.audience(audience_id).condition
        else:
            condition = parse_condition(draft, self.engine.attribute_types, self.engine.event_model_props)
        now, deadline = self.clock(), time.monotonic() + self.preview_seconds
        run = functools.partial(self.reads.read, lambda txn: self.engine.preview(txn, condition, now, sample, deadline))
        try:
            return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self._previews, run),
                                          self.preview_seconds)
        except asyncio.TimeoutError:  # still queued behind other previews (a running one stops at its deadline)
            raise PreviewTooSlow(f"the preview did not finish within {self.preview_seconds:g}s") from None

    async def check(self, person_key: str, audience_ids: list[str], min_token: bytes = b"",
                    budget: float = 0.0) -> list[tuple[str, int]]:
        """(audience, enter time) of each named audience (none named: every audience) the person is in.

        With ``min_token``, once the log position it names is committed
        (waiting at most ``budget`` seconds): evaluation commits with the
        events, so the read that follows sees it.
        """
        _require_person(person_key)
        if min_token and self.positions is not None:
            await wait_visible(self.positions, min_token, budget)
        missing, found = self.reads.memberships(person_key, audience_ids)
        if missing:
            raise AudienceNotFound(f"no audience {missing[0]!r}", metadata={"audience": missing[0]})
        return found

    async def list_members(self, audience_id: str, size: int, token: str) -> tuple[list[str], str]:
        exists, keys, next_token = self.reads.list_members(audience_id, token, page_size(size, MAX_PAGE))
        if not exists:
            raise AudienceNotFound(f"no audience {audience_id!r}", metadata={"audience": audience_id})
        return keys, next_token

    async def explain(self, audience_id: str, person_key: str) -> tuple[bool, dict]:
        _require_person(person_key)
        now = self.clock()
        return await asyncio.to_thread(self.reads.read, lambda txn: self.engine.explain(txn, audience_id, person_key, now))
