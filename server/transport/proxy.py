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


def proxy_handler(channel: grpc.aio.Channel, service) -> grpc.GenericRpcHandler:
    """Forwards every method of a service descriptor through ``channel``."""
    methods = {}
    for m in service.methods:
        path = f"/{service.full_name}/{m.name}"
        if m.client_streaming and m.server_streaming:
            call = channel.stream_stream(path)

            async def handler(requests, context, call=call):
                upstream = call(requests, timeout=context.time_remaining(), metadata=context.invocation_metadata())
                try:
                    async for reply in upstream:
                        yield reply
                except grpc.aio.AioRpcError as err:
                    await _abort_like(context, err)

            methods[m.name] = grpc.stream_stream_rpc_method_handler(handler)
        elif m.server_streaming:
            call = channel.unary_stream(path)

            async def handler(request, context, call=call):
                upstream = call(request, timeout=context.time_remaining(), metadata=context.invocation_metadata())
                try:
                    async for reply in upstream:
                        yield reply
                except grpc.aio.AioRpcError as err:
                    await _abort_like(context, err)

            methods[m.name] = grpc.unary_stream_rpc_method_handler(handler)
        elif m.client_streaming:
            call = channel.stream_unary(path)

            async def handler(requests, context, call=call):
                try:
                    return await call(requests, timeout=context.time_remaining(),
                                      metadata=context.invocation_metadata())
                except grpc.aio.AioRpcError as err:
                    await _abort_like(context, err)

            methods[m.name] = grpc.stream_unary_rpc_method_handler(handler)
        else:
            call = channel.unary_unary(path)

            async def handler(request, context, call=call):
                try:
                    return await call(request, timeout=context.time_remaining(),
                                      metadata=context.invocation_metadata())
                except grpc.aio.AioRpcError as err:
                    await _abort_like(context, err)

            methods[m.name] = grpc.unary_unary_rpc_method_handler(handler)
    return grpc.method_handlers_generic_handler(service.full_name, methods)
