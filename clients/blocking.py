"""The blocking client, over one grpc channel (or ``connections`` of them)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

import grpc

from qualify.v1 import (
    audience_pb2,
    audience_pb2_grpc,
    diagnostics_pb2,
    diagnostics_pb2_grpc,
    personalize_pb2_grpc,
)

from ._call import (
    Backoff,
    Metadata,
    Pem,
    call_metadata,
    channel_credentials,
    connection_options,
    open_channel,
    pause,
    should_retry,
)
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

_Response = TypeVar("_Response")


class _Stubs(NamedTuple):
    personalize: personalize_pb2_grpc.PersonalizeServiceStub
    diagnostics: diagnostics_pb2_grpc.DiagnosticsServiceStub
    audiences: audience_pb2_grpc.AudienceServiceStub


def stubs_for(channel: Any) -> _Stubs:
    return _Stubs(personalize_pb2_grpc.PersonalizeServiceStub(channel),
                  diagnostics_pb2_grpc.DiagnosticsServiceStub(channel),
                  audience_pb2_grpc.AudienceServiceStub(channel))


class Client:
    """A blocking Qualify client; reads are retried on UNAVAILABLE and RESOURCE_EXHAUSTED.

    `api_key` is sent with every call as `authorization: Bearer <key>`. TLS:
    `root_certificates` (the CA of the server's certificate, PEM bytes or a
    path; default the system's roots), plus `certificate_chain` and
    `private_key` for mutual TLS; `tls=True` alone uses the system's roots.
    A RESOURCE_EXHAUSTED answer carrying a RetryInfo is retried no sooner than
    it asks.

    `connections=N` opens N channels, each its own TCP connection, and sends
    calls round-robin over them (a retry goes to the next): against
    `qualify serve --workers N`, where the kernel hands each connection to
    one serving process, that is what spreads one process's calls over the
    workers. The default, 1, shares the process's one connection.

    Audience helpers take the condition as the README's proto-JSON dict
    (proto field names), JSON text, or a `qualify.v1.Condition`, and return
    plain dataclasses. Writes (create, update, delete) are not retried.

    >>> with Client("127.0.0.1:50051") as client:
    ...     record = client.get("user-42", fields=["email", "plan"])
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
        self._channels = [open_channel(address, credentials, o) for o in options]
        self._next = itertools.cycle([stubs_for(c) for c in self._channels]).__next__

    # -- personalize and diagnostics ------------------------------------------------------

    def get(
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
        response = self._read(lambda s: s.personalize.Get, get_request(collection, key, fields, min_token), timeout)
        return record_from_proto(response.record)

    def batch_get(
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
        return batch_from_proto(self._read(lambda s: s.personalize.BatchGet, request, timeout))

    def noop(self, payload: bytes = b"", *, timeout: float | None = None) -> None:
        """One round trip that does nothing: the transport floor."""
        self._read(lambda s: s.diagnostics.Noop, diagnostics_pb2.NoopRequest(payload=payload), timeout)

    def server_info(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Every GetServerInfo field: version, sync_generation, collections, people, worker_pid,
        events_logged, events_unmatched, max_message_bytes (0: not reported)."""
        request = diagnostics_pb2.GetServerInfoRequest()
        return server_info_from_proto(self._read(lambda s: s.diagnostics.GetServerInfo, request, timeout))

    # -- audiences ------------------------------------------------------------------------

    def create_audience(self, audience_id: str, condition: ConditionLike, *, display_name: str = "",
                        description: str = "", timeout: float | None = None) -> Audience:
        """Creates an audience (AlreadyExistsError if the id is taken) and returns at once.

        A backfill over the retained events then brings its members, beside
        ingest: the audience is not ``live`` until it ends (``wait_live``).
        """
        request = create_audience_request(audience_id, condition, display_name, description)
        return audience_from_proto(self._write(lambda s: s.audiences.CreateAudience, request, timeout).audience)

    def update_audience(self, audience_id: str, condition: ConditionLike | None = None, *,
                        display_name: str | None = None, description: str | None = None,
                        timeout: float | None = None) -> Audience:
        """Replaces the fields given (the rest stay); a new condition's members come by a backfill (``wait_live``)."""
        request = update_audience_request(audience_id, condition, display_name, description)
        return audience_from_proto(self._write(lambda s: s.audiences.UpdateAudience, request, timeout).audience)

    def delete_audience(self, audience_id: str, *, timeout: float | None = None) -> None:
        """Deletes an audience; every member exits. NotFoundError if there is none."""
        self._write(lambda s: s.audiences.DeleteAudience, audience_pb2.DeleteAudienceRequest(id=audience_id), timeout)

    def get_audience(self, audience_id: str, *, timeout: float | None = None) -> Audience:
        request = audience_pb2.GetAudienceRequest(id=audience_id)
        return audience_from_proto(self._read(lambda s: s.audiences.GetAudience, request, timeout).audience)

    def wait_live(self, audience_id: str, *, timeout: float = 600.0, poll: float = 0.05) -> Audience:
        """Waits until the audience's backfill has ended (TimeoutError after ``timeout`` s); returns it, live."""
        deadline = time.monotonic() + timeout
        while not (audience := self.get_audience(audience_id)).live:
            if time.monotonic() > deadline:
                raise TimeoutError(f"audience {audience_id!r} still backfilling after {timeout:g}s "
                                   f"({audience.backfill_progress:.0%})")
            time.sleep(poll)
        return audience

    def list_audiences(self, *, timeout: float | None = None) -> list[Audience]:
        """Every audience (all pages; each page call gets the whole timeout)."""
        out: list[Audience] = []
        token = ""
        while True:
            request = audience_pb2.ListAudiencesRequest(page_token=token)
            response = self._read(lambda s: s.audiences.ListAudiences, request, timeout)
            out += [audience_from_proto(a) for a in response.audiences]
            token = response.next_page_token
            if not token:
                return out

    def preview_audience(self, target: str | ConditionLike, *, sample_size: int = 10,
                         timeout: float | None = None) -> Preview:
        """How many qualify now: ``target`` is a saved audience's id or a draft condition."""
        response = self._read(lambda s: s.audiences.PreviewAudience, preview_request(target, sample_size), timeout)
        return Preview(count=response.count, sample_keys=list(response.sample_keys))

    def check_membership(self, person_key: str, audience_ids: Iterable[str] = (), *, min_token: bytes | None = None,
                         timeout: float | None = None) -> list[Membership]:
        """The audiences (of ``audience_ids``; empty: all) the person is in now."""
        request = audience_pb2.CheckMembershipRequest(person_key=person_key,
                                                      audience_ids=_strings("audience_ids", audience_ids),
                                                      min_token=min_token or b"")
        return memberships_from_proto(self._read(lambda s: s.audiences.CheckMembership, request, timeout))

    def list_members(self, audience_id: str, *, page_size: int = 0, page_token: str = "",
                     timeout: float | None = None) -> MembersPage:
        """One page of member keys (``page_size`` 0: the server's 1,000); pass ``next_page_token`` on."""
        request = audience_pb2.ListMembersRequest(id=audience_id, page_size=page_size, page_token=page_token)
        response = self._read(lambda s: s.audiences.ListMembers, request, timeout)
        return MembersPage(person_keys=list(response.person_keys), next_page_token=response.next_page_token)

    def explain_membership(self, audience_id: str, person_key: str, *,
                           timeout: float | None = None) -> MembershipExplanation:
        """Every condition node's value for the person, and when it will change by itself."""
        request = audience_pb2.ExplainMembershipRequest(id=audience_id, person_key=person_key)
        return membership_explanation_from_proto(self._read(lambda s: s.audiences.ExplainMembership, request, timeout))

    def watch_memberships(self, audience_ids: Iterable[str] = (), *, min_token: bytes | None = None, start: str = "now", after_sequence: int = 0,
                          timeout: float | None = None) -> Iterator[MembershipChange | SnapshotEnd]:
        """Membership changes as they happen, in sequence order, until the caller stops iterating.

        ``start``: "now", "sequence" (after ``after_sequence``; resume there
        after an error) or "snapshot" (current members as enters with
        sequence 0, then a ``SnapshotEnd``, then live changes). ``timeout``:
        a deadline for the whole stream (default none). Errors are raised as
        QualifyError subclasses; the stream is not resumed for you.
        """
        request = watch_request(audience_ids, start, after_sequence)  # checked now, not at the first next()
        call = self._next().audiences.WatchMemberships(request, timeout=timeout, metadata=self._metadata)
        return _watch(call)

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _read(
        self, method: Callable[[_Stubs], Callable[..., _Response]], request: Any, timeout: float | None,
        retries: int | None = None,
    ) -> _Response:
        """Calls an idempotent method on the next connection; every attempt gets the whole timeout."""
        deadline = self._timeout if timeout is None else timeout
        retries = self._retries if retries is None else retries
        retry = 0
        while True:
            try:
                return method(self._next())(request, timeout=deadline, metadata=self._metadata)
            except grpc.RpcError as err:
                if not should_retry(err, retry, retries):
                    raise error_from_rpc_error(err) from err
                delay = pause(err, retry, self._backoff)  # `err` is unbound after the except block
            time.sleep(delay)
            retry += 1

    def _write(self, method: Callable[[_Stubs], Callable[..., _Response]], request: Any,
               timeout: float | None) -> _Response:
        """Calls a method that changes something: once (a retry could apply it twice)."""
        return self._read(method, request, timeout, retries=0)


def _watch(call: Any) -> Iterator[MembershipChange | SnapshotEnd]:
    try:
        for response in call:
            yield from watch_records(response)
    except grpc.RpcError as err:
        raise error_from_rpc_error(err) from err
    finally:
        call.cancel()  # the caller stopped iterating (or the stream ended): free the server's watch
