"""Plain-Python results and the conversions to and from qualify.v1 messages."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import json

import grpc
from google.protobuf import field_mask_pb2, json_format, struct_pb2

from qualify.v1 import audience_pb2, condition_pb2, diagnostics_pb2, membership_pb2, personalize_pb2

from ._errors import InvalidArgumentError
from ._values import BatchResult, Membership, MembersPage, Record, _rfc3339  # noqa: F401 - re-exported

#: A condition as its proto-JSON dict (proto field names), JSON text, or a qualify.v1.Condition.
ConditionLike = dict[str, Any] | str | condition_pb2.Condition


def get_request(collection: str, key: str, fields: Iterable[str] | None,
                min_token: bytes | None = None) -> personalize_pb2.GetRequest:
    return personalize_pb2.GetRequest(collection=collection, key=key, read_mask=_read_mask(fields),
                                      min_token=min_token or b"")


def batch_get_request(
    collection: str, keys: Iterable[str], fields: Iterable[str] | None, min_token: bytes | None = None
) -> personalize_pb2.BatchGetRequest:
    return personalize_pb2.BatchGetRequest(
        collection=collection, keys=_strings("keys", keys), read_mask=_read_mask(fields), min_token=min_token or b""
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
    # Every field of the message, so a new one cannot be dropped silently
    # (tests/test_clients_unit.py compares the keys with the descriptor).
    return {
        "version": response.version,
        "sync_generation": response.sync_generation,
        "collections": list(response.collections),
        "people": response.people,
        "worker_pid": response.worker_pid,
        "events_logged": response.events_logged,
        "events_unmatched": response.events_unmatched,
        "max_message_bytes": response.max_message_bytes,
    }


# -- audiences ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Audience:
    """A realtime audience as the server holds it."""

    id: str
    display_name: str
    description: str
    #: The condition as its proto-JSON dict (proto field names), the README's shape.
    condition: dict[str, Any]
    create_time: datetime | None
    update_time: datetime | None
    member_count: int
    #: False while a backfill brings members to a new or changed definition (BACKFILLING); True once LIVE.
    live: bool = True
    #: While not live, how far the backfill is, from 0 to 1.
    backfill_progress: float = 1.0

    def condition_message(self) -> condition_pb2.Condition:
        return json_format.ParseDict(self.condition, condition_pb2.Condition())


@dataclass(frozen=True)
class Preview:
    """How many people qualify now under a definition, and some of their keys."""

    count: int
    sample_keys: list[str]


@dataclass(frozen=True)
class Explanation:
    """One condition node's value for one person, and its children's."""

    path: str
    value: bool
    count: int
    #: For aggregates, when defined.
    aggregate: float | None
    #: When the node's value will change with no new event; None: not by itself.
    changes_at: datetime | None
    summary: str
    children: list[Explanation]


@dataclass(frozen=True)
class MembershipExplanation:
    member: bool
    root: Explanation | None


@dataclass(frozen=True)
class MembershipChange:
    """One enter or exit from WatchMemberships (sequence 0 during a snapshot)."""

    sequence: int
    audience_id: str
    person_key: str
    #: "enter" or "exit".
    direction: str
    effective_time: datetime | None
    #: "event", "warehouse_sync", "window_lapse", "session_end", "identity_merge", "audience_change".
    cause: str
    #: For cause "event": the causing event's message_id.
    message_id: str


@dataclass(frozen=True)
class SnapshotEnd:
    """Ends a WATCH_START_SNAPSHOT snapshot: live changes after ``sequence`` follow."""

    sequence: int


_WATCH_STARTS = {"now": audience_pb2.WATCH_START_NOW, "sequence": audience_pb2.WATCH_START_SEQUENCE,
                 "snapshot": audience_pb2.WATCH_START_SNAPSHOT}


def condition_from(condition: ConditionLike, field: str = "audience.condition") -> condition_pb2.Condition:
    """A Condition from a message, a proto-JSON dict or JSON text; InvalidArgumentError if it does not parse."""
    if isinstance(condition, condition_pb2.Condition):
        return condition
    try:
        if isinstance(condition, str):
            condition = json.loads(condition)
        if not isinstance(condition, dict):
            raise TypeError(f"a condition is a dict, JSON text or qualify.v1.Condition, not {type(condition).__name__}")
        return json_format.ParseDict(condition, condition_pb2.Condition())
    except (json_format.ParseError, ValueError, TypeError) as err:
        # Raised here, before any call, as the server would answer an invalid definition.
        raise InvalidArgumentError(f"the condition does not parse: {err}", code=grpc.StatusCode.INVALID_ARGUMENT,
                                   reason="INVALID_AUDIENCE", field_violations=[(field, str(err))]) from err


def audience_message(audience_id: str, condition: ConditionLike | None, display_name: str | None,
                     description: str | None) -> tuple[audience_pb2.Audience, list[str]]:
    """The Audience to send and the paths of the fields given (an update's mask)."""
    message = audience_pb2.Audience(id=audience_id)
    paths = []
    if condition is not None:
        message.condition.CopyFrom(condition_from(condition))
        paths.append("condition")
    if display_name is not None:
        message.display_name = display_name
        paths.append("display_name")
    if description is not None:
        message.description = description
        paths.append("description")
    return message, paths


def create_audience_request(audience_id: str, condition: ConditionLike, display_name: str,
                            description: str) -> audience_pb2.CreateAudienceRequest:
    message, _ = audience_message(audience_id, condition, display_name, description)
    return audience_pb2.CreateAudienceRequest(audience=message)


def update_audience_request(audience_id: str, condition: ConditionLike | None, display_name: str | None,
                            description: str | None) -> audience_pb2.UpdateAudienceRequest:
    message, paths = audience_message(audience_id, condition, display_name, description)
    if not paths:
        raise ValueError("update_audience needs a condition, display_name or description to change")
    return audience_pb2.UpdateAudienceRequest(audience=message, update_mask=field_mask_pb2.FieldMask(paths=paths))


def preview_request(target: str | ConditionLike, sample_size: int) -> audience_pb2.PreviewAudienceRequest:
    """A saved audience's id (a str that is not JSON text) or a draft condition."""
    if isinstance(target, str) and not target.lstrip().startswith("{"):
        return audience_pb2.PreviewAudienceRequest(id=target, sample_size=sample_size)
    return audience_pb2.PreviewAudienceRequest(condition=condition_from(target, "condition"), sample_size=sample_size)


def watch_request(audience_ids: Iterable[str], start: str, after_sequence: int) -> audience_pb2.WatchMembershipsRequest:
    if start not in _WATCH_STARTS:
        raise ValueError(f"start must be one of {sorted(_WATCH_STARTS)}, not {start!r}")
    if after_sequence and start != "sequence":
        start = "sequence"  # resuming is what after_sequence means
    return audience_pb2.WatchMembershipsRequest(audience_ids=_strings("audience_ids", audience_ids),
                                                start=_WATCH_STARTS[start], after_sequence=after_sequence)


def audience_from_proto(message: audience_pb2.Audience) -> Audience:
    return Audience(
        id=message.id,
        display_name=message.display_name,
        description=message.description,
        condition=json_format.MessageToDict(message.condition, preserving_proto_field_name=True),
        create_time=_time(message, "create_time"),
        update_time=_time(message, "update_time"),
        member_count=message.member_count,
        live=message.state != audience_pb2.Audience.BACKFILLING,
        backfill_progress=message.backfill_progress if message.state == audience_pb2.Audience.BACKFILLING else 1.0,
    )


def memberships_from_proto(response: audience_pb2.CheckMembershipResponse) -> list[Membership]:
    return [_membership(m) for m in response.memberships]


def explanation_from_proto(message: audience_pb2.ConditionExplanation) -> Explanation:
    return Explanation(
        path=message.path,
        value=message.value,
        count=message.count,
        aggregate=message.aggregate if message.HasField("aggregate") else None,
        changes_at=_time(message, "changes_at"),
        summary=message.summary,
        children=[explanation_from_proto(c) for c in message.children],
    )


def membership_explanation_from_proto(response: audience_pb2.ExplainMembershipResponse) -> MembershipExplanation:
    root = explanation_from_proto(response.root) if response.HasField("root") else None
    return MembershipExplanation(member=response.member, root=root)


def watch_records(response: audience_pb2.WatchMembershipsResponse) -> list[MembershipChange | SnapshotEnd]:
    out: list[MembershipChange | SnapshotEnd] = [change_from_proto(c) for c in response.changes]
    if response.HasField("snapshot_end_sequence"):
        out.append(SnapshotEnd(response.snapshot_end_sequence))
    return out


def change_from_proto(message: membership_pb2.MembershipChange) -> MembershipChange:
    return MembershipChange(
        sequence=message.sequence,
        audience_id=message.audience_id,
        person_key=message.person_key,
        direction=_enum_word(membership_pb2.Direction, message.direction, "DIRECTION_"),
        effective_time=_time(message, "effective_time"),
        cause=_enum_word(membership_pb2.ChangeCause, message.cause, "CHANGE_CAUSE_"),
        message_id=message.message_id,
    )


def _enum_word(enum: Any, number: int, prefix: str) -> str:
    try:
        return enum.Name(number).removeprefix(prefix).lower()
    except ValueError:  # a value newer than these stubs
        return str(number)


def _time(message: Any, field: str) -> datetime | None:
    return getattr(message, field).ToDatetime(tzinfo=timezone.utc) if message.HasField(field) else None


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


def _read_mask(fields: Iterable[str] | None) -> field_mask_pb2.FieldMask | None:
    # No mask (not an empty one) when fields is None: the server returns every field.
    return None if fields is None else field_mask_pb2.FieldMask(paths=_strings("fields", fields))


def _strings(name: str, values: Iterable[str]) -> list[str]:
    # A bare str is iterable too; read as characters it would ask for "i", "d", ...
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of strings, not {type(values).__name__}")
    return list(values)
