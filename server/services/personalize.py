"""Personalize and diagnostics: a person's collection record with their memberships, and what this server holds.

Reads go straight to the memory-mapped tables through a ``RecordReader``;
nothing here waits for the writer. Records are returned in their stored wire
form, so the transport answers with a few slices rather than a message built
field by field (see qualify.server.wire).
"""

from __future__ import annotations

import os

from ..domain.access import EVERYTHING, Access
from ..domain.errors import AudienceNotFound, BatchTooLarge, FieldViolation, InvalidRequest
from ..domain.ports import CollectionView, EventCounts, RecordReader
from .consistency import wait_visible

MAX_BATCH_KEYS = 1000
MAX_KEY_BYTES = 511  # LMDB's key size limit

Stored = tuple[bytes, dict[int, int] | None]  # (the record's stored fields, {membership bit: enter_us})


def check_key(key: str, field: str) -> bytes:
    if not key:
        raise InvalidRequest(f"{field} is empty", violations=[FieldViolation(field, "must be a non-empty key")])
    raw = key.encode()
    if len(raw) > MAX_KEY_BYTES:
        raise InvalidRequest(f"{field} is {len(raw)} bytes long",
                             violations=[FieldViolation(field, f"must be at most {MAX_KEY_BYTES} bytes of UTF-8")])
    return raw


def _check_collection(collection: str) -> None:
    if not collection:
        raise InvalidRequest("collection is empty", violations=[FieldViolation("collection", "must name a collection")])


class PersonalizeService:
    """Record reads and server facts over one process's RecordReader."""

    def __init__(self, records: RecordReader, event_counts: EventCounts, version: str, max_message_bytes: int = 0):
        self.records = records
        self.event_counts = event_counts
        self.version = version
        self.max_message_bytes = max_message_bytes  # what a client may send in one message

    @property
    def audience_ids(self) -> tuple[str | None, ...]:
        """The audience of each membership bit (None: a free bit)."""
        return self.records.audience_ids

    async def wait(self, min_token: bytes, budget: float) -> None:
        """Returns once this process sees the write ``min_token`` names; NotYetConsistent after ``budget`` s.

        A read begun after it returns sees that write: LMDB's snapshots only
        move forward, in this process and in any other reading the map.
        """
        await wait_visible(self.records, min_token, budget)

    def get(self, collection: str, key: str, access: Access = EVERYTHING) -> tuple[CollectionView, bytes, Stored]:
        """(the collection, the key's bytes, its record); KeyNotFound when it has none.

        ``access`` (the caller's key) is checked first: a key may not learn
        whether a record exists in a collection it may not read.
        """
        _check_collection(collection)
        access.check_collection(collection)
        raw = check_key(key, "key")
        view, stored, bits = self.records.get_one(collection, raw)
        return view, raw, (stored, bits)

    def batch_get(self, collection: str, keys, access: Access = EVERYTHING
                  ) -> tuple[CollectionView, list[bytes], list[tuple[bytes | None, dict | None]]]:
        """(the collection, each key's bytes, each key's record or (None, None)), in request order."""
        _check_collection(collection)
        access.check_collection(collection)
        n = len(keys)
        if n > MAX_BATCH_KEYS:
            raise BatchTooLarge(f"{n} keys in one BatchGet; the limit is {MAX_BATCH_KEYS}",
                                violations=[FieldViolation("keys", f"must hold at most {MAX_BATCH_KEYS} keys, not {n}")])
        raws = [check_key(k, f"keys[{i}]") for i, k in enumerate(keys)]
        view, rows = self.records.get(collection, raws)
        return view, raws, rows

    @staticmethod
    def mask(view: CollectionView, paths: tuple[str, ...] | None, access: Access = EVERYTHING) -> tuple[int, ...] | None:
        """Column indices to read for ``paths`` (None or (): every field the caller may read)."""
        if access.fields is not None:
            paths = access.paths(view.columns, tuple(paths or ()))
            if not paths:  # a key limited to fields this collection lacks reads none
                return ()
        return view.mask_indices(tuple(paths)) if paths else None

    def audience_bit(self, audience: str) -> int:
        """The membership bit of ``audience``; AudienceNotFound when no audience has that id."""
        try:
            return self.audience_ids.index(audience)
        except ValueError:
            raise AudienceNotFound(f"no audience with id {audience!r}", metadata={"audience": audience}) from None

    def server_info(self) -> dict:
        events_logged, events_unmatched = self.event_counts.counts()
        return {"version": self.version, "sync_generation": self.records.generation,
                "collections": sorted(self.records.collections()), "people": self.records.people(),
                "worker_pid": os.getpid(), "events_logged": events_logged, "events_unmatched": events_unmatched,
                "max_message_bytes": self.max_message_bytes}
