"""Questions about the engine's state that change nothing: previews of drafts, and explanations."""

from __future__ import annotations

import math
import time

import numpy as np

from qualify.evaluator import make_evaluator

from . import backfill
from .compile import compile_audiences, leaf_for
from .conditions import Condition
from .errors import PreviewTooSlow
from .events import ANON, matching_models
from .explain import explain_tree


def preview(engine, txn, condition: Condition, now_us: int, sample: int,
            deadline: float = math.inf) -> tuple[int, list[str]]:
    """How many people qualify now under a draft condition, and some of their keys.

    Reads only ``txn`` (a read snapshot is enough) and what the engine
    replaces whole (its models, its warehouse parts), so it may run on any
    thread beside the writer. Past ``deadline`` (time.monotonic) it raises
    PreviewTooSlow.
    """
    warehouse = engine.warehouse  # one consistent set of columns, even if a sync lands meanwhile
    compiled = compile_audiences([("draft", condition)], engine.model_index, engine.session_timeout_us)
    evaluator = make_evaluator(compiled.program, reference=engine.reference)
    static_arrays, static_missing = warehouse.evaluate(compiled)
    default = warehouse.defaults(compiled, static_arrays)[0].copy()
    members: list[str] = []
    for n, key in enumerate(engine.store.state_keys(txn)):  # everyone with realtime state, as committed
        if n % 256 == 0 and time.monotonic() > deadline:
            raise PreviewTooSlow("the preview did not finish in time; try again when ingest is quieter, "
                                 "or preview a narrower draft")
        state = evaluator.new_state()  # the person's own retained events, replayed into the draft
        for seq in engine.store.person_seqs(txn, key):
            ev = engine.read_event(txn, seq)
            if ev is None:  # older than the log's retention
                continue
            for model, _ in matching_models(ev, engine.models):
                evaluator.observe(state, model, ev.timestamp_us, ev.properties, ev.session_id)
        pid = None if key.startswith(ANON) else engine.store.person_id(txn, key)
        statics = [bool(a[pid]) if pid is not None and pid < len(a) else m for a, m in zip(static_arrays, static_missing)]
        if evaluator.evaluate(state, now_us, statics)[0]:
            members.append(key)
        if pid is not None and pid < len(default):
            default[pid] = False
    count = int(default.sum()) + len(members)
    keys = sorted(members)[:sample]
    for pid in np.flatnonzero(default)[: max(0, sample - len(keys))].tolist():
        k = engine.store.person_key(txn, pid)
        if k is not None:
            keys.append(k)
    return count, keys


def explain(engine, txn, audience_id: str, person_key: str, now_us: int) -> tuple[bool, dict]:
    """Whether the person is a member now, and every node's value with what decides it.

    Like ``preview``, it reads only ``txn`` and what the engine replaces
    whole, so it runs beside the writer: the person's state as committed,
    evaluated by an evaluator of its own (the writer's has scratch buffers),
    with the leaves a walk has not brought them yet grafted from their
    retained events.
    """
    audience = engine.audience(audience_id)
    compiled, epochs, warehouse = engine.compiled, engine.leaf_epochs, engine.warehouse
    evaluator = make_evaluator(compiled.program, reference=engine.reference)
    stored = engine.store.state(txn, person_key)
    state = evaluator.new_state()
    if stored is not None:
        state, missing = evaluator.load_with_missing(stored[3])
        stale = sorted(set(missing) | {j for j, epoch in enumerate(epochs) if epoch > stored[2]})
        if stale:
            backfill.graft(engine, txn, person_key, state, tuple(stale), into=(evaluator, compiled.program))
    pid = stored[1] if stored is not None and stored[1] is not None else (
        None if person_key.startswith(ANON) else engine.store.person_id(txn, person_key))

    def leaf_index(c) -> int:
        return compiled.program.leaves.index(leaf_for(c, engine.model_index))

    tree = explain_tree(audience.condition, evaluator, state, lambda name: warehouse.value(name, pid), leaf_index,
                        now_us)
    bit = engine.bits.index(audience_id)
    return bit in engine.store.membership(txn, person_key), tree
