"""Sequence and absence conditions in the domain: the JSON form, its violations, compiling and explaining.

Plain Python over the real parser, compiler and evaluators (no server): the
server-level behaviour is tests/test_sequence_server.py's.
"""

from __future__ import annotations

import pytest

from qualify.evaluator import make_evaluator
from qualify.evaluator.program import Kind, Scope, SequenceLeaf
from qualify.server.domain.audiences import check_windows
from qualify.server.domain.compile import audiences_by_model, compile_audiences, leaf_for
from qualify.server.domain.conditions import parse_condition
from qualify.server.domain.errors import InvalidAudience
from qualify.server.domain.explain import explain_tree
from qualify.server.domain.schema import ValueType
from qualify.server.domain.sequences import AbsenceCondition, SequenceCondition
from qualify.server.domain.static import without_events

S = 1_000_000
MIN = 60 * S
T0 = 1_750_000_000 * S
ATTRS = {"plan": ValueType.STRING}
MODELS = {
    "page_views": {"path": ValueType.STRING},
    "trial_starts": {"plan": ValueType.STRING},
    "product_views": {"product_id": ValueType.STRING, "price": ValueType.FLOAT},
    "cart_adds": {"product_id": ValueType.STRING, "price": ValueType.FLOAT, "qty": ValueType.INT},
    "orders": {"total": ValueType.FLOAT, "product_id": ValueType.INT},
    "checkouts": {"product_id": ValueType.STRING},
}
INDEX = {name: i for i, name in enumerate(MODELS)}

# The README's three audiences.
ABANDONERS = {"absence": {"after": {"event_model": "cart_adds"}, "absent": {"event_model": "orders"},
                          "within": "1800s", "scope": "SCOPE_WITHIN", "window": "86400s"}}
PRICING_THEN_TRIAL = {"sequence": {"steps": [
    {"event_model": "page_views", "filters": [{"property": "path", "operator": "OPERATOR_EQ",
                                               "value": {"string_value": "/pricing"}}]},
    {"event_model": "trial_starts"}], "within": "600s", "scope": "SCOPE_EVER"}}
VIEWED_THEN_ADDED = {"sequence": {"steps": [{"event_model": "product_views"}, {"event_model": "cart_adds"}],
                                  "same": ["product_id"], "scope": "SCOPE_SESSION"}}


def parse(raw):
    return parse_condition(raw, ATTRS, MODELS)


def violations(raw) -> list[str]:
    with pytest.raises(InvalidAudience) as info:
        parse(raw)
    return [v.field for v in info.value.violations]


def test_the_readme_audiences_parse():
    a = parse(ABANDONERS)
    assert isinstance(a, AbsenceCondition)
    assert (a.after.event_model, a.absent.event_model, a.within_us, a.scope, a.window_us) == (
        "cart_adds", "orders", 1800 * S, Scope.WITHIN, 86400 * S)
    p = parse(PRICING_THEN_TRIAL)
    assert isinstance(p, SequenceCondition) and p.within_us == 600 * S and len(p.steps[0].filters) == 1
    v = parse(VIEWED_THEN_ADDED)
    assert v.same == ("product_id",) and v.within_us == 0 and v.scope == Scope.SESSION


def seq(steps, **kw):
    return {"sequence": {"steps": [{"event_model": m} for m in steps], "scope": "SCOPE_EVER", **kw}}


INVALID = {
    "one step": (seq(["page_views"]), ["condition.sequence.steps"]),
    "six steps": (seq(["page_views"] * 6), ["condition.sequence.steps"]),
    "unknown model": (seq(["page_views", "signups"]), ["condition.sequence.steps[1].event_model"]),
    "bad filter": ({"sequence": {"steps": [{"event_model": "page_views", "filters": [
        {"property": "referrer", "operator": "OPERATOR_EQ", "value": {"string_value": "x"}}]},
        {"event_model": "page_views"}], "scope": "SCOPE_EVER"}}, ["condition.sequence.steps[0].filters[0].property"]),
    "same not on every step": (seq(["product_views", "page_views"], same=["product_id"]), ["condition.sequence.same"]),
    "same of two types": (seq(["cart_adds", "orders"], same=["product_id"]), ["condition.sequence.same"]),
    "same twice": (seq(["cart_adds", "product_views"], same=["product_id", "product_id"]), ["condition.sequence.same"]),
    "same not a list": (seq(["cart_adds", "product_views"], same="product_id"), ["condition.sequence.same"]),
    "bad within": (seq(["page_views", "trial_starts"], within="ten minutes"), ["condition.sequence.within"]),
    "no scope": ({"sequence": {"steps": [{"event_model": "page_views"}, {"event_model": "orders"}]}},
                 ["condition.sequence.scope"]),
    "window missing": (seq(["page_views", "orders"], scope="SCOPE_WITHIN"), ["condition.sequence.window"]),
    "window on session": (seq(["page_views", "orders"], scope="SCOPE_SESSION", window="60s"),
                          ["condition.sequence.window"]),
    "absence without within": ({"absence": {"after": {"event_model": "cart_adds"}, "absent": {"event_model": "orders"},
                                            "scope": "SCOPE_EVER"}}, ["condition.absence.within"]),
    "absence without B": ({"absence": {"after": {"event_model": "cart_adds"}, "within": "60s", "scope": "SCOPE_EVER"}},
                          ["condition.absence.absent"]),
    "absence within the window": ({"absence": {"after": {"event_model": "cart_adds"}, "absent": {"event_model": "orders"},
                                               "within": "3600s", "scope": "SCOPE_WITHIN", "window": "3600s"}},
                                  ["condition.absence.within"]),
    "nested in and": ({"and": {"conditions": [{"attribute": {"attribute": "plan", "operator": "OPERATOR_IS_SET"}},
                                              seq(["page_views", "nope"])]}},
                      ["condition.and.conditions[1].sequence.steps[1].event_model"]),
}


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_sequences_name_the_field(name):
    raw, fields = INVALID[name]
    assert violations(raw) == fields


def test_windows_and_withins_must_fit_the_retention():
    check_windows(parse(ABANDONERS), 86400 * S)
    with pytest.raises(InvalidAudience):
        check_windows(parse(ABANDONERS), 3600 * S)
    with pytest.raises(InvalidAudience):
        check_windows(parse(seq(["page_views", "orders"], within="7200s")), 3600 * S)


def test_compile_shares_leaves_and_routes_every_step_model():
    conds = [("a", parse(ABANDONERS)), ("b", parse({"and": {"conditions": [
        ABANDONERS, {"attribute": {"attribute": "plan", "operator": "OPERATOR_EQ", "value": {"string_value": "free"}}}]}})),
        ("c", parse(VIEWED_THEN_ADDED))]
    compiled = compile_audiences(conds, INDEX, 30 * MIN)
    leaves = compiled.program.leaves
    assert len(leaves) == 2 and all(isinstance(lf, SequenceLeaf) for lf in leaves)
    assert leaves[0].kind == Kind.ABSENCE and leaves[1].same == ("product_id",)
    assert compiled.models_used == {INDEX["cart_adds"], INDEX["orders"], INDEX["product_views"]}
    routes = audiences_by_model(compiled.program, INDEX.values())
    # an order re-evaluates the abandoners; a session condition makes every model's event count
    assert routes[INDEX["orders"]] == [0, 1, 2] and routes[INDEX["page_views"]] == [2]
    assert [list(a) for a in without_events(compiled.program, [[True]], 1)] == [[False], [False], [False]]
    assert leaf_for(conds[0][1], INDEX) == leaves[0]


def test_explain_shows_the_step_progress():
    cond = parse({"sequence": {"steps": [{"event_model": "product_views"}, {"event_model": "cart_adds"},
                                         {"event_model": "checkouts"}], "within": "600s", "same": ["product_id"],
                               "scope": "SCOPE_EVER"}})
    compiled = compile_audiences([("x", cond)], INDEX, 30 * MIN)
    for reference in (False, True):
        ev = make_evaluator(compiled.program, reference)
        s = ev.new_state()
        ev.observe(s, INDEX["product_views"], T0, {"product_id": "sku-9"})
        ev.observe(s, INDEX["cart_adds"], T0 + MIN, {"product_id": "sku-9"})
        node = explain_tree(cond, ev, s, lambda name: None, lambda c: 0, T0 + 2 * MIN)
        assert node["value"] is False and node["count"] == 2
        assert node["summary"] == ("step 2 of 3 done, from 2025-06-15T15:06:40Z; needs a checkouts with "
                                   "product_id = 'sku-9' before 2025-06-15T15:16:40Z"), node["summary"]


def test_explain_an_absence_waiting_and_holding():
    cond = parse(ABANDONERS)
    compiled = compile_audiences([("x", cond)], INDEX, 30 * MIN)
    ev = make_evaluator(compiled.program)
    s = ev.new_state()
    ev.observe(s, INDEX["cart_adds"], T0, {"product_id": "sku-1"})
    node = explain_tree(cond, ev, s, lambda name: None, lambda c: 0, T0 + MIN)
    assert node["changes_at"] == T0 + 30 * MIN
    assert node["summary"] == ("a cart_adds at 2025-06-15T15:06:40Z; qualifies at 2025-06-15T15:36:40Z unless "
                               "an orders arrives first")
    node = explain_tree(cond, ev, s, lambda name: None, lambda c: 0, T0 + 31 * MIN)
    assert node["value"] and node["summary"].startswith("holds: a cart_adds with no orders after it; exits at ")


@pytest.mark.parametrize("raw,field", [
    ({"event": {"event_model": "page_views", "scope": "SCOPE_EVER", "comparison": "COMPARISON_GE", "count": 3}},
     "condition.event.count"),
    ({"attribute": {"attribute": "plan", "operator": "OPERATOR_EQ", "value": {"string_value": "x"}, "op": 1}},
     "condition.attribute.op"),
    ({"event": {"event_model": "page_views", "scope": "SCOPE_EVER", "comparison": "COMPARISON_GE", "threshold": 1,
                "filters": [{"property": "path", "operator": "OPERATOR_EQ", "valu": {"string_value": "/"}}]}},
     "condition.event.filters[0].valu"),
    ({"absence": {**ABANDONERS["absence"], "after": {"event_model": "cart_adds", "filter": []}}},
     "condition.absence.after.filter"),
    ({"sequence": {**PRICING_THEN_TRIAL["sequence"], "within_s": 600}}, "condition.sequence.within_s"),
    ({"and": {"conditions": [ABANDONERS], "condition": ABANDONERS}}, "condition.and.condition"),
])
def test_an_unknown_field_is_a_violation_not_a_default(raw, field):
    with pytest.raises(InvalidAudience) as exc:
        parse(raw)
    assert [v.field for v in exc.value.violations] == [field]
    assert "unknown field" in exc.value.violations[0].description
