"""PersonalizeService and DiagnosticsService: decode, read, assemble bytes.

Replies are not built as protobuf objects: the stored record is already the
wire form of the Record's fields, so a reply is a few slices and length
prefixes (see qualify.server.wire). The handlers are registered with an
identity response serializer and return those bytes directly.
"""

from __future__ import annotations

import os

import grpc

from google.protobuf import timestamp_pb2

from qualify.v1 import diagnostics_pb2, personalize_pb2

from ..domain.errors import BatchTooLarge, FieldViolation, InvalidRequest
from ..storage.eventlog import EventLogView
from ..storage.lmdb_store import Reader
from ..wire import length_delimited, record_message
from .errors import guarded, lenient, reject_malformed

MAX_BATCH_KEYS = 1000
MAX_KEY_BYTES = 511  # LMDB's key size limit


def _identity(payload: bytes) -> bytes:
    return payload


def _check_key(key: str, field: str) -> bytes:
    if not key:
        raise InvalidRequest(f"{field} is empty", violations=[FieldViolation(field, "must be a non-empty key")])
    raw = key.encode()
    if len(raw) > MAX_KEY_BYTES:
        raise InvalidRequest(f"{field} is {len(raw)} bytes long",
                             violations=[FieldViolation(field, f"must be at most {MAX_KEY_BYTES} bytes of UTF-8")])
    return raw


class Personalize:
    """Handlers over a Reader; one instance per server process."""

    def __init__(self, reader: Reader, version: str):
        self.reader = reader
        self.version = version
        self._audience_ids: tuple[str, ...] = ()
        self._encoded_audiences: list[bytes] = []
        self._event_log = EventLogView(reader.env)

    def _memberships(self, members: dict[int, int] | None) -> bytes:
        """Encoded Record.memberships fields from a person's memberships {bit: enter_us}."""
        if not members:
            return b""
        ids = self.reader.audience_ids
        if ids is not self._audience_ids:
            self._audience_ids = ids
            self._encoded_audiences = [length_delimited(b"\x0a", a.encode()) if a else b"" for a in ids]
        enc = self._encoded_audiences
        out = []
        for bit, enter_us in sorted(members.items()):
            if bit < len(enc) and enc[bit]:
                seconds, micros = divmod(enter_us, 1_000_000)
                ts = timestamp_pb2.Timestamp(seconds=seconds, nanos=micros * 1000).SerializeToString()
                out.append(length_delimited(b"\x22", enc[bit] + length_delimited(b"\x12", ts)))
        return b"".join(out)

    @staticmethod
    def _mask(view, request) -> tuple[int, ...] | None:
        if not request.HasField("read_mask"):
            return None
        return view.mask_indices(tuple(request.read_mask.paths))

    async def get(self, request: personalize_pb2.GetRequest, context) -> bytes:
        reject_malformed(request)
        if not request.collection:
            raise InvalidRequest("collection is empty", violations=[FieldViolation("collection", "must name a collection")])
        key = _check_key(request.key, "key")
        view, stored, bits = self.reader.get_one(request.collection, key)
        record = record_message(view.prefix, key, stored, self._mask(view, request), self._memberships(bits))
        return length_delimited(b"\x0a", record)

    async def batch_get(self, request: personalize_pb2.BatchGetRequest, context) -> bytes:
        reject_malformed(request)
        if not request.collection:
            raise InvalidRequest("collection is empty", violations=[FieldViolation("collection", "must name a collection")])
        n = len(request.keys)
        if n > MAX_BATCH_KEYS:
            raise BatchTooLarge(f"{n} keys in one BatchGet; the limit is {MAX_BATCH_KEYS}",
                                violations=[FieldViolation("keys", f"must hold at most {MAX_BATCH_KEYS} keys, not {n}")])
        keys = [_check_key(k, f"keys[{i}]") for i, k in enumerate(request.keys)]
        view, rows = self.reader.get(request.collection, keys)
        mask = self._mask(view, request)
        found, missing = [], []
        for key, (stored, bits) in zip(keys, rows):
            if stored is None:
                missing.append(length_delimited(b"\x12", key))
            else:
                found.append(length_delimited(b"\x0a", record_message(view.prefix, key, stored, mask, self._memberships(bits))))
        return b"".join(found) + b"".join(missing)

    async def noop(self, request: diagnostics_pb2.NoopRequest, context) -> bytes:
        return b""

    async def server_info(self, request: diagnostics_pb2.GetServerInfoRequest, context) -> bytes:
        reject_malformed(request)
        events_logged, events_unmatched = self._event_log.counts()
        return diagnostics_pb2.GetServerInfoResponse(
            version=self.version,
            sync_generation=self.reader.generation,
            collections=sorted(self.reader.collections()),
            people=self.reader.people(),
            worker_pid=os.getpid(),
            events_logged=events_logged,
            events_unmatched=events_unmatched,
        ).SerializeToString()

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        def unary(fn, request_type, name):
            return grpc.unary_unary_rpc_method_handler(
                guarded(name)(fn), request_deserializer=lenient(request_type), response_serializer=_identity)

        return [
            grpc.method_handlers_generic_handler("qualify.v1.PersonalizeService", {
                "Get": unary(self.get, personalize_pb2.GetRequest, "PersonalizeService.Get"),
                "BatchGet": unary(self.batch_get, personalize_pb2.BatchGetRequest, "PersonalizeService.BatchGet"),
            }),
            grpc.method_handlers_generic_handler("qualify.v1.DiagnosticsService", {
                "Noop": unary(self.noop, diagnostics_pb2.NoopRequest, "DiagnosticsService.Noop"),
                "GetServerInfo": unary(self.server_info, diagnostics_pb2.GetServerInfoRequest, "DiagnosticsService.GetServerInfo"),
            }),
        ]
