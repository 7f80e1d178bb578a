"""The HTTP scenarios' operations: personalize-http (GET a record) and ingest-http (POST /v1/batch).

Same protocol as the gRPC operations in _loadgen (``send(j, done)``, one
``done(status)`` per request) so the schedules, histograms and CPU accounting
are the ones the gRPC scenarios use, against the same server. Requests go
through aiohttp's client on one event-loop thread per load process, over a
pool of keep-alive connections that grows to the requests in flight (HTTP/1.1
has one request per connection at a time, where gRPC multiplexes them on
one); the bodies and paths are built in ``prepare``.

A status is "OK" for a 200 whose body is right (one in CHECK_EVERY is
checked), else ``HTTP_<status>``, or UNAVAILABLE / DEADLINE_EXCEEDED when
no answer came. An ingest-http batch that the server answered with
rejections counts as EVENTS_REJECTED, as the gRPC ingest scenario does.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import os
import threading

CHECK_EVERY = 997
API_KEY = os.environ.get("QUALIFY_API_KEY")
_SEGMENT_TYPES = {1: "track", 2: "page", 3: "screen", 4: "identify", 5: "alias", 6: "group"}


class _Loop:
    """An asyncio loop on a thread of its own, with one aiohttp session."""

    def __init__(self, base: str, timeout: float, headers: dict):
        self.base, self.timeout, self.headers = base, timeout, headers
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="http-load")
        self.session = None

    def open(self) -> None:
        import aiohttp

        self.thread.start()

        async def make():
            return aiohttp.ClientSession(
                self.base, connector=aiohttp.TCPConnector(limit=0, force_close=False),
                timeout=aiohttp.ClientTimeout(total=self.timeout), headers=self.headers, auto_decompress=False)

        self.session = asyncio.run_coroutine_threadsafe(make(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.session.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class HttpOp:
    """``requests[j]`` is (method, path, body or None); ``check(i, status, body)`` judges a sampled reply."""

    def __init__(self, series: str, loop: _Loop, requests: list, items: int = 1, check=None):
        self.series, self.loop, self.requests, self.items, self.check = series, loop, requests, items, check
        self.rejected = 0

    def open(self) -> None:
        self.loop.open()

    def close(self) -> None:
        self.loop.close()

    def send(self, j: int, done) -> None:
        self.loop.loop.call_soon_threadsafe(self._start, j, done)

    def _start(self, j: int, done) -> None:
        asyncio.ensure_future(self._one(j, done))

    async def _one(self, j: int, done, request=None) -> None:
        i = j % len(self.requests)
        method, path, body = request or self.requests[i]
        try:
            async with self.loop.session.request(method, path, data=body) as r:
                raw = await r.read()
                status = r.status
        except asyncio.TimeoutError:
            done("DEADLINE_EXCEEDED")
            return
        except Exception:  # noqa: BLE001 - refused or reset: no answer
            done("UNAVAILABLE")
            return
        if status != 200:
            done(f"HTTP_{status}")
        elif self.check is not None and (j % CHECK_EVERY == 0 or self.series == "ingest-http"):
            done(self.check(i, raw))
        else:
            done("OK")


def _headers(content_type: str | None = None) -> dict:
    headers = {"Content-Type": content_type} if content_type else {}
    if API_KEY:  # the tracking API's way: the key as the Basic auth username
        headers["Authorization"] = "Basic " + base64.b64encode(f"{API_KEY}:".encode()).decode()
    return headers


def make_op(name: str, spec: dict, inputs, keys: list[str], events, timeout: float) -> HttpOp:
    """The operation ``name`` (get-http or ingest-http) of a phase ``spec``."""
    if name == "get-http":
        return get_op(spec["http"], inputs.collection, keys, timeout)
    return IngestOp(spec["http"], events, spec["batch"], timeout)


def get_op(http: str, collection: str, keys: list[str], timeout: float) -> HttpOp:
    requests = [("GET", f"/v1/collections/{collection}/records/{k}", None) for k in keys]

    def check(i: int, raw: bytes) -> str:
        body = json.loads(raw)
        return "OK" if body.get("key") == keys[i] and body.get("fields") else "BAD_RESPONSE"

    return HttpOp("get-http", _Loop(f"http://{http}", timeout, _headers()), requests, 1, check)


def _segment_fragment(pb) -> str:
    """The Segment JSON of one event without messageId and timestamp: '"type":...}' to append to them."""
    from google.protobuf import json_format

    msg = {"type": _SEGMENT_TYPES.get(pb.type, "track"), "userId": pb.user_id}
    msg["event" if pb.type == 1 else "name"] = pb.name
    if pb.HasField("properties"):
        msg["properties"] = json_format.MessageToDict(pb.properties)
    return json.dumps(msg, separators=(",", ":"))[1:]


class _Batches:
    """Segment batches of ``size`` events with fresh message ids, from the event mix's bodies."""

    def __init__(self, events, size: int):
        from qualify.v1 import event_pb2

        self.events, self.size = events, size
        self.fragments = [_segment_fragment(event_pb2.Event.FromString(b)) for b in events.bodies]

    def body(self) -> bytes:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat()
        n, start = len(self.fragments), self.events.counter
        msgs = ",".join(f'{{"messageId":"{self.events.next_id()}","timestamp":"{now}",{self.fragments[(start + j) % n]}'
                        for j in range(self.size))
        return f'{{"sentAt":"{now}","batch":[{msgs}]}}'.encode()


class IngestOp(HttpOp):
    """POST /v1/batch; each request a fresh batch (new ids), so nothing is a duplicate."""

    def __init__(self, http: str, events, size: int, timeout: float):
        super().__init__("ingest-http", _Loop(f"http://{http}", timeout, _headers("application/json")),
                         [None], size, self._check)
        self.batches = _Batches(events, size)

    def _check(self, i: int, raw: bytes) -> str:
        rejected = len(json.loads(raw).get("rejected", ()))
        self.rejected += rejected
        return "OK" if not rejected else "EVENTS_REJECTED"

    def _start(self, j: int, done) -> None:  # on the loop's thread: the batch is made there, in send order
        asyncio.ensure_future(self._one(0, done, ("POST", "/v1/batch", self.batches.body())))
