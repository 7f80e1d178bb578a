"""The blocking client, over one grpc channel."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, TypeVar

import grpc

from qualify.v1 import diagnostics_pb2, diagnostics_pb2_grpc, personalize_pb2_grpc

from ._call import Backoff, Metadata, Pem, call_metadata, channel_credentials, open_channel, pause, should_retry
from ._errors import error_from_rpc_error
from ._records import (
    BatchResult,
    Record,
    batch_from_proto,
    batch_get_request,
    get_request,
    record_from_proto,
    server_info_from_proto,
)

_Response = TypeVar("_Response")


class Client:
    """A blocking Qualify client; reads are retried on UNAVAILABLE and RESOURCE_EXHAUSTED.

    `api_key` is sent with every call as `authorization: Bearer <key>`. TLS:
    `root_certificates` (the CA of the server's certificate, PEM bytes or a
    path; default the system's roots), plus `certificate_chain` and
    `private_key` for mutual TLS; `tls=True` alone uses the system's roots.
    A RESOURCE_EXHAUSTED answer carrying a RetryInfo is retried no sooner than
    it asks.

    >>> with Client("127.0.0.1:50051") as client:
    ...     record = client.get("user-42", fields=["email", "plan"])
    """

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        timeout: float = 1.0,
        retries: int = 3,
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
        self._channel = open_channel(address, credentials)
        self._personalize = personalize_pb2_grpc.PersonalizeServiceStub(self._channel)
        self._diagnostics = diagnostics_pb2_grpc.DiagnosticsServiceStub(self._channel)

    def get(
        self,
        key: str,
        collection: str = "customers",
        fields: Iterable[str] | None = None,
        *,
        timeout: float | None = None,
    ) -> Record:
        """One record and the person's memberships; raises NotFoundError if absent."""
        response = self._read(self._personalize.Get, get_request(collection, key, fields), timeout)
        return record_from_proto(response.record)

    def batch_get(
        self,
        keys: Iterable[str],
        collection: str = "customers",
        fields: Iterable[str] | None = None,
        *,
        timeout: float | None = None,
    ) -> BatchResult:
        """Up to 1,000 records in request order, and the keys with no record."""
        request = batch_get_request(collection, keys, fields)
        return batch_from_proto(self._read(self._personalize.BatchGet, request, timeout))

    def noop(self, payload: bytes = b"", *, timeout: float | None = None) -> None:
        """One round trip that does nothing: the transport floor."""
        self._read(self._diagnostics.Noop, diagnostics_pb2.NoopRequest(payload=payload), timeout)

    def server_info(self, *, timeout: float | None = None) -> dict[str, Any]:
        """version, sync_generation, collections, people, worker_pid."""
        request = diagnostics_pb2.GetServerInfoRequest()
        return server_info_from_proto(self._read(self._diagnostics.GetServerInfo, request, timeout))

    def close(self) -> None:
        self._channel.close()

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
        self, method: Callable[..., _Response], request: Any, timeout: float | None
    ) -> _Response:
        """Calls an idempotent method; every attempt gets the whole timeout."""
        deadline = self._timeout if timeout is None else timeout
        retry = 0
        while True:
            try:
                return method(request, timeout=deadline, metadata=self._metadata)
            except grpc.RpcError as err:
                if not should_retry(err, retry, self._retries):
                    raise error_from_rpc_error(err) from err
                delay = pause(err, retry, self._backoff)  # `err` is unbound after the except block
            time.sleep(delay)
            retry += 1
