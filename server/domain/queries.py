"""Questions about the engine's state that change nothing: previews of drafts, and explanations."""

from __future__ import annotations

import math
import time

import numpy as np

from qualify.evaluator import make_evaluator
from qualify.evaluator.program import state_key_hash

from . import backfill
from .compile import compile_audiences, leaf_for
from .conditions import Condition
from .errors import PreviewTooSlow
from .events import ANON
from .explain import explain_tree


def preview(engine, txn, condition: Condition, now_us: int, sample: int,
            deadline: float = math.inf) -> tuple[int, list[str]]:
    """How many people qualify now under a draft condition, and some of their keys.

    Reads only ``txn`` (a read snapshot is enough) and what the engine
    replaces whole (its models, its warehouse parts, its program's epochs),
    so it may run on any thread beside the writer. A draft's leaf whose
    state the program keeps is read from each person's stored state, as a
    live audience's would be; only the others (a new window, say) replay the
    person's retained events (``backfill.graft``). Past ``deadline``
    (time.monotonic) it raises PreviewTooSlow.
    """
    warehouse, epochs = engine.warehouse, engine.epoch_keys  # each replaced whole: one consistent set
    compiled = compile_audiences([("draft", condition)], engine.model_index, engine.session_timeout_us)
    program = compiled.program
    evaluator = make_evaluator(program, reference=engine.reference)
    leaf_keys = [format(state_key_hash(leaf), "016x") for leaf in program.leaves]  # as engine.epoch_keys
    static_arrays, static_missing = warehouse.evaluate(compiled)
    default = warehouse.defaults(compiled, static_arrays)[0].copy()
    members: list[str] = []
    grafters: dict = {}
    for n, (key, (_, pid, generation, raw)) in enumerate(engine.store.stored_states(txn)):
        if n % 64 == 0:
            if time.monotonic() > deadline:
                raise PreviewTooSlow("the preview did not finish in time; try again when ingest is quieter, "
                                     "or preview a narrower draft")
            # The loop holds the GIL between LMDB calls: hand it to the writer and the event loop every few
            # hundred microseconds, or an acknowledgement waits out a whole switch interval (5 ms) each time.
            time.sleep(0)
        state, missing = evaluator.load_with_missing(raw)
        stale = sorted(set(missing) | {j for j, k in enumerate(leaf_keys) if epochs.get(k, math.inf) > generation})
        if stale:  # leaves the program lacks, or learned after this state was stored
            backfill.graft(engine, txn, key, state, tuple(stale), into=(evaluator, program), grafters=grafters)
        if pid is None and not key.startswith(ANON):
            pid = engine.store.person_id(txn, key)
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
