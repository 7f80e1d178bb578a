"""The Personalization API as JSON: a record with its memberships, a batch of them, one membership.

- ``GET /v1/collections/{collection}/records/{key}?fields=plan,ltv``
- ``POST /v1/collections/{collection}/records:batchGet`` with ``{"keys": [...], "fields": [...]}``
  (up to 1,000 keys; missing keys listed, as BatchGet does)
- ``GET /v1/collections/{collection}/audiences/{audience}/members/{key}``: is the
  person in the audience now, and since when. Under the collection, so a key
  limited to some collections is checked on the same path as a record read.

The same use case as gRPC's PersonalizeService (the same key checks,
including a publishable key's collections and fields). The record's fields
come from its stored wire form, decoded once per read; memberships are the
audience ids with their enter times (RFC 3339).

Read-your-writes: every read takes ``minToken`` (query parameter, or in the
batchGet body), the ``consistencyToken`` of a tracking answer, base64; it
answers once this process sees that write (503 NOT_YET_CONSISTENT after 1 s).
"""

from __future__ import annotations

import base64
import binascii
import json

from aiohttp import web

from qualify.v1 import personalize_pb2

from ...domain.consistency import DEFAULT_MAX_WAIT
from ...domain.errors import FieldViolation, InvalidRequest
from ...wire import record_message, rfc3339
from ..ingest import struct_to_dict  # Struct -> plain values, half json_format's cost
from .edge import HttpEdge, json_response

_Record = personalize_pb2.Record


class Records:
    def __init__(self, edge: HttpEdge):
        self.edge = edge
        self.reads = edge.reads

    def _memberships(self, bits: dict | None) -> list[dict]:
        if not bits:
            return []
        ids = self.reads.audience_ids
        return [{"audience": ids[bit], "enteredAt": rfc3339(enter_us)}
                for bit, enter_us in sorted(bits.items()) if bit < len(ids) and ids[bit]]

    def _record(self, view, key: bytes, stored, mask, bits) -> dict:
        message = _Record.FromString(record_message(view.prefix, key, stored, mask, b""))
        return {"collection": view.name, "key": message.key,
                "fields": struct_to_dict(message.fields), "memberships": self._memberships(bits)}

    async def _wait(self, token) -> None:
        if token:
            try:
                raw = base64.b64decode(token, validate=True)
            except (binascii.Error, ValueError, TypeError):
                raise InvalidRequest("minToken is not base64", violations=[
                    FieldViolation("minToken", "must be a consistencyToken from a tracking answer, unchanged")]) from None
            await self.reads.wait(raw, DEFAULT_MAX_WAIT)

    async def get(self, request: web.Request) -> web.Response:
        access = self.edge.authorize(request, "personalize", "HTTP.get")
        await self._wait(request.query.get("minToken"))
        collection, key = request.match_info["collection"], request.match_info["key"]
        fields = request.query.get("fields")
        paths = tuple(f.strip() for f in fields.split(",") if f.strip()) if fields else None
        view, raw, (stored, bits) = self.reads.get(collection, key, access)
        return json_response(self._record(view, raw, stored, self.reads.mask(view, paths, access), bits))

    async def batch_get(self, request: web.Request) -> web.Response:
        access = self.edge.authorize(request, "personalize", "HTTP.batchGet")
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            body = None
        keys = body.get("keys") if isinstance(body, dict) else None
        fields = body.get("fields") if isinstance(body, dict) else None
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise InvalidRequest("the body must be {\"keys\": [\"...\"]}",
                                 violations=[FieldViolation("keys", "must be a list of strings")])
        if fields is not None and (not isinstance(fields, list) or not all(isinstance(f, str) for f in fields)):
            raise InvalidRequest("fields must be a list of field names",
                                 violations=[FieldViolation("fields", "must be a list of strings")])
        await self._wait(body.get("minToken"))
        view, raws, rows = self.reads.batch_get(request.match_info["collection"], keys, access)
        mask = self.reads.mask(view, tuple(fields) if fields else None, access)
        records, missing = [], []
        for raw, key, (stored, bits) in zip(raws, keys, rows):
            if stored is None:
                missing.append(key)
            else:
                records.append(self._record(view, raw, stored, mask, bits))
        return json_response({"records": records, "missingKeys": missing})

    async def member(self, request: web.Request) -> web.Response:
        access = self.edge.authorize(request, "personalize", "HTTP.member")
        collection, audience, key = (request.match_info[k] for k in ("collection", "audience", "key"))
        access.check_collection(collection)
        await self._wait(request.query.get("minToken"))
        # The read first: it is what brings this process's audience catalog up to date.
        _, _, (_, bits) = self.reads.get(collection, key, access)  # KeyNotFound: nobody by that key
        bit = self.reads.audience_bit(audience)
        entered = (bits or {}).get(bit)
        return json_response({"audience": audience, "key": key, "member": entered is not None,
                              "enteredAt": rfc3339(entered) if entered is not None else None})


def add_routes(app: web.Application, edge: HttpEdge) -> None:
    r = Records(edge)
    app.router.add_get("/v1/collections/{collection}/records/{key}", r.get, name="get")
    app.router.add_post("/v1/collections/{collection}/records:batchGet", r.batch_get, name="batchGet")
    app.router.add_get("/v1/collections/{collection}/audiences/{audience}/members/{key}", r.member, name="member")
