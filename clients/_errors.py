"""Client errors: every grpc.RpcError becomes one of these, from one table.

The server sends a `google.rpc.Status` in the `grpc-status-details-bin` trailer
whose details hold one `google.rpc.ErrorInfo` (the reason, a
qualify.v1.ErrorReason name) and, for invalid input, a `google.rpc.BadRequest`.
Callers branch on `type(err)` and `err.reason`, never on the message text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

# The trailer grpcio-status writes (grpc_status._common.GRPC_DETAILS_METADATA_KEY).
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class QualifyError(Exception):
    """A failed RPC. Subclasses name the gRPC status code family."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        reason: str = "",
        field_violations: Iterable[tuple[str, str]] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        #: The ErrorInfo reason, e.g. "KEY_NOT_FOUND"; "" when the server sent none.
        self.reason = reason
        #: (field path, description) pairs from the BadRequest detail.
        self.field_violations: list[tuple[str, str]] = list(field_violations)
        #: The ErrorInfo metadata (free-form context such as the collection).
        self.metadata: dict[str, str] = dict(metadata or {})

    def __str__(self) -> str:
        head = f"{self.code.name} ({self.reason})" if self.reason else self.code.name
        return f"{head}: {self.message}" if self.message else head

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.name}, reason={self.reason!r}, "
            f"message={self.message!r}, field_violations={self.field_violations!r})"
        )


class NotFoundError(QualifyError):
    """NOT_FOUND: e.g. KEY_NOT_FOUND, AUDIENCE_NOT_FOUND."""


class AlreadyExistsError(QualifyError):
    """ALREADY_EXISTS: e.g. AUDIENCE_ALREADY_EXISTS."""


class InvalidArgumentError(QualifyError):
    """INVALID_ARGUMENT: see `reason` and `field_violations`."""


class UnavailableError(QualifyError):
    """UNAVAILABLE: no connection, NOT_READY or STORAGE_UNAVAILABLE; retried on reads."""


class DeadlineExceededError(QualifyError):
    """DEADLINE_EXCEEDED: an attempt ran past its deadline."""


class ResourceExhaustedError(QualifyError):
    """RESOURCE_EXHAUSTED: the server is overloaded; retried on reads."""


class UnauthenticatedError(QualifyError):
    """UNAUTHENTICATED."""


class PermissionDeniedError(QualifyError):
    """PERMISSION_DENIED."""


class UnimplementedError(QualifyError):
    """UNIMPLEMENTED: the RPC is in the contract but not served (NOT_IMPLEMENTED)."""


_ERROR_BY_CODE: dict[grpc.StatusCode, type[QualifyError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
}


def error_from_rpc_error(err: grpc.RpcError) -> QualifyError:
    """Maps a failed call (blocking `grpc.RpcError` or `grpc.aio.AioRpcError`).

    Both kinds expose `code()`, `details()` and `trailing_metadata()` as plain
    methods once the call has failed (on AioRpcError they are not coroutines,
    unlike on a live `grpc.aio.Call`), and both trailers iterate as
    (key, value) pairs, so one reader serves both.
    `grpc_status.rpc_status.from_call` is not used: it raises ValueError when
    the Status proto's code or message differs from the call's (a proxy that
    rewrites the message would do that), which would lose the typed error.
    """
    code = _call_attr(err, "code") or grpc.StatusCode.UNKNOWN
    message = _call_attr(err, "details") or ""
    status = _rich_status(_call_attr(err, "trailing_metadata") or ())
    reason = ""
    violations: list[tuple[str, str]] = []
    metadata: dict[str, str] = {}
    if status is not None:
        message = message or status.message
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.extend((v.field, v.description) for v in bad.field_violations)
    cls = _ERROR_BY_CODE.get(code, QualifyError)
    return cls(message, code=code, reason=reason, field_violations=violations, metadata=metadata)


def _call_attr(err: grpc.RpcError, name: str) -> Any:
    # A bare grpc.RpcError need not be a grpc.Call (e.g. raised by an interceptor).
    method = getattr(err, name, None)
    return method() if callable(method) else None


def _rich_status(trailers: Iterable[tuple[str, str | bytes]]) -> status_pb2.Status | None:
    for key, value in trailers:
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                return None
    return None


def retry_info_delay(err: grpc.RpcError) -> float | None:
    """Seconds the server asked the caller to wait (a `google.rpc.RetryInfo` detail), if any."""
    status = _rich_status(_call_attr(err, "trailing_metadata") or ())
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    return None
