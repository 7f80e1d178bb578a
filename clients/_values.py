"""The plain-Python results that need no gRPC: records, memberships, pages.

They live apart from _records.py (which converts qualify.v1 messages and so
imports grpc and protobuf) because qualify.clients.LocalReader returns the
same types from the caller's own process and must not pull grpc in.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any


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


@dataclass(frozen=True)
class MembersPage:
    """One page of an audience's member keys; ``next_page_token`` is "" on the last."""

    person_keys: list[str]
    next_page_token: str


def _rfc3339(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    text = moment.astimezone(timezone.utc).isoformat()
    return text[: -len("+00:00")] + "Z"
