"""Realtime syncs: create, update (field-mask merge), delete and inspect the syncs that deliver changes.

Delivery itself runs in delivery/; this is the management side. A sync's
definition is checked against what exists now (audiences, collection
fields). The webhook secret is input only: it is never returned, and an
update that leaves it empty keeps the current one.
"""

from __future__ import annotations

from ..domain.errors import FieldViolation, InvalidRequest
from ..domain.ports import RecordReader, SyncRunners
from ..domain.syncs import SyncSpec, Webhook, check_sync_id, parse_sync
from .audiences import page_size

UPDATABLE = ("audience_ids", "fields", "webhook", "nats")
MAX_PAGE = 1000


class SyncService:
    """The sync use cases over the delivery runners of the writing process."""

    def __init__(self, deliveries: SyncRunners, records: RecordReader):
        self.d = deliveries
        self.records = records

    def _parse(self, d: dict) -> SyncSpec:
        fields = {name: set(view.columns) for name, view in self.records.collections().items()}  # refreshes
        audiences = {a for a in self.records.audience_ids if a}
        return parse_sync(d, audiences=audiences, fields=fields, parent=self.d.parent)

    async def create(self, definition: dict):
        return await self.d.create(self._parse(definition))

    async def update(self, definition: dict, paths: set[str]):
        """Replaces the parts of the sync named in ``paths`` (empty: every updatable part) with ``definition``'s."""
        check_sync_id(definition["id"])
        current = self.d.runner(definition["id"]).spec
        paths = paths or set(UPDATABLE)
        unknown = paths - set(UPDATABLE)
        if unknown:
            raise InvalidRequest("update_mask names fields that cannot be updated", violations=[
                FieldViolation("update_mask.paths", f"{p!r} is not updatable; updatable: {', '.join(UPDATABLE)}")
                for p in sorted(unknown)])
        merged = current.to_json()
        merged.pop("managed_by_project")
        if paths & {"webhook", "nats"}:
            for kind in ("webhook", "nats"):
                merged.pop(kind, None)
                if kind in definition:
                    merged[kind] = definition[kind]
            w = merged.get("webhook")
            if w is not None and not w["secret"] and isinstance(current.destination, Webhook):
                w["secret"] = current.destination.secret  # input only: an empty secret keeps the current one
        for name in paths & {"audience_ids", "fields"}:
            merged[name] = definition[name]
        return await self.d.update(self._parse(merged))

    async def delete(self, sync_id: str) -> None:
        await self.d.delete(sync_id)

    def get(self, sync_id: str):
        return self.d.runner(sync_id)

    def list(self, size: int, token: str) -> tuple[list, str]:
        size = page_size(size, MAX_PAGE, default=100)
        ids = sorted(i for i in self.d.runners if i > token)
        page = ids[:size]
        return [self.d.runners[i] for i in page], page[-1] if len(ids) > size else ""

    def dead_letters(self, sync_id: str, size: int, token: str) -> tuple[list, str]:
        size = page_size(size, MAX_PAGE, default=100)
        try:
            after = int(token or 0)
        except ValueError:
            raise InvalidRequest("page_token is not one this server returned",
                                 violations=[FieldViolation("page_token", "is not valid")]) from None
        letters = self.d.dead_letters(sync_id, after, size + 1)
        page = letters[:size]
        return page, str(page[-1].change.sequence) if len(letters) > size else ""

    async def replay(self, sync_id: str) -> int:
        return await self.d.replay(sync_id)

    def lag_us(self, runner) -> int:
        return self.d.lag_us(runner)

    def holds_changelog(self, runner) -> bool:
        return self.d.holds_changelog(runner)
