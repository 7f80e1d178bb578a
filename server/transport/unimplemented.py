"""The parts of the contract later releases build answer UNIMPLEMENTED, honestly.

Each such RPC fails with UNIMPLEMENTED and an ErrorInfo whose reason is
NOT_IMPLEMENTED, rather than pretending to work.
"""

from __future__ import annotations

import grpc
from google.rpc import code_pb2

from .errors import to_status


def _status(full_name: str) -> grpc.Status:
    return to_status(code_pb2.UNIMPLEMENTED, f"{full_name} is not implemented by this server yet",
                     "NOT_IMPLEMENTED", {"method": full_name})


def handler_for(service) -> grpc.GenericRpcHandler:
    """A handler answering every method of a service descriptor with UNIMPLEMENTED."""
    methods = {}
    for m in service.methods:
        status = _status(f"{service.full_name}/{m.name}")
        deserialize = lambda raw: raw  # noqa: E731 - the request is never read

        async def unary(request, context, status=status):
            await context.abort_with_status(status)

        async def streaming(request, context, status=status):
            await context.abort_with_status(status)
            yield  # pragma: no cover - makes this an async generator

        if m.client_streaming and m.server_streaming:
            h = grpc.stream_stream_rpc_method_handler(streaming, request_deserializer=deserialize)
        elif m.client_streaming:
            h = grpc.stream_unary_rpc_method_handler(unary, request_deserializer=deserialize)
        elif m.server_streaming:
            h = grpc.unary_stream_rpc_method_handler(streaming, request_deserializer=deserialize)
        else:
            h = grpc.unary_unary_rpc_method_handler(unary, request_deserializer=deserialize)
        methods[m.name] = h
    return grpc.method_handlers_generic_handler(service.full_name, methods)
