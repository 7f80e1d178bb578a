"""AudienceService over gRPC: decode, the audience use cases, encode.

Definitions cross as the protobuf JSON mapping of ``qualify.v1.Condition``
(proto field names), which is also the project file's and the domain's form.
"""

from __future__ import annotations

from google.protobuf import json_format

from qualify.v1 import audience_pb2, condition_pb2, membership_pb2

from ..domain.errors import FieldViolation, InvalidAudience
from ..services.audiences import AudienceInfo, AudienceService
from ..services.consistency import budget_of
from .errors import reject_malformed
from .watch import Watch, timestamp

# What the JSON mapping can write (google/protobuf/duration.proto, timestamp.proto).
MAX_DURATION_SECONDS = 315_576_000_000
MIN_TIMESTAMP_SECONDS, MAX_TIMESTAMP_SECONDS = -62_135_596_800, 253_402_300_799
_BAD_DURATION = ("is not a valid google.protobuf.Duration: seconds within ±315576000000 and nanos "
                 "within ±999999999, of the same sign")
_BAD_TIMESTAMP = ("is not a valid google.protobuf.Timestamp: seconds within years 0001-9999 (RFC 3339) "
                  "and nanos in [0, 999999999]")


def condition_to_dict(message: condition_pb2.Condition, path: str = "condition") -> dict:
    """The condition's JSON form; a Duration or Timestamp JSON cannot write is InvalidAudience at its path."""
    try:
        return json_format.MessageToDict(message, preserving_proto_field_name=True)
    except (json_format.SerializeToJsonError, ValueError):
        found = _bad_time(message, path)
        if found is None:
            raise
        raise InvalidAudience(f"invalid condition: {found.field}: {found.description}", violations=[found]) from None


def _bad_duration(d) -> bool:
    s, n = d.seconds, d.nanos
    return not (-MAX_DURATION_SECONDS <= s <= MAX_DURATION_SECONDS and -1_000_000_000 < n < 1_000_000_000
                and (s == 0 or n == 0 or (s > 0) == (n > 0)))


def _bad_timestamp(t) -> bool:
    return not (MIN_TIMESTAMP_SECONDS <= t.seconds <= MAX_TIMESTAMP_SECONDS and 0 <= t.nanos < 1_000_000_000)


def _bad_literals(body, path: str) -> FieldViolation | None:
    literals = [(body.value, f"{path}.value")] if body.HasField("value") else []
    literals += [(v, f"{path}.values[{i}]") for i, v in enumerate(body.values)]
    for lit, at in literals:
        if lit.WhichOneof("kind") == "timestamp_value" and _bad_timestamp(lit.timestamp_value):
            return FieldViolation(f"{at}.timestamp_value", _BAD_TIMESTAMP)
    return None


def _bad_time(c: condition_pb2.Condition, path: str) -> FieldViolation | None:
    """The first Duration or Timestamp under ``c`` that the JSON mapping refuses (the rare, failing path)."""
    kind = c.WhichOneof("kind")
    sub = f"{path}.{kind}"
    if kind in ("and", "or"):
        for i, child in enumerate(getattr(c, kind).conditions):
            if (found := _bad_time(child, f"{sub}.conditions[{i}]")) is not None:
                return found
    elif kind == "not":
        body = getattr(c, "not")  # a Python keyword: no attribute syntax
        return _bad_time(body.condition, f"{sub}.condition") if body.HasField("condition") else None
    elif kind == "attribute":
        return _bad_literals(c.attribute, sub)
    elif kind == "event":
        if c.event.HasField("window") and _bad_duration(c.event.window):
            return FieldViolation(f"{sub}.window", _BAD_DURATION)
        for i, f in enumerate(c.event.filters):
            if (found := _bad_literals(f, f"{sub}.filters[{i}]")) is not None:
                return found
    elif kind in ("sequence", "absence"):
        return _bad_sequence_time(getattr(c, kind), kind, sub)
    return None


def _bad_sequence_time(body, kind: str, sub: str) -> FieldViolation | None:
    for name in ("within", "window"):
        if body.HasField(name) and _bad_duration(getattr(body, name)):
            return FieldViolation(f"{sub}.{name}", _BAD_DURATION)
    steps = [(s, f"{sub}.steps[{i}]") for i, s in enumerate(body.steps)] if kind == "sequence" else \
        [(body.after, f"{sub}.after"), (body.absent, f"{sub}.absent")]
    for step, at in steps:
        for i, f in enumerate(step.filters):
            if (found := _bad_literals(f, f"{at}.filters[{i}]")) is not None:
                return found
    return None


def _message(a: AudienceInfo) -> audience_pb2.Audience:
    msg = audience_pb2.Audience(id=a.id, display_name=a.display_name, description=a.description,
                                create_time=timestamp(a.create_us), update_time=timestamp(a.update_us),
                                member_count=a.member_count,
                                state=audience_pb2.Audience.LIVE if a.backfill is None else audience_pb2.Audience.BACKFILLING,
                                backfill_progress=1.0 if a.backfill is None else a.backfill)
    json_format.ParseDict(a.definition, msg.condition)
    return msg


def _explanation(node: dict) -> audience_pb2.ConditionExplanation:
    msg = audience_pb2.ConditionExplanation(path=node["path"], value=node["value"], count=node["count"],
                                            summary=node["summary"],
                                            children=[_explanation(c) for c in node["children"]])
    if node["aggregate"] is not None:
        msg.aggregate = node["aggregate"]
    if node["changes_at"] is not None:
        msg.changes_at.CopyFrom(timestamp(node["changes_at"]))
    return msg


class Audiences:
    """AudienceService handlers; WatchMemberships is the Watch's."""

    def __init__(self, service: AudienceService, watch: Watch | None = None, simulation=None):
        self.service = service
        if watch is not None:
            self.watch_memberships = watch.watch_memberships
        if simulation is not None:  # transport/simulate.py's Simulation
            self.simulate_audience = simulation.simulate_audience

    async def create_audience(self, request: audience_pb2.CreateAudienceRequest, context):
        reject_malformed(request)
        a = request.audience
        info = await self.service.create(a.id, a.display_name, a.description,
                                         condition_to_dict(a.condition, "audience.condition")
                                         if a.HasField("condition") else None)
        return audience_pb2.CreateAudienceResponse(audience=_message(info))

    async def update_audience(self, request: audience_pb2.UpdateAudienceRequest, context):
        reject_malformed(request)
        a = request.audience
        info = await self.service.update(a.id, set(request.update_mask.paths), a.display_name, a.description,
                                         condition_to_dict(a.condition, "audience.condition")
                                         if a.HasField("condition") else None)
        return audience_pb2.UpdateAudienceResponse(audience=_message(info))

    async def delete_audience(self, request: audience_pb2.DeleteAudienceRequest, context):
        reject_malformed(request)
        await self.service.delete(request.id)
        return audience_pb2.DeleteAudienceResponse()

    async def get_audience(self, request: audience_pb2.GetAudienceRequest, context):
        reject_malformed(request)
        return audience_pb2.GetAudienceResponse(audience=_message(await self.service.get(request.id)))

    async def list_audiences(self, request: audience_pb2.ListAudiencesRequest, context):
        reject_malformed(request)
        infos, token = await self.service.list(request.page_size, request.page_token)
        return audience_pb2.ListAudiencesResponse(audiences=[_message(i) for i in infos], next_page_token=token)

    async def preview_audience(self, request: audience_pb2.PreviewAudienceRequest, context):
        reject_malformed(request)
        target = request.WhichOneof("target")
        count, keys = await self.service.preview(
            request.id if target == "id" else None,
            condition_to_dict(request.condition) if target == "condition" else None, request.sample_size)
        return audience_pb2.PreviewAudienceResponse(count=count, sample_keys=keys)

    async def check_membership(self, request: audience_pb2.CheckMembershipRequest, context):
        reject_malformed(request)
        found = await self.service.check(request.person_key, list(request.audience_ids), request.min_token,
                                         budget_of(context.time_remaining()))
        return audience_pb2.CheckMembershipResponse(memberships=[
            membership_pb2.AudienceMembership(audience_id=aid, enter_time=timestamp(t)) for aid, t in found])

    async def list_members(self, request: audience_pb2.ListMembersRequest, context):
        reject_malformed(request)
        keys, token = await self.service.list_members(request.id, request.page_size, request.page_token)
        return audience_pb2.ListMembersResponse(person_keys=keys, next_page_token=token)

    async def explain_membership(self, request: audience_pb2.ExplainMembershipRequest, context):
        reject_malformed(request)
        member, tree = await self.service.explain(request.id, request.person_key)
        return audience_pb2.ExplainMembershipResponse(member=member, root=_explanation(tree))
