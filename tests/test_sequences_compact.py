"""Sequence and absence leaves, the packed in-memory records (_sequences.pxi): the fallbacks.

A value record lives packed in a 64-byte slot while its payload fits, and
spilled to the heap when it does not (a long ``same`` key, timestamps or
arrival numbers far apart, many buffered events). Both forms must answer
exactly as the reference does, move between each other as records grow and
shrink, survive eviction at the values cap, dumps and grafts, and read the
state dumped before the packing (the stored format is unchanged).
"""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qualify.evaluator import CompiledEvaluator
from qualify.evaluator.program import Code, Kind, Program, Scope, SequenceLeaf
from qualify.evaluator.reference import ReferenceEvaluator

from test_evaluator import check_agree, drive_agreeing
from test_sequences import S, absence, program, seq
from test_sequences_differential import step_st

VIEW, CART = 0, 1
LONG = "k" * 70  # a key longer than a slot's payload


def _agree(prog, events, nows):
    comp, ref = CompiledEvaluator(prog), ReferenceEvaluator(prog)
    cs, rs = comp.new_state(), ref.new_state()
    for e in events:
        comp.observe(cs, e[0], e[1], e[2], "")
        ref.observe(rs, e[0], e[1], e[2], "")
    for now in nows:
        check_agree(comp, ref, cs, rs, prog, now, ())
        raw = comp.dump(cs)
        assert comp.dump(comp.load(raw)) == raw
        check_agree(comp, ref, comp.load(raw), rs, prog, now, ())
    return comp, cs


def test_a_long_key_spills_and_answers_alike():
    prog = program(seq(VIEW, CART, same=("sku",)))
    comp, cs = _agree(prog, [(VIEW, 10 * S, {"sku": LONG}), (VIEW, 11 * S, {"sku": "a"}), (CART, 12 * S, {"sku": LONG})],
                      [12 * S, 20 * S])
    assert cs.spilled(0)[:2] == (2, 1)
    assert comp.leaf(cs, 0, 13 * S).holds
    assert comp.load(comp.dump(cs)).spilled(0)[:2] == (2, 1)


def test_far_timestamps_spill_then_pack_again():
    """Events of one value days and years apart make its payload too big; once they fold out, it packs again."""
    leaf = seq(VIEW, CART, VIEW, reorder=8)
    far = [(VIEW if i % 2 else CART, i * (1 << 52), {}) for i in range(8)]
    comp, cs = _agree(program(leaf), far, [8 << 52])
    assert cs.spilled(0)[:2] == (1, 1)
    t = 8 << 52
    near = [(CART if i % 3 else VIEW, t + i, {}) for i in range(1, 9)]  # folds every far event into the summary
    for e in near:
        comp.observe(cs, e[0], e[1], e[2], "")
    assert cs.spilled(0)[:2] == (1, 0)
    _agree(program(leaf), far + near, [t + 9, t + 100 * S])


def test_arrival_numbers_far_apart():
    """A value's buffered events separated by many other events: large arrival deltas stay exact."""
    prog = program(absence(CART, VIEW, 5 * S, same=("sku",), reorder=4, values=2), seq(VIEW, CART, within=3 * S))
    events = [(CART, 10 * S, {"sku": "a"})] + [(VIEW, 10 * S + i, {"sku": "b"}) for i in range(1, 3000)]
    events += [(CART, 11 * S, {"sku": "a"}), (CART, 10 * S, {"sku": "a"})]
    _agree(prog, events, [11 * S, 15 * S + 1, 16 * S + 1])


def test_eviction_at_the_cap_frees_spilled_records():
    prog = program(absence(CART, VIEW, 5 * S, same=("sku",), values=2))
    ev = CompiledEvaluator(prog)
    s = ev.new_state()
    ev.observe(s, CART, 1 * S, {"sku": LONG}, "")
    ev.observe(s, CART, 2 * S, {"sku": "b"}, "")
    assert s.spilled(0)[:2] == (2, 1)
    big = s.nbytes()
    ev.observe(s, CART, 3 * S, {"sku": "c"}, "")  # evicts LONG, the value seen longest ago
    assert s.spilled(0)[:2] == (2, 0)
    assert s.nbytes() < big
    ev.observe(s, CART, 0, {"sku": LONG + "x"}, "")  # older than both: forgotten at once
    assert s.spilled(0)[:2] == (2, 0)
    _agree(prog, [(CART, 1 * S, {"sku": LONG}), (CART, 2 * S, {"sku": "b"}), (CART, 3 * S, {"sku": "c"}),
                  (CART, 0, {"sku": LONG + "x"}), (VIEW, 4 * S, {"sku": "b"})], [6 * S, 8 * S + 1, 9 * S])


def test_a_record_is_64_bytes_and_a_new_leaf_8():
    leaves = [seq(VIEW, CART, same=("sku",)), absence(CART, VIEW, 30 * 60 * S, same=("sku",), scope=Scope.WITHIN,
                                                      window=24 * 3600 * S)]
    for leaf in leaves:
        ev = CompiledEvaluator(program(leaf))
        s = ev.new_state()
        fresh = s.nbytes()
        t = 1_800_000_000 * S
        for k in range(8):
            for i in range(4):  # a full reorder buffer of events minutes apart, and pending anchors
                ev.observe(s, [VIEW, CART][i % 2], t + (k * 4 + i) * 97 * S + 12345, {"sku": f"sku-{k:02d}"}, "")
        assert s.spilled(0)[:2] == (8, 0)
        assert s.nbytes() - fresh == 48 + 8 * 64  # its QState and 8 records
    ev = CompiledEvaluator(program(*leaves))
    assert ev.new_state().nbytes() == CompiledEvaluator(program()).new_state().nbytes() + 2 * 8


# ---------------------------------------------------------------- state dumped before the packing

# golden_events' state as the unpacked layout (commit 084d493) dumped it: the stored format is unchanged.
GOLDEN_084d493 = bytes.fromhex(
    "01020080808080808080040b80808080808080fcff01040d852eb403bc0788b301040302016104ffdb97fcffffff038201c0"
    "cc8d08e10180dac409c202c0c7b9ecffffff01e20201fff685ffffffff034802466b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b"
    "6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b"
    "6b6b6b02ffed8bfeffffff0342c0843d61000302016202ffd29dfbffffff03c101c0c39307a201000302016302ffb982ebff"
    "ffff03820280d1ca08a102001df58b18e237e545af01040302016104ffdb97fcffffff038101c0cc8d08e20180dac409c102"
    "c0c7b9ecffffff01e10200004802466b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b"
    "6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b02ffed8bfeffffff0341c0843d6200"
    "000302016202ffd29dfbffffff03c201c0c39307a10100000302016302ffb982ebffffff03810280d1ca08a2020000966f16"
    "dc2e0316d530010002ff8ef3d8ffffff03c202c0c7b9ecffffff01e20207ff97edd9ffffff03ffc2fcebffffff03ffc2fceb"
    "ffffff0393fad189f1b0b14224010004ffb982ebffffff03810280d1ca08a202c0843dc102c0c7b9ecffffff01e10200006c"
    "ea235c"
)


def golden_events():
    prog = program(seq(VIEW, CART, same=("sku",)),
                   absence(CART, VIEW, 5 * S, same=("sku",), scope=Scope.WITHIN, window=60 * S),
                   seq(VIEW, CART, VIEW, within=30 * S, reorder=2), absence(CART, VIEW, 3 * S))
    events = [(VIEW, 1 * S, {"sku": "a"}), (CART, 2 * S, {"sku": LONG}), (VIEW, 3 * S, {"sku": LONG}),
              (CART, 4 * S, {"sku": "a"}), (CART, 20 * S, {"sku": "b"}), (VIEW, 5 * S, {"sku": "b"}),
              (VIEW, 21 * S, {"sku": "a"}), (CART, 22 * S, {"sku": "c"}), (VIEW, 40 * S, {"sku": "c"}),
              (CART, 41 * S, {"sku": "a"}), (CART, 1 << 50, {"sku": "a"})]
    return prog, events


def test_state_dumped_before_the_packing_loads_and_dumps_alike():
    prog, events = golden_events()
    comp, ref = CompiledEvaluator(prog), ReferenceEvaluator(prog)
    loaded, cs, rs = comp.load(GOLDEN_084d493), comp.new_state(), ref.new_state()
    for e in events:
        comp.observe(cs, e[0], e[1], e[2], "")
        ref.observe(rs, e[0], e[1], e[2], "")
    assert comp.dump(loaded) == GOLDEN_084d493 == comp.dump(cs)
    for now in (41 * S, 46 * S + 1, 100 * S, (1 << 50) + 10 * S):
        check_agree(comp, ref, loaded, rs, prog, now, ())
    assert loaded.spilled(0)[1] == 1  # the long key's record


# ---------------------------------------------------------------- property

far_offset = st.one_of(st.integers(-16, 4).map(lambda k: k * S // 2), st.integers(-(1 << 33), 1 << 33),
                       st.integers(-(1 << 52), 1 << 52))
far_event_st = st.tuples(
    st.sampled_from([0, 0, 1, 1, 2]), far_offset,
    st.fixed_dictionaries({}, optional={"a": st.sampled_from(["x", "y", LONG, LONG + "y", "é" * 40]),
                                        "b": st.sampled_from([True, 1, 2.5, "1"])}))


@st.composite
def wide_leaf_st(draw):
    """Leaves whose records often do not fit a slot: long keys, many buffered events, five steps."""
    kind = draw(st.sampled_from([Kind.SEQUENCE, Kind.ABSENCE]))
    n_steps = 2 if kind == Kind.ABSENCE else draw(st.sampled_from([2, 3, 5]))
    steps = tuple(draw(st.lists(step_st, min_size=n_steps, max_size=n_steps)))
    scope = draw(st.sampled_from([Scope.WITHIN, Scope.EVER, Scope.EVER]))
    window = draw(st.sampled_from([20 * S, 1 << 34, 1 << 53])) if scope == Scope.WITHIN else 0
    within = (draw(st.sampled_from([S, 10 * S, 1 << 32, 1 << 51])) if kind == Kind.ABSENCE
              else draw(st.sampled_from([0, 3 * S, 1 << 33])))
    if kind == Kind.ABSENCE and scope == Scope.WITHIN and within >= window:
        within = window // 2
    same = draw(st.sampled_from([(), ("a",), ("a",), ("a", "b")]))
    return SequenceLeaf(kind, steps, within, same, scope, window, reorder=draw(st.sampled_from([1, 2, 4, 8, 12])),
                        values=draw(st.integers(1, 4)), pending=draw(st.integers(1, 6)))


@settings(max_examples=300, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_differential_far_apart_and_long_keys(data):
    """Timestamps far apart (so payloads outgrow their slots and shrink back), long keys, eviction at the cap;
    through dumps and loads at random checkpoints and a graft at the end."""
    leaves = tuple(data.draw(st.lists(wide_leaf_st(), min_size=1, max_size=3)))
    prog = Program(leaves, tuple(((Code.EVENT, j),) for j in range(len(leaves))), 0, 1 << 40)
    comp, ref = CompiledEvaluator(prog), ReferenceEvaluator(prog)
    now = data.draw(st.sampled_from([0, 1_800_000_000 * S, -(1 << 50), 1 << 58]))
    cs, now = drive_agreeing(data, comp, ref, prog, now, 5, st.lists(far_event_st.map(lambda e: (*e, "")), max_size=14),
                             far_offset.map(abs), dumps=True)
    gs = comp.new_state()
    comp.graft(gs, cs, [(j, j) for j in range(len(leaves))])
    for j in range(len(leaves)):
        assert comp.leaf(gs, j, now) == comp.leaf(cs, j, now)
        assert comp.progress(gs, j, now) == comp.progress(cs, j, now)


def test_the_differential_case_spills():
    """The property above does reach spilled records (else it would not test the fallback)."""
    leaf = dataclasses.replace(seq(VIEW, CART, same=("a",)), reorder=12)
    ev = CompiledEvaluator(program(leaf))
    s = ev.new_state()
    for i in range(12):
        ev.observe(s, VIEW, i * (1 << 52), {"a": "x"}, "")
    assert s.spilled(0)[:2] == (1, 1)
