"""The requests a load process sends: one class per kind of operation.

They run inside a load generator process (bench/_loadgen.py), which picks one
per tick and calls its ``send``; the method paths and the API-key metadata are
here too because the bench's own setup calls (bench/_audiences.py) share them.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from functools import partial

from . import _inputs

GET = "/qualify.v1.PersonalizeService/Get"
BATCH_GET = "/qualify.v1.PersonalizeService/BatchGet"
NOOP = "/qualify.v1.DiagnosticsService/Noop"
INFO = "/qualify.v1.DiagnosticsService/GetServerInfo"
TRACK = "/qualify.v1.IngestService/Track"
STREAM = "/qualify.v1.IngestService/StreamEvents"
WATCH = "/qualify.v1.AudienceService/WatchMemberships"
# A server with API keys on (a project file, or `qualify serve --auth on`): every call carries
# $QUALIFY_API_KEY (GetServerInfo, used to find the serving processes, needs the admin scope).
METADATA = (("authorization", "Bearer " + os.environ["QUALIFY_API_KEY"]),) if os.environ.get("QUALIFY_API_KEY") else None
CHECK_EVERY = 997  # one reply in this many is decoded and checked


# Operations ----------------------------------------------------------------
# Each has ``series`` (its name in the results), ``items`` (events or keys per
# request) and ``send(j, done)``; ``done(status)`` is called once per request
# with the status code's name, and ``done(status, sub)`` for a secondary
# measurement of the same request (the e2e acknowledgement).


class Unary:
    def __init__(self, series: str, calls: list, requests: list[bytes], timeout: float, items: int = 1, check=None):
        self.series, self.calls, self.requests, self.timeout = series, calls, requests, timeout
        self.items, self.check = items, check

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def send(self, j: int, done) -> None:
        f = self.calls[j % len(self.calls)].future(self.requests[j % len(self.requests)], timeout=self.timeout,
                                                     metadata=METADATA)
        f.add_done_callback(partial(self._done, j, done))

    def _done(self, j: int, done, f) -> None:
        code = f.code()
        if code.value[0] == 0 and self.check is not None and j % CHECK_EVERY == 0:
            try:
                ok = self.check(j % len(self.requests), f.result())
            except Exception:  # noqa: BLE001 - a reply that does not decode is a bad reply
                ok = False
            done("OK" if ok else "BAD_RESPONSE")
        else:
            done(code.name)


class _Reader:
    """A thread reading one server stream; ``on_item`` per message, ``on_error`` once if it fails."""

    def __init__(self, call, on_item, on_error):
        self.call = call
        self.thread = threading.Thread(target=self._run, args=(on_item, on_error), daemon=True)
        self.thread.start()

    def _run(self, on_item, on_error) -> None:
        import grpc

        try:
            for item in self.call:
                on_item(item)
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.CANCELLED:
                on_error(exc.code().name)

    def stop(self) -> None:
        self.call.cancel()
        self.thread.join(5)


class Stream:
    """Batches of events over StreamEvents, one stream per connection; a request is one batch."""

    def __init__(self, channels: list, events: _inputs.Events, batch: int):
        from qualify.v1 import ingest_pb2

        self.series, self.items = "ingest", batch
        self.channels, self.events, self.batch = channels, events, batch
        self.decode = ingest_pb2.StreamEventsResponse.FromString
        self.numbers = itertools.count(1)
        self.pending: dict[int, object] = {}
        self.rejected = 0
        self.failed: str | None = None

    def open(self) -> None:
        self.queues, self.readers = [], []
        for ch in self.channels:
            q: queue.SimpleQueue = queue.SimpleQueue()
            call = ch.stream_stream(STREAM, response_deserializer=self.decode)(iter(q.get, None), metadata=METADATA)
            self.queues.append(q)
            self.readers.append(_Reader(call, self._ack, self._fail))

    def _ack(self, ack) -> None:
        done = self.pending.pop(ack.batch_number, None)
        if done is not None:
            self.rejected += len(ack.rejections)
            done("OK" if not ack.rejections else "EVENTS_REJECTED")

    def _fail(self, code: str) -> None:
        self.failed = code
        for n in list(self.pending):
            done = self.pending.pop(n, None)
            if done is not None:
                done(code)

    def send(self, j: int, done) -> None:
        if self.failed:
            done(self.failed)
            return
        n = next(self.numbers)
        self.pending[n] = done
        self.queues[j % len(self.queues)].put(_inputs.stream_request(n, self.events.batch(self.batch)))

    def close(self) -> None:
        for q in self.queues:
            q.put(None)
        for r in self.readers:
            r.thread.join(5)
            r.stop()


class Membership:
    """An event that makes a person enter the e2e audience, timed to the change it causes.

    ``mode="watch"``: to the MembershipChange on a WatchMemberships stream
    (matched by the event's message_id). ``mode="get"``: to the first Get that
    shows the membership (the fallback while a server has no watch stream);
    ``mode="get-token"``: to one Get carrying the Track's consistency token
    as ``min_token`` (read-your-writes: it must show the membership). The
    acknowledgement of the Track is the secondary series ``ack``.
    """

    def __init__(self, channels: list, events: _inputs.Events, persons: list[str], audience_id: str, path: str,
                 collection: str, mode: str, after_sequence: int, timeout: float):
        from qualify.v1 import audience_pb2, event_pb2, ingest_pb2, personalize_pb2

        self.series = {"watch": "change", "get": "visible_in_get", "get-token": "visible_with_token"}[mode]
        self.items, self.mode, self.timeout = 1, mode, timeout
        self.channels, self.events, self.persons = channels, events, persons
        self.audience_id, self.collection = audience_id, collection
        self.bodies = []
        for p in persons:
            e = event_pb2.Event(type=event_pb2.EVENT_TYPE_PAGE, name="Page Viewed", user_id=p)
            e.properties.update({"path": path})
            self.bodies.append(e.SerializeToString())
        self.track = [ch.unary_unary(TRACK) for ch in channels]
        self.get = [ch.unary_unary(GET) for ch in channels]
        self.get_request = personalize_pb2.GetRequest
        self.get_response = personalize_pb2.GetResponse.FromString
        self.track_response = ingest_pb2.TrackResponse.FromString
        self.watch_request = audience_pb2.WatchMembershipsRequest(
            audience_ids=[audience_id], start=audience_pb2.WATCH_START_SEQUENCE,
            after_sequence=after_sequence).SerializeToString()
        self.watch_response = audience_pb2.WatchMembershipsResponse.FromString
        self.pending: dict[str, object] = {}
        self.readers: list[_Reader] = []
        self.failed: str | None = None

    def open(self) -> None:
        if self.mode == "watch":
            self.readers = [_Reader(ch.unary_stream(WATCH, response_deserializer=self.watch_response)(
                                        self.watch_request, metadata=METADATA),
                                    self._change, self._fail) for ch in self.channels]

    def _change(self, message) -> None:
        for change in message.changes:
            if change.audience_id == self.audience_id:
                done = self.pending.pop(change.message_id, None)
                if done is not None:
                    done("OK")

    def _fail(self, code: str) -> None:
        self.failed = code
        for mid in list(self.pending):
            done = self.pending.pop(mid, None)
            if done is not None:
                done(code)

    def send(self, j: int, done) -> None:
        if self.failed:
            done(self.failed, "ack")
            done(self.failed)
            return
        mid = self.events.next_id()
        i = j % len(self.persons)
        if self.mode == "watch":
            self.pending[mid] = done
        f = self.track[j % len(self.track)].future(_inputs.track_request(self.events.event(self.bodies[i], mid)),
                                                   timeout=self.timeout, metadata=METADATA)
        f.add_done_callback(partial(self._acked, j, i, mid, done))

    def _acked(self, j: int, i: int, mid: str, done, f) -> None:
        code = f.code()
        done(code.name, "ack")
        if code.value[0] != 0:
            if self.mode == "watch" and self.pending.pop(mid, None) is None:
                return  # the change already arrived (it can beat the acknowledgement)
            done(code.name)
        elif self.mode == "get":
            self._poll(j, i, done, time.perf_counter())
        elif self.mode == "get-token":
            self._poll(j, i, done, time.perf_counter(), self.track_response(f.result()).consistency_token)

    def _poll(self, j: int, i: int, done, since: float, token: bytes = b"") -> None:
        req = self.get_request(collection=self.collection, key=self.persons[i], min_token=token).SerializeToString()
        f = self.get[j % len(self.get)].future(req, timeout=self.timeout, metadata=METADATA)
        f.add_done_callback(partial(self._polled, j, i, done, since, token))

    def _polled(self, j: int, i: int, done, since: float, token: bytes, f) -> None:
        if f.code().value[0] != 0:
            done(f.code().name)
        elif any(m.audience_id == self.audience_id for m in self.get_response(f.result()).record.memberships):
            done("OK")
        elif token:  # read-your-writes broken: a Get past the token must show the change
            done("STALE_AFTER_TOKEN")
        elif time.perf_counter() - since > self.timeout:
            done("NOT_VISIBLE")
        else:
            self._poll(j, i, done, since)

    def close(self) -> None:
        for r in self.readers:
            r.stop()
