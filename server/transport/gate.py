"""The gate every Qualify RPC passes: who calls, may they, how often, and what came of it.

One ``grpc.GenericRpcHandler`` stands in front of the servicers' handlers.
gRPC asks it for a method's handler with the call's metadata in hand, before
the request is read, so the cheap decisions are taken there:

1. the API key (``authorization: Bearer qk_...``) is hashed once and looked
   up in a dict (``KeyStore``); missing, unknown and revoked keys all get the
   same UNAUTHENTICATED, and a key without the method's scope gets
   PERMISSION_DENIED before any resource is looked at, so neither answer
   tells whether some other key or some record exists;
2. the key's token bucket (RESOURCE_EXHAUSTED, reason RATE_LIMITED, with a
   ``google.rpc.RetryInfo``).

A refused call gets a handler that does not even decode the request. An
accepted one gets the servicer's handler wrapped (once per method, at
start, not per call) so that it runs with a request id (the caller's ``x-request-id`` if well formed, else a new one; in
the ``REQUEST_ID`` context variable for logs and error statuses, and in the
trailing metadata), counts against the key's concurrent streams if it
streams, and ends with one latency observation per method and status code
and, at debug level, one log line. What the wrapper needs to know of the call
(the key, the caller's request id) it reads from the ``_CALL`` context
variable, which ``service`` sets: gRPC resolves the handler and runs it in the
same task (tests/test_security.py checks both facts arrive).

A stream outlives the check made when it opened, so the gate keeps the open
streams of each key and, while any is open, looks at the key file every
``STREAM_CHECK_SECONDS`` (``KeyStore.refresh``: a stat, and a re-read only
when the file changed). Only when the store's generation moved does it look
the streams' keys up; a stream whose key was revoked ends UNAUTHENTICATED,
within a second of the revocation, idle or not: the handler's task is
cancelled while it waits for its next reply, or the stream ends before its
next reply if it was sending one. ``drain`` (graceful shutdown) ends every
server-streaming call the same way, with UNAVAILABLE (SHUTTING_DOWN), so
shutdown need not wait out its grace for a watch; bidirectional streams
(StreamEvents) drain themselves, acknowledging what is in flight first.

The same gate, with ``edge=False``, guards the writer's internal socket in
``--workers N`` mode: the forwarded call is authenticated and authorized
again (so nothing reaches the writer around the serving processes' gate),
keeps the request id it was given, and is neither limited nor measured a
second time.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import logging
import time

import grpc

from ..domain.access import EVERYTHING, Access
from ..domain.errors import (PermissionDenied, QualifyError, RateLimited, ShuttingDown, TooManyStreams,
                             Unauthenticated)
from ..observability import metrics
from ..observability.logs import REQUEST_ID, request_id_from
from ..config.operations import Limits, TlsSettings
from ..security.keys import ApiKey, KeyStore
from ..security.limits import RateLimiter, StreamSlots
from .errors import status_of

log = logging.getLogger(__name__)

_Details = collections.namedtuple("_Details", ("method", "invocation_metadata"))
_CALL: contextvars.ContextVar[tuple[str | None, str | None]] = contextvars.ContextVar("qualify_call")

UNAUTHENTICATED_MESSAGE = "a valid API key is required: send the metadata 'authorization: Bearer <key>'"
STREAM_CHECK_SECONDS = 0.25


class _OpenStream:
    """One open stream: its key, its handler's task, whether it waits for its next reply, and why it must end."""

    __slots__ = ("key_id", "task", "waiting", "ending")

    def __init__(self, key_id: str | None, task: asyncio.Task):
        self.key_id, self.task = key_id, task
        self.waiting = False
        self.ending: QualifyError | None = None

    def end(self, err: QualifyError) -> None:
        if self.ending is None:
            self.ending = err
            if self.waiting:  # not while gRPC sends a reply: the stream ends before the next one instead
                self.task.cancel()

# The key of the call being served (None: auth off), for the checks that need
# the decoded request: a key limited to some collections and fields.
CALLER: contextvars.ContextVar[ApiKey | None] = contextvars.ContextVar("qualify_caller", default=None)


def caller_access() -> Access:
    """What the key of the call being served may read (everything when auth is off)."""
    key = CALLER.get()
    return EVERYTHING if key is None else key.access


def bearer_token(value: str | None) -> str | None:
    """The key in an ``authorization: Bearer <key>`` value, or None."""
    if isinstance(value, str) and value[:7].lower() == "bearer ":
        return value[7:].strip()
    return None


def authorize(keys: KeyStore, rates: RateLimiter | None, token: str | None, scope: str | None, name: str,
              message: str = UNAUTHENTICATED_MESSAGE) -> ApiKey:
    """The valid key ``token`` is, allowed ``scope`` and within its rate; else the domain error to answer.

    Shared by every transport (gRPC here, HTTP in transport/http), so the
    order of the checks, and what each answer reveals, is the same on both.
    """
    key = keys.authenticate(token) if token else None
    if key is None:
        raise Unauthenticated(message)
    if not key.allows(scope):
        raise PermissionDenied(f"the API key {key.id} does not grant the scope {scope!r} that {name} needs",
                               metadata={"scope": scope or "", "key_id": key.id})
    if rates is not None:
        wait = rates.take(key.id)
        if wait:
            raise RateLimited(f"the API key {key.id} is over its rate of {rates.rate:g} requests/s; retry in {wait:.3f}s",
                              metadata={"key_id": key.id}, retry_after=wait)
    return key


def required_scope(service: str, method: str) -> str | None:
    """The scope a method needs; None: any valid key (the no-op). Unknown methods need admin."""
    if service == "qualify.v1.PersonalizeService":
        return "personalize"
    if service == "qualify.v1.IngestService":
        return "ingest"
    if service == "qualify.v1.AudienceService":
        return "audiences:write" if method.startswith(("Create", "Update", "Delete")) else "audiences:read"
    if service == "qualify.v1.SyncService":
        return "syncs:admin"
    if (service, method) == ("qualify.v1.DiagnosticsService", "Noop"):
        return None
    return "admin"


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    """TLS from the project's files; with ``client_ca``, clients must present a certificate it signed."""
    ca = tls.client_ca.read_bytes() if tls.client_ca else None
    return grpc.ssl_server_credentials([(tls.key.read_bytes(), tls.cert.read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)


class _Method:
    __slots__ = ("name", "scope", "handler", "observe", "wrapped")

    def __init__(self, name: str, scope: str | None, handler: grpc.RpcMethodHandler, observe):
        self.name = name  # "PersonalizeService.Get": the metrics label and log field
        self.scope = scope
        self.handler = handler  # the servicer's own
        self.observe = observe  # metrics.rpc_observer(name), or None
        self.wrapped: grpc.RpcMethodHandler | None = None  # the handler the gate hands out


def _code(exc: BaseException, context) -> str:
    """The status a call that raised ``exc`` ends with, as gRPC will send it."""
    if isinstance(exc, grpc.aio.AbortError):
        code = context.code()
        return code.name if code is not None else "UNKNOWN"
    # CancelledError (the client went away) and GeneratorExit are BaseExceptions;
    # any other exception becomes UNKNOWN on the wire.
    return "UNKNOWN" if isinstance(exc, Exception) else "CANCELLED"


class Gate(grpc.GenericRpcHandler):
    """Authenticates, authorizes, limits and measures the methods of ``services``; see the module docstring.

    ``keys`` None: auth off (every call allowed, nothing limited per key).
    """

    def __init__(self, handlers: list[grpc.GenericRpcHandler], services, *, keys: KeyStore | None,
                 limits: Limits, edge: bool = True):
        self.keys = keys
        self.edge = edge
        self.rates = RateLimiter(limits.requests_per_second, limits.burst) if edge and keys else None
        self.slots = StreamSlots(limits.max_streams_per_key) if edge and keys else None
        self.streams: dict[_OpenStream, bool] = {}  # open streams -> whether the client streams too
        self._key_watch: asyncio.Task | None = None
        self.draining = False
        self.methods: dict[str, _Method] = {}
        for service in services:
            for m in service.methods:
                path = f"/{service.full_name}/{m.name}"
                handler = next((h for g in handlers if (h := g.service(_Details(path, ()))) is not None), None)
                if handler is not None:
                    name = f"{service.name}.{m.name}"
                    method = _Method(name, required_scope(service.full_name, m.name), handler,
                                     metrics.rpc_observer(name) if edge else None)
                    method.wrapped = self._wrap(method)
                    self.methods[path] = method

    # -- per call, before the request is read ---------------------------------------------

    def service(self, details):
        m = self.methods.get(details.method)
        if m is None:
            return None  # not ours: health, reflection, or unknown (UNIMPLEMENTED)
        token = request_id = None
        for k, v in details.invocation_metadata or ():
            if k == "authorization":
                token = v
            elif k == "x-request-id":
                request_id = v
        key_id = None
        if self.keys is not None:
            try:
                key = authorize(self.keys, self.rates, bearer_token(token), m.scope, m.name)
            except QualifyError as err:
                return self._refuse(m, err, request_id, err.metadata.get("key_id"))
            key_id = key.id
            CALLER.set(key)
        _CALL.set((key_id, request_id))
        return m.wrapped

    def _wrap(self, m: _Method) -> grpc.RpcMethodHandler:
        """The servicer's handler inside ``_call`` or ``_stream``, built once per method."""
        h = m.handler
        if h.unary_unary is not None:
            make, wrapper = grpc.unary_unary_rpc_method_handler, functools.partial(self._call, m, h.unary_unary)
        elif h.stream_unary is not None:
            make, wrapper = grpc.stream_unary_rpc_method_handler, functools.partial(self._call, m, h.stream_unary)
        elif h.unary_stream is not None:
            make, wrapper = grpc.unary_stream_rpc_method_handler, functools.partial(self._stream, m, h.unary_stream)
        else:
            make, wrapper = grpc.stream_stream_rpc_method_handler, functools.partial(self._stream, m, h.stream_stream)
        return make(wrapper, h.request_deserializer, h.response_serializer)

    # -- the call itself ------------------------------------------------------------------

    def _enter(self, context, request_id: str | None) -> tuple[float, tuple | None]:
        """Sets the call's request id; returns when it started and (at debug level) what to log.

        The id is not reset afterwards: every call runs in a task of its own,
        whose context dies with it.
        """
        request_id = request_id_from(request_id)
        context.set_trailing_metadata((("x-request-id", request_id),))
        REQUEST_ID.set(request_id)
        # The peer is read now: a streaming handler that the client abandoned
        # is finalized after gRPC has released the call, when peer() would
        # read freed memory.
        debug = (request_id, context.peer()) if self.edge and log.isEnabledFor(logging.DEBUG) else None
        return time.perf_counter(), debug

    def _exit(self, m: _Method, code: str, started: float, key_id: str | None, debug: tuple | None) -> None:
        if m.observe is not None or debug is not None:
            seconds = time.perf_counter() - started
            if m.observe is not None:
                m.observe(code, seconds)
            if debug is not None:  # the id explicitly: a late finalizer runs in another context
                log.debug("%s %s %.3f ms", m.name, code, seconds * 1e3,
                          extra={"request_id": debug[0], "method": m.name, "code": code,
                                 "duration_ms": round(seconds * 1e3, 3), "key_id": key_id, "peer": debug[1]})

    async def _call(self, m: _Method, fn, request, context):
        key_id, request_id = _CALL.get((None, None))
        started, debug = self._enter(context, request_id)
        code = "OK"
        try:
            return await fn(request, context)
        except BaseException as exc:
            code = _code(exc, context)
            raise
        finally:
            self._exit(m, code, started, key_id, debug)

    async def _stream(self, m: _Method, fn, request, context):
        key_id, request_id = _CALL.get((None, None))
        started, debug = self._enter(context, request_id)
        code = "OK"
        held = False
        open_ = None
        try:
            if self.slots is not None and key_id is not None:
                held = self.slots.acquire(key_id)
                if not held:
                    await context.abort_with_status(status_of(TooManyStreams(
                        f"the API key {key_id} already has {self.slots.limit} streams open",
                        metadata={"key_id": key_id})))
            open_ = self._opened(key_id, m.handler.request_streaming)
            replies = fn(request, context).__aiter__()
            while True:
                open_.waiting = True
                try:
                    reply = await replies.__anext__()
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if open_.ending is None:
                        raise
                    open_.task.uncancel()
                finally:
                    open_.waiting = False
                if open_.ending is not None:
                    await context.abort_with_status(status_of(open_.ending))
                yield reply
        except BaseException as exc:
            code = _code(exc, context)
            raise
        finally:
            if open_ is not None:
                self.streams.pop(open_, None)
            if held:
                self.slots.release(key_id)
            self._exit(m, code, started, key_id, debug)

    def _opened(self, key_id: str | None, client_streams: bool) -> _OpenStream:
        open_ = _OpenStream(key_id, asyncio.current_task())
        self.streams[open_] = client_streams
        if self.draining and not client_streams:
            open_.end(ShuttingDown("the server is shutting down; resume on another server or after the restart"))
        if key_id is not None and self.keys is not None and self._key_watch is None:
            self._key_watch = asyncio.get_running_loop().create_task(self._watch_keys())
        return open_

    def drain(self) -> None:
        """Graceful shutdown: every server-streaming call ends UNAVAILABLE now (see the module docstring)."""
        self.draining = True
        err = ShuttingDown("the server is shutting down; resume on another server or after the restart")
        for open_, client_streams in list(self.streams.items()):
            if not client_streams:
                open_.end(err)

    async def _watch_keys(self) -> None:
        """While streams are open: revoke those whose key left the key file; see the module docstring."""
        try:
            seen = self.keys.generation
            while self.streams:
                await asyncio.sleep(STREAM_CHECK_SECONDS)
                generation = self.keys.refresh()
                if generation != seen:
                    seen = generation
                    for open_ in list(self.streams):
                        if open_.key_id is not None and not self.keys.is_valid(open_.key_id):
                            open_.end(Unauthenticated(f"the API key {open_.key_id} was revoked",
                                                      metadata={"key_id": open_.key_id}))
        finally:
            self._key_watch = None

    def _refuse(self, m: _Method, err: QualifyError, request_id: str | None,
                key_id: str | None = None) -> grpc.RpcMethodHandler:
        """A handler that answers ``err`` without decoding the request."""

        async def refuse(request, context):
            started, debug = self._enter(context, request_id)
            try:
                await context.abort_with_status(status_of(err))
            finally:
                self._exit(m, err.status.value, started, key_id, debug)

        async def refuse_stream(request, context):
            await refuse(request, context)
            yield  # pragma: no cover - makes this an async generator

        h = m.handler
        if h.response_streaming:
            make = grpc.stream_stream_rpc_method_handler if h.request_streaming else grpc.unary_stream_rpc_method_handler
            return make(refuse_stream)
        make = grpc.stream_unary_rpc_method_handler if h.request_streaming else grpc.unary_unary_rpc_method_handler
        return make(refuse)
