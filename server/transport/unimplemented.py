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


def method_handler(service, method) -> grpc.RpcMethodHandler:
    """A handler answering one method of a service descriptor with UNIMPLEMENTED."""
    name = f"{service.full_name}/{method.name}"
    deserialize = lambda raw: raw  # noqa: E731 - the request is never read

    async def unary(request, context):
        await context.abort_with_status(_status(name))  # per call: it carries the request id

    async def streaming(request, context):
        await context.abort_with_status(_status(name))
        yield  # pragma: no cover - makes this an async generator

    if method.client_streaming and method.server_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, request_deserializer=deserialize)
    if method.client_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, request_deserializer=deserialize)
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, request_deserializer=deserialize)
    return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=deserialize)


def handler_for(service) -> grpc.GenericRpcHandler:
    """A handler answering every method of a service descriptor with UNIMPLEMENTED."""
    return grpc.method_handlers_generic_handler(
        service.full_name, {m.name: method_handler(service, m) for m in service.methods})
