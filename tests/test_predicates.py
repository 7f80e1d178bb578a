"""The predicate kernels production uses, held to the reference's semantics.

Event-model filters, explanations and warehouse string columns go through the
compiled ``PredicateMatcher``/``FilterSet``; numeric warehouse columns through
static.py's vectorised code. Each is run here against
``reference.matches_predicate`` (and ``reference.compare``) on random
operators and values of every kind: strings that contain and prefix each
other, ints beyond a double and beyond int64, floats with NaN, ±inf and -0.0,
booleans (which equal only booleans), and missing values.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qualify.evaluator import FilterSet, PredicateMatcher, compare_value, match_predicate
from qualify.evaluator.program import Comparison, Op
from qualify.evaluator.reference import compare, matches_predicate
from qualify.server.domain.schema import ValueType
from qualify.server.domain.static import Column, predicate_array

strings = st.text(alphabet="ab", max_size=3)
ints = st.one_of(st.integers(-3, 3), st.sampled_from([2**53, 2**53 + 1, 2**63 - 1, -(2**63), 2**64, 10**400]))
floats = st.one_of(st.sampled_from([0.0, -0.0, 0.5, 1.0, 2.0, 2.0**53, math.nan, math.inf, -math.inf, 1e308]),
                   st.floats(-4, 4))
bools = st.booleans()
values = st.one_of(strings, ints, floats, bools)


@st.composite
def predicates(draw, literal=values):
    """(op, values) with the number of values the operator needs, sometimes more."""
    op = draw(st.sampled_from(list(Op)))
    need = {Op.BETWEEN: 2, Op.IN: 0, Op.NOT_IN: 0, Op.IS_SET: 0, Op.IS_NOT_SET: 0}.get(op, 1)
    return op, tuple(draw(st.lists(literal, min_size=need, max_size=need + 3)))


@settings(max_examples=3000, deadline=None)
@given(predicates(), st.one_of(st.none(), values))
def test_matcher_is_the_reference(pred, value):
    op, vals = pred
    want = matches_predicate(op, vals, value)
    m = PredicateMatcher(op, vals, "p")
    assert m.matches(value) is want
    assert match_predicate(op, vals, value) is want
    assert m.table([value, value]) == bytes([want, want])


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("pqr"), predicates()), max_size=4),
       st.dictionaries(st.sampled_from("pqrs"), st.one_of(st.none(), values), max_size=4))
def test_filter_set_is_the_conjunction(filters, props):
    """A property absent from the event, or null in it, is missing."""
    fs = FilterSet((name, op, vals) for name, (op, vals) in filters)
    want = all(matches_predicate(op, vals, props.get(name)) for name, (op, vals) in filters)
    assert fs.matches(props) is want
    assert len(fs) == len(filters)


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(list(Comparison)), st.one_of(st.none(), st.floats(), st.integers(-3, 3)),
       st.one_of(st.floats(), st.integers(-3, 3)))
def test_compare_value_is_the_reference(comparison, value, threshold):
    threshold = float(threshold)
    assert compare_value(comparison, value, threshold) is compare(comparison, value, threshold)


def test_kernels_refuse_what_they_cannot_decide():
    with pytest.raises(ValueError):
        PredicateMatcher(Op.EQ, ())
    with pytest.raises(ValueError):
        PredicateMatcher(Op.BETWEEN, (1,))
    with pytest.raises(ValueError):
        PredicateMatcher(99, (1,))
    with pytest.raises(ValueError):
        compare_value(0, 1.0, 1.0)
    assert FilterSet(()).matches({}) is True


# ---------------------------------------------------------------- warehouse columns

_COLUMN_VALUES = {
    ValueType.STRING: strings,
    ValueType.INT: st.integers(-3, 3),
    ValueType.TIMESTAMP: st.integers(-3, 3),
    ValueType.FLOAT: st.one_of(st.sampled_from([0.0, -0.0, 0.5, math.nan, math.inf, -math.inf]), st.floats(-4, 4)),
    ValueType.BOOL: bools,
}
# Literals a warehouse predicate can hold, kept to where a double represents every int
# exactly: the columns are int64/float64 arrays, and a literal past 2**53 against them is
# a question about numpy's casting this test does not pose.
_LITERALS = st.one_of(strings, st.integers(-3, 3), st.sampled_from([0.0, -0.0, 0.5, 1.0, 2.5, math.nan, math.inf]),
                      bools)


def _column(vtype: ValueType, cells: list) -> Column:
    valid = np.array([c is not None for c in cells], np.uint8)
    if vtype is ValueType.STRING:
        words = tuple(sorted({c for c in cells if c is not None}))
        codes = np.array([words.index(c) if c is not None else 0 for c in cells], np.int64)
        return Column(vtype, codes, valid, words)
    dtype = {ValueType.FLOAT: np.float64, ValueType.BOOL: np.uint8}.get(vtype, np.int64)
    return Column(vtype, np.array([0 if c is None else c for c in cells], dtype), valid)


@st.composite
def columns(draw):
    vtype = draw(st.sampled_from(list(_COLUMN_VALUES)))
    return vtype, draw(st.lists(st.one_of(st.none(), _COLUMN_VALUES[vtype]), max_size=6))


@settings(max_examples=1500, deadline=None)
@given(columns(), predicates(_LITERALS), st.integers(0, 3))
def test_warehouse_column_is_the_reference(column, pred, extra):
    """Over person ids past the column's end too: those people are missing."""
    vtype, cells = column
    op, vals = pred
    col = _column(vtype, cells)
    size = len(cells) + extra
    got = predicate_array(col, op, vals, size)
    want = [matches_predicate(op, vals, col.value(i)) for i in range(size)]
    assert got.tolist() == want
