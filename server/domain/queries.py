"""Questions about the engine's state that change nothing: previews of drafts, and explanations."""

from __future__ import annotations

import math
import time

import numpy as np

from qualify.evaluator import make_evaluator

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
    """Whether the person is a member now, and every node's value with what decides it."""
    audience = engine.audience(audience_id)
    slot = engine._slot(person_key, txn) if engine._has_state(txn, person_key) else None
    state = engine.states[slot] if slot is not None else engine.evaluator.new_state()
    pid = engine.pids[slot] if slot is not None else (
        None if person_key.startswith(ANON) else engine.store.person_id(txn, person_key))

    def leaf_index(c) -> int:
        return engine.compiled.program.leaves.index(leaf_for(c, engine.model_index))

    tree = explain_tree(audience.condition, engine.evaluator, state, lambda name: engine.warehouse.value(name, pid),
                        leaf_index, now_us)
    return engine.is_member(txn, person_key, audience_id) is not None, tree

