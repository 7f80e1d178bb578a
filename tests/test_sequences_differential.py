"""Sequence and absence leaves, differential: the reference against a brute-force oracle, the compiled
evaluator against the reference.

Random programs (sequences, absences, ``same`` values, event leaves beside
them), late and out-of-order events, sessions, dump/load round trips and
backfill grafts; the unit cases are tests/test_sequences.py's.
"""

from __future__ import annotations

import dataclasses
import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qualify.evaluator import CompiledEvaluator
from qualify.evaluator._reference_sequences import canonical
from qualify.evaluator.program import Code, Kind, Program, Scope, SequenceLeaf, Step, state_key
from qualify.evaluator.reference import ReferenceEvaluator, matches_predicate

from test_evaluator import check_agree, check_st, drive_agreeing, filter_st, leaf_st, stream_st
from test_sequences import S, program, run

# ---------------------------------------------------------------- the oracle


def oracle(leaf: SequenceLeaf, events, now, session, open_) -> bool:
    """The definitions of _reference_sequences, brute force over every event (no caps).

    ``events``: (model, ts, properties, session number) in arrival order.
    """
    rel = []
    for seq_no, (model, ts, props, sess) in enumerate(events, 1):
        mask = sum(1 << i for i, s in enumerate(leaf.steps) if s.model == model
                   and all(matches_predicate(f.op, f.values, props.get(f.property)) for f in s.filters))
        key = tuple(canonical(props.get(p)) for p in leaf.same)
        if mask and None not in key and (leaf.scope != Scope.SESSION or (sess == session and open_)):
            rel.append((ts, seq_no, mask, key))
    rel.sort()

    def scoped(ts):
        return leaf.scope != Scope.WITHIN or now - leaf.window_us < ts

    if leaf.kind == Kind.SEQUENCE:
        k = len(leaf.steps)
        for combo in itertools.combinations(rel, k):
            if (all(e[2] >> i & 1 for i, e in enumerate(combo)) and len({e[3] for e in combo}) == 1
                    and (not leaf.within_us or combo[-1][0] - combo[0][0] <= leaf.within_us) and scoped(combo[0][0])):
                return True
        return False
    for a in rel:
        if a[2] & 1 and a[0] + leaf.within_us <= now and scoped(a[0]) and not any(
                b[2] & 2 and b[3] == a[3] and b[:2] > a[:2] and b[0] <= a[0] + leaf.within_us for b in rel):
            return True
    return False


small_filter = st.one_of(st.just(()), st.just(()), st.just(()), st.lists(filter_st, min_size=1, max_size=1).map(tuple))
step_st = st.builds(Step, st.sampled_from([0, 0, 1, 1, 2]), small_filter)


@st.composite
def seq_leaf_st(draw, caps=True):
    kind = draw(st.sampled_from([Kind.SEQUENCE, Kind.ABSENCE]))
    n_steps = 2 if kind == Kind.ABSENCE else draw(st.sampled_from([2, 2, 2, 3, 3, 4, 5]))
    steps = tuple(draw(st.lists(step_st, min_size=n_steps, max_size=n_steps)))
    scope = draw(st.sampled_from(list(Scope)))
    window = draw(st.integers(4, 40)) * S // 2 if scope == Scope.WITHIN else 0
    within = draw(st.integers(1, 20)) * S // 2 if kind == Kind.ABSENCE else draw(st.sampled_from([0, 0, 3 * S, 10 * S]))
    if kind == Kind.ABSENCE and scope == Scope.WITHIN and within >= window:
        within = window // 2
    same = draw(st.sampled_from([(), (), (), ("a",), ("a",), ("b",), ("a", "b")]))
    cap = {} if not caps else dict(reorder=draw(st.integers(1, 4)), values=draw(st.integers(1, 3)),
                                   pending=draw(st.integers(1, 3)))
    return SequenceLeaf(kind, steps, within, same, scope, window, **cap)


@st.composite
def mixed_program_st(draw):
    """Sequence leaves with event leaves beside them (a session spans every model)."""
    n_models = 3
    leaves = draw(st.lists(seq_leaf_st(), min_size=1, max_size=3))
    leaves += [dataclasses.replace(lf, model=lf.model % n_models) for lf in draw(st.lists(leaf_st, max_size=2))]
    leaves = draw(st.permutations(leaves))
    audiences = tuple(((Code.EVENT, j),) for j in range(len(leaves)))
    audiences += (tuple((Code.EVENT, j) for j in range(len(leaves))) + ((Code.AND, len(leaves)),),)
    return Program(tuple(leaves), audiences, 0, draw(st.integers(5, 60)) * S)


dense_event_st = st.tuples(
    st.integers(0, 2), st.integers(-16, 4).map(lambda k: k * S // 2),
    st.fixed_dictionaries({}, optional={"a": st.sampled_from(["x", "y"]), "b": st.sampled_from([True, 1, 1.0, "1"])}),
    st.sampled_from(["", "", "", "s1", "s2"]))


# Bursts of events around now (some late, some ahead), each followed by a checkpoint, as test_evaluator's
# stream_st, with fewer models and values so that steps line up into matches often.
seq_stream_st = st.lists(st.tuples(st.lists(dense_event_st, max_size=5), check_st), min_size=1, max_size=12)
any_stream_st = st.one_of(seq_stream_st, seq_stream_st, stream_st)


def _drive(prog, stream, each):
    comp, ref = CompiledEvaluator(prog), ReferenceEvaluator(prog)
    cs, rs = comp.new_state(), ref.new_state()
    now = 0
    for events, (advance, _) in stream:
        for model, offset, props, sid in events:
            comp.observe(cs, model, now + offset, props, sid)
            ref.observe(rs, model, now + offset, props, sid)
        if advance is None:
            nxt = ref.next_change(rs, now)
            now = nxt if nxt is not None else now + S
        else:
            now += advance
        cs = each(comp, ref, cs, rs, now)
        nxt = comp.next_change(cs, now)
        if nxt is not None and nxt - 1 > now:
            now = nxt - 1
            cs = each(comp, ref, cs, rs, now)
    return comp, ref, cs, rs, now


@settings(max_examples=600, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mixed_program_st(), any_stream_st)
def test_differential(prog, stream):
    def each(comp, ref, cs, rs, now):
        check_agree(comp, ref, cs, rs, prog, now, ())
        return cs
    _drive(prog, stream, each)


@settings(max_examples=400, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mixed_program_st(), any_stream_st, st.randoms(use_true_random=False))
def test_differential_through_dump_and_load(prog, stream, rnd):
    """A state dumped and loaded at random checkpoints answers as if never dumped; dumps are stable."""
    def each(comp, ref, cs, rs, now):
        if rnd.random() < 0.5:
            raw = comp.dump(cs)
            cs = comp.load(raw)
            assert comp.dump(cs) == raw
            assert comp.missing_leaves(raw) == ()
        check_agree(comp, ref, cs, rs, prog, now, ())
        return cs
    _drive(prog, stream, each)


@settings(max_examples=400, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_differential_dense(data):
    """Many events of few values: the reorder buffers fold, the caps bite, timestamps tie."""
    prog = Program(tuple(data.draw(st.lists(seq_leaf_st(), min_size=1, max_size=3))), (), 0,
                   data.draw(st.integers(3, 20)) * S)
    prog = dataclasses.replace(prog, audiences=tuple(((Code.EVENT, j),) for j in range(len(prog.leaves))))
    comp, ref = CompiledEvaluator(prog), ReferenceEvaluator(prog)
    drive_agreeing(data, comp, ref, prog, 0, 6, st.lists(dense_event_st, max_size=10),
                   st.integers(0, 8).map(lambda k: k * S // 2))


@settings(max_examples=300, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(seq_leaf_st(caps=False), st.lists(dense_event_st, max_size=10), st.integers(0, 30))
def test_reference_is_the_definition_below_the_caps(leaf, events, now_half_s):
    """Below the caps the reference forgets nothing: it answers what the definitions say."""
    ref = ReferenceEvaluator(program(dataclasses.replace(leaf, reorder=64, values=64, pending=64), timeout=10 * S))
    s = run(ref, events)
    now = now_half_s * S // 2
    open_ = s.session >= 0 and now < s.session_last_ts + 10 * S
    numbered = [(e.model, e.ts, e.properties, e.session) for e in s.events]  # sessions as the reference numbers them
    assert ref.evaluate(s, now, [])[0] == oracle(leaf, numbered, now, s.session, open_)


@settings(max_examples=300, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mixed_program_st(), any_stream_st, st.integers(0, 11), st.randoms(use_true_random=False))
def test_graft_differential(p2, stream, split, rnd):
    """A backfill's graft (domain/backfill.py) of new sequence leaves: dumped under a program without
    them, loaded under one with them, grafted from a donor that saw the events: as if there all along."""
    keep = [lf for lf in p2.leaves if not isinstance(lf, SequenceLeaf) or rnd.random() < 0.4]
    p1 = Program(tuple(keep), (tuple((Code.EVENT, j) for j in range(len(keep))) + ((Code.OR, len(keep)),),)
                 if keep else (), 0, p2.session_timeout_us)
    old = {state_key(lf) for lf in p1.leaves}
    new = tuple(j for j, lf in enumerate(p2.leaves) if state_key(lf) not in old)
    donor_program = Program(tuple(p2.leaves[j] for j in new), (), 0, p2.session_timeout_us)
    c1, r1, c2, r2 = CompiledEvaluator(p1), ReferenceEvaluator(p1), CompiledEvaluator(p2), ReferenceEvaluator(p2)
    cd, rd = CompiledEvaluator(donor_program), ReferenceEvaluator(donor_program)
    s1c, s1r, uc, dc, dr = c1.new_state(), r1.new_state(), c2.new_state(), cd.new_state(), rd.new_state()
    split %= len(stream)
    now = 0
    lc = lr = None
    for i, (events, (advance, _)) in enumerate(stream):
        states = [(c2, uc)] + ([(c1, s1c), (r1, s1r), (cd, dc), (rd, dr)] if lc is None else [(c2, lc), (r2, lr)])
        for model, offset, props, sid in events:
            for ev, s in states:
                ev.observe(s, model, now + offset, props, sid)
        if advance is None:
            nxt = c2.next_change(uc, now)
            now = nxt if nxt is not None else now + S
        else:
            now += advance
        if lc is None:
            c1.evaluate(s1c, now, [])
            c2.evaluate(uc, now, [])
            if i != split:
                continue
            lc, lr = c2.load(c1.dump(s1c)), r2.load(r1.dump(s1r))
            pairs = [(j, k) for k, j in enumerate(new)]
            c2.graft(lc, dc, pairs)
            r2.graft(lr, dr, pairs)
            lc = c2.load(c2.dump(lc))  # and it survives a round trip
        check_agree(c2, r2, lc, lr, p2, now, ())
        for j, lf in enumerate(p2.leaves):  # (check_agree held the event leaves to the reference)
            if isinstance(lf, SequenceLeaf):
                assert c2.leaf(lc, j, now) == c2.leaf(uc, j, now), (j, lf, now)
