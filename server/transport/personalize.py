"""PersonalizeService over gRPC: decode, read, assemble the reply's bytes.

Replies are not built as protobuf objects: the stored record is already the
wire form of the Record's fields, so a reply is a few slices and length
prefixes (see qualify.server.wire), returned as bytes that the handler
sends as they are.
"""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from qualify.v1 import personalize_pb2

from ..services.consistency import budget_of
from ..services.personalize import PersonalizeService
from ..wire import length_delimited, record_message
from .errors import reject_malformed
from .gate import caller_access


class Personalize:
    """PersonalizeService handlers; one instance per server process."""

    def __init__(self, service: PersonalizeService):
        self.service = service
        self._audience_ids: tuple[str | None, ...] = ()
        self._encoded_audiences: list[bytes] = []

    def _memberships(self, members: dict[int, int] | None) -> bytes:
        """Encoded Record.memberships fields from a person's memberships {bit: enter_us}."""
        if not members:
            return b""
        ids = self.service.audience_ids
        if ids is not self._audience_ids:  # a new catalog: encode its ids once
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

    def _mask(self, view, request, access) -> tuple[int, ...] | None:
        paths = tuple(request.read_mask.paths) if request.HasField("read_mask") else None
        return self.service.mask(view, paths, access)

    async def get(self, request: personalize_pb2.GetRequest, context) -> bytes:
        reject_malformed(request)
        if request.min_token:
            await self.service.wait(request.min_token, budget_of(context.time_remaining()))
        access = caller_access()
        view, key, (stored, bits) = self.service.get(request.collection, request.key, access)
        record = record_message(view.prefix, key, stored, self._mask(view, request, access), self._memberships(bits))
        return length_delimited(b"\x0a", record)

    async def batch_get(self, request: personalize_pb2.BatchGetRequest, context) -> bytes:
        reject_malformed(request)
        if request.min_token:
            await self.service.wait(request.min_token, budget_of(context.time_remaining()))
        access = caller_access()
        view, keys, rows = self.service.batch_get(request.collection, request.keys, access)
        mask = self._mask(view, request, access)
        found, missing = [], []
        for key, (stored, bits) in zip(keys, rows):
            if stored is None:
                missing.append(length_delimited(b"\x12", key))
            else:
                found.append(length_delimited(b"\x0a", record_message(view.prefix, key, stored, mask,
                                                                      self._memberships(bits))))
        return b"".join(found) + b"".join(missing)
