"""The realtime sections of a project file: [event_models.NAME] (with their filters) and [realtime].

A filter is a predicate spelled as a TOML table; what each operator takes,
which property types it applies to and how a value becomes a literal are the
domain's rules (``domain.conditions``), shared with audience conditions. Only
the wording is this file's: it names TOML keys (``value``, ``values``) and
lower-case operators, as the project file spells them.
"""

from __future__ import annotations

import math
from datetime import date
from typing import Any

from qualify.evaluator.program import Op

from ..domain.conditions import Predicate
from ..domain.operators import Arity, arity, coerce_literal, literal_fits, misfit, parse_operator
from ..domain.events import EVENT_TYPE_NAMES, EventModel, EventType, Identifier
from ..domain.schema import TYPE_NAMES, ValueType
from .reader import MISSING, NAME_RE, Reader

DEFAULT_SESSION_TIMEOUT = 30 * 60.0
DEFAULT_WATCH_BUFFER = 10_000
DEFAULT_WATCH_MAX_LAG = 1_000_000
DEFAULT_EVENT_RETENTION = 30 * 86400.0
DEFAULT_CHANGELOG_RETENTION = 7 * 86400.0
DEFAULT_PREVIEW_TIMEOUT = 10.0
DEFAULT_STATE_CACHE = 100_000
REALTIME_KEYS = ("session_timeout", "watch_buffer", "watch_max_lag", "event_retention", "changelog_retention",
                 "preview_timeout", "state_cache")
_MODEL_KEYS = ("type", "event", "filters", "identifier", "properties")
_FILTER_KEYS = ("property", "operator", "value", "values")
_NUMERIC = (ValueType.INT, ValueType.FLOAT)
_WANT = {ValueType.STRING: "a string", ValueType.INT: "a number", ValueType.FLOAT: "a number",
         ValueType.BOOL: "true or false", ValueType.TIMESTAMP: "a date-time such as 2024-05-01T00:00:00Z"}


def parse_realtime(r: Reader, rt: dict) -> dict:
    """[realtime]: the Project fields watch_buffer, watch_max_lag, session_timeout and the retentions."""
    return {
        "event_retention": r.duration(rt, "realtime.event_retention", DEFAULT_EVENT_RETENTION, positive=True),
        "preview_timeout": r.duration(rt, "realtime.preview_timeout", DEFAULT_PREVIEW_TIMEOUT, positive=True),
        "state_cache": r.integer(rt, "realtime.state_cache", DEFAULT_STATE_CACHE, 1, 100_000_000),
        "changelog_retention": r.duration(rt, "realtime.changelog_retention", DEFAULT_CHANGELOG_RETENTION,
                                          positive=True),
        "watch_buffer": r.integer(rt, "realtime.watch_buffer", DEFAULT_WATCH_BUFFER, 1, 10_000_000),
        "watch_max_lag": r.integer(rt, "realtime.watch_max_lag", DEFAULT_WATCH_MAX_LAG, 1, 10**12),
        "session_timeout": r.duration(rt, "realtime.session_timeout", DEFAULT_SESSION_TIMEOUT, positive=True),
    }


# -- [event_models.NAME] ---------------------------------------------------------

def parse_event_models(r: Reader, raw: Any) -> tuple[EventModel, ...]:
    if not isinstance(raw, dict):
        r.problem("event_models", raw, "must be a table of [event_models.NAME] tables")
        return ()
    models: list[EventModel] = []
    for name, spec in raw.items():
        key = f"event_models.{name}"
        if not NAME_RE.match(name):
            r.problem(key, MISSING, "the model name must start with a letter and hold only letters, digits, _ and -")
        elif not isinstance(spec, dict):
            r.problem(key, spec, 'must be a table with at least type = "track" (or page, screen, identify, alias)')
        else:
            model = _event_model(r, name, key, spec)
            if model is not None:
                models.append(model)
    _check_overlaps(r, models)
    return tuple(models)


def _event_model(r: Reader, name: str, key: str, spec: dict) -> EventModel | None:
    """One model, or None when it has problems (all of them reported)."""
    r.unknown_keys(spec, _MODEL_KEYS, key + ".")
    before = len(r.problems)
    tname = r.string(spec, "type", key + ".type")
    etype = None
    if tname is not None:
        try:
            etype = EventType.parse(tname)
        except KeyError:
            r.problem(key + ".type", tname, "must be one of " + ", ".join(EVENT_TYPE_NAMES))
    event_name = spec.get("event", "")
    if not isinstance(event_name, str):
        r.problem(key + ".event", event_name, "must be a string: the event name to match (absent matches any)")
        event_name = ""
    props = _properties(r, key, spec.get("properties", {}))
    filters = _filters(r, key, spec.get("filters", []), props)
    identifier, ident_prop = _identifier(r, key, spec.get("identifier", "user_id"), props)
    if len(r.problems) > before or etype is None:
        return None
    return EventModel(name=name, type=etype, event_name=event_name, filters=filters,
                      properties=tuple(props.items()), identifier=identifier, identifier_property=ident_prop)


def _properties(r: Reader, key: str, raw: Any) -> dict[str, ValueType]:
    props: dict[str, ValueType] = {}
    if not isinstance(raw, dict):
        r.problem(key + ".properties", raw, 'must be a table of name = "type"')
        return props
    for pname, ptype in raw.items():
        pkey = f"{key}.properties.{pname}"
        if not pname:
            r.problem(pkey, MISSING, "a property name must not be empty")
            continue
        try:
            props[pname] = ValueType.parse(ptype)
        except (KeyError, AttributeError):
            r.problem(pkey, ptype, "must be one of " + ", ".join(TYPE_NAMES))
    return props


def _identifier(r: Reader, key: str, raw: Any, props: dict[str, ValueType]) -> tuple[Identifier, str]:
    """identifier = "user_id", "anonymous_id" or "property:NAME": what maps an event to a person."""
    if isinstance(raw, str) and raw.startswith("property:"):
        prop = raw[len("property:"):]
        if props.get(prop) not in (ValueType.STRING, ValueType.INT):
            r.problem(key + ".identifier", raw,
                      f"the property {prop!r} must be declared under [{key}.properties] "
                      "as string or int: it carries the person's user id")
        return Identifier.PROPERTY, prop
    if raw in ("user_id", "anonymous_id"):
        return Identifier(raw), ""
    r.problem(key + ".identifier", raw, 'must be "user_id", "anonymous_id" or "property:NAME"')
    return Identifier.USER_ID, ""


def _check_overlaps(r: Reader, models: list[EventModel]) -> None:
    # One event may match several models, and its properties are stored once:
    # a property two overlapping models declare must have one type (int and
    # float mix, as numbers compare numerically).
    for j, b in enumerate(models):
        for a in models[:j]:
            if a.type != b.type or (a.event_name and b.event_name and a.event_name != b.event_name):
                continue
            at = a.property_types()
            for pname, btype in b.properties:
                atype = at.get(pname)
                if atype is not None and atype != btype and not (atype in _NUMERIC and btype in _NUMERIC):
                    r.problem(f"event_models.{b.name}.properties.{pname}", btype.name.lower(),
                              f"event model {a.name!r} matches the same events and declares {pname!r} "
                              f"as {atype.name.lower()}")


# -- filters ------------------------------------------------------------------------

def _filters(r: Reader, key: str, raw: Any, props: dict[str, ValueType]) -> tuple[Predicate, ...]:
    if not isinstance(raw, list):
        r.problem(key + ".filters", raw, "must be a list of tables")
        return ()
    parsed = (_filter(r, f"{key}.filters[{i}]", f, props) for i, f in enumerate(raw))
    return tuple(p for p in parsed if p is not None)


def _filter(r: Reader, key: str, spec: Any, props: dict[str, ValueType]) -> Predicate | None:
    if not isinstance(spec, dict):
        r.problem(key, spec, 'must be a table such as { property = "path", operator = "eq", value = "/pricing" }')
        return None
    r.unknown_keys(spec, _FILTER_KEYS, key + ".")
    name = r.string(spec, "property", key + ".property")
    op_name = r.string(spec, "operator", key + ".operator")
    if name is None or op_name is None:
        return None
    vtype = props.get(name)
    if vtype is None:
        known = ", ".join(props) or "none"
        r.problem(key + ".property", name, f"is not a declared property of this model (declared: {known})")
        return None
    op = parse_operator(op_name, ignore_case=True)
    if op is None:
        r.problem(key + ".operator", op_name, "must be one of " + ", ".join(o.name.lower() for o in Op))
        return None
    wrong = misfit(op, vtype)
    if wrong is not None:
        r.problem(key + ".operator", op_name, f"{wrong.value}; {name!r} is {vtype.name.lower()}")
        return None
    values = _filter_values(r, key, spec, op, vtype)
    return None if values is None else Predicate(name, op, values)


def _filter_values(r: Reader, key: str, spec: dict, op: Op, vtype: ValueType) -> tuple | None:
    """The operator's values, from ``value`` or ``values`` as its arity says; a key it does not take is a problem."""
    takes, word = arity(op), op.name.lower()
    if takes is Arity.NONE:
        for k in ("value", "values"):
            if k in spec:
                r.problem(f"{key}.{k}", spec[k], f"{word} takes no value")
        return ()
    if takes is Arity.ONE:
        if "values" in spec:
            r.problem(key + ".values", spec["values"], f"{word} takes one value: use value = ...")
            return None
        if "value" not in spec:
            r.problem(key + ".value", MISSING, f"{word} needs a value")
            return None
        ok, v = _literal(r, key + ".value", spec["value"], vtype)
        return (v,) if ok else None
    if "value" in spec:
        r.problem(key + ".value", spec["value"], f"{word} takes a list: use values = [...]")
        return None
    raw = spec.get("values", MISSING)
    if raw is MISSING or not isinstance(raw, list) or not raw:
        r.problem(key + ".values", raw, f"{word} needs a non-empty list of values")
        return None
    if not takes.accepts(len(raw)):
        r.problem(key + ".values", raw, "between needs exactly two values: the lower and upper bounds")
        return None
    out = [_literal(r, f"{key}.values[{i}]", v, vtype) for i, v in enumerate(raw)]
    return tuple(v for _, v in out) if all(ok for ok, _ in out) else None


def _toml_type(value: Any, want: ValueType) -> ValueType | None:
    """The type a TOML value spells, as a literal kind: its own, or a timestamp for text in a timestamp's place."""
    if isinstance(value, bool):
        return ValueType.BOOL
    if isinstance(value, int):
        return ValueType.INT
    if isinstance(value, float):
        return ValueType.FLOAT
    if isinstance(value, date):  # TOML date-times and dates (a naive one is UTC, a date midnight UTC)
        return ValueType.TIMESTAMP
    if isinstance(value, str):
        return ValueType.TIMESTAMP if want is ValueType.TIMESTAMP else ValueType.STRING  # RFC 3339 text
    return None


def _literal(r: Reader, key: str, value: Any, vtype: ValueType) -> tuple[bool, Any]:
    """A filter value from TOML as the property's type: (ok, value)."""
    got = _toml_type(value, vtype)
    if got is not None and literal_fits(got, vtype):
        # Numbers of either kind compare numerically, as in audience conditions.
        if isinstance(value, float) and not math.isfinite(value):
            r.problem(key, value, "must be a finite number")
            return False, None
        try:
            return True, coerce_literal(value, got)
        except ValueError:
            pass
    r.problem(key, value, f"must be {_WANT[vtype]} (the property is {vtype.name.lower()})")
    return False, None
