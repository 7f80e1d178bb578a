"""Audience condition trees: the domain model, its validation and its semantics.

A definition arrives as the protobuf JSON mapping of ``qualify.v1.Condition``
with proto field names (``{"and": {"conditions": [...]}}``, ``{"event":
{"event_model": "pricing_views", "scope": "SCOPE_WITHIN", "window": "600s",
"comparison": "COMPARISON_GE", "threshold": 3}}``); the transport produces it
from the message and the project file holds the same shape. ``parse_condition``
turns it into frozen dataclasses, reporting every problem with its field path.

Semantics are those of ``qualify.evaluator.reference``, the executable
specification; in short:

- Values: strings, integers, floats, booleans, and timestamps as integer
  microseconds since the epoch. ``None`` is a missing value.
- Predicates (attributes and event properties): a missing value satisfies
  only IS_NOT_SET, NE and NOT_IN. Otherwise EQ NE LT LE GT GE compare, IN and
  NOT_IN test membership, BETWEEN is inclusive at both ends, CONTAINS and
  STARTS_WITH are substring tests on strings, IS_SET holds.
- Event conditions count a person's events of one event model that pass the
  filters, in a scope: WITHIN a window (events whose timestamp ``ts`` satisfies
  ``now - window < ts``; an event leaves the window at ``ts + window``), the
  current SESSION, or EVER. COUNT is never missing; SUM MIN MAX AVG over a
  property are missing when no event in scope has the property, and a missing
  aggregate satisfies only NE. The result is compared with the threshold.
- Sequence and absence conditions (``sequences.py``): events of several
  models in order ("did A, then B within T"), or an event not followed by
  another ("did A, then no B within T").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Union

from qualify.evaluator.program import Aggregation, Comparison, Op, Scope

from .errors import FieldViolation, InvalidAudience
from .operators import NUMERIC, Arity, Misfit, Value, arity, coerce_literal, literal_fits, misfit, parse_operator
from .schema import ValueType
from .sequences import AbsenceCondition, SequenceCondition, parse_absence, parse_sequence



@dataclass(frozen=True)
class Predicate:
    """``field op values`` on an attribute or an event property."""

    field: str
    op: Op
    values: tuple[Value, ...] = ()


@dataclass(frozen=True)
class AttributeCondition:
    predicate: Predicate


@dataclass(frozen=True)
class EventCondition:
    event_model: str
    filters: tuple[Predicate, ...]
    scope: Scope
    window_us: int  # WITHIN only; 0 otherwise
    aggregation: Aggregation
    property: str  # SUM MIN MAX AVG only; "" for COUNT
    comparison: Comparison
    threshold: float


@dataclass(frozen=True)
class And:
    children: tuple["Condition", ...]


@dataclass(frozen=True)
class Or:
    children: tuple["Condition", ...]


@dataclass(frozen=True)
class Not:
    child: "Condition"


Condition = Union[And, Or, Not, AttributeCondition, EventCondition, SequenceCondition, AbsenceCondition]
REALTIME = (EventCondition, SequenceCondition, AbsenceCondition)  # the leaves read realtime state


# -- shape ---------------------------------------------------------------------

def walk(condition: Condition):
    """Every node, parents first."""
    yield condition
    if isinstance(condition, (And, Or)):
        for c in condition.children:
            yield from walk(c)
    elif isinstance(condition, Not):
        yield from walk(condition.child)


def event_conditions(condition: Condition) -> list[EventCondition]:
    return [n for n in walk(condition) if isinstance(n, EventCondition)]


def is_static(condition: Condition) -> bool:
    """True when the subtree reads warehouse attributes only."""
    return not any(isinstance(n, REALTIME) for n in walk(condition))


# -- parsing and validation -------------------------------------------------------

MAX_DEPTH = 32
MAX_NODES = 1000
_DURATION = re.compile(r"^(\d+)(?:\.(\d{1,9}))?s$")
_TYPE_OF = {
    "string_value": ValueType.STRING,
    "int_value": ValueType.INT,
    "float_value": ValueType.FLOAT,
    "bool_value": ValueType.BOOL,
    "timestamp_value": ValueType.TIMESTAMP,
}
# The fields of each object of the JSON form (qualify.v1.Condition's, by proto field name;
# tests/test_vocabulary.py holds them to the proto). A key outside them is a mistake to report,
# not to ignore: {"count": 3} for "threshold" would otherwise mean a threshold of 0.
FIELDS = {
    "and": ("conditions",),
    "or": ("conditions",),
    "not": ("condition",),
    "attribute": ("attribute", "operator", "value", "values"),
    "property": ("property", "operator", "value", "values"),
    "event": ("event_model", "filters", "scope", "window", "aggregation", "property", "comparison", "threshold"),
    "step": ("event_model", "filters"),
    "sequence": ("steps", "within", "same", "scope", "window"),
    "absence": ("after", "absent", "within", "same", "scope", "window"),
}


class _Parser:
    def __init__(self, attributes: dict[str, ValueType], event_models: dict[str, dict[str, ValueType]]):
        self.attributes = attributes
        self.event_models = event_models
        self.violations: list[FieldViolation] = []
        self.nodes = 0

    def bad(self, path: str, message: str) -> None:
        self.violations.append(FieldViolation(path, message))

    def known(self, body: dict, path: str, kind: str) -> bool:
        """Whether ``body`` has only the fields of a ``kind`` object (each other one is reported)."""
        fields = FIELDS[kind]
        unknown = [k for k in body if k not in fields]
        for k in unknown:
            self.bad(f"{path}.{k}", f"unknown field {k!r} (known here: {', '.join(fields)})")
        return not unknown

    def condition(self, raw: Any, path: str, depth: int) -> Condition | None:
        self.nodes += 1
        if depth > MAX_DEPTH or self.nodes > MAX_NODES:
            if depth > MAX_DEPTH:
                self.bad(path, f"nesting deeper than {MAX_DEPTH} levels")
            return None
        if not isinstance(raw, dict) or len(raw) != 1:
            kinds = ", ".join(raw) if isinstance(raw, dict) else type(raw).__name__
            self.bad(path, "must set exactly one of and, or, not, attribute, event, sequence, absence "
                           f"(found: {kinds or 'none'})")
            return None
        (kind, body), = raw.items()
        sub = f"{path}.{kind}"
        if not isinstance(body, dict):
            self.bad(sub, "must be an object")
            return None
        if kind in FIELDS and kind != "attribute" and not self.known(body, sub, kind):  # (predicate checks attributes)
            return None
        if kind in ("and", "or"):
            children = body.get("conditions", [])
            if not isinstance(children, list) or not children:
                self.bad(f"{sub}.conditions", "must hold at least one condition")
                return None
            parsed = [self.condition(c, f"{sub}.conditions[{i}]", depth + 1) for i, c in enumerate(children)]
            if any(p is None for p in parsed):
                return None
            return (And if kind == "and" else Or)(tuple(parsed))
        if kind == "not":
            child = self.condition(body.get("condition"), f"{sub}.condition", depth + 1)
            return None if child is None else Not(child)
        if kind == "attribute":
            pred = self.predicate(body, sub, "attribute", self.attributes, "attribute")
            return None if pred is None else AttributeCondition(pred)
        if kind == "event":
            return self.event(body, sub)
        if kind == "sequence":
            return parse_sequence(self, body, sub)
        if kind == "absence":
            return parse_absence(self, body, sub)
        self.bad(path, f"unknown condition kind {kind!r}; use and, or, not, attribute, event, sequence or absence")
        return None

    def literal(self, raw: Any, path: str, want: ValueType) -> Value:
        if not isinstance(raw, dict) or len(raw) != 1:
            self.bad(path, "must set exactly one of string_value, int_value, float_value, bool_value, timestamp_value")
            return None
        (kind, v), = raw.items()
        got = _TYPE_OF.get(kind)
        if got is None:
            self.bad(path, f"unknown literal kind {kind!r}")
            return None
        if not literal_fits(got, want):
            self.bad(f"{path}.{kind}", f"a {want.name.lower()} field needs a {want.name.lower()}_value, not {kind}")
            return None
        try:
            return coerce_literal(v, got)
        except (TypeError, ValueError):
            self.bad(f"{path}.{kind}", f"{v!r} is not a valid {kind}")
            return None

    def predicate(self, body: dict, path: str, name_key: str, fields: dict[str, ValueType], what: str) -> Predicate | None:
        if not isinstance(body, dict):
            self.bad(path, "must be an object")
            return None
        if not self.known(body, path, name_key):
            return None
        name = body.get(name_key, "")
        if not name:
            self.bad(f"{path}.{name_key}", f"must name a {what}")
            return None
        ftype = fields.get(name)
        if ftype is None:
            known = ", ".join(sorted(fields)) or "none"
            self.bad(f"{path}.{name_key}", f"{name!r} is not a known {what} (known: {known})")
            return None
        op = parse_operator(str(body.get("operator", "OPERATOR_UNSPECIFIED")))
        if op is None:
            self.bad(f"{path}.operator", f"must be one of {', '.join('OPERATOR_' + o.name for o in Op)}")
            return None
        lits = self.values(body, path, op, ftype)
        if lits is None or any(v is None for v in lits):
            return None
        wrong = misfit(op, ftype)
        if wrong is not None:
            why = f"; {name!r} is {ftype.name.lower()}" if wrong is Misfit.STRINGS_ONLY else ""
            self.bad(f"{path}.operator", f"OPERATOR_{op.name} {wrong.value}{why}")
            return None
        return Predicate(name, op, lits)

    def values(self, body: dict, path: str, op: Op, ftype: ValueType) -> tuple | None:
        """The operator's literals; a key the operator does not take is ignored, as proto3 would."""
        takes = arity(op)
        if takes is Arity.NONE:
            return ()
        if takes is Arity.ONE:
            value = body.get("value")
            if value is None:
                self.bad(f"{path}.value", f"OPERATOR_{op.name} needs a value")
                return None
            return (self.literal(value, f"{path}.value", ftype),)
        values = body.get("values", [])
        if not takes.accepts(len(values) if values else 0):
            self.bad(f"{path}.values", f"OPERATOR_{op.name} needs at least one value" if takes is Arity.SOME
                     else "OPERATOR_BETWEEN needs exactly two values: the lower and upper bounds")
            return None
        return tuple(self.literal(v, f"{path}.values[{i}]", ftype) for i, v in enumerate(values))

    def model_filters(self, body: dict, path: str) -> tuple[str, tuple[Predicate, ...]] | None:
        """The ``event_model`` an event condition or a sequence step names, and its property filters."""
        model = body.get("event_model", "")
        props = self.event_models.get(model)
        if props is None:
            known = ", ".join(sorted(self.event_models)) or "none"
            self.bad(f"{path}.event_model", f"{model!r} is not a realtime event model (known: {known})")
            return None
        filters = []
        for i, f in enumerate(body.get("filters", [])):
            p = self.predicate(f, f"{path}.filters[{i}]", "property", props, "property")
            if p is None:
                return None
            filters.append(p)
        return model, tuple(filters)

    def event(self, body: dict, path: str) -> EventCondition | None:
        parsed = self.model_filters(body, path)
        if parsed is None:
            return None
        model, filters = parsed
        props = self.event_models[model]
        scope_name = str(body.get("scope", "SCOPE_UNSPECIFIED")).removeprefix("SCOPE_")
        if scope_name not in Scope.__members__:
            self.bad(f"{path}.scope", "must be SCOPE_WITHIN, SCOPE_SESSION or SCOPE_EVER")
            return None
        scope = Scope[scope_name]
        window_us = 0
        if scope is Scope.WITHIN:
            window_us = self.duration(body.get("window"), f"{path}.window")
            if window_us is None:
                return None
        elif body.get("window") not in (None, "0s"):
            self.bad(f"{path}.window", f"only SCOPE_WITHIN takes a window, not SCOPE_{scope.name}")
            return None
        agg_name = str(body.get("aggregation", "AGGREGATION_COUNT")).removeprefix("AGGREGATION_")
        if agg_name == "UNSPECIFIED":
            agg_name = "COUNT"
        if agg_name not in Aggregation.__members__:
            self.bad(f"{path}.aggregation", "must be one of AGGREGATION_COUNT, _SUM, _MIN, _MAX, _AVG")
            return None
        agg = Aggregation[agg_name]
        prop = body.get("property", "")
        if agg is Aggregation.COUNT:
            if prop:
                self.bad(f"{path}.property", "AGGREGATION_COUNT takes no property")
                return None
        elif props.get(prop) not in NUMERIC:
            numeric = ", ".join(sorted(k for k, t in props.items() if t in NUMERIC)) or "none"
            self.bad(f"{path}.property", f"AGGREGATION_{agg.name} needs a numeric property of {model!r} (numeric: {numeric})")
            return None
        cmp_name = str(body.get("comparison", "COMPARISON_UNSPECIFIED")).removeprefix("COMPARISON_")
        if cmp_name not in Comparison.__members__:
            self.bad(f"{path}.comparison", "must be one of COMPARISON_EQ, _NE, _LT, _LE, _GT, _GE")
            return None
        try:
            threshold = float(body.get("threshold", 0.0))
            if not math.isfinite(threshold):
                raise ValueError
        except (TypeError, ValueError):
            self.bad(f"{path}.threshold", "must be a finite number")
            return None
        if agg is Aggregation.COUNT and (threshold < 0 or threshold != int(threshold) or threshold > 1_000_000):
            self.bad(f"{path}.threshold", "a count threshold must be a whole number from 0 to 1000000")
            return None
        return EventCondition(model, filters, scope, window_us, agg, prop, Comparison[cmp_name], threshold)

    def duration(self, raw: Any, path: str, what: str = "window") -> int | None:
        m = _DURATION.match(raw) if isinstance(raw, str) else None
        if not m:
            self.bad(path, 'SCOPE_WITHIN needs a window such as "600s" (JSON Duration)' if what == "window"
                     else f'{what} must be a JSON Duration such as "600s"')
            return None
        us = int(m.group(1)) * 1_000_000 + int((m.group(2) or "0").ljust(9, "0")[:6])
        if not 0 < us <= 366 * 86400 * 1_000_000:
            self.bad(path, f"the {what} must be longer than 0 and at most 366 days")
            return None
        return us


def parse_condition(raw: Any, attributes: dict[str, ValueType], event_models: dict[str, dict[str, ValueType]],
                    path: str = "condition") -> Condition:
    """Validates a condition in its JSON form; raises InvalidAudience listing each bad field."""
    parser = _Parser(attributes, event_models)
    parsed = parser.condition(raw, path, 0)
    if parser.nodes > MAX_NODES:
        parser.bad(path, f"more than {MAX_NODES} condition nodes")
    if parser.violations or parsed is None:
        first = parser.violations[0] if parser.violations else FieldViolation(path, "invalid")
        raise InvalidAudience(f"invalid condition: {first.field}: {first.description}", violations=parser.violations)
    return parsed
