"""Sequence and absence leaves without ``same``: the one value record inline in 64 bytes (_sequences.pxi).

Such a leaf's place in a person's block is 64 bytes, whatever its state: its
one record packed there with its bases and the value's cache while they fit,
else spilled to the heap in the layout of the leaves with ``same`` (a QState
and one slot) and packed inline again once it fits. Spilling costs space,
never answers: every form must answer as the reference does, move between
the others as the record grows and shrinks, and survive dumps, loads and
grafts unchanged.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qualify.evaluator import CompiledEvaluator
from qualify.evaluator.program import Code, Kind, Program, Scope, SequenceLeaf
from qualify.evaluator.reference import ReferenceEvaluator

from test_evaluator import check_agree, drive_agreeing
from test_sequences import MIN, S, TIMEOUT, absence, program, seq
from test_sequences_differential import step_st

VIEW, CART, ORDER = 0, 1, 2
T0 = 1_800_000_000 * S
HOUR = 60 * MIN
INLINE = 64  # a leaf without same, in the block
SPILLED_SLOT = INLINE + 48 + 4 + 60  # + a QState with one hash and one slot (the record packed in it)
NO_LEAVES = CompiledEvaluator(program()).new_state().nbytes()

# Leaves like the bench's (bench/_audiences.py), without same, in every scope.
LEAVES = (absence(CART, ORDER, 30 * MIN, scope=Scope.WITHIN, window=24 * HOUR),
          seq(VIEW, CART, within=10 * MIN, scope=Scope.WITHIN, window=6 * HOUR),
          seq(VIEW, VIEW, CART, within=20 * MIN, scope=Scope.SESSION),
          absence(VIEW, CART, 15 * MIN),
          seq(VIEW, CART, ORDER, VIEW, CART))


def _check(comp, ref, cs, rs, prog, nows):
    """Agreement with the reference at each instant, and through a dump and load: the same bytes, the same
    layout and bytes per leaf."""
    for now in nows:
        check_agree(comp, ref, cs, rs, prog, now, ())
        raw = comp.dump(cs)
        loaded = comp.load(raw)
        assert comp.dump(loaded) == raw
        for j in range(len(prog.leaves)):
            assert (loaded.layout(j), loaded.leaf_nbytes(j)) == (cs.layout(j), cs.leaf_nbytes(j))
        check_agree(comp, ref, loaded, rs, prog, now, ())


def test_a_leaf_without_same_is_64_bytes_inline():
    """64 bytes per leaf before its first event and with its record, and nothing beyond the block, over a
    person's events minutes apart (this fails if the records stop being inline)."""
    prog = program(*LEAVES)
    comp, ref = CompiledEvaluator(prog), ReferenceEvaluator(prog)
    cs, rs = comp.new_state(), ref.new_state()
    assert cs.nbytes() == NO_LEAVES + INLINE * len(LEAVES)
    assert [(cs.layout(j), cs.leaf_nbytes(j)) for j in range(len(LEAVES))] == [("empty", INLINE)] * len(LEAVES)
    t = T0
    for i in range(300):
        t += (37 + 13 * (i % 7)) * 7 * S  # 4 to 13 minutes apart: one session
        model = [VIEW, CART, VIEW, ORDER, CART, VIEW][i % 6]
        comp.observe(cs, model, t, {}, "")
        ref.observe(rs, model, t, {}, "")
        comp.evaluate(cs, t, ())
        comp.next_change(cs, t)
        assert cs.nbytes() == NO_LEAVES + INLINE * len(LEAVES)
        if i >= 3:
            assert [cs.layout(j) for j in range(len(LEAVES))] == ["inline"] * len(LEAVES)
            assert [cs.spilled(j)[:2] for j in range(len(LEAVES))] == [(1, 0)] * len(LEAVES)
        if i % 50 == 49:
            _check(comp, ref, cs, rs, prog, [t, t + 10 * MIN, t + 31 * MIN, t + 7 * HOUR])


def test_a_record_outgrows_its_inline_bytes_and_comes_back():
    """Events ever farther apart make the one record too big for its inline bytes: it spills, first to a
    slot on the heap, then out of that slot too; once near events fold the far ones out of its buffer it
    is inline again. Every step answers as the reference, through dumps and loads."""
    prog = program(seq(VIEW, CART, VIEW, reorder=8))
    comp, ref = CompiledEvaluator(prog), ReferenceEvaluator(prog)
    cs, rs = comp.new_state(), ref.new_state()
    t = T0
    seen = []
    for bits in [20] * 8 + [24] * 8 + [41] * 8 + [0] * 9:  # a second, 16 s, 25 days, 1 µs apart
        t += 1 << bits if bits else 1
        model = CART if len(seen) % 3 else VIEW
        comp.observe(cs, model, t, {}, "")
        ref.observe(rs, model, t, {}, "")
        seen.append((cs.layout(0), cs.leaf_nbytes(0)))
        _check(comp, ref, cs, rs, prog, [t, t + (1 << 50)])
    layouts = [x[0] for x in seen]
    first_spill = layouts.index("spilled")
    assert set(layouts[:first_spill]) == {"inline"} and first_spill >= 8
    assert seen[first_spill] == ("spilled", SPILLED_SLOT)  # the record in the heap QState's slot
    assert any(lay == "spilled" and n > SPILLED_SLOT for lay, n in seen)  # and out of it too
    back = layouts.index("inline", first_spill)
    assert seen[back - 1] == ("spilled", SPILLED_SLOT) and set(layouts[back:]) == {"inline"}
    assert all(n == INLINE for lay, n in seen if lay == "inline")


def test_a_session_leaf_inline_across_sessions():
    """A SESSION leaf keeps its session in its inline bytes: a new session clears the record, and a dump
    of a session that is over is empty."""
    prog = program(seq(VIEW, CART, within=5 * MIN, scope=Scope.SESSION),
                   absence(CART, ORDER, 2 * MIN, scope=Scope.SESSION))
    comp, ref = CompiledEvaluator(prog), ReferenceEvaluator(prog)
    cs, rs = comp.new_state(), ref.new_state()
    t = T0
    for k in range(5):
        for i, model in enumerate([VIEW, CART, VIEW, CART, ORDER, CART]):
            t += (20 + 17 * i) * S
            comp.observe(cs, model, t, {}, f"s{k}")
            ref.observe(rs, model, t, {}, f"s{k}")
        assert [cs.layout(j) for j in range(2)] == ["inline", "inline"]
        _check(comp, ref, cs, rs, prog, [t, t + MIN, t + 3 * MIN, t + TIMEOUT + 1])
        t += TIMEOUT + k * HOUR  # the next session


def test_graft_keeps_inline_and_spilled_records():
    leaves = (seq(VIEW, CART, within=10 * MIN), seq(VIEW, CART, VIEW, reorder=8))
    prog = program(*leaves)
    comp = CompiledEvaluator(prog)
    cs = comp.new_state()
    for i in range(8):
        comp.observe(cs, [VIEW, CART][i % 2], T0 + i * (1 << 48), {}, "")  # leaf 1's record: far apart
    comp.observe(cs, VIEW, T0 + 8 * (1 << 48), {}, "")
    assert [cs.layout(j) for j in range(2)] == ["inline", "spilled"]
    gs = comp.new_state()
    comp.graft(gs, cs, [(0, 0), (1, 1)])
    now = T0 + 9 * (1 << 48)
    for j in range(2):
        assert (gs.layout(j), gs.leaf_nbytes(j)) == (cs.layout(j), cs.leaf_nbytes(j))
        assert comp.leaf(gs, j, now) == comp.leaf(cs, j, now)
        assert comp.progress(gs, j, now) == comp.progress(cs, j, now)


# ---------------------------------------------------------------- property

near_or_far = st.one_of(st.integers(-8, 8).map(lambda k: k * S * 7), st.integers(-(1 << 30), 1 << 30),
                        st.integers(-(1 << 44), 1 << 44), st.integers(-(1 << 52), 1 << 52))
event_st = st.tuples(st.sampled_from([0, 0, 1, 1, 2]), near_or_far,
                     st.fixed_dictionaries({}, optional={"a": st.sampled_from(["x", "y"]),
                                                         "b": st.sampled_from([True, 1, 2.5, "1"])}),
                     st.sampled_from(["", "", "s1", "s2"]))


@st.composite
def lone_leaf_st(draw):
    """Leaves without same, in every scope, with caps that make records from a few bytes to past a slot."""
    kind = draw(st.sampled_from([Kind.SEQUENCE, Kind.ABSENCE]))
    n_steps = 2 if kind == Kind.ABSENCE else draw(st.sampled_from([2, 3, 5]))
    steps = tuple(draw(st.lists(step_st, min_size=n_steps, max_size=n_steps)))
    scope = draw(st.sampled_from(list(Scope)))
    window = draw(st.sampled_from([20 * S, 1 << 34, 1 << 45])) if scope == Scope.WITHIN else 0
    within = (draw(st.sampled_from([S, 10 * S, 1 << 32, 1 << 44])) if kind == Kind.ABSENCE
              else draw(st.sampled_from([0, 3 * S, 1 << 33])))
    if kind == Kind.ABSENCE and scope == Scope.WITHIN and within >= window:
        within = window // 2
    return SequenceLeaf(kind, steps, within, (), scope, window, reorder=draw(st.sampled_from([1, 2, 4, 8])),
                        values=draw(st.integers(1, 8)), pending=draw(st.integers(1, 6)))


@settings(max_examples=600, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_differential_inline_and_spilled(data):
    """Leaves without same whose records cross between inline and spilled (offsets near and far), in
    sessions; against the reference at each query, through dumps and loads, and a graft at the end."""
    leaves = tuple(data.draw(st.lists(lone_leaf_st(), min_size=1, max_size=3)))
    prog = Program(leaves, tuple(((Code.EVENT, j),) for j in range(len(leaves))), 0,
                   data.draw(st.sampled_from([TIMEOUT, 1 << 40])))
    comp, ref = CompiledEvaluator(prog), ReferenceEvaluator(prog)
    cs, now = drive_agreeing(data, comp, ref, prog, data.draw(st.sampled_from([0, T0, -(1 << 50)])), 5,
                             st.lists(event_st, max_size=14), near_or_far.map(abs), dumps=True)
    gs = comp.new_state()  # (no session: a SESSION leaf's records are not grafted into it)
    comp.graft(gs, cs, [(j, j) for j in range(len(leaves))])
    for j in range(len(leaves)):
        assert cs.layout(j) in ("empty", "inline", "spilled")
        if leaves[j].scope != Scope.SESSION:
            assert comp.leaf(gs, j, now) == comp.leaf(cs, j, now)
            assert comp.progress(gs, j, now) == comp.progress(cs, j, now)
            assert gs.layout(j) in ("empty", "inline", "spilled")  # (arrival numbers shifted: maybe not cs's)


def test_the_differential_case_reaches_every_layout():
    """The property above reaches spilled records and inline ones (else it would not test the moves)."""
    leaf = seq(VIEW, CART, reorder=8)
    comp = CompiledEvaluator(program(leaf))
    s = comp.new_state()
    layouts = set()
    for i in range(12):
        comp.observe(s, VIEW, T0 + i * (1 << 44), {}, "")
        layouts.add(s.layout(0))
    assert layouts == {"inline", "spilled"}
