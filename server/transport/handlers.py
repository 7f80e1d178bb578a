"""gRPC method handlers built from a service descriptor and a servicer object: one helper for every service.

``handlers_for(service, impl)`` binds each RPC of ``service`` to the method
of ``impl`` named after it in snake_case (``BatchGet`` -> ``batch_get``):

- requests are decoded leniently, so bad bytes answer INVALID_ARGUMENT
  instead of gRPC's INTERNAL (transport/errors.py);
- unary and server-streaming methods are guarded: domain errors become
  statuses from the one error table, surprises INTERNAL with a request id;
  bidirectional methods guard themselves (they acknowledge what they can
  before failing);
- a method may return ``bytes`` that already are the reply's wire form
  (PersonalizeService assembles them from stored records);
- an RPC ``impl`` lacks answers UNIMPLEMENTED, reason NOT_IMPLEMENTED, rather
  than pretending to work.
"""

from __future__ import annotations

import re

import grpc
from google.protobuf import message_factory

from ..domain.errors import NotImplementedYet
from .errors import guarded, guarded_stream, lenient, status_of


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _serialize(reply) -> bytes:
    return reply if type(reply) is bytes else reply.SerializeToString()


def _status(full_name: str) -> grpc.Status:
    return status_of(NotImplementedYet(f"{full_name} is not implemented by this server yet",
                                       metadata={"method": full_name}))


def unimplemented(service, method) -> grpc.RpcMethodHandler:
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


def _bound(service, method, fn) -> grpc.RpcMethodHandler:
    label = f"{service.name}.{method.name}"
    decode = lenient(message_factory.GetMessageClass(method.input_type))
    if method.client_streaming and method.server_streaming:
        return grpc.stream_stream_rpc_method_handler(fn, request_deserializer=decode, response_serializer=_serialize)
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(guarded_stream(label)(fn), request_deserializer=decode,
                                                    response_serializer=_serialize)
    if method.client_streaming:  # no such RPC in qualify.v1 yet
        raise TypeError(f"{label}: client-streaming RPCs are not supported")
    return grpc.unary_unary_rpc_method_handler(guarded(label)(fn), request_deserializer=decode,
                                               response_serializer=_serialize)


def handlers_for(service, impl=None) -> grpc.GenericRpcHandler:
    """Every method of ``service`` bound to ``impl`` (None: all UNIMPLEMENTED); see the module docstring."""
    methods = {}
    for m in service.methods:
        fn = getattr(impl, _snake(m.name), None) if impl is not None else None
        methods[m.name] = _bound(service, m, fn) if fn is not None else unimplemented(service, m)
    return grpc.method_handlers_generic_handler(service.full_name, methods)
