"""SyncService: realtime syncs managed over gRPC, with their delivery status."""

from __future__ import annotations

import grpc
from google.protobuf.duration_pb2 import Duration

from qualify.v1 import sync_pb2

from ..delivery.runner import Deliveries, SyncRunner
from ..domain.errors import FieldViolation, InvalidRequest
from ..domain.syncs import SyncSpec, Webhook, check_sync_id, parse_sync
from ..storage.lmdb_store import Reader
from .errors import guarded, lenient, reject_malformed
from .watch import change_message, timestamp

UPDATABLE = ("audience_ids", "fields", "webhook", "nats")
MAX_PAGE = 1000


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromMicroseconds(int(seconds * 1_000_000))
    return d


def sync_dict(msg: sync_pb2.Sync) -> dict:
    """The dict form domain.syncs.parse_sync reads, from the message."""
    d = {"id": msg.id, "audience_ids": list(msg.audience_ids), "fields": list(msg.fields)}
    kind = msg.WhichOneof("destination")
    if kind == "webhook":
        w = msg.webhook
        d["webhook"] = {"url": w.url, "secret": w.secret, "max_batch_size": w.max_batch_size,
                        "max_delay": w.max_delay.ToMicroseconds() / 1e6, "max_attempts": w.max_attempts}
    elif kind == "nats":
        d["nats"] = {"url": msg.nats.url, "subject": msg.nats.subject, "max_attempts": msg.nats.max_attempts}
    return d


class Syncs:
    """SyncService handlers over the deliveries of the writing process."""

    def __init__(self, deliveries: Deliveries, reader: Reader):
        self.d = deliveries
        self.reader = reader

    def _parse(self, d: dict) -> SyncSpec:
        fields = {name: set(view.columns) for name, view in self.reader.collections().items()}  # refreshes
        audiences = {a for a in self.reader.audience_ids if a}
        return parse_sync(d, audiences=audiences, fields=fields, parent=self.d.parent)

    def _message(self, runner: SyncRunner) -> sync_pb2.Sync:
        spec, state = runner.spec, runner.state
        msg = sync_pb2.Sync(id=spec.id, audience_ids=spec.audience_ids, fields=spec.fields,
                            managed_by_project=spec.managed_by_project)
        dest = spec.destination
        if isinstance(dest, Webhook):  # the secret is input only
            msg.webhook.CopyFrom(sync_pb2.WebhookDestination(url=dest.url, max_batch_size=dest.max_batch_size,
                                                             max_delay=_duration(dest.max_delay),
                                                             max_attempts=dest.max_attempts))
        else:
            msg.nats.CopyFrom(sync_pb2.NatsDestination(url=dest.url, subject=dest.subject, max_attempts=dest.max_attempts))
        msg.status.CopyFrom(sync_pb2.SyncStatus(delivered=state.delivered, retries=state.retries,
                                                last_error=state.last_error, dead_lettered=state.dead_lettered,
                                                cursor=state.cursor, lag=_duration(self.d.lag_us(runner) / 1e6)))
        if state.last_error_us:
            msg.status.last_error_time.CopyFrom(timestamp(state.last_error_us))
        return msg

    async def create(self, request: sync_pb2.CreateSyncRequest, context):
        reject_malformed(request)
        runner = await self.d.create(self._parse(sync_dict(request.sync)))
        return sync_pb2.CreateSyncResponse(sync=self._message(runner))

    async def update(self, request: sync_pb2.UpdateSyncRequest, context):
        reject_malformed(request)
        check_sync_id(request.sync.id)
        current = self.d.runner(request.sync.id).spec
        paths = set(request.update_mask.paths) or set(UPDATABLE)
        unknown = paths - set(UPDATABLE)
        if unknown:
            raise InvalidRequest("update_mask names fields that cannot be updated", violations=[
                FieldViolation("update_mask.paths", f"{p!r} is not updatable; updatable: {', '.join(UPDATABLE)}")
                for p in sorted(unknown)])
        new, merged = sync_dict(request.sync), current.to_json()
        merged.pop("managed_by_project")
        if paths & {"webhook", "nats"}:
            for kind in ("webhook", "nats"):
                merged.pop(kind, None)
                if kind in new:
                    merged[kind] = new[kind]
            w = merged.get("webhook")
            if w is not None and not w["secret"] and isinstance(current.destination, Webhook):
                w["secret"] = current.destination.secret  # input only: an empty secret keeps the current one
        for name in paths & {"audience_ids", "fields"}:
            merged[name] = new[name]
        runner = await self.d.update(self._parse(merged))
        return sync_pb2.UpdateSyncResponse(sync=self._message(runner))

    async def delete(self, request: sync_pb2.DeleteSyncRequest, context):
        reject_malformed(request)
        await self.d.delete(request.id)
        return sync_pb2.DeleteSyncResponse()

    async def get(self, request: sync_pb2.GetSyncRequest, context):
        reject_malformed(request)
        return sync_pb2.GetSyncResponse(sync=self._message(self.d.runner(request.id)))

    async def list(self, request: sync_pb2.ListSyncsRequest, context):
        reject_malformed(request)
        size = _page_size(request.page_size, 100)
        ids = sorted(i for i in self.d.runners if i > request.page_token)
        page = ids[:size]
        return sync_pb2.ListSyncsResponse(syncs=[self._message(self.d.runners[i]) for i in page],
                                          next_page_token=page[-1] if len(ids) > size else "")

    async def list_dead_letters(self, request: sync_pb2.ListDeadLettersRequest, context):
        reject_malformed(request)
        size = _page_size(request.page_size, 100)
        try:
            after = int(request.page_token or 0)
        except ValueError:
            raise InvalidRequest("page_token is not one this server returned",
                                 violations=[FieldViolation("page_token", "is not valid")]) from None
        letters = self.d.dead_letters(request.id, after, size + 1)
        page = letters[:size]
        return sync_pb2.ListDeadLettersResponse(
            dead_letters=[sync_pb2.DeadLetter(change=change_message(dl.sequence, dl.row), attempts=dl.attempts,
                                              error=dl.error, dead_letter_time=timestamp(dl.dead_us)) for dl in page],
            next_page_token=str(page[-1].sequence) if len(letters) > size else "")

    async def replay(self, request: sync_pb2.ReplayDeadLettersRequest, context):
        reject_malformed(request)
        return sync_pb2.ReplayDeadLettersResponse(replayed=await self.d.replay(request.id))

    def handlers(self) -> grpc.GenericRpcHandler:
        rpcs = {
            "CreateSync": (self.create, sync_pb2.CreateSyncRequest),
            "UpdateSync": (self.update, sync_pb2.UpdateSyncRequest),
            "DeleteSync": (self.delete, sync_pb2.DeleteSyncRequest),
            "GetSync": (self.get, sync_pb2.GetSyncRequest),
            "ListSyncs": (self.list, sync_pb2.ListSyncsRequest),
            "ListDeadLetters": (self.list_dead_letters, sync_pb2.ListDeadLettersRequest),
            "ReplayDeadLetters": (self.replay, sync_pb2.ReplayDeadLettersRequest),
        }
        service = sync_pb2.DESCRIPTOR.services_by_name["SyncService"]
        return grpc.method_handlers_generic_handler(service.full_name, {
            name: grpc.unary_unary_rpc_method_handler(
                guarded(f"SyncService.{name}")(fn), request_deserializer=lenient(req),
                response_serializer=lambda m: m.SerializeToString())
            for name, (fn, req) in rpcs.items()})


def _page_size(n: int, default: int) -> int:
    if n < 0:
        raise InvalidRequest("page_size is negative", violations=[FieldViolation("page_size", "must not be negative")])
    return min(n or default, MAX_PAGE)
