"""Behavioural events and realtime event models: plain Python, no grpc, no lmdb.

An ``Event`` is what the transport decodes from ``qualify.v1.Event`` and what
the event log stores. An ``EventModel`` (from ``[event_models.NAME]`` in the
project file) says which events it matches (type, optional event name,
optional property filters), which properties it exposes with their types, and
which identifier maps a matching event to a person.

Validation (``validate``) runs once per event, before anything is written:

- TOO_LARGE: the encoded event is over 32 KB;
- MISSING_MESSAGE_ID, UNKNOWN_TYPE, MISSING_IDENTITY (neither user_id nor
  anonymous_id);
- INVALID_TIMESTAMP: not an instant RFC 3339 can write (years 0001-9999),
  or nanos outside [0, 1e9) on the wire (the transport hands those over as
  ``timestamp_us=None``). Checked before anything reads the time: out of
  range, the microseconds need not fit the log's int64;
- FUTURE_TIMESTAMP: more than 5 minutes ahead of the server clock;
- PROPERTY_TYPE: a property declared by a candidate model (one whose type and
  event name match; see below) holds a value of another type.

Property coercion happens during validation, in place: ``google.protobuf.Struct``
carries every number as a double, so an ``int`` property accepts an integral
float and stores an int; a ``timestamp`` property accepts an RFC 3339 string
and stores integer microseconds since the epoch; ``float`` accepts any finite
number (NaN and ±Infinity are PROPERTY_TYPE: aggregates would never recover);
``bool`` only booleans; ``string`` only strings. A missing or null property is
never a type error (it is a missing value, which predicates know how to treat).

Why the type check uses *candidate* models (type and name match) rather than
models whose filters also pass: filters compare typed values, so they can only
run after coercion; and an event that claims to be a "Product Viewed" with a
mistyped declared property is a client bug worth reporting even when a filter
would not have selected it.

Matching (``matching_models``) then applies each candidate's filters, with the
semantics of ``qualify.evaluator.reference.matches_predicate``, through one
compiled ``FilterSet`` per model (built with the ``ModelSet``, run per
ingested event), and resolves the person: ``user_id`` (falling back to
``anonymous_id``), ``anonymous_id``, or ``property:NAME``. Person keys are returned as given, ``("user", id)`` or
``("anonymous", id)``, without namespacing: the engine decides that. A
``property:NAME`` identifier names the person's user id (the parent model's
primary key) carried in a property, so it yields ``("user", value)``. An event
that matches no model is still stored and acknowledged, and counted as
unmatched; it is not evaluated.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from qualify.evaluator import FilterSet

from .conditions import Predicate
from .errors import QualifyError, Status
from .operators import parse_timestamp
from .schema import ValueType

ANON = "anon:"  # an anonymous person's key is ANON + anonymous id, until a merge names them
MAX_EVENT_BYTES = 32 * 1024
MAX_FUTURE_US = 5 * 60 * 1_000_000
# RFC 3339's range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z, in microseconds since the epoch.
MIN_TIMESTAMP_US = -62_135_596_800 * 1_000_000
MAX_TIMESTAMP_US = 253_402_300_800 * 1_000_000 - 1
DEDUPE_WINDOW_US = 24 * 3600 * 1_000_000

PersonKey = tuple[str, str]  # ("user", id) or ("anonymous", id)


class EventType(enum.IntEnum):
    """The kind of an event (numbers as qualify.v1.EventType)."""

    TRACK = 1
    PAGE = 2
    SCREEN = 3
    IDENTIFY = 4
    ALIAS = 5
    GROUP = 6  # Segment's group call: the person joins a group (properties.groupId, the group's traits)

    @classmethod
    def parse(cls, name: str) -> "EventType":
        return cls[name.upper()]


EVENT_TYPE_NAMES = tuple(t.name.lower() for t in EventType)
_EVENT_TYPES = frozenset(int(t) for t in EventType)
_TYPES = {int(t): t for t in EventType}


class RejectionReason(enum.IntEnum):
    """Why an event was rejected (numbers as qualify.v1.RejectionReason)."""

    MISSING_IDENTITY = 1
    UNKNOWN_TYPE = 2
    PROPERTY_TYPE = 3
    FUTURE_TIMESTAMP = 4
    TOO_LARGE = 5
    MISSING_MESSAGE_ID = 6
    INVALID_TIMESTAMP = 7


@dataclass(frozen=True, slots=True)
class Rejection:
    """One rejected event: the reason, a sentence for people, and the offending field ("": the whole event)."""

    reason: RejectionReason
    description: str
    field: str = ""


class EventRejected(QualifyError):
    """A single event (IngestService.Track) was rejected; metadata["rejection"] names why."""

    status, reason = Status.INVALID_ARGUMENT, "EVENT_REJECTED"


class Identifier(str, enum.Enum):
    USER_ID = "user_id"  # falls back to anonymous_id
    ANONYMOUS_ID = "anonymous_id"
    PROPERTY = "property"  # the user id, carried in identifier_property


@dataclass(frozen=True)
class EventModel:
    """A realtime event model from ``[event_models.NAME]``."""

    name: str
    type: EventType
    event_name: str = ""  # "" matches any name of the type
    filters: tuple[Predicate, ...] = ()
    properties: tuple[tuple[str, ValueType], ...] = ()
    identifier: Identifier = Identifier.USER_ID
    identifier_property: str = ""  # identifier PROPERTY only

    def property_types(self) -> dict[str, ValueType]:
        return dict(self.properties)


@dataclass(slots=True)
class Event:
    """One behavioural event, as validated, stored and evaluated.

    ``timestamp_us`` and ``received_us`` are integer microseconds since the
    epoch (``timestamp_us`` None: the wire timestamp was malformed, which
    ``validate`` rejects as INVALID_TIMESTAMP). ``seq`` is assigned by the event log when the event is appended
    (0 before).
    """

    message_id: str
    type: int  # an EventType once validated; any other int is rejected as UNKNOWN_TYPE
    name: str = ""
    user_id: str = ""
    anonymous_id: str = ""
    timestamp_us: int | None = 0
    received_us: int = 0
    properties: dict = field(default_factory=dict)
    traits: dict = field(default_factory=dict)
    session_id: str = ""
    previous_id: str = ""
    context: dict = field(default_factory=dict)
    seq: int = 0
    # Its place in its ingest call, set by a cluster node: one call's events at one received instant land
    # on several partitions, and a merge across them interleaves them by it as one node's log order does.
    arrival: int = 0


@dataclass(frozen=True, slots=True)
class MatchedEvent:
    """A validated event and the (model index, person) pairs it matches: what ingest hands the writer.

    Matching runs once, with validation, off the writer thread; the log
    counts the events that match nothing, and the engine evaluates the rest.
    """

    event: Event
    matches: tuple[tuple[int, PersonKey], ...]


class ModelSet:
    """Event models indexed by (type, name), compiled once per project."""

    def __init__(self, models: Sequence[EventModel]):
        self.models: tuple[EventModel, ...] = tuple(models)
        self.types: tuple[tuple[tuple[str, ValueType], ...], ...] = tuple(m.properties for m in self.models)
        # None for a model without filters: most models have none, and skipping the call is cheaper.
        self.filters: tuple[FilterSet | None, ...] = tuple(
            FilterSet((p.field, p.op, p.values) for p in m.filters) if m.filters else None for m in self.models)
        self._named: dict[tuple[int, str], tuple[int, ...]] = {}
        self._any: dict[int, tuple[int, ...]] = {}
        self._by_user: dict[tuple[int, str], tuple[int, ...] | None] = {}  # see by_user
        named: dict[tuple[int, str], list[int]] = {}
        any_name: dict[int, list[int]] = {}
        for i, m in enumerate(self.models):
            if m.event_name:
                named.setdefault((int(m.type), m.event_name), []).append(i)
            else:
                any_name.setdefault(int(m.type), []).append(i)
        for key, idx in named.items():
            # A named model's candidates include the type's any-name models,
            # in declaration order.
            self._named[key] = tuple(sorted(idx + any_name.get(key[0], [])))
        for t in _EVENT_TYPES:
            self._any[t] = tuple(any_name.get(t, ()))

    def __len__(self) -> int:
        return len(self.models)

    def candidates(self, event: Event) -> tuple[int, ...]:
        """Indices of the models whose type and event name match (filters not applied)."""
        return self.candidates_of(event.type, event.name)

    def candidates_of(self, type_: int, name: str) -> tuple[int, ...]:
        hit = self._named.get((type_, name))
        return hit if hit is not None else self._any.get(type_, ())

    def by_user(self, type_: int, name: str) -> tuple[int, ...] | None:
        """The candidates of a (type, name) when each is identified by user id; else None.

        Then a logged event (which always names someone) matches exactly the
        candidates whose filters accept its properties: ``matching_models``
        without the Event.
        """
        key = (type_, name)
        found = self._by_user.get(key, _NO)
        if found is _NO:
            found = self.candidates_of(type_, name)
            if any(self.models[i].identifier is not Identifier.USER_ID for i in found):
                found = None
            self._by_user[key] = found
        return found


Models = Union[ModelSet, Sequence[EventModel]]


def compile_models(models: Models) -> ModelSet:
    return models if isinstance(models, ModelSet) else ModelSet(models)


_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
_NO = object()
_INT64 = 2**63


def coerce(value: Any, vtype: ValueType) -> Any:
    """``value`` as a ``vtype`` property (None stays None), or the sentinel _NO."""
    if value is None:
        return None
    if vtype is ValueType.STRING:
        return value if isinstance(value, str) else _NO
    if vtype is ValueType.FLOAT:
        # NaN and the infinities are refused: one of them in a SUM or AVG would spoil it for good.
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        return _NO
    if vtype is ValueType.INT:
        if isinstance(value, bool):
            return _NO
        if isinstance(value, int):
            return value if -_INT64 <= value < _INT64 else _NO
        if isinstance(value, float) and math.isfinite(value) and value == int(value) and -_INT64 <= value < _INT64:
            return int(value)
        return _NO
    if vtype is ValueType.BOOL:
        return value if isinstance(value, bool) else _NO
    # TIMESTAMP: RFC 3339 with a zone; numbers are refused because their unit
    # (s, ms, µs) would be a guess.
    if isinstance(value, str) and _RFC3339.match(value):
        try:
            return parse_timestamp(value)
        except ValueError:
            return _NO
    return _NO


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


_EXPECTED = {
    ValueType.STRING: "a string",
    ValueType.INT: "an integer",
    ValueType.FLOAT: "a finite number",
    ValueType.BOOL: "a bool",
    ValueType.TIMESTAMP: "an RFC 3339 timestamp with a zone (e.g. 2024-05-01T12:00:00Z)",
}


def validate(event: Event, models: Models, now_us: int, encoded_size: int = 0) -> Rejection | None:
    """Checks one event, coercing its declared properties in place; None when it is good.

    ``encoded_size`` is the size of the event as it arrived (the transport
    knows it). A missing timestamp (0) becomes ``received_us``.
    """
    if encoded_size > MAX_EVENT_BYTES:
        return Rejection(RejectionReason.TOO_LARGE,
                         f"the event is {encoded_size} bytes encoded; the limit is {MAX_EVENT_BYTES}")
    if not event.message_id:
        return Rejection(RejectionReason.MISSING_MESSAGE_ID, "message_id is empty", "message_id")
    if event.type not in _EVENT_TYPES:
        return Rejection(RejectionReason.UNKNOWN_TYPE,
                         f"type {event.type} is not one of track, page, screen, identify, alias", "type")
    event.type = _TYPES[event.type]
    if not event.user_id and not event.anonymous_id:
        return Rejection(RejectionReason.MISSING_IDENTITY, "neither user_id nor anonymous_id is set", "user_id")
    ts = event.timestamp_us
    if ts is None or not MIN_TIMESTAMP_US <= ts <= MAX_TIMESTAMP_US:
        return Rejection(RejectionReason.INVALID_TIMESTAMP,
                         "the timestamp is not an RFC 3339 instant: seconds must fall in years 0001-9999 "
                         "and nanos in [0, 999999999]", "timestamp")
    if not ts:
        event.timestamp_us = event.received_us
    elif event.timestamp_us > now_us + MAX_FUTURE_US:
        ahead = (event.timestamp_us - now_us) / 1e6
        return Rejection(RejectionReason.FUTURE_TIMESTAMP,
                         f"the timestamp is {ahead:.0f} s ahead of the server clock; at most 300 s is allowed",
                         "timestamp")
    models = compile_models(models)
    candidates = models.candidates(event)
    if candidates:
        props = event.properties
        updates: dict[str, Any] = {}
        for i in candidates:
            for name, vtype in models.types[i]:
                raw = props.get(name)
                if raw is None:
                    continue
                got = coerce(raw, vtype)
                if got is _NO:
                    return Rejection(
                        RejectionReason.PROPERTY_TYPE,
                        f"property {name!r} of event model {models.models[i].name!r} must be "
                        f"{_EXPECTED[vtype]}, not {_kind(raw)}",
                        f"properties.{name}")
                # Two models may declare one property as int and float (the
                # config refuses other mixes): the first declaration wins; the
                # values compare equal either way.
                updates.setdefault(name, got)
        if updates:
            props.update(updates)
    return None


# Identifiers become LMDB keys (at most 511 bytes), some behind a 5-byte "anon:".
MAX_ID_BYTES = 500
_ID_FIELDS = ("user_id", "anonymous_id", "previous_id")
_TEXT_FIELDS = ("message_id", "name", "session_id")


def _over(s: str, limit: int) -> bool:
    """Whether ``s`` is over ``limit`` bytes of UTF-8 (encoded only when it could be)."""
    return len(s) * 4 > limit and (len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))) > limit


def _long_string(value: Any, limit: int) -> bool:
    """Whether a property value holds a string, or a key, over ``limit`` bytes (nested values too)."""
    if isinstance(value, str):
        return _over(value, limit)
    if isinstance(value, dict):
        return any(_long_string(k, limit) or _long_string(v, limit) for k, v in value.items())
    if isinstance(value, list):
        return any(_long_string(v, limit) for v in value)
    return False


def check_limits(event: Event, max_properties: int, max_string_bytes: int) -> Rejection | None:
    """TOO_LARGE for an event within the size limit that breaks a finer one (see [limits])."""
    for names, limit in ((_ID_FIELDS, MAX_ID_BYTES), (_TEXT_FIELDS, max_string_bytes)):
        for name in names:
            if _over(getattr(event, name), limit):
                return Rejection(RejectionReason.TOO_LARGE, f"{name} is over {limit} bytes", name)
    for name in ("properties", "traits", "context"):
        values = getattr(event, name)
        if not values:
            continue
        if len(values) > max_properties:
            return Rejection(RejectionReason.TOO_LARGE,
                             f"{name} has {len(values)} keys; the limit is {max_properties}", name)
        if _long_string(values, max_string_bytes):
            return Rejection(RejectionReason.TOO_LARGE,
                             f"{name} holds a string over {max_string_bytes} bytes", name)
    return None


def _person(model: EventModel, event: Event) -> PersonKey | None:
    ident = model.identifier
    if ident is Identifier.USER_ID:
        if event.user_id:
            return ("user", event.user_id)
        return ("anonymous", event.anonymous_id) if event.anonymous_id else None
    if ident is Identifier.ANONYMOUS_ID:
        return ("anonymous", event.anonymous_id) if event.anonymous_id else None
    v = event.properties.get(model.identifier_property)
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, str):  # an id too long to be a key names nobody
        return ("user", v) if v and not _over(v, MAX_ID_BYTES) else None
    if isinstance(v, int):
        return ("user", str(v))
    if isinstance(v, float) and math.isfinite(v) and v == int(v):
        return ("user", str(int(v)))
    return None


def matching_models(event: Event, models: Models) -> list[tuple[int, PersonKey]]:
    """(model index, person key) for every model the (validated) event matches.

    A model whose identifier cannot be resolved for this event (e.g.
    ``anonymous_id`` on an event with only a user_id) does not match it.
    """
    models = compile_models(models)
    out = []
    props = event.properties
    filters = models.filters
    for i in models.candidates(event):
        f = filters[i]
        if f is not None and not f.matches(props):
            continue
        person = _person(models.models[i], event)
        if person is not None:
            out.append((i, person))
    return out

