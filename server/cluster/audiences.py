"""The cluster's audience catalog: definitions in ``qualify-audiences``, changes fanned out to every partition.

A definition is stored under its id with compare-and-set (create: the key
must be absent or a tombstone; update and delete: the revision read). A
delete writes a tombstone ``{"deleted": true}`` rather than a key-value
delete, so every version, the delete included, has a revision. The
revision orders the versions of one audience: each partition applies a
version once, in its stream's order, when the control message carrying
it arrives (cluster/apply.py), so every replay of a partition sees the
audience change at the same point among its events.

The node that took the API call publishes the control message to every
partition before answering: events sent after the answer are evaluated
with the new definition on every partition. If it dies halfway, owners
repair: each compares the catalog with the revisions its partitions
applied and publishes what is missing (``repair``), and the revision check
makes any repeat harmless.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from ..domain.errors import AudienceExists, AudienceNotFound, FieldViolation, StorageUnavailable
from .jetstream import Resources, events_subject
from .messages import MSG_ID, Kind, control

log = logging.getLogger(__name__)

REPAIR_AFTER = 5.0  # seconds a version may take to reach every partition before owners repair it


class AudienceCatalog:
    def __init__(self, res: Resources, clock):
        self.res = res
        self.clock = clock

    async def _get(self, audience_id: str):
        try:
            entry = await self.res.audiences.get(audience_id)
        except KeyNotFoundError:
            return None, 0
        record = json.loads(entry.value)
        return (None if record.get("deleted") else record), entry.revision

    async def get(self, audience_id: str) -> tuple[dict, int]:
        record, revision = await self._get(audience_id)
        if record is None:
            raise AudienceNotFound(f"no audience {audience_id!r}", metadata={"audience": audience_id})
        return record, revision

    async def create(self, record: dict) -> int:
        current, revision = await self._get(record["id"])
        if current is not None:
            raise AudienceExists(f"audience {record['id']!r} already exists",
                                 violations=[FieldViolation("audience.id", "already exists")])
        try:
            if revision:  # a tombstone: the id was used before
                revision = await self.res.audiences.update(record["id"], json.dumps(record).encode(), last=revision)
            else:
                revision = await self.res.audiences.create(record["id"], json.dumps(record).encode())
        except KeyWrongLastSequenceError:
            raise AudienceExists(f"audience {record['id']!r} already exists",
                                 violations=[FieldViolation("audience.id", "already exists")]) from None
        await self.fan_out(record["id"], revision, "put", record)
        return revision

    async def update(self, record: dict, revision: int) -> int:
        """Replaces the version read at ``revision``; AudienceNotFound if it changed meanwhile (or went)."""
        try:
            new = await self.res.audiences.update(record["id"], json.dumps(record).encode(), last=revision)
        except KeyWrongLastSequenceError:
            raise StorageUnavailable(f"audience {record['id']!r} was changed by another call at the same time; "
                                     "read it again and retry") from None
        await self.fan_out(record["id"], new, "put", record)
        return new

    async def delete(self, audience_id: str) -> None:
        record, revision = await self.get(audience_id)
        try:
            new = await self.res.audiences.update(audience_id, json.dumps({"id": audience_id, "deleted": True}).encode(),
                                                  last=revision)
        except KeyWrongLastSequenceError:
            raise StorageUnavailable(f"audience {audience_id!r} was changed by another call at the same time; "
                                     "retry") from None
        await self.fan_out(audience_id, new, "delete", {"id": audience_id})

    async def fan_out(self, audience_id: str, revision: int, op: str, record: dict,
                      partitions: list[int] | None = None) -> None:
        """The version's control message on every partition's stream (deduplicated per partition)."""
        js = self.res.js
        targets = range(self.res.partitions) if partitions is None else partitions
        futures = []
        for p in targets:
            payload, headers = control(Kind.AUDIENCE, self.clock(), revision, op, record)
            headers[MSG_ID] = f"aud.{audience_id}.{revision}.{p}"
            futures.append(js.publish(events_subject(p), payload, headers=headers, timeout=5))
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            log.warning("audience %s revision %d reached %d of %d partitions (%s); owners repair the rest",
                        audience_id, revision, len(results) - len(failed), len(results), failed[0])


async def repair(catalog: AudienceCatalog, owned: dict[int, dict[str, int]], entries: dict) -> None:
    """Publishes the catalog's versions that an owned partition has not applied (``owned``: p -> applied)."""
    now = time.time()
    for aid, (record, revision, created) in entries.items():
        if now - created < REPAIR_AFTER:
            continue
        op = "delete" if record.get("deleted") else "put"
        late = [p for p, applied in owned.items()
                if applied.get(aid, 0) < revision and (op == "put" or aid in applied)]
        if late:
            log.info("audience %s revision %d: repairing %d partitions", aid, revision, len(late))
            await catalog.fan_out(aid, revision, op, record, late)
