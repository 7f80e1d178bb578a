"""SyncService over gRPC: realtime syncs managed through the sync use cases, with their delivery status."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration

from qualify.v1 import sync_pb2

from ..domain.syncs import Webhook
from ..services.syncs import SyncService
from .errors import reject_malformed
from .watch import change_message, timestamp


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
    """SyncService handlers."""

    def __init__(self, service: SyncService):
        self.service = service

    def _message(self, runner) -> sync_pb2.Sync:
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
                                                cursor=state.cursor, lag=_duration(self.service.lag_us(runner) / 1e6),
                                                holds_changelog=self.service.holds_changelog(runner)))
        if state.last_error_us:
            msg.status.last_error_time.CopyFrom(timestamp(state.last_error_us))
        return msg

    async def create_sync(self, request: sync_pb2.CreateSyncRequest, context):
        reject_malformed(request)
        return sync_pb2.CreateSyncResponse(sync=self._message(await self.service.create(sync_dict(request.sync))))

    async def update_sync(self, request: sync_pb2.UpdateSyncRequest, context):
        reject_malformed(request)
        runner = await self.service.update(sync_dict(request.sync), set(request.update_mask.paths))
        return sync_pb2.UpdateSyncResponse(sync=self._message(runner))

    async def delete_sync(self, request: sync_pb2.DeleteSyncRequest, context):
        reject_malformed(request)
        await self.service.delete(request.id)
        return sync_pb2.DeleteSyncResponse()

    async def get_sync(self, request: sync_pb2.GetSyncRequest, context):
        reject_malformed(request)
        return sync_pb2.GetSyncResponse(sync=self._message(self.service.get(request.id)))

    async def list_syncs(self, request: sync_pb2.ListSyncsRequest, context):
        reject_malformed(request)
        runners, token = self.service.list(request.page_size, request.page_token)
        return sync_pb2.ListSyncsResponse(syncs=[self._message(r) for r in runners], next_page_token=token)

    async def list_dead_letters(self, request: sync_pb2.ListDeadLettersRequest, context):
        reject_malformed(request)
        page, token = self.service.dead_letters(request.id, request.page_size, request.page_token)
        return sync_pb2.ListDeadLettersResponse(
            dead_letters=[sync_pb2.DeadLetter(change=change_message(dl.change), attempts=dl.attempts,
                                              error=dl.error, dead_letter_time=timestamp(dl.dead_us)) for dl in page],
            next_page_token=token)

    async def replay_dead_letters(self, request: sync_pb2.ReplayDeadLettersRequest, context):
        reject_malformed(request)
        return sync_pb2.ReplayDeadLettersResponse(replayed=await self.service.replay(request.id))
