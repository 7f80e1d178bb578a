"""Serving processes forward the writer's RPCs to the process that writes.

With ``--workers N`` only one process holds the realtime state (the LMDB
writer); the serving processes answer Personalize from the shared map
themselves and pass IngestService and AudienceService calls, as raw bytes,
to the writer over a Unix socket. Statuses and their details pass through
unchanged, so a client cannot tell which process answered.
"""

from __future__ import annotations

import asyncio

import grpc

from ..observability.logs import REQUEST_ID

# What grpc.aio reports, client-side, when it could not send a request message
# because the other end had already finished the call.
_SEND_RACE = (grpc.StatusCode.INTERNAL, "Internal error from Core")


def _forwarded(context) -> tuple:
    """The caller's metadata (its API key included: the writer checks it again), with this call's request id."""
    metadata = tuple((k, v) for k, v in context.invocation_metadata() if k != "x-request-id")
    return (*metadata, ("x-request-id", REQUEST_ID.get())) if REQUEST_ID.get() else metadata


def _now(getter):
    """The value of a finished call's status getter, without an event loop.

    Inside a done callback the status is set, so ``code()``, ``details()``
    and ``trailing_metadata()`` complete at their first step.
    """
    step = getter()
    try:
        step.send(None)
    except StopIteration as done:
        return done.value
    step.close()
    raise RuntimeError("the call has no status yet")


def _statuses(upstream) -> list[tuple]:
    """Every status the upstream call is given, in order, as (code, details, trailers).

    Why more than one: when the writer ends a call whose requests stream (a
    malformed batch) while this process is still forwarding the caller's next
    request, grpc.aio overwrites the writer's status with INTERNAL "Internal
    error from Core" if the failed write is processed after it, or sets that
    first and the writer's status after (grpc/grpc#36066). A done callback
    sees each status as it is set, so the writer's is never lost.
    """
    seen: list[tuple] = []
    upstream.add_done_callback(lambda call: seen.append(
        (_now(call.code), _now(call.details), _now(call.trailing_metadata))))
    return seen


async def _abort_like(context, err: grpc.aio.AioRpcError, seen: list[tuple]) -> None:
    status = (err.code(), err.details(), err.trailing_metadata())
    for _ in range(100):  # the writer's own status is at most in flight: wait up to 0.5 s for it
        real = [s for s in seen if s[:2] != _SEND_RACE]
        if real or status[:2] != _SEND_RACE:
            status = real[0] if real else status
            break
        await asyncio.sleep(0.005)
    code, details, trailers = status
    # The trailers carry grpc-status-details-bin: ErrorInfo and BadRequest pass through.
    await context.abort(code, details or "", tuple(tuple(item) for item in (trailers or ())))


def _streaming(call):
    """Forwards a call whose replies stream (request: one message or a stream)."""

    async def handler(request, context):
        upstream = call(request, timeout=context.time_remaining(), metadata=_forwarded(context))
        seen = _statuses(upstream)
        try:
            async for reply in upstream:
                yield reply
        except grpc.aio.AioRpcError as err:
            await _abort_like(context, err, seen)

    return handler


def _unary(call):
    """Forwards a call with one reply (request: one message or a stream)."""

    async def handler(request, context):
        upstream = call(request, timeout=context.time_remaining(), metadata=_forwarded(context))
        seen = _statuses(upstream)
        try:
            return await upstream
        except grpc.aio.AioRpcError as err:
            await _abort_like(context, err, seen)

    return handler


def proxy_handler(channel: grpc.aio.Channel, service) -> grpc.GenericRpcHandler:
    """Forwards every method of a service descriptor through ``channel``, as raw bytes."""
    methods = {}
    for m in service.methods:
        path = f"/{service.full_name}/{m.name}"
        if m.client_streaming and m.server_streaming:
            methods[m.name] = grpc.stream_stream_rpc_method_handler(_streaming(channel.stream_stream(path)))
        elif m.server_streaming:
            methods[m.name] = grpc.unary_stream_rpc_method_handler(_streaming(channel.unary_stream(path)))
        elif m.client_streaming:
            methods[m.name] = grpc.stream_unary_rpc_method_handler(_unary(channel.stream_unary(path)))
        else:
            methods[m.name] = grpc.unary_unary_rpc_method_handler(_unary(channel.unary_unary(path)))
    return grpc.method_handlers_generic_handler(service.full_name, methods)
