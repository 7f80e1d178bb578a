"""AudienceService: audience definitions in, membership answers out.

Definitions cross as the protobuf JSON mapping of ``qualify.v1.Condition``
(proto field names), which is also the project file's and the domain's form.
Every call runs on the writer thread, in order with ingest and timers, so it
sees the engine between two transactions, never inside one.
"""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf import json_format

from qualify.v1 import audience_pb2, condition_pb2, membership_pb2

from ..domain.conditions import parse_condition
from ..domain.engine import check_audience_id
from ..domain.errors import FieldViolation, InvalidRequest
from .errors import guarded, guarded_stream, lenient, reject_malformed
from .unimplemented import method_handler

MAX_PAGE = 1000
MAX_SAMPLE = 100


def _timestamp(us: int):
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = Timestamp()
    ts.seconds, ts.nanos = divmod(us, 1_000_000)
    ts.nanos *= 1000
    return ts


def condition_to_dict(message: condition_pb2.Condition) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


class Audiences:
    """AudienceService handlers over the engine, through the writer thread."""

    def __init__(self, engine, writer, store, clock, watch=None):
        self.engine = engine
        self.writer = writer
        self.store = store
        self.clock = clock
        self.watch = watch  # transport.watch.Watch: WatchMemberships

    async def _run(self, fn):
        return await asyncio.wrap_future(self.writer.submit(fn))

    def _message(self, audience) -> audience_pb2.Audience:
        msg = audience_pb2.Audience(id=audience.id, display_name=audience.display_name,
                                    description=audience.description,
                                    create_time=_timestamp(audience.create_us),
                                    update_time=_timestamp(audience.update_us),
                                    member_count=max(0, self.engine.counts.get(audience.id, 0)))
        json_format.ParseDict(audience.definition, msg.condition)
        return msg

    async def create(self, request: audience_pb2.CreateAudienceRequest, context):
        reject_malformed(request)
        a = request.audience
        check_audience_id(a.id)
        if not a.HasField("condition"):
            raise InvalidRequest("audience.condition is required",
                                 violations=[FieldViolation("audience.condition", "is required")])
        definition = condition_to_dict(a.condition)
        audience, _ = await self._run(lambda txn: self.engine.put_audience(
            txn, a.id, a.display_name, a.description, definition, self.clock(), create=True))
        return audience_pb2.CreateAudienceResponse(audience=self._message(audience))

    async def update(self, request: audience_pb2.UpdateAudienceRequest, context):
        reject_malformed(request)
        a = request.audience
        paths = set(request.update_mask.paths) or {"display_name", "description", "condition"}
        unknown = paths - {"display_name", "description", "condition"}
        if unknown:
            raise InvalidRequest("update_mask names fields that cannot be updated",
                                 violations=[FieldViolation("update_mask.paths", f"{p!r} is not updatable") for p in sorted(unknown)])
        if "condition" in paths and not a.HasField("condition"):
            raise InvalidRequest("audience.condition is required",
                                 violations=[FieldViolation("audience.condition", "is required when updated")])

        def update(txn):
            current = self.engine.audience(a.id)
            return self.engine.put_audience(
                txn, a.id,
                a.display_name if "display_name" in paths else current.display_name,
                a.description if "description" in paths else current.description,
                condition_to_dict(a.condition) if "condition" in paths else current.definition,
                self.clock(), create=False)

        audience, _ = await self._run(update)
        return audience_pb2.UpdateAudienceResponse(audience=self._message(audience))

    async def delete(self, request: audience_pb2.DeleteAudienceRequest, context):
        reject_malformed(request)
        await self._run(lambda txn: self.engine.delete_audience(txn, request.id, self.clock()))
        return audience_pb2.DeleteAudienceResponse()

    async def get(self, request: audience_pb2.GetAudienceRequest, context):
        reject_malformed(request)
        audience = await self._run(lambda txn: self.engine.audience(request.id))
        return audience_pb2.GetAudienceResponse(audience=self._message(audience))

    async def list(self, request: audience_pb2.ListAudiencesRequest, context):
        reject_malformed(request)
        size = _page_size(request.page_size, 100, "page_size")
        audiences = await self._run(lambda txn: sorted(self.engine.audiences.values(), key=lambda a: a.id))
        page = [a for a in audiences if a.id > request.page_token][:size]
        more = len(page) == size and any(a.id > page[-1].id for a in audiences)
        return audience_pb2.ListAudiencesResponse(audiences=[self._message(a) for a in page],
                                                  next_page_token=page[-1].id if more else "")

    async def preview(self, request: audience_pb2.PreviewAudienceRequest, context):
        reject_malformed(request)
        sample = request.sample_size
        if not 0 <= sample <= MAX_SAMPLE:
            raise InvalidRequest("sample_size out of range",
                                 violations=[FieldViolation("sample_size", f"must be from 0 to {MAX_SAMPLE}")])
        target = request.WhichOneof("target")
        if target is None:
            raise InvalidRequest("set id or condition", violations=[FieldViolation("target", "set id or condition")])
        draft = condition_to_dict(request.condition) if target == "condition" else None

        def preview(txn):
            if draft is None:
                condition = self.engine.audience(request.id).condition
            else:
                condition = parse_condition(draft, self.engine.attribute_types, self.engine.event_model_props)
            return self.engine.preview(txn, condition, self.clock(), sample)

        count, keys = await self._run(preview)
        return audience_pb2.PreviewAudienceResponse(count=count, sample_keys=keys)

    async def check(self, request: audience_pb2.CheckMembershipRequest, context):
        reject_malformed(request)
        if not request.person_key:
            raise InvalidRequest("person_key is empty", violations=[FieldViolation("person_key", "is required")])

        def check(txn):
            ids = list(request.audience_ids) or sorted(self.engine.audiences)
            for aid in ids:
                self.engine.audience(aid)  # unknown ids are NOT_FOUND
            return [(aid, t) for aid in ids if (t := self.engine.is_member(txn, request.person_key, aid)) is not None]

        found = await self._run(check)
        return audience_pb2.CheckMembershipResponse(memberships=[
            membership_pb2.AudienceMembership(audience_id=aid, enter_time=_timestamp(t)) for aid, t in found])

    async def list_members(self, request: audience_pb2.ListMembersRequest, context):
        reject_malformed(request)
        size = _page_size(request.page_size, MAX_PAGE, "page_size")

        def members(txn):
            self.engine.audience(request.id)
            return self.store.list_members(txn, request.id, request.page_token, size)

        keys, token = await self._run(members)
        return audience_pb2.ListMembersResponse(person_keys=keys, next_page_token=token)

    async def explain(self, request: audience_pb2.ExplainMembershipRequest, context):
        reject_malformed(request)
        if not request.person_key:
            raise InvalidRequest("person_key is empty", violations=[FieldViolation("person_key", "is required")])
        member, tree = await self._run(lambda txn: self.engine.explain(txn, request.id, request.person_key, self.clock()))
        return audience_pb2.ExplainMembershipResponse(member=member, root=_explanation(tree))

    def handlers(self) -> grpc.GenericRpcHandler:
        def unary(fn, request_type, name):
            return grpc.unary_unary_rpc_method_handler(
                guarded(name)(fn), request_deserializer=lenient(request_type),
                response_serializer=lambda m: m.SerializeToString())

        rpcs = {
            "CreateAudience": (self.create, audience_pb2.CreateAudienceRequest),
            "UpdateAudience": (self.update, audience_pb2.UpdateAudienceRequest),
            "DeleteAudience": (self.delete, audience_pb2.DeleteAudienceRequest),
            "GetAudience": (self.get, audience_pb2.GetAudienceRequest),
            "ListAudiences": (self.list, audience_pb2.ListAudiencesRequest),
            "PreviewAudience": (self.preview, audience_pb2.PreviewAudienceRequest),
            "CheckMembership": (self.check, audience_pb2.CheckMembershipRequest),
            "ListMembers": (self.list_members, audience_pb2.ListMembersRequest),
            "ExplainMembership": (self.explain, audience_pb2.ExplainMembershipRequest),
        }
        service = audience_pb2.DESCRIPTOR.services_by_name["AudienceService"]
        handlers = {name: unary(fn, req, f"AudienceService.{name}") for name, (fn, req) in rpcs.items()}
        if self.watch is not None:
            handlers["WatchMemberships"] = grpc.unary_stream_rpc_method_handler(
                guarded_stream("AudienceService.WatchMemberships")(self.watch.watch),
                request_deserializer=lenient(audience_pb2.WatchMembershipsRequest),
                response_serializer=lambda m: m.SerializeToString())
        for m in service.methods:
            handlers.setdefault(m.name, method_handler(service, m))
        return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _page_size(n: int, maximum: int, field: str) -> int:
    if n < 0:
        raise InvalidRequest(f"{field} is negative", violations=[FieldViolation(field, "must not be negative")])
    return min(n or maximum, maximum)


def _explanation(node: dict) -> audience_pb2.ConditionExplanation:
    msg = audience_pb2.ConditionExplanation(path=node["path"], value=node["value"], count=node["count"],
                                            summary=node["summary"],
                                            children=[_explanation(c) for c in node["children"]])
    if node["aggregate"] is not None:
        msg.aggregate = node["aggregate"]
    if node["changes_at"] is not None:
        msg.changes_at.CopyFrom(_timestamp(node["changes_at"]))
    return msg
