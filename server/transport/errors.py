"""Domain errors -> google.rpc.Status, from one table.

Every failure leaves as a gRPC status whose details hold an ErrorInfo (reason
from qualify.v1.ErrorReason, domain "qualify.dev") and, for invalid input, a
BadRequest with one violation per field. Unexpected exceptions are logged with
a request id and answered INTERNAL with that id only: no internals leak.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import math

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from google.protobuf.message import DecodeError

from ..domain.errors import FieldViolation, InvalidRequest, QualifyError, Status
from ..observability.logs import REQUEST_ID, new_request_id

log = logging.getLogger(__name__)

DOMAIN = "qualify.dev"

_CODES = {
    Status.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    Status.NOT_FOUND: code_pb2.NOT_FOUND,
    Status.ALREADY_EXISTS: code_pb2.ALREADY_EXISTS,
    Status.UNAVAILABLE: code_pb2.UNAVAILABLE,
    Status.UNIMPLEMENTED: code_pb2.UNIMPLEMENTED,
    Status.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
    Status.UNAUTHENTICATED: code_pb2.UNAUTHENTICATED,
    Status.PERMISSION_DENIED: code_pb2.PERMISSION_DENIED,
    Status.FAILED_PRECONDITION: code_pb2.FAILED_PRECONDITION,
    Status.DEADLINE_EXCEEDED: code_pb2.DEADLINE_EXCEEDED,
    Status.INTERNAL: code_pb2.INTERNAL,
}


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


class _Status(collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):
    pass


def to_status(code: int, message: str, reason: str, metadata: dict[str, str] | None = None,
              violations: list[tuple[str, str]] | None = None, retry_after: float | None = None) -> grpc.Status:
    """The status to abort with; its trailers also carry the call's ``x-request-id``.

    (Aborting replaces trailers set earlier, so the request id rides here.)
    """
    status = status_pb2.Status(code=code, message=message)
    status.details.append(_pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata or {})))
    if violations:
        bad = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations])
        status.details.append(_pack(bad))
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(1_000_000, int(retry_after * 1e9)))  # at least 1 ms: "now" is not a delay
        status.details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    plain = rpc_status.to_status(status)
    request_id = REQUEST_ID.get()
    if not request_id:
        return plain
    return _Status(plain.code, plain.details, (*plain.trailing_metadata, ("x-request-id", request_id)))


def status_of(err: QualifyError) -> grpc.Status:
    return to_status(_CODES[err.status], err.message, err.reason, err.metadata,
                     [(v.field, v.description) for v in err.violations], getattr(err, "retry_after", None))


def internal_status(exc: BaseException, method: str) -> grpc.Status:
    request_id = REQUEST_ID.get() or new_request_id()
    log.error("unexpected error in %s (request id %s)", method, request_id, exc_info=exc)
    return to_status(code_pb2.INTERNAL, f"internal error (request id {request_id})", "INTERNAL_ERROR",
                     {"request_id": request_id})


def guarded(method: str):
    """Wraps an async unary handler: domain errors and surprises become statuses."""

    def wrap(fn):
        @functools.wraps(fn)
        async def handler(request, context):
            try:
                return await fn(request, context)
            except QualifyError as err:
                await context.abort_with_status(status_of(err))
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - the one place surprises are caught
                await context.abort_with_status(internal_status(exc, method))

        return handler

    return wrap


def guarded_stream(method: str):
    """``guarded`` for a handler that is an async generator of replies."""

    def wrap(fn):
        @functools.wraps(fn)
        async def handler(request, context):
            try:
                async for reply in fn(request, context):
                    yield reply
            except QualifyError as err:
                await context.abort_with_status(status_of(err))
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:  # noqa: BLE001 - the one place surprises are caught
                await context.abort_with_status(internal_status(exc, method))

        return handler

    return wrap


class Malformed:
    """Stands in for a request whose bytes are not valid protobuf.

    gRPC would answer a failing deserializer with INTERNAL; decoding in the
    handler lets it answer INVALID_ARGUMENT instead.
    """

    def __init__(self, type_name: str):
        self.type_name = type_name


def lenient(message_type):
    """A request deserializer that never raises: bad bytes become a Malformed."""

    def parse(raw: bytes):
        try:
            return message_type.FromString(raw)
        except DecodeError:
            return Malformed(message_type.DESCRIPTOR.full_name)

    return parse


def reject_malformed(request) -> None:
    if type(request) is Malformed:
        raise InvalidRequest(f"the request is not a valid {request.type_name} message",
                             violations=[FieldViolation("(request)", f"could not be decoded as {request.type_name}")])


# -- the same errors over HTTP (AIP-193) ------------------------------------------------

# google.rpc.Code -> HTTP status, as google/rpc/code.proto documents each code.
# Not a second error table: a domain error's code still comes from _CODES.
_HTTP_STATUS = {
    code_pb2.INVALID_ARGUMENT: 400, code_pb2.FAILED_PRECONDITION: 400, code_pb2.UNAUTHENTICATED: 401,
    code_pb2.PERMISSION_DENIED: 403, code_pb2.NOT_FOUND: 404, code_pb2.ALREADY_EXISTS: 409,
    code_pb2.RESOURCE_EXHAUSTED: 429, code_pb2.UNIMPLEMENTED: 501, code_pb2.UNAVAILABLE: 503,
    code_pb2.DEADLINE_EXCEEDED: 504,
    code_pb2.INTERNAL: 500,
}
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"


def http_body(code: int, message: str, reason: str, metadata: dict[str, str] | None = None,
              violations: list[tuple[str, str]] | None = None,
              retry_after: float | None = None) -> tuple[int, dict, dict[str, str]]:
    """(HTTP status, AIP-193 JSON body, extra headers) for the status ``to_status`` would send."""
    details: list[dict] = [{"@type": _ERROR_INFO, "reason": reason, "domain": DOMAIN, "metadata": metadata or {}}]
    if violations:
        details.append({"@type": "type.googleapis.com/google.rpc.BadRequest",
                        "fieldViolations": [{"field": f, "description": d} for f, d in violations]})
    headers = {}
    if retry_after is not None:
        seconds = max(0.001, retry_after)
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{seconds:.3f}s"})
        headers["Retry-After"] = str(max(1, math.ceil(seconds)))  # HTTP counts whole seconds
    http = _HTTP_STATUS.get(code, 500)
    status = code_pb2.Code.Name(code)
    return http, {"error": {"code": http, "message": message, "status": status, "details": details}}, headers


def http_error_of(err: QualifyError) -> tuple[int, dict, dict[str, str]]:
    return http_body(_CODES[err.status], err.message, err.reason, err.metadata,
                     [(v.field, v.description) for v in err.violations], getattr(err, "retry_after", None))


def http_internal(exc: BaseException, method: str) -> tuple[int, dict, dict[str, str]]:
    request_id = REQUEST_ID.get() or new_request_id()
    log.error("unexpected error in %s (request id %s)", method, request_id, exc_info=exc)
    return http_body(code_pb2.INTERNAL, f"internal error (request id {request_id})", "INTERNAL_ERROR",
                     {"request_id": request_id})
