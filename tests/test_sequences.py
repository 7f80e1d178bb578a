"""Sequence and absence leaves: every case on the compiled evaluator and the reference.

Unit cases pin the contract of DESIGN.md ("Sequences and absence") with
hand-computed instants; the capped cases pin what the bounded state forgets
beyond its caps (REORDER, VALUES, PENDING in program.py, stated in
_reference_sequences.py); the state codec's sections and the graft's checks
close it. The property tests (oracle and differential runs) are
tests/test_sequences_differential.py's.
"""

from __future__ import annotations

import dataclasses
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qualify.evaluator import CompiledEvaluator
from qualify.evaluator.program import (Code, Filter, Kind, Op, Program, Scope, SequenceLeaf, SequenceProgress, Step,
                                       state_key)
from qualify.evaluator.reference import ReferenceEvaluator

S = 1_000_000
MIN = 60 * S
TIMEOUT = 30 * MIN
EVALUATORS = {"compiled": CompiledEvaluator, "reference": ReferenceEvaluator}
VIEW, CART, ORDER = 0, 1, 2


@pytest.fixture(params=sorted(EVALUATORS))
def make(request):
    return EVALUATORS[request.param]


def seq(*steps, within=0, same=(), scope=Scope.EVER, window=0, **caps) -> SequenceLeaf:
    return SequenceLeaf(Kind.SEQUENCE, tuple(s if isinstance(s, Step) else Step(s) for s in steps), within,
                        tuple(same), scope, window, **caps)


def absence(a, b, within, same=(), scope=Scope.EVER, window=0, **caps) -> SequenceLeaf:
    return SequenceLeaf(Kind.ABSENCE, tuple(s if isinstance(s, Step) else Step(s) for s in (a, b)), within,
                        tuple(same), scope, window, **caps)


def program(*leaves, timeout=TIMEOUT) -> Program:
    return Program(tuple(leaves), tuple(((Code.EVENT, j),) for j in range(len(leaves))), 0, timeout)


def run(ev, events, leaf_index=0):
    """Observes (model, ts, props[, session]) in order; returns the state."""
    s = ev.new_state()
    for e in events:
        ev.observe(s, e[0], e[1], e[2] if len(e) > 2 else {}, e[3] if len(e) > 3 else "")
    return s


def timeline(ev, s, start, end, j=0):
    """[(instant, holds)] of leaf j from start, following next-change instants up to end."""
    out = [(start, ev.leaf(s, j, start).holds)]
    t = start
    while (t := ev.leaf(s, j, t).flips_at) is not None and t <= end:
        out.append((t, ev.leaf(s, j, t).holds))
    return out


# ---------------------------------------------------------------- sequences


def test_steps_in_order_by_timestamp_then_arrival(make):
    ev = make(program(seq(VIEW, CART)))
    assert not ev.evaluate(run(ev, [(CART, 10), (VIEW, 20)]), 30, [])[0]  # B before A
    assert ev.evaluate(run(ev, [(VIEW, 10), (CART, 20)]), 30, [])[0]
    # equal timestamps: the order of arrival decides
    assert ev.evaluate(run(ev, [(VIEW, 10), (CART, 10)]), 30, [])[0]
    assert not ev.evaluate(run(ev, [(CART, 10), (VIEW, 10)]), 30, [])[0]
    # a late first step, timestamped before the second: a match
    assert ev.evaluate(run(ev, [(CART, 20), (VIEW, 10)]), 30, [])[0]


def test_one_event_fills_one_step(make):
    ev = make(program(seq(VIEW, VIEW, VIEW)))
    s = run(ev, [(VIEW, 1), (VIEW, 2)])
    assert not ev.evaluate(s, 10, [])[0]
    assert ev.progress(s, 0, 10) == SequenceProgress(2, 1, ())
    ev.observe(s, VIEW, 3, {})
    assert ev.evaluate(s, 10, [])[0]


def test_within_is_inclusive_and_measured_from_the_first_step(make):
    ev = make(program(seq(VIEW, CART, ORDER, within=10 * MIN)))
    assert ev.evaluate(run(ev, [(VIEW, 0), (CART, 9 * MIN), (ORDER, 10 * MIN)]), 11 * MIN, [])[0]
    assert not ev.evaluate(run(ev, [(VIEW, 0), (CART, MIN), (ORDER, 10 * MIN + 1)]), 11 * MIN, [])[0]
    # a later first step makes room: the view at 5 min starts a match that ends within 10 minutes of it
    assert ev.evaluate(run(ev, [(VIEW, 0), (VIEW, 5 * MIN), (CART, 6 * MIN), (ORDER, 12 * MIN)]), 13 * MIN, [])[0]


def test_window_scope_exits_when_the_first_step_leaves(make):
    lf = seq(VIEW, CART, scope=Scope.WITHIN, window=60 * MIN)
    ev = make(program(lf))
    s = run(ev, [(VIEW, 10 * MIN), (CART, 20 * MIN)])
    v = ev.leaf(s, 0, 25 * MIN)
    assert (v.holds, v.count, v.flips_at) == (True, 2, 70 * MIN)
    assert ev.evaluate(s, 70 * MIN - 1, [])[0] and not ev.evaluate(s, 70 * MIN, [])[0]
    assert ev.next_change(s, 70 * MIN) is None
    # a newer match moves the exit: the first step's 30 min + 60
    ev.observe(s, VIEW, 30 * MIN, {})
    ev.observe(s, CART, 40 * MIN, {})
    assert ev.leaf(s, 0, 70 * MIN).flips_at == 90 * MIN


def test_session_scope_binds_every_step(make):
    ev = make(program(seq(VIEW, CART, scope=Scope.SESSION)))
    s = run(ev, [(VIEW, 0, {}, "a"), (CART, MIN, {}, "b")])  # another session between the steps
    assert not ev.evaluate(s, 2 * MIN, [])[0]
    s = run(ev, [(VIEW, 0, {}, "a"), (CART, MIN, {}, "a")])
    v = ev.leaf(s, 0, 2 * MIN)
    assert v.holds and v.flips_at == MIN + TIMEOUT  # the session ends 30 minutes after its latest event
    assert not ev.evaluate(s, MIN + TIMEOUT, [])[0]


def test_same_value_across_steps(make):
    ev = make(program(seq(Step(VIEW), Step(CART), same=("sku",))))
    s = run(ev, [(VIEW, 1, {"sku": "x"}), (CART, 2, {"sku": "y"})])
    assert not ev.evaluate(s, 10, [])[0]
    assert ev.progress(s, 0, 10).steps_done == 1
    ev.observe(s, CART, 3, {})  # no sku: never matches
    assert not ev.evaluate(s, 10, [])[0]
    ev.observe(s, CART, 4, {"sku": "x"})
    assert ev.evaluate(s, 10, [])[0]
    assert ev.progress(s, 0, 10) == SequenceProgress(2, 1, ("x",))


def test_same_values_compare_as_predicates_do(make):
    ev = make(program(seq(VIEW, CART, same=("n",))))
    assert ev.evaluate(run(ev, [(VIEW, 1, {"n": 1}), (CART, 2, {"n": 1.0})]), 3, [])[0]
    assert ev.evaluate(run(ev, [(VIEW, 1, {"n": 10**20}), (CART, 2, {"n": 1e20})]), 3, [])[0]
    assert not ev.evaluate(run(ev, [(VIEW, 1, {"n": True}), (CART, 2, {"n": 1})]), 3, [])[0]
    assert not ev.evaluate(run(ev, [(VIEW, 1, {"n": 2**53 + 1}), (CART, 2, {"n": 2.0**53})]), 3, [])[0]
    assert not ev.evaluate(run(ev, [(VIEW, 1, {"n": float("nan")}), (CART, 2, {"n": float("nan")})]), 3, [])[0]


def test_progress_names_the_next_step(make):
    ev = make(program(seq(VIEW, CART, ORDER, within=10 * MIN, same=("sku",))))
    s = run(ev, [(VIEW, 0, {"sku": "sku-9"}), (CART, MIN, {"sku": "sku-9"}), (VIEW, 2 * MIN, {"sku": "sku-1"})])
    assert ev.progress(s, 0, 3 * MIN) == SequenceProgress(2, 0, ("sku-9",))
    assert ev.leaf(s, 0, 3 * MIN).count == 2


# ---------------------------------------------------------------- absence


def test_absence_enters_at_exactly_a_plus_t(make):
    ev = make(program(absence(CART, ORDER, 30 * MIN, scope=Scope.WITHIN, window=60 * MIN)))
    s = run(ev, [(CART, 0)])
    assert ev.next_change(s, 0) == 30 * MIN
    assert timeline(ev, s, 0, 200 * MIN) == [(0, False), (30 * MIN, True), (60 * MIN, False)]
    assert ev.progress(s, 0, MIN) == SequenceProgress(1, 0, ())


def test_a_b_at_exactly_a_plus_t_cancels(make):
    ev = make(program(absence(CART, ORDER, 30 * MIN)))
    assert not ev.evaluate(run(ev, [(CART, 0), (ORDER, 30 * MIN)]), 100 * MIN, [])[0]
    assert ev.evaluate(run(ev, [(CART, 0), (ORDER, 30 * MIN + 1)]), 100 * MIN, [])[0]
    # B before A, or at A's instant but arrived first, does not cancel
    assert ev.evaluate(run(ev, [(ORDER, 0), (CART, 0)]), 100 * MIN, [])[0]
    assert not ev.evaluate(run(ev, [(CART, 0), (ORDER, 0)]), 100 * MIN, [])[0]


def test_every_pending_anchor_matters(make):
    """DESIGN.md's example: carts at 0, 100, 200, an order at 1950, T = 1800, W = 3600."""
    ev = make(program(absence(CART, ORDER, 1800 * S, scope=Scope.WITHIN, window=3600 * S)))
    s = run(ev, [(CART, 0), (CART, 100 * S), (CART, 200 * S), (ORDER, 1950 * S)])
    assert timeline(ev, s, 0, 10_000 * S) == [(0, False), (1800 * S, True), (3700 * S, False)]


@pytest.mark.parametrize("reorder", [1, 4])  # folded into final intervals, or still in the buffer
def test_memberships_that_meet_are_one(make, reorder):
    """Anchors window - within apart: one ends where the next begins, with no flip between."""
    ev = make(program(absence(CART, ORDER, 30 * S, scope=Scope.WITHIN, window=60 * S, reorder=reorder)))
    s = run(ev, [(CART, 0), (CART, 30 * S), (VIEW, 200 * S), (CART, 300 * S)])
    assert timeline(ev, s, 0, 250 * S) == [(0, False), (30 * S, True), (90 * S, False)]


def test_a_late_b_ends_the_membership_on_arrival(make):
    ev = make(program(absence(CART, ORDER, 30 * MIN)))
    s = run(ev, [(CART, 0)])
    assert ev.evaluate(s, 40 * MIN, [])[0]
    ev.observe(s, ORDER, 10 * MIN, {})  # timestamped 10 min after the cart, arriving at 40
    assert not ev.evaluate(s, 40 * MIN, [])[0]
    assert ev.next_change(s, 40 * MIN) is None


def test_absence_correlated_on_same(make):
    ev = make(program(absence(Step(CART), Step(ORDER), 30 * MIN, same=("sku",))))
    s = run(ev, [(CART, 0, {"sku": "x"}), (CART, MIN, {"sku": "y"}), (ORDER, 2 * MIN, {"sku": "y"}),
                 (CART, 3 * MIN, {}), (ORDER, 4 * MIN, {})])  # no sku: never an anchor, never a cancel
    assert ev.progress(s, 0, 10 * MIN) == SequenceProgress(1, 0, ("x",))
    assert timeline(ev, s, 10 * MIN, 100 * MIN) == [(10 * MIN, False), (30 * MIN, True)]


def test_absence_in_a_session(make):
    ev = make(program(absence(CART, ORDER, 10 * MIN, scope=Scope.SESSION), timeout=30 * MIN))
    s = run(ev, [(CART, 0, {}, "a"), (VIEW, 20 * MIN, {}, "a")])
    assert timeline(ev, s, 0, 200 * MIN) == [(0, False), (10 * MIN, True), (50 * MIN, False)]
    # an order in another session does not cancel; the new session has no anchor
    s = run(ev, [(CART, 0, {}, "a"), (ORDER, MIN, {}, "b")])
    assert not ev.evaluate(s, 20 * MIN, [])[0]


def test_absence_with_filters_and_an_event_both_steps(make):
    views = Step(VIEW, (Filter("path", Op.EQ, ("/pricing",)),))
    ev = make(program(absence(views, Step(VIEW), 5 * MIN)))  # a pricing view that was the last view for 5 min
    s = run(ev, [(VIEW, 0, {"path": "/pricing"}), (VIEW, MIN, {"path": "/home"})])
    assert not ev.evaluate(s, 10 * MIN, [])[0]
    s = run(ev, [(VIEW, 0, {"path": "/home"}), (VIEW, MIN, {"path": "/pricing"})])
    assert ev.evaluate(s, 6 * MIN, [])[0] and not ev.evaluate(s, 6 * MIN - 1, [])[0]


# ---------------------------------------------------------------- the caps


def test_reorder_cap_ignores_events_too_late(make):
    ev = make(program(seq(VIEW, CART, reorder=2)))
    s = run(ev, [(CART, 20), (CART, 30), (VIEW, 10)])  # two later carts known: the view is too late
    assert not ev.evaluate(s, 40, [])[0]
    s = run(ev, [(CART, 20), (VIEW, 10)])  # one later: put in its place
    assert ev.evaluate(s, 40, [])[0]


def test_in_order_sequences_are_exact_however_many_events(make):
    ev = make(program(seq(VIEW, CART, ORDER, reorder=1)))
    events = [(VIEW, 0)] + [(CART, t) for t in range(1, 40)] + [(ORDER, 50)]
    assert ev.evaluate(run(ev, events), 60, [])[0]  # the view at 0 folded long ago, the match found


def test_values_cap_forgets_the_value_seen_longest_ago(make):
    ev = make(program(seq(VIEW, CART, same=("sku",), values=2)))
    s = run(ev, [(VIEW, 1, {"sku": "a"}), (VIEW, 2, {"sku": "b"}), (VIEW, 3, {"sku": "c"}),  # forgets a
                 (CART, 4, {"sku": "b"}), (CART, 5, {"sku": "a"})])  # a again: forgets c (latest 3; b's is 4)
    assert ev.evaluate(s, 10, [])[0]  # b's view and cart
    assert ev.progress(s, 0, 10) == SequenceProgress(2, 2, ("b",))
    s = run(ev, [(VIEW, 1, {"sku": "a"}), (VIEW, 2, {"sku": "b"}), (VIEW, 3, {"sku": "c"}),
                 (CART, 4, {"sku": "a"})])
    assert not ev.evaluate(s, 10, [])[0]
    # a newcomer older than everything remembered is itself forgotten
    s = run(ev, [(VIEW, 5, {"sku": "a"}), (VIEW, 6, {"sku": "b"}), (VIEW, 1, {"sku": "c"}), (CART, 7, {"sku": "c"})])
    assert ev.progress(s, 0, 10).values in (("a",), ("b",)) and not ev.evaluate(s, 10, [])[0]


def test_pending_cap_keeps_the_earliest_anchors(make):
    """Beyond the cap the entry stays exact and the exit can come early: documented, and pinned here."""
    leaf = absence(CART, ORDER, 1800 * S, scope=Scope.WITHIN, window=3600 * S, reorder=1, pending=1)
    ev = make(program(leaf))
    carts = [(CART, t * S) for t in (0, 100, 200, 300)]
    # no order: exact (the cart at 0 enters at 1800, the buffered one at 300 holds it to 3900)
    assert timeline(ev, run(ev, carts), 0, 10_000 * S) == [(0, False), (1800 * S, True), (3900 * S, False)]
    # an order at 1950: exactly, the cart at 100 would hold it to 3700; the cap forgot it
    s = run(ev, carts + [(ORDER, 1950 * S)])
    assert timeline(ev, s, 0, 10_000 * S) == [(0, False), (1800 * S, True), (3600 * S, False)]


# ---------------------------------------------------------------- state keys and codec


def test_state_keys_tell_sequence_state_apart():
    base = seq(VIEW, CART, within=10 * S, same=("sku",), scope=Scope.WITHIN, window=60 * S)
    others = [dataclasses.replace(base, kind=Kind.ABSENCE), seq(CART, VIEW, within=10 * S, same=("sku",),
              scope=Scope.WITHIN, window=60 * S), dataclasses.replace(base, within_us=11 * S),
              dataclasses.replace(base, same=()), dataclasses.replace(base, window_us=61 * S),
              dataclasses.replace(base, reorder=3), dataclasses.replace(base, values=3),
              dataclasses.replace(base, scope=Scope.EVER, window_us=0)]
    keys = {state_key(lf) for lf in [base] + others}
    assert len(keys) == len(others) + 1
    assert state_key(dataclasses.replace(base, pending=2)) == state_key(base)  # a SEQUENCE keeps no pending anchors
    filt = (Filter("p", Op.EQ, ("x",)), Filter("q", Op.GT, (1,)))
    assert state_key(seq(Step(VIEW, filt), CART)) == state_key(seq(Step(VIEW, filt[::-1]), CART))


def test_codec_round_trip_and_corruption():
    prog = program(seq(VIEW, CART, ORDER, within=10 * MIN, same=("sku",), reorder=2),
                   absence(CART, ORDER, 30 * MIN, same=("sku",), scope=Scope.WITHIN, window=90 * MIN, reorder=1),
                   absence(CART, ORDER, 5 * MIN, scope=Scope.SESSION))
    ev = CompiledEvaluator(prog)
    s = run(ev, [(VIEW, 0, {"sku": "a"}), (CART, MIN, {"sku": "a"}), (CART, 2 * MIN, {"sku": "b"}),
                 (VIEW, 3 * MIN, {"sku": "a"}), (CART, 4 * MIN, {"sku": "a"}), (ORDER, 50 * MIN, {"sku": "b"})])
    raw = ev.dump(s)
    r = ev.load(raw)
    for now in (10 * MIN, 31 * MIN, 60 * MIN, 200 * MIN):
        assert [ev.leaf(r, j, now) for j in range(3)] == [ev.leaf(s, j, now) for j in range(3)]
        assert [ev.progress(r, j, now) for j in range(3)] == [ev.progress(s, j, now) for j in range(3)]
    for i in range(1, len(raw) - 4):  # any single byte changed: a checksum or a bounds error, never a crash
        bad = bytearray(raw)
        bad[i] ^= 0x41
        with pytest.raises(ValueError):
            ev.load(bytes(bad))
    # the same program without the sequence leaves reads the rest and skips their sections
    other = CompiledEvaluator(program(absence(CART, ORDER, 5 * MIN, scope=Scope.SESSION)))
    assert other.missing_leaves(raw) == ()


CODEC_PROGRAM = program(seq(VIEW, CART, ORDER, within=10 * MIN, same=("sku",), reorder=2),
                        absence(CART, ORDER, 30 * MIN, same=("sku", "n"), scope=Scope.WITHIN, window=90 * MIN,
                                reorder=1, pending=2),
                        absence(CART, ORDER, 5 * MIN, scope=Scope.SESSION))
CODEC_EVENTS = [(VIEW, 0, {"sku": "a", "n": 1}), (CART, MIN, {"sku": "a", "n": 1.5}), (CART, 2 * MIN, {"sku": "b"}),
                (VIEW, 3 * MIN, {"sku": "a"}), (CART, 4 * MIN, {"sku": "a", "n": 10**30}),
                (CART, 5 * MIN, {"sku": "a", "n": 1.5}), (CART, 6 * MIN, {"sku": "a", "n": True}),
                (ORDER, 50 * MIN, {"sku": "b", "n": -3})]


@settings(max_examples=500, derandomize=True, database=None, deadline=None)
@given(st.data())
def test_mutated_sections_with_a_valid_checksum_never_crash(data):
    """Past the checksum the sequence sections bound every read: a ValueError or a usable state."""
    ev = CompiledEvaluator(CODEC_PROGRAM)
    s = run(ev, CODEC_EVENTS)
    ev.evaluate(s, 40 * MIN, [])
    body = bytearray(ev.dump(s)[:-4])
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["set", "set", "cut", "insert"]))
        k = data.draw(st.integers(1, len(body) - 1))
        if op == "set":
            body[k] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del body[k:k + data.draw(st.integers(1, 6))]
        else:
            body[k:k] = data.draw(st.binary(min_size=1, max_size=6))
        if len(body) < 2:
            break
    raw = bytes(body) + zlib.crc32(bytes(body)).to_bytes(4, "little")
    try:
        r = ev.load(raw)
    except ValueError:
        return
    for j in range(3):
        ev.leaf(r, j, 41 * MIN)
        ev.progress(r, j, 41 * MIN)
    ev.next_change(r, 41 * MIN)
    for e in CODEC_EVENTS:
        ev.observe(r, e[0], e[1] + 60 * MIN, e[2])
    ev.evaluate(r, 200 * MIN, [])
    ev.dump(r)


def test_graft_refuses_sequence_leaves_that_keep_different_state():
    main = CompiledEvaluator(program(seq(VIEW, CART, within=10 * S)))
    for other in (seq(VIEW, CART, within=11 * S), absence(VIEW, CART, 10 * S), seq(VIEW, CART, within=10 * S, reorder=2)):
        donor = CompiledEvaluator(program(other))
        with pytest.raises(ValueError):
            main.graft(main.new_state(), donor.new_state(), [(0, 0)])
