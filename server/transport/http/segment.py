"""The Segment tracking API: /v1/track, page, screen, identify, alias, group and batch.

Segment's SDKs (analytics-python, analytics-node, analytics.js, RudderStack's)
POST the spec's JSON here unchanged once their host points at Qualify. Each
message becomes a domain ``Event`` and goes through the same ingest use case
as ``TrackBatch``: validated one by one, deduplicated by ``messageId``, and
answered only after the writer's commit, so a 200 means durable.

- Auth: the write key is a Qualify API key with the ``ingest`` scope, sent
  as the Basic auth username (``writeKey:``) or, as analytics.js does from
  a browser, as ``writeKey`` in the body (which keeps the request "simple"
  for CORS: no preflight).
- Limits as Segment's: a message over 32 KB is rejected (TOO_LARGE) and a
  body over 500 KB refused (400, BATCH_TOO_LARGE), measured after gzip.
- Clock skew, as Segment corrects it: a message with ``sentAt`` (its own, or
  the batch's) is placed at ``timestamp + (receivedAt - sentAt)``, so a
  device whose clock is off still orders its events by the server's clock.
- A single-message endpoint answers a rejected message with 400
  (EVENT_REJECTED, as ``Track``); ``/v1/batch`` answers 200 with the
  rejected messages listed, and their neighbours kept. Errors are AIP-193
  JSON with Segment's top-level ``code`` and ``message`` beside ``error``:
  the SDKs read those two, and some fail on a body without them.
- ``group`` is stored as an EVENT_TYPE_GROUP event whose ``properties``
  carry ``groupId`` beside nothing else, and its ``traits`` the group's.
- The spec has no session: ``properties.session_id`` or ``context.sessionId``
  becomes the event's session when present (else the inactivity rule).
  ``integrations`` (which destinations a message is for) is accepted and not
  kept: Qualify is the one destination.
"""

from __future__ import annotations

import base64
import json
import re
from datetime import datetime
from json.decoder import scanstring

from aiohttp import web

from ...domain.consistency import encode_token
from ...domain.errors import BatchTooLarge, FieldViolation, InvalidRequest
from ...domain.events import Event, EventType
from .edge import HttpEdge, json_response

MAX_BATCH_BYTES = 500 * 1024  # Segment's batch limit
MAX_MESSAGE_BYTES = 32 * 1024  # Segment's message limit (the same as TOO_LARGE's)

# Endpoint -> type; analytics.js' short paths (/v1/t ...) beside the documented ones.
_ENDPOINTS = {"track": EventType.TRACK, "page": EventType.PAGE, "screen": EventType.SCREEN,
              "identify": EventType.IDENTIFY, "alias": EventType.ALIAS, "group": EventType.GROUP}
_SHORT = {"t": "track", "p": "page", "s": "screen", "i": "identify", "a": "alias", "g": "group"}
_TYPES = {name: t for name, t in _ENDPOINTS.items()}


_scan = json.JSONDecoder().scan_once  # the stdlib's C scanner: one JSON value from a position
_WS = re.compile(r"[ \t\n\r]*")


def _expect(text: str, pos: int, chars: str) -> tuple[str, int]:
    """The character at ``pos`` (after whitespace), which must be one of ``chars``, and the position after it."""
    pos = _WS.match(text, pos).end()
    c = text[pos:pos + 1]
    if not c or c not in chars:
        raise ValueError(f"expected one of {chars!r} at {pos}")
    return c, pos + 1


def _array(text: str, pos: int) -> tuple[list, list[int], int]:
    """The JSON array whose '[' is before ``pos``: items, each item's length in ``text``, the end."""
    items, sizes = [], []
    pos = _WS.match(text, pos).end()
    if text[pos:pos + 1] == "]":
        return items, sizes, pos + 1
    while True:
        item, end = _scan(text, pos)
        items.append(item)
        sizes.append(end - pos)
        c, pos = _expect(text, end, ",]")
        if c == "]":
            return items, sizes, pos
        pos = _WS.match(text, pos).end()


def parse_body(text: str) -> tuple[dict, list[int]]:
    """``json.loads(text)`` for a JSON object, and the size in bytes of each message of its ``batch``.

    Segment's 32 KB limit is on a message as sent; re-encoding each parsed
    message to measure it cost more than parsing. So the object's members
    are read here with the stdlib's own scanner, which returns where each
    value ends: the batch's items are measured in the text as they are parsed.
    """
    _, pos = _expect(text, 0, "{")
    body, sizes = {}, []
    pos = _WS.match(text, pos).end()
    if text[pos:pos + 1] == "}":
        pos += 1
    else:
        while True:
            _, pos = _expect(text, pos, '"')
            key, pos = scanstring(text, pos)
            _, pos = _expect(text, pos, ":")
            pos = _WS.match(text, pos).end()
            if key == "batch" and text[pos:pos + 1] == "[":
                body[key], sizes, pos = _array(text, pos + 1)
            else:
                body[key], pos = _scan(text, pos)
            c, pos = _expect(text, pos, ",}")
            if c == "}":
                break
    if _WS.match(text, pos).end() != len(text):
        raise ValueError("text after the JSON object")
    if sizes and not text.isascii():  # characters are not bytes: measure the few messages that could be over
        items = body["batch"]
        sizes = [size if size * 4 <= MAX_MESSAGE_BYTES else len(json.dumps(m, ensure_ascii=False).encode())
                 for m, size in zip(items, sizes)]
    return body, sizes


def _micros(value, field: str) -> int:
    """RFC 3339 / ISO 8601 text (what every Segment SDK sends) as microseconds; 0 when absent."""
    if value is None or value == "":
        return 0
    if not isinstance(value, str):
        raise ValueError(f"{field} must be an ISO 8601 string")
    try:
        dt = datetime.fromisoformat(value.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{field} {value[:40]!r} is not an ISO 8601 time") from None
    if dt.tzinfo is None:
        raise ValueError(f"{field} {value[:40]!r} has no time zone")
    return int(dt.timestamp() * 1_000_000)


def _text(value) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)  # Segment allows numeric ids


def _object(value) -> dict:
    return value if isinstance(value, dict) else {}


def to_event(msg: dict, type_: EventType | None, received_us: int, batch_sent_us: int) -> Event:
    """One Segment message as a domain Event; ValueError for times that cannot be read."""
    if type_ is None:
        type_ = _TYPES.get(str(msg.get("type", "")).lower())
    timestamp_us = _micros(msg.get("timestamp"), "timestamp")
    sent_us = _micros(msg.get("sentAt"), "sentAt") or batch_sent_us
    if timestamp_us and sent_us:
        timestamp_us += received_us - sent_us
    properties, traits, context = _object(msg.get("properties")), _object(msg.get("traits")), _object(msg.get("context"))
    name = msg.get("event") if type_ is EventType.TRACK else msg.get("name")
    if type_ is EventType.IDENTIFY and not traits:
        traits = _object(context.get("traits"))
    if type_ is EventType.GROUP:
        properties = {"groupId": _text(msg.get("groupId"))}
    return Event(message_id=_text(msg.get("messageId")), type=int(type_) if type_ is not None else 0,
                 name=_text(name), user_id=_text(msg.get("userId")), anonymous_id=_text(msg.get("anonymousId")),
                 timestamp_us=timestamp_us, received_us=received_us, properties=properties, traits=traits,
                 previous_id=_text(msg.get("previousId")), context=context,
                 session_id=_text(properties.get("session_id") or context.get("sessionId") or ""))


async def _body(request: web.Request) -> tuple[dict, int, list[int]]:
    """The JSON object sent (aiohttp has already undone gzip), its size, and its batch's message sizes."""
    raw = await request.read()
    if len(raw) > MAX_BATCH_BYTES:
        raise BatchTooLarge(f"the body is {len(raw)} bytes; Segment's limit, kept here, is {MAX_BATCH_BYTES}",
                            violations=[FieldViolation("(body)", f"must be at most {MAX_BATCH_BYTES} bytes")])
    try:
        body, sizes = parse_body(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, StopIteration, RecursionError):
        raise InvalidRequest("the body is not a JSON object",
                             violations=[FieldViolation("(body)", "must be a JSON object")]) from None
    return body, len(raw), sizes


def _write_key(edge: HttpEdge, request: web.Request, body: dict, name: str) -> None:
    key = body.get("writeKey")
    edge.authorize(request, "ingest", name, key if isinstance(key, str) and key else None)


def _service(edge: HttpEdge):
    if edge.ingest is None:  # pragma: no cover - HTTP is served where the writer is (see app.py)
        raise InvalidRequest("this process does not take events")
    return edge.ingest


async def _single(edge: HttpEdge, request: web.Request, endpoint: str) -> web.Response:
    body, size, _ = await _body(request)
    _write_key(edge, request, body, f"HTTP.{endpoint}")
    service = _service(edge)
    received = service.clock_us()
    try:
        event = to_event(body, _ENDPOINTS[endpoint], received, 0)
    except ValueError as exc:
        raise InvalidRequest(str(exc), violations=[FieldViolation("timestamp", str(exc))]) from None
    duplicate, position = await service.track(event, size)
    return json_response({"success": True, "duplicate": duplicate, **_token(position)})


async def _batch(edge: HttpEdge, request: web.Request) -> web.Response:
    body, _, sizes = await _body(request)
    _write_key(edge, request, body, "HTTP.batch")
    messages = body.get("batch")
    if not isinstance(messages, list):
        raise InvalidRequest("the body has no batch list", violations=[FieldViolation("batch", "must be a list of messages")])
    service = _service(edge)
    service.check_batch_size(len(messages), "batch")
    received = service.clock_us()
    try:
        sent = _micros(body.get("sentAt"), "sentAt")
    except ValueError as exc:
        raise InvalidRequest(str(exc), violations=[FieldViolation("sentAt", str(exc))]) from None
    events, unreadable = [], []
    for i, (msg, size) in enumerate(zip(messages, sizes)):
        try:
            if not isinstance(msg, dict):
                raise ValueError("a message must be a JSON object")
            events.append((to_event(msg, None, received, sent), size))
        except ValueError as exc:
            unreadable.append({"index": i, "messageId": _text(msg.get("messageId")) if isinstance(msg, dict) else "",
                               "reason": "REJECTION_REASON_UNSPECIFIED", "description": str(exc)})
            events.append((Event(message_id="", type=0), 0))  # holds its index; rejected below and not reported twice
    outcome = await service.ingest(events)
    bad = {u["index"] for u in unreadable}
    rejected = unreadable + [{"index": r.index, "messageId": r.message_id,
                              "reason": f"REJECTION_REASON_{r.rejection.reason.name}",
                              "description": r.rejection.description}
                             for r in outcome.rejected if r.index not in bad]
    rejected.sort(key=lambda r: r["index"])
    return json_response({"success": True, **_token(outcome.position), "accepted": outcome.accepted,
                          "duplicates": outcome.duplicates,
                          "rejected": rejected})


def add_routes(app: web.Application, edge: HttpEdge) -> None:
    def single(endpoint: str):
        async def handler(request: web.Request) -> web.Response:
            request["segment"] = True
            return await _single(edge, request, endpoint)
        return handler

    async def batch(request: web.Request) -> web.Response:
        request["segment"] = True
        return await _batch(edge, request)

    for endpoint in _ENDPOINTS:
        app.router.add_post(f"/v1/{endpoint}", single(endpoint), name=endpoint)
    for short, endpoint in _SHORT.items():
        app.router.add_post(f"/v1/{short}", single(endpoint), name=f"{endpoint}.short")
    app.router.add_post("/v1/batch", batch, name="batch")
    app.router.add_post("/v1/b", batch, name="batch.short")


def _token(position: int) -> dict:
    """Read-your-writes over HTTP: the acknowledgement's consistency token, base64 (absent when nothing was written)."""
    token = encode_token(position)
    return {"consistencyToken": base64.b64encode(token).decode()} if token else {}
