"""The evaluator: every test runs against the compiled evaluator and the reference.

The reference (``qualify.evaluator.reference``) is the executable
specification; the compiled one keeps bounded state and must agree with it on
every audience value, every leaf's ``holds`` and ``flips_at`` and every
``next_change``. Unit tests pin the semantics with hand-computed values
(boundary instants included); differential property tests hold the two
evaluators to each other on random programs and event streams.
"""

from __future__ import annotations

import dataclasses
import gc
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qualify.evaluator import CompiledEvaluator, make_evaluator
from qualify.evaluator._evaluator import _fsum
from qualify.evaluator.program import Aggregation, Code, Comparison, EventLeaf, Filter, Op, Program, Scope, SequenceLeaf
from qualify.evaluator.reference import ReferenceEvaluator, exact_sum, matches_predicate, run

S = 1_000_000  # one second in microseconds
TIMEOUT = 30 * S

EVALUATORS = {"compiled": CompiledEvaluator, "reference": ReferenceEvaluator}


@pytest.fixture(params=sorted(EVALUATORS))
def make(request):
    """Builds an evaluator of the parametrized kind for a Program."""
    return EVALUATORS[request.param]


def leaf(model=0, filters=(), scope=Scope.EVER, window_us=0, aggregation=Aggregation.COUNT, property="",
         comparison=Comparison.GE, threshold=1.0) -> EventLeaf:
    return EventLeaf(model, tuple(filters), scope, window_us, aggregation, property, comparison, float(threshold))


def program(*leaves: EventLeaf, audiences=None, n_static=0, timeout=TIMEOUT) -> Program:
    """One audience per leaf (``EVENT j``) unless audiences are given."""
    if audiences is None:
        audiences = tuple(((Code.EVENT, j),) for j in range(len(leaves)))
    return Program(tuple(leaves), tuple(tuple(a) for a in audiences), n_static, timeout)


def within(window_s, **kw) -> EventLeaf:
    return leaf(scope=Scope.WITHIN, window_us=int(window_s * S), **kw)


def capped(ev, lf: EventLeaf, count: int) -> int:
    """What ``leaf().count`` reports: WITHIN COUNT is capped at keep by the compiled evaluator."""
    if isinstance(lf, SequenceLeaf):
        return count  # steps done: exact in both
    if isinstance(ev, CompiledEvaluator) and lf.scope == Scope.WITHIN and lf.aggregation == Aggregation.COUNT:
        if math.isnan(lf.threshold):  # every comparison with NaN is constant: nothing is kept
            return 0
        return min(count, max(lf.keep, 0))
    return count


# ---------------------------------------------------------------- WITHIN

def test_within_count_boundary_is_exclusive(make):
    ev = make(program(within(10)))
    s = ev.new_state()
    ev.observe(s, 0, 100 * S, {})
    assert ev.evaluate(s, 100 * S, []) == [True]
    assert ev.evaluate(s, 110 * S - 1, []) == [True]
    assert ev.next_change(s, 105 * S) == 110 * S
    v = ev.leaf(s, 0, 105 * S)
    assert (v.holds, v.count, v.aggregate, v.flips_at) == (True, 1, 1.0, 110 * S)
    # exactly at ts + window the event is out
    assert ev.evaluate(s, 110 * S, []) == [False]
    assert ev.next_change(s, 110 * S) is None
    assert ev.leaf(s, 0, 110 * S).count == 0


def test_within_future_timestamps_count_at_once(make):
    ev = make(program(within(10)))
    s = ev.new_state()
    ev.observe(s, 0, 200 * S, {})
    assert ev.evaluate(s, 100 * S, []) == [True]
    assert ev.next_change(s, 100 * S) == 210 * S


def test_within_at_least_n_out_of_order(make):
    lf = within(60, threshold=3)
    ev = make(program(lf))
    s = ev.new_state()
    for t in (50, 10, 30, 20, 40):  # arrival order is not timestamp order
        ev.observe(s, 0, t * S, {})
    # window at now=75: (15, 75] holds 20, 30, 40, 50
    v = ev.leaf(s, 0, 75 * S)
    assert v.holds
    assert v.count == capped(ev, lf, 4)
    # 20 leaves at 80, 30 at 90: then only 40, 50 remain
    assert v.flips_at == 90 * S
    assert ev.evaluate(s, 89 * S, []) == [True]
    assert ev.evaluate(s, 90 * S, []) == [False]
    # a late event with an old timestamp can still re-qualify
    ev.observe(s, 0, 45 * S, {})
    assert ev.evaluate(s, 90 * S, []) == [True]
    assert ev.next_change(s, 90 * S) == 100 * S


def test_within_did_not_and_at_most(make):
    never = within(10, comparison=Comparison.EQ, threshold=0)
    at_most_2 = within(10, comparison=Comparison.LE, threshold=2)
    ev = make(program(never, at_most_2))
    s = ev.new_state()
    assert ev.evaluate(s, 0, []) == [True, True]
    assert ev.next_change(s, 0) is None
    for t in (1, 2, 3):
        ev.observe(s, 0, t * S, {})
    assert ev.evaluate(s, 5 * S, []) == [False, False]
    # 1 leaves at 11 (count 2: at most 2 holds again), 3 leaves at 13 (count 0)
    assert ev.leaf(s, 1, 5 * S).flips_at == 11 * S
    assert ev.leaf(s, 0, 5 * S).flips_at == 13 * S
    assert ev.next_change(s, 5 * S) == 11 * S
    assert ev.evaluate(s, 11 * S, []) == [False, True]
    assert ev.evaluate(s, 13 * S, []) == [True, True]


def test_within_equal_timestamps_leave_together(make):
    ev = make(program(within(10, comparison=Comparison.EQ, threshold=1)))
    s = ev.new_state()
    ev.observe(s, 0, 0, {})
    ev.observe(s, 0, 0, {})
    ev.observe(s, 0, 5 * S, {})
    # count 3 until 10 s, then 1 until 15 s, then 0
    assert ev.evaluate(s, 1 * S, []) == [False]
    assert ev.next_change(s, 1 * S) == 10 * S
    assert ev.evaluate(s, 10 * S, []) == [True]
    assert ev.next_change(s, 10 * S) == 15 * S


@pytest.mark.parametrize("comparison,threshold,counts", [
    (Comparison.EQ, 2, {0: False, 1: False, 2: True, 3: False}),
    (Comparison.NE, 2, {0: True, 1: True, 2: False, 3: True}),
    (Comparison.LT, 2, {0: True, 1: True, 2: False, 3: False}),
    (Comparison.LE, 2, {0: True, 1: True, 2: True, 3: False}),
    (Comparison.GT, 2, {0: False, 1: False, 2: False, 3: True}),
    (Comparison.GE, 2, {0: False, 1: False, 2: True, 3: True}),
    (Comparison.GE, 1.5, {0: False, 1: False, 2: True, 3: True}),
    (Comparison.LT, 0.5, {0: True, 1: False, 2: False, 3: False}),
    (Comparison.GT, -1, {0: True, 1: True, 2: True, 3: True}),
])
@pytest.mark.parametrize("scope", [Scope.WITHIN, Scope.SESSION, Scope.EVER])
def test_count_comparisons(make, scope, comparison, threshold, counts):
    lf = leaf(scope=scope, window_us=1000 * S, comparison=comparison, threshold=threshold)
    ev = make(program(lf))
    s = ev.new_state()
    for n in range(4):
        if n:
            ev.observe(s, 0, n * S, {})
        assert ev.evaluate(s, 10 * S, []) == [counts[n]], n
        assert ev.leaf(s, 0, 10 * S).count == capped(ev, lf, n)


def test_within_count_state_is_bounded():
    lf = within(3600, threshold=2)  # at least 2 in the hour: 3 timestamps decide it
    ev = CompiledEvaluator(program(lf))
    s = ev.new_state()
    for i in range(10_000):
        ev.observe(s, 0, (i * 7919 % 10_000) * 1000, {})  # shuffled
    assert s.stored(0) == 3
    v = ev.leaf(s, 0, 10 * S)
    assert v.holds and v.count == 3
    # the three largest are 9.997 s, 9.998 s, 9.999 s: it flips when the second largest leaves
    assert v.flips_at == 9_998_000 + 3600 * S


def test_within_aggregate_state_is_pruned():
    ev = CompiledEvaluator(program(within(10, aggregation=Aggregation.SUM, property="n", threshold=5)))
    s = ev.new_state()
    for i in range(1000):
        ev.observe(s, 0, i * S, {"n": 1})
        ev.evaluate(s, i * S, [])
    assert s.stored(0) <= 11
    assert ev.leaf(s, 0, 999 * S).aggregate == 10.0
    # an event already out of every window from the horizon on is not stored
    ev.observe(s, 0, 100 * S, {"n": 1})
    assert s.stored(0) <= 11


def test_compiled_state_is_one_small_block():
    prog = program(within(60, threshold=2), leaf(), leaf(scope=Scope.SESSION, aggregation=Aggregation.SUM, property="n"),
                   leaf(aggregation=Aggregation.MAX, property="n"))
    ev = CompiledEvaluator(prog)
    s = ev.new_state()
    assert s.nbytes() <= 40 + 16 + 96 + 40  # WITHIN, EVER COUNT, SESSION SUM, EVER MAX
    for i in range(1000):
        ev.observe(s, 0, i * S, {"n": i * 0.1})
    assert s.nbytes() <= 40 + 16 + 96 + 40 + 4 * 8 + 8 * 8  # + 3 kept timestamps (capacity 4), + fsum partials
    with pytest.raises(ValueError):
        CompiledEvaluator(prog).evaluate(s, 0, [])  # a state belongs to the evaluator that made it
    # One per loaded person, and never in a reference cycle: the cyclic collector does not track them
    # (tracked, every full collection scanned them all: 110-180 ms with 100,000 people loaded).
    assert not gc.is_tracked(s) and not gc.is_tracked(ev.load(ev.dump(s)))


# ---------------------------------------------------------------- aggregates

@pytest.mark.parametrize("scope", [Scope.WITHIN, Scope.SESSION, Scope.EVER])
@pytest.mark.parametrize("aggregation,expected", [
    (Aggregation.SUM, 0.1 + 0.2 + 0.3 + 2 + 0.4),  # fsum: 3.0 exactly, not 3.0000000000000004
    (Aggregation.MIN, 0.1),
    (Aggregation.MAX, 2.0),
    (Aggregation.AVG, 3.0 / 5),
])
def test_aggregates(make, scope, aggregation, expected):
    expected = {Aggregation.SUM: 3.0}.get(aggregation, expected)
    lf = leaf(scope=scope, window_us=100 * S, aggregation=aggregation, property="n",
              comparison=Comparison.EQ, threshold=expected)
    ev = make(program(lf))
    s = ev.new_state()
    assert ev.leaf(s, 0, 0).aggregate is None
    for i, n in enumerate([0.1, 0.2, True, "7", 0.3, 2, None, 0.4]):
        ev.observe(s, 0, i * S, {} if n is None else {"n": n})
    v = ev.leaf(s, 0, 10 * S)
    assert v.aggregate == expected and v.holds
    assert v.count == 8  # every matching event counts; only numbers (not bools) aggregate


@pytest.mark.parametrize("comparison,holds", [
    (Comparison.EQ, False), (Comparison.NE, True), (Comparison.LT, False),
    (Comparison.LE, False), (Comparison.GT, False), (Comparison.GE, False),
])
@pytest.mark.parametrize("scope", [Scope.WITHIN, Scope.SESSION, Scope.EVER])
def test_missing_aggregate_satisfies_only_ne(make, scope, comparison, holds):
    ev = make(program(leaf(scope=scope, window_us=100 * S, aggregation=Aggregation.MAX, property="n",
                           comparison=comparison, threshold=0)))
    s = ev.new_state()
    ev.observe(s, 0, 0, {"n": "12"})
    ev.observe(s, 0, S, {"n": False})
    v = ev.leaf(s, 0, 2 * S)
    assert (v.holds, v.count, v.aggregate) == (holds, 2, None)


def test_within_sum_flips_when_values_leave(make):
    ev = make(program(within(10, aggregation=Aggregation.SUM, property="n", comparison=Comparison.GT, threshold=5)))
    s = ev.new_state()
    ev.observe(s, 0, 0, {"n": 4})
    ev.observe(s, 0, 2 * S, {"n": 3})
    ev.observe(s, 0, 4 * S, {"n": -3})
    # 4 + 3 - 3 = 4: no; at 10 s the 4 leaves: 0; at 12 s the 3 leaves: -3 -> never above 5
    assert ev.leaf(s, 0, 5 * S).holds is False
    assert ev.next_change(s, 5 * S) is None
    ev.observe(s, 0, 5 * S, {"n": 2})
    # 6 now; 4 leaves at 10 s -> 2
    assert ev.evaluate(s, 5 * S, []) == [True]
    assert ev.next_change(s, 5 * S) == 10 * S
    assert ev.evaluate(s, 10 * S, []) == [False]
    # later: 3 leaves at 12 (-1), -3 at 14 (2), 2 at 15 (missing): still never above 5
    assert ev.next_change(s, 10 * S) is None


def test_min_max_follow_python_with_nan(make):
    # Python's min/max keep a NaN that comes first in arrival order and skip later ones.
    nan = float("nan")
    for scope in (Scope.WITHIN, Scope.EVER):
        lmin = leaf(scope=scope, window_us=100 * S, aggregation=Aggregation.MIN, property="n",
                    comparison=Comparison.LT, threshold=5)
        ev = make(program(lmin))
        s = ev.new_state()
        ev.observe(s, 0, 2 * S, {"n": 3})
        ev.observe(s, 0, 1 * S, {"n": nan})
        assert ev.leaf(s, 0, 3 * S).aggregate == 3.0
        s = ev.new_state()
        ev.observe(s, 0, 2 * S, {"n": nan})
        ev.observe(s, 0, 1 * S, {"n": 3})
        v = ev.leaf(s, 0, 3 * S)
        assert math.isnan(v.aggregate) and not v.holds
        # the 3 (ts 1 s) leaves the window at 101 s; the NaN alone remains
        if scope == Scope.WITHIN:
            assert ev.leaf(s, 0, 101 * S).holds is False
            assert math.isnan(ev.leaf(s, 0, 101 * S).aggregate)


def test_large_ints_and_mixed_numbers(make):
    big = 2**53 + 1
    ev = make(program(
        leaf(aggregation=Aggregation.SUM, property="n", comparison=Comparison.EQ, threshold=float(2**53)),  # fsum rounds half-even
        leaf(aggregation=Aggregation.MAX, property="n", comparison=Comparison.EQ, threshold=float(2**53)),
    ))
    s = ev.new_state()
    ev.observe(s, 0, 0, {"n": big})
    ev.observe(s, 0, 1, {"n": 1.0})
    assert ev.evaluate(s, 2, []) == [True, True]


def same(a: float | None, b: float | None) -> bool:
    return a == b or (a is not None and b is not None and math.isnan(a) and math.isnan(b))


def test_exact_sum_on_hard_cases():
    inf = math.inf
    cases = [
        [1e16, 1.0, 1e-16],
        [1e-16, 1.0, 1e16],
        [0.1] * 10,
        [1e308, -1e308, 1e-308],
        [2.0**53, 1.0, -2.0**53],
        [1.0, 1e100, 1.0, -1e100],
        [-0.0, 0.0],
        [-0.0],
        [inf, 1.0],
        [math.nan, 1.0],
        [7, 2**60 + 1, -(2**60)],
        # where math.fsum raises, the left-to-right float sum
        [1e308, 1e308],
        [1e308, 1e308, -1e308, -1e308, -1e308],
        [inf, -inf],
        [inf, 1e308, 1e308, -inf],
        [10**400, 1.0],
        [10**400, -(10**400)],
        [-1e308, -1e308, 10**400],
    ]
    for values in cases:
        assert same(_fsum(values), exact_sum(values)), values


@settings(max_examples=400, derandomize=True, database=None, deadline=None)
@given(st.lists(st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e-300, max_value=1e-300),
    st.sampled_from([0.1, 0.2, 0.3, 1e16, -1e16, 1.0, 2.0**-52, 2.0**53, 1e308, -1e308, math.inf, -math.inf, math.nan]),
    st.integers(-(2**70), 2**70),
    st.sampled_from([10**400, -(10**400)]),
), max_size=25))
def test_exact_sum_property(values):
    assert same(_fsum(values), exact_sum(values))


# ---------------------------------------------------------------- sessions

def test_session_ends_timeout_after_latest_timestamp(make):
    ev = make(program(leaf(scope=Scope.SESSION)))
    s = ev.new_state()
    ev.observe(s, 0, 0, {})
    ev.observe(s, 0, 10 * S, {})
    assert ev.leaf(s, 0, 20 * S).flips_at == 40 * S
    assert ev.evaluate(s, 40 * S - 1, []) == [True]
    # exactly at the session end the session is over
    assert ev.evaluate(s, 40 * S, []) == [False]
    assert ev.next_change(s, 40 * S) is None


def test_session_rules_in_arrival_order(make):
    count = leaf(scope=Scope.SESSION, comparison=Comparison.EQ, threshold=2)
    ev = make(program(count, leaf(model=1, scope=Scope.SESSION)))
    s = ev.new_state()
    ev.observe(s, 0, 0, {})
    ev.observe(s, 0, 30 * S, {})  # exactly timeout after the latest: a new session
    assert ev.leaf(s, 0, 31 * S).count == 1
    ev.observe(s, 0, 5 * S, {})  # old timestamp, but it arrives within the session: joins it
    v = ev.leaf(s, 0, 31 * S)
    assert (v.holds, v.count, v.flips_at) == (True, 2, 60 * S)
    # an event of another model extends the session for every model
    ev.observe(s, 1, 50 * S, {})
    assert ev.leaf(s, 0, 31 * S).flips_at == 80 * S
    assert ev.next_change(s, 31 * S) == 80 * S


def test_session_ids(make):
    ev = make(program(leaf(scope=Scope.SESSION, comparison=Comparison.EQ, threshold=2)))
    s = ev.new_state()
    ev.observe(s, 0, 0, {}, "a")
    ev.observe(s, 0, 1 * S, {}, "")  # no id: joins the current session
    assert ev.evaluate(s, 2 * S, []) == [True]
    ev.observe(s, 0, 2 * S, {}, "a")
    assert ev.evaluate(s, 2 * S, []) == [False]  # three in session "a"
    ev.observe(s, 0, 3 * S, {}, "b")  # another id: a new session
    ev.observe(s, 0, 4 * S, {}, "b")
    assert ev.evaluate(s, 5 * S, []) == [True]
    ev.observe(s, 0, 5 * S, {}, "a")  # back to "a" is a new session too
    assert ev.leaf(s, 0, 5 * S).count == 1


def test_session_sum_resets_with_the_session(make):
    ev = make(program(leaf(scope=Scope.SESSION, aggregation=Aggregation.SUM, property="n",
                           comparison=Comparison.GE, threshold=10)))
    s = ev.new_state()
    ev.observe(s, 0, 0, {"n": 6})
    ev.observe(s, 0, S, {"n": 6})
    assert ev.evaluate(s, 2 * S, []) == [True]
    ev.observe(s, 0, 100 * S, {"n": 6})
    assert ev.evaluate(s, 100 * S, []) == [False]
    assert ev.leaf(s, 0, 100 * S).aggregate == 6.0


def test_session_other_model_starts_new_session(make):
    ev = make(program(leaf(scope=Scope.SESSION), leaf(model=1, scope=Scope.SESSION,
                                                        comparison=Comparison.EQ, threshold=0)))
    s = ev.new_state()
    ev.observe(s, 0, 0, {}, "a")
    assert ev.evaluate(s, 1, []) == [True, True]
    ev.observe(s, 1, 1, {"x": 1}, "b")  # model 1's event opens session "b": model 0 has none in it
    assert ev.evaluate(s, 2, []) == [False, False]
    # leaf 1 (count EQ 0) becomes true when session "b" ends
    assert ev.next_change(s, 2) == 1 + TIMEOUT


# ---------------------------------------------------------------- EVER and filters

def test_ever_never_flips(make):
    ev = make(program(leaf(threshold=2)))
    s = ev.new_state()
    ev.observe(s, 0, 0, {})
    ev.observe(s, 0, -10**12, {})
    assert ev.evaluate(s, 10**15, []) == [True]
    assert ev.next_change(s, 0) is None
    assert ev.leaf(s, 0, 0).count == 2


PREDICATES = [
    # op, values, [(property value, expected)]; MISSING stands for an absent property
    (Op.EQ, ("x",), [("x", True), ("y", False), (1, False)]),
    (Op.EQ, (1,), [(1, True), (1.0, True), (True, False), ("1", False), (2, False)]),
    (Op.EQ, (True,), [(True, True), (1, False), (1.0, False), (False, False)]),
    (Op.NE, (1,), [(1.0, False), (True, True), ("MISSING", True)]),
    (Op.LT, (2,), [(1, True), (1.5, True), (2, False), (2.0, False), ("1", False), (True, False), ("MISSING", False)]),
    (Op.LE, (2,), [(2.0, True), (3, False)]),
    (Op.GT, ("b",), [("c", True), ("ba", True), ("b", False), ("a", False), (5, False)]),
    (Op.GE, (1.5,), [(1.5, True), (2, True), (1, False), (False, False)]),
    (Op.IN, ("x", 1, True), [("x", True), (1.0, True), (True, True), (False, False), ("y", False), ("MISSING", False)]),
    (Op.IN, (1,), [(True, False), (1, True)]),
    (Op.IN, (), [("x", False)]),
    (Op.NOT_IN, ("x", 2), [("x", False), (2.0, False), ("y", True), ("MISSING", True)]),
    (Op.NOT_IN, (False,), [(0, True), (False, False)]),
    (Op.BETWEEN, (1, 3), [(1, True), (2.5, True), (3, True), (3.5, False), ("2", False), (True, False)]),
    (Op.BETWEEN, ("b", "d"), [("c", True), ("d", True), ("da", False), (2, False)]),
    (Op.CONTAINS, ("ell",), [("hello", True), ("help", False), (5, False), ("MISSING", False)]),
    (Op.STARTS_WITH, ("he",), [("hello", True), ("the", False), (True, False)]),
    (Op.IS_SET, (), [("x", True), (0, True), (False, True), ("MISSING", False)]),
    (Op.IS_NOT_SET, (), [("x", False), ("MISSING", True)]),
]


@pytest.mark.parametrize("op,values,cases", PREDICATES, ids=[f"{p[0].name}-{p[1]}" for p in PREDICATES])
def test_filter_operators(make, op, values, cases):
    ev = make(program(leaf(filters=[Filter("p", op, values)])))
    for value, expected in cases:
        s = ev.new_state()
        ev.observe(s, 0, 0, {} if value == "MISSING" and isinstance(value, str) else {"p": value, "q": 1})
        assert ev.evaluate(s, 1, []) == [expected], value


def test_every_operator_on_every_kind_of_value(make):
    """Each operator, with values of every kind, on properties of every kind (and missing)."""
    values = ["", "x", "xy", "1", 0, 1, 2, -1, 0.0, 1.0, 1.5, -0.0, math.nan, True, False]
    filters = [Filter("p", op, ()) for op in (Op.IS_SET, Op.IS_NOT_SET, Op.IN, Op.NOT_IN)]
    filters += [Filter("p", op, (a,)) for a in values
                for op in (Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT, Op.GE, Op.IN, Op.NOT_IN, Op.CONTAINS, Op.STARTS_WITH)]
    filters += [Filter("p", op, (a, b)) for a in values for b in values for op in (Op.BETWEEN, Op.IN, Op.NOT_IN)]
    ev = make(program(*(leaf(filters=[f]) for f in filters)))
    for v in values + [None]:
        s = ev.new_state()
        ev.observe(s, 0, 0, {} if v is None else {"p": v})
        got = ev.evaluate(s, 1, [])
        want = [matches_predicate(f.op, f.values, v) for f in filters]
        assert got == want, [(f, v, g) for f, g, w in zip(filters, got, want) if g != w][:5]


def test_filters_are_conjunctive_and_per_model(make):
    ev = make(program(leaf(model=0, filters=[Filter("a", Op.EQ, ("x",)), Filter("b", Op.GT, (2,))]),
                      leaf(model=1)))
    s = ev.new_state()
    ev.observe(s, 0, 0, {"a": "x", "b": 2})
    ev.observe(s, 2, 0, {"a": "x", "b": 3})  # a model no leaf uses
    assert ev.evaluate(s, 1, []) == [False, False]
    ev.observe(s, 0, 0, {"a": "x", "b": 3})
    assert ev.evaluate(s, 1, []) == [True, False]


# ---------------------------------------------------------------- programs

def test_program_codes(make):
    e0, e1 = leaf(threshold=1), leaf(model=1, threshold=1)
    audiences = [
        [(Code.STATIC, 0)],
        [(Code.STATIC, 0), (Code.EVENT, 0), (Code.AND, 2)],
        [(Code.STATIC, 1), (Code.EVENT, 0), (Code.EVENT, 1), (Code.OR, 3)],
        [(Code.EVENT, 1), (Code.NOT, 0)],
        [(Code.STATIC, 0), (Code.NOT, 0), (Code.EVENT, 0), (Code.NOT, 0), (Code.AND, 2), (Code.NOT, 0)],
        [(Code.EVENT, 0), (Code.AND, 1)],
    ]
    ev = make(program(e0, e1, audiences=audiences, n_static=2))
    s = ev.new_state()
    ev.observe(s, 0, 0, {})
    assert ev.evaluate(s, 1, [True, False]) == [True, True, True, True, True, True]
    assert ev.evaluate(s, 1, [False, False]) == [False, False, True, True, True, True]
    assert ev.evaluate(s, 1, (0, 1)) == [False, False, True, True, True, True]
    if isinstance(ev, CompiledEvaluator):
        for static in (bytes([0, 1]), bytearray([0, 1]), np.array([False, True]), np.array([0, 1], dtype=np.uint8),
                       memoryview(bytes([0, 1])), np.array([0, 1], dtype=np.int64)):
            assert ev.evaluate(s, 1, static) == [False, False, True, True, True, True]
            assert ev.evaluate_bytes(s, 1, static) == bytes([0, 0, 1, 1, 1, 1])
    s2 = ev.new_state()
    assert ev.evaluate(s2, 1, [True, True]) == [True, False, True, True, True, False]


def test_program_slice_semantics(make):
    # reference.run pops ``stack[-arg:]``: AND 0 takes the whole stack (an empty AND is True).
    audiences = [
        [(Code.AND, 0)],
        [(Code.OR, 0)],
        [(Code.STATIC, 0), (Code.STATIC, 1), (Code.AND, 0)],
        [(Code.STATIC, 0), (Code.OR, 5)],
    ]
    ev = make(program(leaf(), audiences=audiences, n_static=2))
    assert ev.evaluate(ev.new_state(), 0, [True, False]) == [True, False, False, True]


def test_malformed_program_rejected_by_compiled():
    with pytest.raises(ValueError):
        CompiledEvaluator(program(leaf(), audiences=[[(Code.EVENT, 0), (Code.EVENT, 0)]]))
    with pytest.raises(ValueError):
        CompiledEvaluator(program(leaf(), audiences=[[(Code.NOT, 0)]]))
    with pytest.raises(ValueError):
        CompiledEvaluator(program(leaf(), audiences=[[(Code.EVENT, 3)]]))
    with pytest.raises(ValueError):
        CompiledEvaluator(program(leaf(), audiences=[[(9, 0)]]))
    with pytest.raises(ValueError):
        CompiledEvaluator(program(leaf(filters=[Filter("p", Op.EQ, ())])))


def test_make_evaluator(monkeypatch):
    p = program(leaf())
    monkeypatch.delenv("QUALIFY_EVALUATOR", raising=False)
    assert isinstance(make_evaluator(p), CompiledEvaluator)
    assert isinstance(make_evaluator(p, reference=True), ReferenceEvaluator)
    monkeypatch.setenv("QUALIFY_EVALUATOR", "reference")
    assert isinstance(make_evaluator(p), ReferenceEvaluator)


# ---------------------------------------------------------------- overflowing sums

@pytest.mark.parametrize("values", [[1e308, 1e308], [float("inf"), float("-inf")], [10**400],
                                    [1e308, 1e308, -1e308, -1e308, -1e308]])
def test_sum_never_raises(make, values):
    """A person's evaluation must not fail because a SUM overflows: both answer IEEE's inf / nan.

    math.fsum raises OverflowError on intermediate overflow (and for ints
    beyond a double) and ValueError on inf + -inf.
    """
    ev = make(program(leaf(aggregation=Aggregation.SUM, property="n", comparison=Comparison.GT, threshold=0)))
    s = ev.new_state()
    for i, v in enumerate(values):
        ev.observe(s, 0, i, {"n": v})
    result = ev.evaluate(s, 10, [])
    assert result == [not math.isnan(ev.leaf(s, 0, 10).aggregate)]


@pytest.mark.parametrize("scope", [Scope.WITHIN, Scope.SESSION, Scope.EVER])
def test_overflowing_sum_adds_in_arrival_order(make, scope):
    # math.fsum raises on the intermediate overflow, so the answer is the left-to-right sum in
    # arrival order: 1e308 + 1e308 = inf, inf - 1e308 = inf (in timestamp order it would be 1e308).
    ev = make(program(leaf(scope=scope, window_us=60 * S, aggregation=Aggregation.SUM, property="n",
                           comparison=Comparison.EQ, threshold=math.inf)))
    s = ev.new_state()
    for ts, n in [(3, 1e308), (1, 1e308), (2, -1e308)]:
        ev.observe(s, 0, ts * S, {"n": n})
    v = ev.leaf(s, 0, 4 * S)
    assert (v.holds, v.aggregate) == (True, math.inf)


@pytest.mark.parametrize("aggregation", [Aggregation.MIN, Aggregation.MAX])
def test_min_max_of_an_int_beyond_a_double(make, aggregation):
    """MIN/MAX of an int too large for a double is ±inf, as float() of it would be if it did not raise."""
    ev = make(program(leaf(aggregation=aggregation, property="n", comparison=Comparison.EQ, threshold=0)))
    s = ev.new_state()
    ev.observe(s, 0, 0, {"n": 10**400 if aggregation == Aggregation.MAX else -(10**400)})
    ev.observe(s, 0, 1, {"n": 0})
    assert ev.evaluate(s, 10, []) == [False]
    assert ev.leaf(s, 0, 10).aggregate == (math.inf if aggregation == Aggregation.MAX else -math.inf)


# ---------------------------------------------------------------- differential

# Strategies are built once, at import: building them per example dominates the run time.
PROPS = ["a", "b", "n"]
POOL = ["", "x", "y", "xy", "yx", 0, 1, 2, -1, 3, 0.0, 1.0, 1.5, -0.5, 2.5, 0.1, 0.2, 0.3, 1e16, True, False]
STRINGS = ["", "x", "y", "xy", "yx"]
value_st = st.sampled_from(POOL)
number_st = st.one_of(st.sampled_from([0, 1, 2, 3, -1, 0.1, 0.2, 0.3, 0.5, 2.5, 1e16, -1e16, 1e-3, 7, math.nan]),
                      st.floats(-100, 100, allow_nan=False), st.integers(-10, 10))
# Values that compare across kinds: booleans equal only booleans, 1 == 1.0, "1" is a string.
TRICKY = [True, False, 0, 1, 0.0, 1.0, -0.0, 2, "", "1", "x"]
# per property, the kinds of values events carry (filters draw from the same pools, so they match often)
PROP_VALUES = {"a": st.sampled_from(STRINGS), "b": st.sampled_from(TRICKY), "n": st.one_of(number_st, number_st, value_st)}


def _filters_on(prop: str):
    pool = PROP_VALUES[prop]
    return st.one_of(
        st.builds(Filter, st.just(prop), st.sampled_from([Op.IN, Op.NOT_IN]), st.lists(pool, max_size=3).map(tuple)),
        st.builds(Filter, st.just(prop), st.just(Op.BETWEEN), st.tuples(pool, pool).map(
            lambda ab: tuple(sorted(ab, key=lambda v: (isinstance(v, str), v))))),
        st.builds(Filter, st.just(prop), st.sampled_from([Op.IS_SET, Op.IS_NOT_SET]), st.just(())),
        st.builds(Filter, st.just(prop), st.sampled_from([Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT, Op.GE, Op.CONTAINS,
                                                          Op.STARTS_WITH]), st.tuples(pool)),
    )


filter_st = st.one_of(*(_filters_on(p) for p in PROPS))
_leaf_common = dict(
    model=st.integers(0, 2),
    filters=st.one_of(st.just(()), st.just(()), st.lists(filter_st, min_size=1, max_size=2).map(tuple)),
    scope=st.sampled_from(list(Scope)),
    window_us=st.tuples(st.one_of(st.integers(2, 30), st.integers(1, 100)), st.sampled_from([1, 1, 2])).map(
        lambda wd: wd[0] * S // wd[1]),
    property=st.sampled_from(["n", "n", "n", "b", ""]),
    comparison=st.sampled_from(list(Comparison)),
)
leaf_st = st.one_of(
    st.builds(EventLeaf, aggregation=st.just(Aggregation.COUNT),
              threshold=st.sampled_from([0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 4.0, 5.0, 0.5, 1.5, -1.0]), **_leaf_common),
    st.builds(EventLeaf, aggregation=st.sampled_from(list(Aggregation)),
              threshold=st.one_of(st.sampled_from([0, 1, 2, 3, 5, 0.6, 1.5, -0.5, 0.1, 1e16]), number_st).map(float),
              **_leaf_common),
)
# A condition tree; leaf indices are taken modulo the program's sizes.
tree_st = st.recursive(
    st.tuples(st.sampled_from([Code.EVENT, Code.EVENT, Code.STATIC]), st.integers(0, 5)),
    lambda kids: st.one_of(
        st.tuples(st.sampled_from([Code.AND, Code.OR]), st.lists(kids, min_size=1, max_size=3)),
        st.tuples(st.just(Code.NOT), kids)),
    max_leaves=6)


def postfix(tree, n_leaves: int, n_static: int) -> list[tuple[int, int]]:
    code, arg = tree
    if code == Code.STATIC and n_static:
        return [(Code.STATIC, arg % n_static)]
    if code in (Code.EVENT, Code.STATIC):
        return [(Code.EVENT, arg % n_leaves)]
    if code == Code.NOT:
        return postfix(arg, n_leaves, n_static) + [(Code.NOT, 0)]
    return [ins for kid in arg for ins in postfix(kid, n_leaves, n_static)] + [(code, len(arg))]


@st.composite
def program_st(draw):
    n_models = draw(st.integers(1, 3))
    leaves = tuple(dataclasses.replace(lf, model=lf.model % n_models)
                   for lf in draw(st.lists(leaf_st, min_size=1, max_size=6)))
    n_static = draw(st.integers(0, 3))
    audiences = tuple(tuple(postfix(t, len(leaves), n_static)) for t in draw(st.lists(tree_st, min_size=1, max_size=4)))
    # every leaf in one audience as well, so evaluate() reads them all
    audiences += (tuple((Code.EVENT, j) for j in range(len(leaves))) + ((Code.OR, len(leaves)),),)
    timeout = draw(st.integers(5, 60)) * S
    return Program(leaves, audiences, n_static, timeout), n_models


# One event: (model, ts offset from now, properties, session id); timestamps land around now,
# before and after it, sometimes on the same or the neighbouring microsecond.
event_st = st.tuples(
    st.integers(0, 2),
    st.tuples(st.one_of(st.integers(-20, 10), st.integers(-120, 40)), st.sampled_from([0, 0, 0, 1, -1])).map(
        lambda o: o[0] * S // 2 + o[1]),
    st.fixed_dictionaries({}, optional=PROP_VALUES),
    st.sampled_from(["", "", "", "s1", "s2", "s3"]),
)
# A checkpoint: how the clock moves (a small tick, a jump past windows and sessions, or exactly
# to the next change), and the static values.
check_st = st.tuples(
    st.one_of(st.integers(0, 6).map(lambda k: k * S // 2), st.integers(30, 300).map(lambda k: k * S),
              st.just(None), st.just(None)),
    st.lists(st.booleans(), min_size=3, max_size=3),
)
# Arrival order: bursts of events, each followed by a checkpoint.
stream_st = st.lists(st.tuples(st.lists(event_st, max_size=4), check_st), min_size=1, max_size=14)


def drive_agreeing(data, comp, ref, program, now: int, rounds: int, events, step, dumps: bool = False):
    """Rounds of drawn events, each followed by drawn queries (at the reference's next change or a step
    ``step`` later), where the compiled evaluator must agree with the reference (check_agree); with
    ``dumps``, a dump and load at random queries must give back the same bytes. ``events`` draws lists of
    (model, offset from now, properties, session). Returns (the compiled state, the last query's time)."""
    cs, rs = comp.new_state(), ref.new_state()
    for _ in range(data.draw(st.integers(1, rounds))):
        for model, offset, props, session in data.draw(events):
            comp.observe(cs, model, now + offset, props, session)
            ref.observe(rs, model, now + offset, props, session)
        for _ in range(data.draw(st.integers(1, 3))):
            nxt = ref.next_change(rs, now)
            now = nxt if (nxt is not None and data.draw(st.booleans())) else now + data.draw(step)
            check_agree(comp, ref, cs, rs, program, now, ())
            if dumps and data.draw(st.booleans()):
                raw = comp.dump(cs)
                cs = comp.load(raw)
                assert comp.dump(cs) == raw
    return cs, now


def check_agree(comp, ref, cs, rs, program, now, static):
    """Everything the compiled evaluator says at ``now`` is what the reference says.

    The reference's evaluate and next_change are, by definition, run() over its
    leaves' holds and the least of their flips_at; computing its leaves once
    keeps the (quadratic) reference affordable.
    """
    expected = [ref.leaf(rs, j, now) for j in range(len(program.leaves))]
    holds = [v.holds for v in expected]
    flips = [v.flips_at for v in expected if v.flips_at is not None]
    assert comp.evaluate(cs, now, static) == [run(code, holds, static) for code in program.audiences]
    assert comp.next_change(cs, now) == (min(flips) if flips else None)
    for j, (lf, r) in enumerate(zip(program.leaves, expected)):
        c = comp.leaf(cs, j, now)
        assert (c.holds, c.flips_at) == (r.holds, r.flips_at), (j, lf, now, c, r)
        assert c.count == capped(comp, lf, r.count), (j, lf, now, c, r)
        if isinstance(lf, SequenceLeaf):
            assert c.aggregate is None
            assert comp.progress(cs, j, now) == ref.progress(rs, j, now), (j, lf, now)
        elif lf.scope == Scope.WITHIN and lf.aggregation == Aggregation.COUNT:
            assert c.aggregate == float(c.count)
        else:
            assert same(c.aggregate, r.aggregate), (j, lf, now, c, r)


@settings(max_examples=1000, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(program_st(), stream_st)
def test_differential(prog_models, stream):
    prog, n_models = prog_models
    comp, ref = CompiledEvaluator(prog), ReferenceEvaluator(prog)
    cs, rs = comp.new_state(), ref.new_state()
    now = 0
    for events, (advance, static) in stream:
        for model, offset, props, sid in events:
            comp.observe(cs, model % n_models, now + offset, props, sid)
            ref.observe(rs, model % n_models, now + offset, props, sid)
        static = tuple(static[:prog.n_static])
        if advance is None:  # land exactly on the next instant something changes by itself
            nxt = ref.next_change(rs, now)
            now = nxt if nxt is not None else now + S
        else:
            now += advance
        check_agree(comp, ref, cs, rs, prog, now, static)
        # and just before the next change, without new events
        nxt = comp.next_change(cs, now)  # checked equal to the reference's just above
        if nxt is not None and nxt - 1 > now:
            now = nxt - 1
            check_agree(comp, ref, cs, rs, prog, now, static)
    check_agree(comp, ref, cs, rs, prog, now, tuple([False] * prog.n_static))


@settings(max_examples=300, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_differential_dense_windows(data):
    """Many events in few windows: the bounded WITHIN state under pressure."""
    window = data.draw(st.integers(1, 20)) * S
    leaves = tuple(
        EventLeaf(0, (), Scope.WITHIN, window, agg, "n", cmp, float(t))
        for agg, cmp, t in data.draw(st.lists(st.tuples(
            st.sampled_from(list(Aggregation)), st.sampled_from(list(Comparison)),
            st.sampled_from([0, 1, 2, 3, 4, 5, 2.5, 10, 0.3])), min_size=1, max_size=6)))
    prog = Program(leaves, tuple(((Code.EVENT, j),) for j in range(len(leaves))), 0, 10 * S)
    comp, ref = CompiledEvaluator(prog), ReferenceEvaluator(prog)
    cs, rs = comp.new_state(), ref.new_state()
    now = 0
    for _ in range(data.draw(st.integers(1, 8))):
        for ts in data.draw(st.lists(st.integers(-25, 5), max_size=12)):
            n = data.draw(st.sampled_from([1, 2, 0.1, 0.2, -1, 3.5, None]))
            comp.observe(cs, 0, now + ts * S // 2, {} if n is None else {"n": n})
            ref.observe(rs, 0, now + ts * S // 2, {} if n is None else {"n": n})
        for _ in range(data.draw(st.integers(1, 4))):
            nxt = ref.next_change(rs, now)
            now = nxt if (nxt is not None and data.draw(st.booleans())) else now + data.draw(st.integers(0, 6)) * S // 2
            check_agree(comp, ref, cs, rs, prog, now, ())


@settings(max_examples=300, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_differential_on_a_grid(data):
    """Whole seconds everywhere: events land exactly on window ends and session ends."""
    leaves = tuple(
        EventLeaf(model, (), scope, window * S, agg, "n", cmp, float(t))
        for model, scope, window, agg, cmp, t in data.draw(st.lists(st.tuples(
            st.integers(0, 1), st.sampled_from(list(Scope)), st.integers(1, 4), st.sampled_from(list(Aggregation)),
            st.sampled_from(list(Comparison)), st.sampled_from([0, 1, 2, 3, 1.5])), min_size=1, max_size=5)))
    prog = Program(leaves, tuple(((Code.EVENT, j),) for j in range(len(leaves))), 0,
                   data.draw(st.integers(1, 4)) * S)
    comp, ref = CompiledEvaluator(prog), ReferenceEvaluator(prog)
    cs, rs = comp.new_state(), ref.new_state()
    now = 0
    for _ in range(data.draw(st.integers(1, 12))):
        for model, ts, n, sid in data.draw(st.lists(st.tuples(
                st.integers(0, 1), st.integers(-6, 2), st.sampled_from([1, 2, -1, 0.5, None]),
                st.sampled_from(["", "", "a", "b"])), max_size=4)):
            props = {} if n is None else {"n": n}
            comp.observe(cs, model, now + ts * S, props, sid)
            ref.observe(rs, model, now + ts * S, props, sid)
        now += data.draw(st.integers(0, 3)) * S
        check_agree(comp, ref, cs, rs, prog, now, ())


@settings(max_examples=200, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_differential_extreme_sums(data):
    """Sums that overflow, cancel infinities or hold ints beyond a double, in every scope.

    Where math.fsum raises, the reference adds left to right in arrival order;
    the compiled evaluator keeps windows in timestamp order, so timestamps here
    arrive out of order.
    """
    extreme = st.sampled_from([1e308, -1e308, 1e308, -1e308, 1.7e308, -1.7e308, math.inf, -math.inf, math.nan,
                               10**400, -(10**400), 1.0, 0.5, 2**60 + 1])
    leaves = tuple(EventLeaf(0, (), scope, 10 * S, agg, "n", cmp, t)
                   for scope, agg, cmp, t in data.draw(st.lists(st.tuples(
                       st.sampled_from(list(Scope)), st.sampled_from([Aggregation.SUM, Aggregation.AVG]),
                       st.sampled_from(list(Comparison)), st.sampled_from([0.0, 1.0, math.inf, -math.inf])),
                       min_size=1, max_size=4)))
    prog = Program(leaves, tuple(((Code.EVENT, j),) for j in range(len(leaves))), 0, 60 * S)
    comp, ref = CompiledEvaluator(prog), ReferenceEvaluator(prog)
    cs, rs = comp.new_state(), ref.new_state()
    now = 0
    for _ in range(data.draw(st.integers(1, 5))):
        for ts, n in data.draw(st.lists(st.tuples(st.integers(-12, 2), extreme), max_size=6)):
            comp.observe(cs, 0, now + ts * S, {"n": n})
            ref.observe(rs, 0, now + ts * S, {"n": n})
        now += data.draw(st.integers(0, 4)) * S
        check_agree(comp, ref, cs, rs, prog, now, ())

