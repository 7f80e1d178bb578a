"""Audiences in a cluster: definitions go to the cluster's catalog; reads come from this node's read copy.

Create, update and delete are checked here exactly as on one node (the
same parser, the same window rule) and then stored in the cluster's
catalog, which every partition applies in its stream's order
(cluster/audiences.py). Get, List, CheckMembership and ListMembers read
this node's read copy, as on one node. Member counts and memberships
follow as each partition evaluates the change: a CreateAudience answers
with 0 members, and GetAudience shows the count as it grows.

Explain is asked of the person's partition owner, which holds their
realtime state (cluster/explain.py). Preview is checked here as on one node,
then asked of every partition's owner, each counting its own people, and the
counts added up (the ``scatter`` port, cluster/queries.py), within the
client's deadline, at most ``preview_seconds``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from ..domain.audiences import check_audience_id, check_windows
from ..domain.conditions import parse_condition
from ..domain.errors import AudienceNotFound, FieldViolation, InvalidRequest, NotImplementedYet, PreviewTooSlow
from .audiences import AudienceInfo, AudienceService, _require_person, check_target, update_paths
from .deadlines import budget


VISIBLE_WITHIN = 5.0  # seconds a change may take to reach this node's read copy before the call answers anyway



def definition_of(reads, audience_id: str | None, draft: dict | None, attribute_types: dict,
                  event_model_props: dict) -> dict:
    """What a cluster preview or simulation evaluates: the draft, checked here, or the saved audience's."""
    if draft is not None:
        parse_condition(draft, attribute_types, event_model_props)
        return draft
    record = reads.audience(audience_id)[0]
    if record is None:
        raise AudienceNotFound(f"no audience {audience_id!r}", metadata={"audience": audience_id})
    return record["condition"]

class AudienceCatalog(Protocol):
    """The cluster's definitions (cluster/audiences.py implements it)."""

    async def get(self, audience_id: str) -> tuple[dict, int]: ...
    async def create(self, record: dict) -> int: ...
    async def update(self, record: dict, revision: int) -> int: ...
    async def delete(self, audience_id: str) -> None: ...


class ClusterAudienceService(AudienceService):
    """AudienceService over the cluster's catalog (see the module docstring)."""

    def __init__(self, catalog: AudienceCatalog, reads, clock, attribute_types: dict, event_model_props: dict,
                 retention_us: int, explainer=None, scatter=None, preview_seconds: float = 10.0):
        super().__init__(None, None, reads, clock, preview_seconds=preview_seconds)
        self.explainer = explainer  # (audience id, person key, now_us) -> (member, tree), asked of the owner
        self.scatter = scatter  # .preview(condition, now_us, sample, budget) -> (count, keys), asked of every owner
        self.catalog = catalog
        self.attribute_types = attribute_types
        self.event_model_props = event_model_props
        self.retention_us = retention_us

    def _check(self, definition: dict) -> None:
        condition = parse_condition(definition, self.attribute_types, self.event_model_props,
                                    path="audience.condition")
        check_windows(condition, self.retention_us)

    async def create(self, audience_id: str, display_name: str, description: str, definition: dict | None) -> AudienceInfo:
        check_audience_id(audience_id)
        if definition is None:
            raise InvalidRequest("audience.condition is required",
                                 violations=[FieldViolation("audience.condition", "is required")])
        self._check(definition)
        now = self.clock()
        record = {"id": audience_id, "display_name": display_name, "description": description,
                  "condition": definition, "create_us": now, "update_us": now}
        await self.catalog.create(record)
        await self._visible(audience_id, lambda r: r is not None and r["update_us"] == now)
        return AudienceInfo.of(record, 0)

    async def update(self, audience_id: str, paths: set[str], display_name: str, description: str,
                     definition: dict | None) -> AudienceInfo:
        paths = update_paths(paths, definition)
        current, revision = await self.catalog.get(audience_id)
        record = dict(current, update_us=self.clock())
        for name, value in (("display_name", display_name), ("description", description),
                            ("condition", definition)):
            if name in paths:
                record[name] = value
        self._check(record["condition"])
        await self.catalog.update(record, revision)
        await self._visible(audience_id, lambda r: r is not None and r["update_us"] == record["update_us"])
        _, count = self.reads.audience(audience_id)
        return AudienceInfo.of(record, count)

    async def delete(self, audience_id: str) -> None:
        await self.catalog.delete(audience_id)
        await self._visible(audience_id, lambda r: r is None)

    async def _visible(self, audience_id: str, seen) -> None:
        """Until this node's read copy shows the change: a Get after the answer, on this node, sees it."""
        deadline = time.monotonic() + VISIBLE_WITHIN
        while not seen(self.reads.audience(audience_id)[0]) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    async def preview(self, audience_id: str | None, draft: dict | None, sample: int) -> tuple[int, list[str]]:
        """As on one node (services/audiences.py), summed over every partition's owner."""
        check_target(audience_id, draft, sample)
        draft = definition_of(self.reads, audience_id, draft, self.attribute_types, self.event_model_props)
        if self.scatter is None:
            raise NotImplementedYet("PreviewAudience needs the partition owners' answers, not wired here")
        seconds = budget(self.preview_seconds)
        if seconds <= 0:
            raise PreviewTooSlow("the call's deadline has passed")
        return await self.scatter.preview(draft, self.clock(), sample, seconds)

    async def explain(self, audience_id: str, person_key: str) -> tuple[bool, dict]:
        """Asked of the person's partition owner, which holds their realtime state (cluster/explain.py)."""
        _require_person(person_key)
        if self.explainer is None:
            raise NotImplementedYet("ExplainMembership needs the partition owners' answers, not wired here")
        if self.reads.audience(audience_id)[0] is None:
            raise AudienceNotFound(f"no audience {audience_id!r}", metadata={"audience": audience_id})
        return await self.explainer(audience_id, person_key, self.clock())
