"""AudienceService over gRPC: decode, the audience use cases, encode.

Definitions cross as the protobuf JSON mapping of ``qualify.v1.Condition``
(proto field names), which is also the project file's and the domain's form.
"""

from __future__ import annotations

from google.protobuf import json_format

from qualify.v1 import audience_pb2, condition_pb2, membership_pb2

from ..services.audiences import AudienceInfo, AudienceService
from ..services.consistency import budget_of
from .errors import reject_malformed
from .watch import Watch, timestamp


def condition_to_dict(message: condition_pb2.Condition) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _message(a: AudienceInfo) -> audience_pb2.Audience:
    msg = audience_pb2.Audience(id=a.id, display_name=a.display_name, description=a.description,
                                create_time=timestamp(a.create_us), update_time=timestamp(a.update_us),
                                member_count=a.member_count)
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

    def __init__(self, service: AudienceService, watch: Watch | None = None):
        self.service = service
        if watch is not None:
            self.watch_memberships = watch.watch_memberships

    async def create_audience(self, request: audience_pb2.CreateAudienceRequest, context):
        reject_malformed(request)
        a = request.audience
        info = await self.service.create(a.id, a.display_name, a.description,
                                         condition_to_dict(a.condition) if a.HasField("condition") else None)
        return audience_pb2.CreateAudienceResponse(audience=_message(info))

    async def update_audience(self, request: audience_pb2.UpdateAudienceRequest, context):
        reject_malformed(request)
        a = request.audience
        info = await self.service.update(a.id, set(request.update_mask.paths), a.display_name, a.description,
                                         condition_to_dict(a.condition) if a.HasField("condition") else None)
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
