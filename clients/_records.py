"""Plain-Python results and the conversions to and from qualify.v1 messages."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from google.protobuf import field_mask_pb2, struct_pb2

from qualify.v1 import diagnostics_pb2, membership_pb2, personalize_pb2


@dataclass(frozen=True)
class Membership:
    """A person's membership of one audience."""

    audience_id: str
    #: When the person entered, in UTC; None when the server did not say.
    enter_time: datetime | None


@dataclass(frozen=True)
class Record:
    """A collection record with the person's current memberships."""

    collection: str
    key: str
    #: The Struct's fields as Python values. Numbers stay floats, as the
    #: Struct carries them (an integer column arrives as 42.0).
    fields: dict[str, Any]
    memberships: list[Membership]

    def to_json_dict(self) -> dict[str, Any]:
        """A dict that `json.dumps` accepts, with RFC 3339 enter times."""
        return {
            "collection": self.collection,
            "key": self.key,
            "fields": copy.deepcopy(self.fields),
            "memberships": [
                {"audience_id": m.audience_id, "enter_time": _rfc3339(m.enter_time)}
                for m in self.memberships
            ],
        }


@dataclass(frozen=True)
class BatchResult:
    """The records found, in request order, and the keys with no record."""

    records: list[Record]
    missing_keys: list[str]


def get_request(collection: str, key: str, fields: Iterable[str] | None) -> personalize_pb2.GetRequest:
    return personalize_pb2.GetRequest(collection=collection, key=key, read_mask=_read_mask(fields))


def batch_get_request(
    collection: str, keys: Iterable[str], fields: Iterable[str] | None
) -> personalize_pb2.BatchGetRequest:
    return personalize_pb2.BatchGetRequest(
        collection=collection, keys=_strings("keys", keys), read_mask=_read_mask(fields)
    )


def record_from_proto(message: personalize_pb2.Record) -> Record:
    return Record(
        collection=message.collection,
        key=message.key,
        fields=struct_to_dict(message.fields),
        memberships=[_membership(m) for m in message.memberships],
    )


def batch_from_proto(response: personalize_pb2.BatchGetResponse) -> BatchResult:
    return BatchResult(
        records=[record_from_proto(r) for r in response.records],
        missing_keys=list(response.missing_keys),
    )


def server_info_from_proto(response: diagnostics_pb2.GetServerInfoResponse) -> dict[str, Any]:
    # Built by hand: MessageToDict would render the uint64 counts as strings.
    return {
        "version": response.version,
        "sync_generation": response.sync_generation,
        "collections": list(response.collections),
        "people": response.people,
        "worker_pid": response.worker_pid,
    }


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """Converts a Struct recursively; unlike MessageToDict it never raises on NaN."""
    return {name: _value(value) for name, value in struct.fields.items()}


def _value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [_value(v) for v in value.list_value.values]
    if kind in (None, "null_value"):
        return None
    return getattr(value, kind)  # number_value (float), string_value, bool_value


def _membership(message: membership_pb2.AudienceMembership) -> Membership:
    enter_time = (
        message.enter_time.ToDatetime(tzinfo=timezone.utc) if message.HasField("enter_time") else None
    )
    return Membership(audience_id=message.audience_id, enter_time=enter_time)


def _rfc3339(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    text = moment.astimezone(timezone.utc).isoformat()
    return text[: -len("+00:00")] + "Z"


def _read_mask(fields: Iterable[str] | None) -> field_mask_pb2.FieldMask | None:
    # No mask (not an empty one) when fields is None: the server returns every field.
    return None if fields is None else field_mask_pb2.FieldMask(paths=_strings("fields", fields))


def _strings(name: str, values: Iterable[str]) -> list[str]:
    # A bare str is iterable too; read as characters it would ask for "i", "d", ...
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of strings, not {type(values).__name__}")
    return list(values)
