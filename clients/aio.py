"""The asyncio client, over one grpc.aio channel (or ``connections`` of them); the same surface as Client."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio

from qualify.v1 import audience_pb2, diagnostics_pb2

from ._call import Backoff, Metadata, Pem, call_metadata, channel_credentials, connection_options, pause, should_retry
from ._errors import error_from_rpc_error
from ._records import (
    Audience,
    BatchResult,
    ConditionLike,
    MembersPage,
    Membership,
    MembershipChange,
    MembershipExplanation,
    Preview,
    Record,
    SnapshotEnd,
    audience_from_proto,
    batch_from_proto,
    batch_get_request,
    create_audience_request,
    get_request,
    membership_explanation_from_proto,
    memberships_from_proto,
    preview_request,
    record_from_proto,
    server_info_from_proto,
    update_audience_request,
    watch_records,
    watch_request,
    _strings,
)
from .blocking import _Stubs, stubs_for

_Response = TypeVar("_Response")


class AsyncClient:
    """An asyncio Qualify client; reads are retried on UNAVAILABLE and RESOURCE_EXHAUSTED.

    `api_key` is sent with every call as `authorization: Bearer <key>`. TLS:
    `root_certificates` (the CA of the server's certificate, PEM bytes or a
    path; default the system's roots), plus `certificate_chain` and
    `private_key` for mutual TLS; `tls=True` alone uses the system's roots.
    A RESOURCE_EXHAUSTED answer carrying a RetryInfo is retried no sooner than
    it asks. `connections=N`: N TCP connections, calls round-robin over them
    (see Client). The audience helpers are Client's, as coroutines;
    `watch_memberships` is an async iterator.

    Create it inside a running event loop: the grpc.aio channel binds to it.

    >>> async with AsyncClient("127.0.0.1:50051") as client:
    ...     record = await client.get("user-42")
    """

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        timeout: float = 1.0,
        retries: int = 3,
        connections: int = 1,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Metadata | None = None,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: Pem | None = None,
        certificate_chain: Pem | None = None,
        private_key: Pem | None = None,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self._timeout = timeout
        self._retries = retries
        self._metadata = call_metadata(metadata, api_key)
        self._backoff = Backoff()
        credentials = channel_credentials(credentials, tls, root_certificates, certificate_chain, private_key)
        options = [connection_options(i, connections) for i in range(connections)]
        self._channels = [
            grpc.aio.secure_channel(address, credentials, options=o) if credentials is not None
            else grpc.aio.insecure_channel(address, options=o)
            for o in options
        ]
        self._next = itertools.cycle([stubs_for(c) for c in self._channels]).__next__

    # -- personalize and diagnostics ------------------------------------------------------

    async def get(
        self,
        key: str,
        collection: str = "customers",
        fields: Iterable[str] | None = None,
        *,
        min_token: bytes | None = None,
        timeout: float | None = None,
    ) -> Record:
        """One record and the person's memberships; raises NotFoundError if absent.

        ``min_token``: a consistency_token (EventEmitter.last_token, or an ack's):
        answer only once the server sees that write (read-your-writes), else
        UnavailableError with reason NOT_YET_CONSISTENT.
        """
        request = get_request(collection, key, fields, min_token)
        response = await self._read(lambda s: s.personalize.Get, request, timeout)
        return record_from_proto(response.record)

    async def batch_get(
        self,
        keys: Iterable[str],
        collection: str = "customers",
        fields: Iterable[str] | None = None,
        *,
        min_token: bytes | None = None,
        timeout: float | None = None,
    ) -> BatchResult:
        """Up to 1,000 records in request order, and the keys with no record."""
        request = batch_get_request(collection, keys, fields, min_token)
        return batch_from_proto(await self._read(lambda s: s.personalize.BatchGet, request, timeout))

    async def noop(self, payload: bytes = b"", *, timeout: float | None = None) -> None:
        """One round trip that does nothing: the transport floor."""
        request = diagnostics_pb2.NoopRequest(payload=payload)
        await self._read(lambda s: s.diagnostics.Noop, request, timeout)

    async def server_info(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Every GetServerInfo field (see Client.server_info)."""
        request = diagnostics_pb2.GetServerInfoRequest()
        return server_info_from_proto(await self._read(lambda s: s.diagnostics.GetServerInfo, request, timeout))

    # -- audiences ------------------------------------------------------------------------

    async def create_audience(self, audience_id: str, condition: ConditionLike, *, display_name: str = "",
                              description: str = "", timeout: float | None = None) -> Audience:
        request = create_audience_request(audience_id, condition, display_name, description)
        response = await self._write(lambda s: s.audiences.CreateAudience, request, timeout)
        return audience_from_proto(response.audience)

    async def update_audience(self, audience_id: str, condition: ConditionLike | None = None, *,
                              display_name: str | None = None, description: str | None = None,
                              timeout: float | None = None) -> Audience:
        request = update_audience_request(audience_id, condition, display_name, description)
        response = await self._write(lambda s: s.audiences.UpdateAudience, request, timeout)
        return audience_from_proto(response.audience)

    async def delete_audience(self, audience_id: str, *, timeout: float | None = None) -> None:
        request = audience_pb2.DeleteAudienceRequest(id=audience_id)
        await self._write(lambda s: s.audiences.DeleteAudience, request, timeout)

    async def get_audience(self, audience_id: str, *, timeout: float | None = None) -> Audience:
        request = audience_pb2.GetAudienceRequest(id=audience_id)
        return audience_from_proto((await self._read(lambda s: s.audiences.GetAudience, request, timeout)).audience)

    async def wait_live(self, audience_id: str, *, timeout: float = 600.0, poll: float = 0.05) -> Audience:
        """Waits until the audience's backfill has ended (TimeoutError after ``timeout`` s); returns it, live."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not (audience := await self.get_audience(audience_id)).live:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"audience {audience_id!r} still backfilling after {timeout:g}s "
                                   f"({audience.backfill_progress:.0%})")
            await asyncio.sleep(poll)
        return audience

    async def list_audiences(self, *, timeout: float | None = None) -> list[Audience]:
        out: list[Audience] = []
        token = ""
        while True:
            request = audience_pb2.ListAudiencesRequest(page_token=token)
            response = await self._read(lambda s: s.audiences.ListAudiences, request, timeout)
            out += [audience_from_proto(a) for a in response.audiences]
            token = response.next_page_token
            if not token:
                return out

    async def preview_audience(self, target: str | ConditionLike, *, sample_size: int = 10,
                               timeout: float | None = None) -> Preview:
        request = preview_request(target, sample_size)
        response = await self._read(lambda s: s.audiences.PreviewAudience, request, timeout)
        return Preview(count=response.count, sample_keys=list(response.sample_keys))

    async def check_membership(self, person_key: str, audience_ids: Iterable[str] = (), *, min_token: bytes | None = None,
                               timeout: float | None = None) -> list[Membership]:
        request = audience_pb2.CheckMembershipRequest(person_key=person_key,
                                                      audience_ids=_strings("audience_ids", audience_ids),
                                                      min_token=min_token or b"")
        return memberships_from_proto(await self._read(lambda s: s.audiences.CheckMembership, request, timeout))

    async def list_members(self, audience_id: str, *, page_size: int = 0, page_token: str = "",
                           timeout: float | None = None) -> MembersPage:
        request = audience_pb2.ListMembersRequest(id=audience_id, page_size=page_size, page_token=page_token)
        response = await self._read(lambda s: s.audiences.ListMembers, request, timeout)
        return MembersPage(person_keys=list(response.person_keys), next_page_token=response.next_page_token)

    async def explain_membership(self, audience_id: str, person_key: str, *,
                                 timeout: float | None = None) -> MembershipExplanation:
        request = audience_pb2.ExplainMembershipRequest(id=audience_id, person_key=person_key)
        response = await self._read(lambda s: s.audiences.ExplainMembership, request, timeout)
        return membership_explanation_from_proto(response)

    def watch_memberships(self, audience_ids: Iterable[str] = (), *, min_token: bytes | None = None, start: str = "now", after_sequence: int = 0,
                          timeout: float | None = None) -> AsyncIterator[MembershipChange | SnapshotEnd]:
        """An async iterator of changes (see Client.watch_memberships); the stream starts now."""
        request = watch_request(audience_ids, start, after_sequence)
        call = self._next().audiences.WatchMemberships(request, timeout=timeout, metadata=self._metadata)
        return _watch(call)

    # -- lifecycle ------------------------------------------------------------------------

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _read(
        self, method: Callable[[_Stubs], Callable[..., Awaitable[_Response]]], request: Any, timeout: float | None,
        retries: int | None = None,
    ) -> _Response:
        """Calls an idempotent method on the next connection; every attempt gets the whole timeout."""
        deadline = self._timeout if timeout is None else timeout
        retries = self._retries if retries is None else retries
        retry = 0
        while True:
            try:
                return await method(self._next())(request, timeout=deadline, metadata=self._metadata)
            except grpc.RpcError as err:  # grpc.aio.AioRpcError subclasses it
                if not should_retry(err, retry, retries):
                    raise error_from_rpc_error(err) from err
                delay = pause(err, retry, self._backoff)  # `err` is unbound after the except block
            await asyncio.sleep(delay)
            retry += 1

    async def _write(self, method: Callable[[_Stubs], Callable[..., Awaitable[_Response]]], request: Any,
                     timeout: float | None) -> _Response:
        """Calls a method that changes something: once (a retry could apply it twice)."""
        return await self._read(method, request, timeout, retries=0)


async def _watch(call: Any) -> AsyncIterator[MembershipChange | SnapshotEnd]:
    try:
        async for response in call:
            for record in watch_records(response):
                yield record
    except grpc.RpcError as err:
        raise error_from_rpc_error(err) from err
    finally:
        call.cancel()
