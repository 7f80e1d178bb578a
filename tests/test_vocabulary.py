"""The enums copied out of the protos agree with them, by name and number.

Domain and evaluator code is plain Python with no protobuf import, so every
proto enum they use is copied by hand: into program.py (the evaluator's IR),
into the domain, and from program.py into the compiled module's C enums. The
transport converts by number, so a copy that drifts would turn one operator,
scope or reason into another without any error. A new pair is one row of
PAIRS.
"""

from __future__ import annotations

import enum

import pytest

from qualify.evaluator import _evaluator, program
from qualify.server.domain import changes, conditions, errors, events, schema
from qualify.server.services import watch
from qualify.v1 import audience_pb2, condition_pb2, errors_pb2, event_pb2, ingest_pb2, membership_pb2, schema_pb2

# (proto enum, its Python copy, the prefix the proto's value names carry)
PAIRS = [
    (condition_pb2.Operator.DESCRIPTOR, program.Op, "OPERATOR_"),
    (condition_pb2.Scope.DESCRIPTOR, program.Scope, "SCOPE_"),
    (condition_pb2.Aggregation.DESCRIPTOR, program.Aggregation, "AGGREGATION_"),
    (condition_pb2.Comparison.DESCRIPTOR, program.Comparison, "COMPARISON_"),
    (ingest_pb2.RejectionReason.DESCRIPTOR, events.RejectionReason, "REJECTION_REASON_"),
    (event_pb2.EventType.DESCRIPTOR, events.EventType, "EVENT_TYPE_"),
    (schema_pb2.ValueType.DESCRIPTOR, schema.ValueType, "VALUE_TYPE_"),
    (membership_pb2.Direction.DESCRIPTOR, changes.Direction, "DIRECTION_"),
    (membership_pb2.ChangeCause.DESCRIPTOR, changes.Cause, "CHANGE_CAUSE_"),
    (audience_pb2.WatchStart.DESCRIPTOR, watch.Start, "WATCH_START_"),
]

# ErrorReason values no domain error carries, with the reason each is still declared.
UNRAISED_REASONS = {
    "RESOURCE_EXHAUSTED": "published for overload in general; the domain's overload errors name "
                          "their cause (RATE_LIMITED, TOO_MANY_STREAMS, WATCH_FELL_BEHIND)",
}


@pytest.mark.parametrize("descriptor,python,prefix", PAIRS, ids=[p[1].__name__ for p in PAIRS])
def test_python_enum_is_the_proto_enum(descriptor, python: type[enum.IntEnum], prefix):
    """Every non-zero proto value has a Python member of the same number, and nothing else does."""
    zero = descriptor.values_by_number[0].name
    assert zero == prefix + "UNSPECIFIED", f"{descriptor.full_name}: 0 is {zero}, not the unspecified value"
    proto = {v.name.removeprefix(prefix): v.number for v in descriptor.values if v.number != 0}
    assert all(v.name.startswith(prefix) for v in descriptor.values), descriptor.full_name
    assert {m.name: int(m) for m in python if int(m) != 0} == proto
    assert all(m.name == "UNSPECIFIED" for m in python if int(m) == 0), "a 0 member must be the unspecified value"


@pytest.mark.parametrize("name", sorted(_evaluator.ENUMS))
def test_compiled_enum_is_program_enum(name):
    """The compiled module's C enums (also checked when it is imported) by program.py's names."""
    assert _evaluator.ENUMS[name] == {m.name: int(m) for m in getattr(program, name)}


def _error_classes():
    seen, todo = set(), [errors.QualifyError]
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.add(cls)
            todo.extend(cls.__subclasses__())
    return seen


def test_error_reasons_are_the_proto_reasons():
    """Each domain error's reason is an ErrorReason name; each ErrorReason is raised or explained."""
    proto = {v.name for v in errors_pb2.ErrorReason.DESCRIPTOR.values if v.number != 0}
    reasons = {cls.reason for cls in _error_classes()}
    assert events.EventRejected in _error_classes()
    assert reasons <= proto, sorted(reasons - proto)
    assert proto - reasons == set(UNRAISED_REASONS), sorted(proto - reasons)


@pytest.mark.parametrize("kind,message", [
    ("and", condition_pb2.AndCondition), ("or", condition_pb2.OrCondition), ("not", condition_pb2.NotCondition),
    ("attribute", condition_pb2.AttributeCondition), ("property", condition_pb2.PropertyCondition),
    ("event", condition_pb2.EventCondition), ("step", condition_pb2.SequenceStep),
    ("sequence", condition_pb2.SequenceCondition), ("absence", condition_pb2.AbsenceCondition),
])
def test_the_condition_parser_knows_exactly_the_proto_fields(kind, message):
    assert set(conditions.FIELDS[kind]) == {f.name for f in message.DESCRIPTOR.fields}
