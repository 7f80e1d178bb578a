"""Serving processes forward the writer's RPCs to the process that writes.

With ``--workers N`` only one process holds the realtime state (the LMDB
writer); the serving processes answer Personalize from the shared map
themselves and pass IngestService and AudienceService calls, as raw bytes,
to the writer over a Unix socket. Statuses and their details pass through
unchanged, so a client cannot tell which process answered.
"""

from __future__ import annotations

import grpc


async def _abort_like(context, err: grpc.aio.AioRpcError) -> None:
    # The trailers carry grpc-status-details-bin: ErrorInfo and BadRequest pass through.
    trailers = tuple(tuple(item) for item in (err.trailing_metadata() or ()))
    await context.abort(err.code(), err.details() or "", trailers)


def _streaming(call):
    """Forwards a call whose replies stream (request: one message or a stream)."""

    async def handler(request, context):
        upstream = call(request, timeout=context.time_remaining(), metadata=context.invocation_metadata())
        try:
            async for reply in upstream:
                yield reply
        except grpc.aio.AioRpcError as err:
            await _abort_like(context, err)

    return handler


def _unary(call):
    """Forwards a call with one reply (request: one message or a stream)."""

    async def handler(request, context):
        try:
            return await call(request, timeout=context.time_remaining(), metadata=context.invocation_metadata())
        except grpc.aio.AioRpcError as err:
            await _abort_like(context, err)

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
