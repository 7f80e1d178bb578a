"""The aiohttp application: routes, and what every request passes through.

Every request, in this order (``_middleware``):

1. CORS: an ``OPTIONS`` preflight from an allowed origin is answered here;
   other origins get no CORS headers, so their browsers refuse the answer;
2. a request id (the caller's well-formed ``x-request-id``, else a new one),
   in ``REQUEST_ID`` for logs and errors and in the reply's headers;
3. the handler, whose domain errors become AIP-193 JSON with the HTTP status
   derived from the one error table (transport/errors.py), and surprises a
   500 naming only the request id;
4. ``Cache-Control: no-store`` (records and memberships change by the
   millisecond, and are the caller's own), one latency observation per
   route and status code, and at debug level one log line, as the gate does.

Authentication is per route (``HttpEdge.authorize``): the key comes as
``Authorization: Bearer <key>`` or, as Segment's SDKs send their write key,
as the username of HTTP Basic auth (``writeKey:``).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import ssl
import time

from aiohttp import web

from ...config.operations import HttpSettings, Limits, TlsSettings
from ...domain.access import EVERYTHING, Access
from ...domain.errors import QualifyError
from ...observability import metrics
from ...observability.logs import REQUEST_ID, request_id_from
from ...security.keys import KeyStore
from ...security.limits import RateLimiter
from ...services.ingest import IngestService
from ...services.personalize import PersonalizeService
from ..errors import http_error_of, http_internal
from ..gate import authorize
from .forward import TOKEN as FORWARD_TOKEN, ForwardedIngest

log = logging.getLogger(__name__)

HTTP_UNAUTHENTICATED = ("a valid API key is required: send 'Authorization: Bearer <key>', "
                        "or the key as the Basic auth username (a Segment write key)")
_CORS_METHODS = "GET, POST, OPTIONS"
# aiohttp's refusals, which no domain error raises, by the google.rpc code gRPC gives the same case.
_AIOHTTP_STATUS = {404: "NOT_FOUND", 405: "UNIMPLEMENTED", 413: "RESOURCE_EXHAUSTED", 400: "INVALID_ARGUMENT"}
_CORS_HEADERS = "Authorization, Content-Type, Content-Encoding, X-Request-Id"


def json_response(body, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(body=json.dumps(body, separators=(",", ":")).encode(), status=status,
                        content_type="application/json", headers=headers)


def _token(request: web.Request) -> str | None:
    value = request.headers.get("Authorization", "")
    scheme, _, rest = value.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return rest.strip() or None
    if scheme == "basic":
        try:
            user = base64.b64decode(rest.strip(), validate=True).decode("utf-8").partition(":")[0]
        except (binascii.Error, UnicodeDecodeError):
            return None
        return user or None
    return None


class HttpEdge:
    """The HTTP API over one process's services; ``ingest`` None: this process does not write."""

    def __init__(self, reads: PersonalizeService, ingest: IngestService | ForwardedIngest | None, *, keys: KeyStore | None,
                 rates: RateLimiter | None, limits: Limits, settings: HttpSettings, audiences=None):
        self.reads = reads
        self.ingest = ingest
        self.audiences = audiences  # AudienceService: the demo page makes its audience
        self.demo_window = settings.demo_window
        self.keys = keys
        self.rates = rates
        self.limits = limits
        self.origins = frozenset(settings.cors_origins)
        self._observers: dict[str, object] = {}

    def authorize(self, request: web.Request, scope: str, name: str, token: str | None = None) -> Access:
        """What the request's key may read; Unauthenticated, PermissionDenied or RateLimited otherwise."""
        if self.keys is None:
            return EVERYTHING
        token = token or _token(request)
        key = authorize(self.keys, self.rates, token, scope, name, HTTP_UNAUTHENTICATED)
        request["key_id"] = key.id
        FORWARD_TOKEN.set(token)  # a serving process of --workers N sends it on to the writer
        return key.access

    def app(self) -> web.Application:
        from . import demo, records, segment  # the routes' modules import this one

        app = web.Application(middlewares=[self._middleware], client_max_size=self.limits.max_message_bytes)
        segment.add_routes(app, self)
        records.add_routes(app, self)
        if self.demo_window is not None and self.audiences is not None:
            demo.add_routes(app, self)
        return app

    # -- every request ----------------------------------------------------------------------

    def _cors(self, request: web.Request) -> dict[str, str]:
        origin = request.headers.get("Origin")
        if origin is None or not ("*" in self.origins or origin.rstrip("/") in self.origins):
            return {}
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                "Access-Control-Expose-Headers": "X-Request-Id, Retry-After"}

    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        cors = self._cors(request)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            headers = {**cors, "Access-Control-Allow-Methods": _CORS_METHODS,
                       "Access-Control-Allow-Headers": _CORS_HEADERS, "Access-Control-Max-Age": "600"} if cors else {}
            return web.Response(status=204 if cors else 403, headers=headers)
        request_id = request_id_from(request.headers.get("X-Request-Id"))
        REQUEST_ID.set(request_id)
        started = time.perf_counter()
        route = request.match_info.route
        name = f"HTTP.{route.name}" if route.name else "HTTP.(unrouted)"
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # aiohttp's own: unknown route, wrong method, body too large
            response = json_response({"error": {"code": exc.status, "message": exc.text or exc.reason,
                                                "status": _AIOHTTP_STATUS.get(exc.status, "UNKNOWN"), "details": []}},
                                     exc.status, {k: v for k, v in exc.headers.items() if k == "Allow"})
        except QualifyError as err:
            status, body, headers = http_error_of(err)
            if request.get("segment"):  # Segment's SDKs read a top-level code and message (and raise without)
                body = {**body, "code": err.reason, "message": err.message}
            response = json_response(body, status, headers)
        except Exception as exc:  # noqa: BLE001 - the one place surprises are caught
            status, body, headers = http_internal(exc, name)
            response = json_response(body, status, headers)
        response.headers.update(cors)
        response.headers["X-Request-Id"] = request_id
        response.headers.setdefault("Cache-Control", "no-store")
        self._observe(name, response.status, time.perf_counter() - started, request)
        return response

    def _observe(self, name: str, status: int, seconds: float, request: web.Request) -> None:
        observe = self._observers.get(name)
        if observe is None:
            observe = self._observers[name] = metrics.rpc_observer(name) or (lambda code, s: None)
        code = str(status)
        observe(code, seconds)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s %.3f ms", name, code, seconds * 1e3,
                      extra={"method": name, "code": code, "duration_ms": round(seconds * 1e3, 3),
                             "key_id": request.get("key_id"), "peer": request.remote})


def ssl_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """The gRPC listener's certificate (and client CA, for mutual TLS) on the HTTP listener too."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.client_ca is not None:
        ctx.load_verify_locations(str(tls.client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def start_http(edge: HttpEdge, settings: HttpSettings, tls: TlsSettings,
                     reuse_port: bool = False) -> tuple[web.AppRunner, int]:
    """Listens on ``settings``; returns the runner (``await runner.cleanup()`` stops it) and the bound port."""
    runner = web.AppRunner(edge.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port or 0, ssl_context=ssl_context(tls),
                       reuse_port=reuse_port or None, shutdown_timeout=2.0)
    await site.start()
    port = runner.addresses[0][1]
    log.info("HTTP API on %s://%s:%d", "https" if tls.enabled else "http", settings.host, port)
    return runner, port
