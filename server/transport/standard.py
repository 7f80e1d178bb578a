"""The standard services (health, reflection) behind lenient request decoding.

grpcio's own registrations decode with ``FromString``: bad bytes raise
DecodeError inside gRPC, which answers UNKNOWN and logs an ERROR with a
traceback per call. These services need no key, so anyone could flood the
log that way. ``add_standard`` registers the same servicers with a decoder
that never raises: a request that is not valid protobuf answers
INVALID_ARGUMENT (reason INVALID_REQUEST, like every other service), and the
log gets at most one warning per ``WARN_EVERY`` seconds, counting the rest.
A method the servicer leaves out (grpcio's aio health has no ``List``)
answers UNIMPLEMENTED instead of an UNKNOWN with a traceback.
"""

from __future__ import annotations

import inspect
import logging
import time

import grpc
from google.protobuf.message import DecodeError
from google.rpc import code_pb2

from .errors import to_status

log = logging.getLogger(__name__)

WARN_EVERY = 60.0


class _Bad:
    __slots__ = ()


_BAD = _Bad()


class _Capture:
    """Stands in for the server while a generated ``add_*_to_server`` registers its method handlers."""

    def __init__(self):
        self.service = ""
        self.methods: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass  # the registered handlers below carry the same methods

    def add_registered_method_handlers(self, service: str, methods: dict) -> None:
        self.service, self.methods = service, dict(methods)


class _Warnings:
    """One warning per ``every`` seconds, with the count of undecodable requests since the last."""

    def __init__(self, every: float = WARN_EVERY, clock=time.monotonic):
        self.every, self.clock = every, clock
        self.next_at = 0.0
        self.suppressed = 0

    def note(self, method: str) -> None:
        now = self.clock()
        if now < self.next_at:
            self.suppressed += 1
            return
        log.warning("undecodable request to %s answered INVALID_ARGUMENT (%d more since the last warning)",
                    method, self.suppressed)
        self.next_at, self.suppressed = now + self.every, 0


_WARNINGS = _Warnings()


def _decoder(parse):
    def decode(raw: bytes):
        try:
            return parse(raw)
        except DecodeError:
            return _BAD
    return decode


async def _refuse(context, method: str) -> None:
    _WARNINGS.note(method)
    await context.abort_with_status(to_status(
        code_pb2.INVALID_ARGUMENT, f"the request to {method} is not a valid protobuf message", "INVALID_REQUEST",
        violations=[("(request)", "could not be decoded")]))


class _BadInStream(Exception):
    pass


def _lenient(method: str, h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    decode, encode = _decoder(h.request_deserializer), h.response_serializer
    if h.unary_unary is not None:
        fn = h.unary_unary

        async def unary(request, context):
            if request is _BAD:
                await _refuse(context, method)
            try:
                return await fn(request, context)
            except NotImplementedError:  # e.g. Health.List, which grpcio's aio servicer leaves out
                await context.abort_with_status(to_status(
                    code_pb2.UNIMPLEMENTED, f"{method} is not implemented by this server", "NOT_IMPLEMENTED",
                    {"method": method}))

        return grpc.unary_unary_rpc_method_handler(unary, decode, encode)
    if h.unary_stream is not None:
        fn = h.unary_stream
        if inspect.isasyncgenfunction(fn):
            async def replies(request, context):
                if request is _BAD:
                    await _refuse(context, method)
                async for reply in fn(request, context):
                    yield reply
        else:  # health's Watch writes with context.write
            async def replies(request, context):
                if request is _BAD:
                    await _refuse(context, method)
                await fn(request, context)

        return grpc.unary_stream_rpc_method_handler(replies, decode, encode)
    if h.stream_stream is not None:
        fn = h.stream_stream

        async def checked(requests):
            async for request in requests:
                if request is _BAD:
                    raise _BadInStream
                yield request

        async def stream(requests, context):
            try:
                async for reply in fn(checked(requests), context):
                    yield reply
            except _BadInStream:
                await _refuse(context, method)

        return grpc.stream_stream_rpc_method_handler(stream, decode, encode)
    raise TypeError(f"{method}: client-streaming methods are not wrapped")


def add_standard(server, register, servicer) -> None:
    """Registers ``servicer`` the way ``register`` (a generated ``add_*_to_server``) would, decoding leniently."""
    capture = _Capture()
    register(servicer, capture)
    methods = {name: _lenient(f"{capture.service}/{name}", h) for name, h in capture.methods.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, methods),))
    server.add_registered_method_handlers(capture.service, methods)
