"""The state codec: ``dump``/``load``/``missing_leaves`` on both evaluators.

A person's state is dumped to bytes (LMDB, issue 11) and loaded later, maybe
under another program. Every case runs on the compiled evaluator and the
reference; the differential runs reuse test_evaluator's strategies and hold
a restored state to the uninterrupted one at every checkpoint: compiled
restored against reference uninterrupted and the other way round, and the
compiled dumps of the two byte for byte.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qualify.evaluator import CompiledEvaluator
from qualify.evaluator.program import Aggregation, Code, Comparison, EventLeaf, Program, Scope, state_key
from qualify.evaluator.reference import ReferenceEvaluator

from test_evaluator import S, check_agree, leaf, leaf_st, program, program_st, stream_st, within

EVALUATORS = {"compiled": CompiledEvaluator, "reference": ReferenceEvaluator}


@pytest.fixture(params=sorted(EVALUATORS))
def make(request):
    return EVALUATORS[request.param]


def values(ev, s, now):
    return [ev.leaf(s, j, now) for j in range(len(ev.program.leaves))], ev.next_change(s, now)


def same_values(a, b) -> bool:
    """LeafValue lists equal, NaN aggregates included."""
    (la, na), (lb, nb) = a, b
    if na != nb or len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if (x.holds, x.count, x.flips_at) != (y.holds, y.count, y.flips_at):
            return False
        if not (x.aggregate == y.aggregate or (x.aggregate is not None and y.aggregate is not None
                                               and math.isnan(x.aggregate) and math.isnan(y.aggregate))):
            return False
    return True


# ---------------------------------------------------------------- unit cases

def test_new_state_from_nothing(make):
    ev = make(program(within(10), leaf()))
    for raw in (None, b""):
        s = ev.load(raw)
        assert ev.evaluate(s, 0, []) == [False, False]
        assert ev.missing_leaves(raw) == (0, 1)  # nothing of any program is in it


def test_round_trip_sessions_and_sums(make):
    prog = program(leaf(scope=Scope.SESSION, aggregation=Aggregation.SUM, property="n", comparison=Comparison.EQ,
                        threshold=3.0),
                   within(60, aggregation=Aggregation.AVG, property="n", comparison=Comparison.GT, threshold=0.5),
                   leaf(aggregation=Aggregation.MIN, property="n", comparison=Comparison.LT, threshold=0),
                   within(60, threshold=2), leaf(scope=Scope.SESSION, threshold=2))
    ev = make(prog)
    s = ev.new_state()
    for i, n in enumerate([0.1, 0.2, math.nan, 0.3, 2, 0.4]):
        ev.observe(s, 0, i * S, {"n": n}, "a" if i < 4 else "b")
    before = values(ev, s, 6 * S)
    raw = ev.dump(s)
    r = ev.load(raw)
    assert ev.missing_leaves(raw) == ()
    assert same_values(values(ev, r, 6 * S), before)
    assert ev.dump(r) == raw
    # the session id carries over: "b" continues, "c" starts a new session
    for x in (s, r):
        ev.observe(x, 0, 7 * S, {"n": 1}, "b")
    assert same_values(values(ev, r, 8 * S), values(ev, s, 8 * S))
    for x in (s, r):
        ev.observe(x, 0, 9 * S, {"n": 1}, "c")
    assert same_values(values(ev, r, 100 * S), values(ev, s, 100 * S))


def test_loads_any_buffer(make):
    ev = make(program(within(10)))
    s = ev.new_state()
    ev.observe(s, 0, S, {})
    raw = ev.dump(s)
    for buf in (bytearray(raw), memoryview(raw)):
        assert ev.evaluate(ev.load(buf), 2 * S, []) == [True]


def test_twins_refuse_each_other():
    prog = program(within(10), leaf())
    comp, ref = CompiledEvaluator(prog), ReferenceEvaluator(prog)
    with pytest.raises(ValueError, match="reference"):
        comp.load(ref.dump(ref.new_state()))
    with pytest.raises(ValueError, match="compiled"):
        ref.load(comp.dump(comp.new_state()))


def test_compiled_dump_is_compact():
    # 20 audiences of 3 leaves; the person touched a few of them
    leaves = []
    for a in range(20):
        leaves += [within(60 + a, threshold=2), leaf(scope=Scope.SESSION, model=a % 3, threshold=a),
                   within(600, aggregation=Aggregation.SUM, property="n", model=1, threshold=a)]
    prog = Program(tuple(leaves), tuple(((Code.EVENT, j),) for j in range(len(leaves))), 0, 1800 * S)
    ev = CompiledEvaluator(prog)
    s = ev.new_state()
    empty = len(ev.dump(s))
    n_keys = len({state_key(lf) for lf in leaves})
    # version, a short header, CRC-32, and per distinct leaf state its key and a zero length
    assert empty <= 1 + 16 + 4 + 9 * n_keys
    t0 = 1_700_000_000 * S
    for i in range(5):
        ev.observe(s, 0, t0 + i * S, {})
    ev.evaluate(s, t0 + 5 * S, [])
    raw = ev.dump(s)
    # 20 windows x 3 timestamps (first one from the session's last ts, then deltas) and an EVER... count
    assert len(raw) - empty <= 20 * (1 + 3 * 4) + 7 * 2
    loaded = ev.load(raw)
    assert loaded.nbytes() <= s.nbytes()


def test_equal_state_keys_share_a_section(make):
    # AVG and SUM keep the same exact sum; comparisons and thresholds only read it
    a = leaf(aggregation=Aggregation.SUM, property="n", threshold=3)
    b = leaf(aggregation=Aggregation.AVG, property="n", comparison=Comparison.LT, threshold=1)
    assert state_key(a) == state_key(b)
    # a WITHIN COUNT keeps threshold + 1 timestamps: different thresholds, different state
    assert state_key(within(10, threshold=1)) != state_key(within(10, threshold=2))
    assert state_key(within(10, threshold=1)) == state_key(within(10, threshold=1.5, comparison=Comparison.LT))
    p1, p2 = program(a), program(b, a)
    e1, e2 = make(p1), make(p2)
    s = e1.new_state()
    for i, n in enumerate([1, 2, 0.5]):
        e1.observe(s, 0, i * S, {"n": n})
    raw = e1.dump(s)
    assert e2.missing_leaves(raw) == ()
    r = e2.load(raw)
    assert e2.leaf(r, 0, 5 * S).aggregate == 3.5 / 3
    assert e2.leaf(r, 1, 5 * S).aggregate == 3.5


def test_program_change_restores_shared_leaves(make):
    shared = within(60, threshold=1)
    gone = leaf(model=1)
    new = leaf(scope=Scope.SESSION)
    e1, e2 = make(program(shared, gone)), make(program(new, shared))
    s = e1.new_state()
    e1.observe(s, 0, S, {})
    e1.observe(s, 0, 2 * S, {})
    e1.observe(s, 1, 3 * S, {})
    raw = e1.dump(s)
    assert e2.missing_leaves(raw) == (0,)
    r, missing = e2.load_with_missing(raw)
    assert missing == (0,)
    v = e2.leaf(r, 1, 4 * S)
    assert v.holds and v.flips_at == 62 * S
    assert e2.leaf(r, 0, 4 * S).count == 0  # the session is open, but the new leaf saw none of it
    e2.observe(r, 0, 5 * S, {})
    assert e2.leaf(r, 0, 6 * S).count == 1
    assert e2.leaf(r, 0, 6 * S).flips_at == 35 * S


# ---------------------------------------------------------------- corrupt input

def _dumped(ev):
    s = ev.new_state()
    for i, n in enumerate([1, 0.5, math.inf, 10**400, "x"]):
        ev.observe(s, i % 2, i * S, {"n": n}, "sid" if i > 2 else "")
    ev.evaluate(s, 5 * S, [])
    return ev.dump(s)


CORRUPT_PROGRAM = program(within(60, threshold=2), within(60, aggregation=Aggregation.SUM, property="n"),
                          leaf(scope=Scope.SESSION, aggregation=Aggregation.MAX, property="n"),
                          leaf(model=1, aggregation=Aggregation.AVG, property="n"))


def test_truncations_and_flips_raise(make):
    ev = make(CORRUPT_PROGRAM)
    raw = _dumped(ev)
    for k in range(1, len(raw)):
        with pytest.raises(ValueError):
            ev.load(raw[:k])
    for k in range(len(raw)):
        flipped = bytearray(raw)
        flipped[k] ^= 0x10
        with pytest.raises(ValueError):
            ev.load(bytes(flipped))
    with pytest.raises(ValueError, match="version"):
        ev.load(bytes([7]) + raw[1:])


@settings(max_examples=400, derandomize=True, database=None, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.sampled_from(sorted(EVALUATORS)))
def test_random_bytes_raise(raw, kind):
    with pytest.raises(ValueError):
        EVALUATORS[kind](CORRUPT_PROGRAM).load(raw)


@settings(max_examples=500, derandomize=True, database=None, deadline=None)
@given(st.data())
def test_mutations_with_a_valid_checksum_never_crash(data):
    """Past the checksum the parser still bounds every read: a ValueError or a usable state."""
    ev = CompiledEvaluator(CORRUPT_PROGRAM)
    body = bytearray(_dumped(ev)[:-4])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["set", "cut", "insert"]))
        k = data.draw(st.integers(1, len(body) - 1))
        if op == "set":
            body[k] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del body[k:k + data.draw(st.integers(1, 12))]
        else:
            body[k:k] = data.draw(st.binary(min_size=1, max_size=12))
        if len(body) < 2:
            break
    raw = bytes(body) + zlib.crc32(bytes(body)).to_bytes(4, "little")
    try:
        s = ev.load(raw)
    except ValueError:
        return
    ev.evaluate(s, 10 * S, [])
    ev.next_change(s, 10 * S)
    ev.observe(s, 0, 11 * S, {"n": 1})
    ev.dump(s)


# ---------------------------------------------------------------- differential

def _run(prog, n_models, stream, splits):
    """The stream through uninterrupted states and through states dumped and loaded at ``splits``."""
    comp, ref = CompiledEvaluator(prog), ReferenceEvaluator(prog)
    cs, rs = comp.new_state(), ref.new_state()
    cl, rl = comp.new_state(), ref.new_state()
    now = 0
    for i, (events, (advance, static)) in enumerate(stream):
        for model, offset, props, sid in events:
            for ev, s in ((comp, cs), (ref, rs), (comp, cl), (ref, rl)):
                ev.observe(s, model % n_models, now + offset, props, sid)
        static = tuple(static[:prog.n_static])
        if advance is None:
            nxt = ref.next_change(rs, now)
            now = nxt if nxt is not None else now + S
        else:
            now += advance
        if i in splits:
            raw = comp.dump(cl)
            cl = comp.load(raw)
            assert comp.dump(cl) == raw
            assert comp.missing_leaves(raw) == ()
            rl = ref.load(ref.dump(rl))
        check_agree(comp, ref, cl, rs, prog, now, static)
        check_agree(comp, ref, cs, rl, prog, now, static)
        assert comp.dump(cl) == comp.dump(cs)
        nxt = comp.next_change(cs, now)
        if nxt is not None and nxt - 1 > now:
            now = nxt - 1
            check_agree(comp, ref, cl, rs, prog, now, static)
            check_agree(comp, ref, cs, rl, prog, now, static)


@settings(max_examples=400, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(program_st(), stream_st, st.sets(st.integers(0, 13), max_size=4))
def test_round_trip_differential(prog_models, stream, splits):
    prog, n_models = prog_models
    _run(prog, n_models, stream, splits)


@settings(max_examples=150, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_round_trip_extreme_values(data):
    """Overflowing and cancelling sums, NaN and ints beyond a double, MIN/MAX by arrival, in every scope."""
    extreme = st.sampled_from([1e308, -1e308, 1.7e308, -1.7e308, math.inf, -math.inf, math.nan,
                               10**400, -(10**400), 1.0, 0.5, 0.1, 2**60 + 1, -0.0])
    # (a COUNT against an infinite threshold is constant, and test_evaluator.capped cannot take it)
    leaves = tuple(EventLeaf(0, (), scope, 10 * S, agg, "n", cmp,
                             1.0 if agg == Aggregation.COUNT and math.isinf(t) else t)
                   for scope, agg, cmp, t in data.draw(st.lists(st.tuples(
                       st.sampled_from(list(Scope)), st.sampled_from(list(Aggregation)),
                       st.sampled_from(list(Comparison)), st.sampled_from([0.0, 1.0, math.inf, -math.inf])),
                       min_size=1, max_size=4)))
    prog = Program(leaves, tuple(((Code.EVENT, j),) for j in range(len(leaves))), 0, 20 * S)
    stream = [([(0, ts * S, {"n": n}, sid) for ts, n, sid in data.draw(st.lists(st.tuples(
                  st.integers(-12, 2), extreme, st.sampled_from(["", "", "a", "b"])), max_size=6))],
               (data.draw(st.integers(0, 8)) * S, [False] * 3))
              for _ in range(data.draw(st.integers(1, 6)))]
    _run(prog, 1, stream, data.draw(st.sets(st.integers(0, 5), max_size=3)))


@st.composite
def program_pair_st(draw):
    """P1 and P2 over the same models; P2 keeps some of P1's leaves (maybe reordered) and adds others."""
    p1, n_models = draw(program_st())
    kept = draw(st.lists(st.sampled_from(p1.leaves), max_size=len(p1.leaves)))
    added = [dataclasses.replace(lf, model=lf.model % n_models) for lf in draw(st.lists(leaf_st, max_size=3))]
    leaves = draw(st.permutations(kept + added)) if kept or added else [p1.leaves[0]]
    leaves = tuple(leaves)
    audiences = (tuple((Code.EVENT, j) for j in range(len(leaves))) + ((Code.OR, len(leaves)),),)
    return p1, Program(leaves, audiences, 0, p1.session_timeout_us), n_models


@settings(max_examples=300, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(program_pair_st(), stream_st, st.integers(0, 13))
def test_program_change_differential(pair, stream, split):
    """Dump under P1, load under P2: shared leaves answer as if uninterrupted, new ones as born at the load."""
    p1, p2, n_models = pair
    split %= len(stream)
    c1, r1, c2, r2 = CompiledEvaluator(p1), ReferenceEvaluator(p1), CompiledEvaluator(p2), ReferenceEvaluator(p2)
    s1c, s1r = c1.new_state(), r1.new_state()
    uc = c2.new_state()  # P2 all along
    old = {state_key(lf) for lf in p1.leaves}
    expected_missing = tuple(j for j, lf in enumerate(p2.leaves) if state_key(lf) not in old)
    now = 0
    lc = lr = None
    for i, (events, (advance, _static)) in enumerate(stream):
        states = [(c2, uc)] + ([(c1, s1c), (r1, s1r)] if lc is None else [(c2, lc), (r2, lr)])
        for model, offset, props, sid in events:
            for ev, s in states:
                ev.observe(s, model % n_models, now + offset, props, sid)
        if advance is None:
            nxt = c2.next_change(uc, now)
            now = nxt if nxt is not None else now + S
        else:
            now += advance
        if lc is None:
            c1.evaluate(s1c, now, [False] * p1.n_static)  # the horizon P1's queries moved
            c2.evaluate(uc, now, [])
            if i == split:
                raw_c, raw_r = c1.dump(s1c), r1.dump(s1r)
                assert c2.missing_leaves(raw_c) == r2.missing_leaves(raw_r) == expected_missing
                lc, missing = c2.load_with_missing(raw_c)
                lr = r2.load(raw_r)
                assert missing == expected_missing
            else:
                continue
        check_agree(c2, r2, lc, lr, p2, now, ())
        for j in range(len(p2.leaves)):
            if j not in expected_missing:
                a, b = c2.leaf(lc, j, now), c2.leaf(uc, j, now)
                assert same_values(([a], None), ([b], None)), (j, p2.leaves[j], now, a, b)


@settings(max_examples=300, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(program_pair_st(), stream_st, st.integers(0, 13))
def test_graft_differential(pair, stream, split):
    """Dump under P1, load under P2, graft P2's new leaves from a replay: every leaf as if P2 all along.

    (A backfill, domain/backfill.py: the donor is an evaluator of just the
    new leaves that saw the person's events again, in order.)
    """
    p1, p2, n_models = pair
    split %= len(stream)
    old = {state_key(lf) for lf in p1.leaves}
    new = tuple(j for j, lf in enumerate(p2.leaves) if state_key(lf) not in old)
    donor_program = Program(tuple(p2.leaves[j] for j in new), (), 0, p2.session_timeout_us)
    c1, r1, c2, r2 = CompiledEvaluator(p1), ReferenceEvaluator(p1), CompiledEvaluator(p2), ReferenceEvaluator(p2)
    cd, rd = CompiledEvaluator(donor_program), ReferenceEvaluator(donor_program)
    s1c, s1r, uc = c1.new_state(), r1.new_state(), c2.new_state()
    dc, dr = cd.new_state(), rd.new_state()
    now = 0
    lc = lr = None
    for i, (events, (advance, _static)) in enumerate(stream):
        states = [(c2, uc)] + ([(c1, s1c), (r1, s1r), (cd, dc), (rd, dr)] if lc is None else [(c2, lc), (r2, lr)])
        for model, offset, props, sid in events:
            for ev, s in states:
                ev.observe(s, model % n_models, now + offset, props, sid)
        if advance is None:
            nxt = c2.next_change(uc, now)
            now = nxt if nxt is not None else now + S
        else:
            now += advance
        if lc is None:
            c1.evaluate(s1c, now, [False] * p1.n_static)
            c2.evaluate(uc, now, [])
            if i != split:
                continue
            lc, lr = c2.load(c1.dump(s1c)), r2.load(r1.dump(s1r))
            pairs = [(j, k) for k, j in enumerate(new)]
            c2.graft(lc, dc, pairs)
            r2.graft(lr, dr, pairs)
            lc = c2.load(c2.dump(lc))  # and it survives a round trip
        check_agree(c2, r2, lc, lr, p2, now, ())
        for j in range(len(p2.leaves)):
            a, b = c2.leaf(lc, j, now), c2.leaf(uc, j, now)
            assert same_values(([a], None), ([b], None)), (j, p2.leaves[j], now, a, b)


def test_graft_refuses_leaves_that_keep_different_state():
    counts, sums = leaf(), dataclasses.replace(leaf(), aggregation=Aggregation.SUM, property="n")
    main, donor = CompiledEvaluator(program(counts)), CompiledEvaluator(program(sums))
    with pytest.raises(ValueError):
        main.graft(main.new_state(), donor.new_state(), [(0, 0)])
    with pytest.raises(IndexError):
        main.graft(main.new_state(), donor.new_state(), [(1, 0)])
