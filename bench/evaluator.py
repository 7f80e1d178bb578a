"""The evaluator alone, in process: per-event evaluation and the full recompute.

    python -m bench evaluator --json [--audiences 100] [--sequences 33] [--people 1000000] [--events 20000]

* per event: a person's event is observed and every audience is evaluated
  (100 audiences: windowed counts with property filters, sessions,
  aggregates, and --sequences of them sequences and absences over four event
  models, each ANDed with a warehouse bit), timed per call; the same loop with
  an empty program is the floor; ``--sequences 0`` is the earlier mix, all on
  page_views;
* state: the bytes each sequence or absence leaf takes in a person's stored
  state (its section of the dump), per person, after the run; and in memory
  (the run's events replayed into the sequence leaves alone): per leaf before
  its first event, per value record held, and per person per leaf for the
  leaves without ``same`` and with it (``state.in_memory.without_same``);
* full recompute: the warehouse-only parts of every audience, and each
  audience's value for people with no realtime events, over N people,
  vectorised over the attribute columns, as after a sync.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
import time

import numpy as np

from ._stats import percentile

S = 1_000_000
TARGETS = {"event_p99_us_max": 20.0, "recompute_seconds_max": 2.0}
SEQUENCE_BYTES_MAX = 64  # per person per sequence leaf; with same, per value remembered (at most the cap, 8)
FRAMING = 9  # every section's 8-byte key and (here) 1-byte length, whatever the leaf: the codec's, not the leaf's


def sequence_state(evaluator, states: list, leaves: list) -> dict:
    """Bytes each sequence leaf's section takes in each person's dump (8-byte key and length prefix included)."""
    from qualify.evaluator.program import state_key_hash

    from ._state_bytes import section_bytes
    from ._stats import percentile

    keys = {state_key_hash(lf): lf for lf in leaves}
    sizes: dict[bool, list[int]] = {False: [], True: []}
    payload: list[int] = []
    per_value, values_held, total = [], [], []
    for s in states:
        raw = evaluator.dump(s)
        total.append(len(raw))
        for key, (n, n_values) in section_bytes(raw, with_first=True).items():
            if key in keys:
                sizes[bool(keys[key].same)].append(n)
                if not keys[key].same:
                    payload.append(n - FRAMING)
                if keys[key].same and n_values:
                    per_value.append((n - FRAMING) / n_values)
                    values_held.append(n_values)

    def summary(xs: list[int]) -> dict:
        return {"sections": len(xs), "mean_bytes": round(sum(xs) / len(xs), 1) if xs else 0,
                "p50_bytes": percentile(xs, 0.5) if xs else 0, "p99_bytes": percentile(xs, 0.99) if xs else 0,
                "max_bytes": max(xs, default=0)}
    values = max((lf.values for lf in leaves if lf.same), default=0)
    return {"without_same": {**summary(sizes[False]), "payload_p99_bytes": percentile(payload, 0.99) if payload else 0,
                             "payload_max_bytes": max(payload, default=0), "framing_bytes": FRAMING},
            "with_same": {**summary(sizes[True]), "values_cap": values,
                          "max_values_held": max(values_held, default=0),
                          "max_bytes_per_value": round(max(per_value, default=0), 1),
                          "mean_bytes_per_value": round(sum(per_value) / len(per_value), 1) if per_value else 0},
            "dump_bytes_per_person": summary(total), "nbytes_per_person_in_memory": round(
                sum(s.nbytes() for s in states) / len(states), 1)}


def _replay(program, leaves: list, persons: int, log: list):
    """The run's events replayed into a program of ``leaves`` alone: (its evaluator, one state per person)."""
    from qualify.evaluator import CompiledEvaluator
    from qualify.evaluator.program import Code, Program

    ev = CompiledEvaluator(Program(tuple(leaves), tuple(((Code.EVENT, j),) for j in range(len(leaves))),
                                   0, program.session_timeout_us))
    states = [ev.new_state() for _ in range(persons)]
    for p, model, now, props in log:
        ev.observe(states[p], model, now, props, "")
    return ev, states


def _leaf_bytes(program, leaves: list, persons: int, log: list) -> dict:
    """Bytes per person per leaf of ``leaves`` (its place in the block and what it holds beyond, capacity
    included, as nbytes counts it), their value records, and how they are held."""
    from qualify.evaluator import CompiledEvaluator
    from qualify.evaluator.program import Program

    if not leaves:
        return {"leaves": 0}
    ev, states = _replay(program, leaves, persons, log)
    none = CompiledEvaluator(Program((), (), 0, program.session_timeout_us)).new_state().nbytes()
    total = sum(s.nbytes() for s in states) - persons * none
    fresh = ev.new_state().nbytes() - none
    counts = [s.spilled(j) for s in states for j in range(len(leaves))]
    records = sum(c[0] for c in counts)
    out = {"leaves": len(leaves), "bytes_per_leaf_before_first_event": round(fresh / len(leaves), 1),
           "bytes_per_leaf": round(total / (persons * len(leaves)), 1),
           "records_per_leaf": round(records / (persons * len(leaves)), 3),
           "bytes_per_record_held": round(total / records, 1) if records else 0,
           "spilled_records": sum(c[1] for c in counts)}
    if hasattr(states[0], "leaf_nbytes"):  # the inline layout: per leaf, and where each one's state is
        per = [s.leaf_nbytes(j) for s in states for j in range(len(leaves))]
        out["bytes_per_leaf_max"] = max(per)
        out["bytes_per_leaf_p99"] = percentile(per, 0.99)
        layouts: dict[str, int] = {}
        for s in states:
            for j in range(len(leaves)):
                layouts[s.layout(j)] = layouts.get(s.layout(j), 0) + 1
        out["layouts"] = layouts
    return out


def sequence_memory(program, seq_leaves: list, persons: int, log: list) -> dict:
    """The sequence leaves' state in memory: the run's events replayed into a program of those leaves alone.

    Per leaf before its first event (the state block's share), and per value record held (the bytes the
    leaves hold beyond the block, over the records in use; capacity included, as nbytes counts it); then
    the same per person per leaf, for the leaves without same and those with same, each replayed alone
    (``without_same.bytes_per_leaf`` is the figure issue 15's 64-byte bound is about)."""
    from qualify.evaluator import CompiledEvaluator
    from qualify.evaluator.program import Program

    only, states = _replay(program, seq_leaves, persons, log)
    none = CompiledEvaluator(Program((), (), 0, program.session_timeout_us))
    fresh = only.new_state().nbytes()
    held = sum(s.nbytes() for s in states) - persons * fresh
    out = {"bytes_per_leaf_before_first_event": round((fresh - none.new_state().nbytes()) / len(seq_leaves), 1),
           "sequence_bytes_per_person": round((held + persons * fresh) / persons, 1)}
    if hasattr(states[0], "spilled"):  # the packed layout: its records and how many are spilled
        counts = [s.spilled(j) for s in states for j in range(len(seq_leaves))]
        records, spilled = sum(c[0] for c in counts), sum(c[1] for c in counts)
        out.update(records_per_person=round(records / persons, 2), spilled_records=spilled,
                   bytes_per_record=round(held / records, 1) if records else 0,
                   mean_packed_payload_bytes=round(sum(c[2] for c in counts) / (records - spilled), 1)
                   if records > spilled else 0)
        out["without_same"] = _leaf_bytes(program, [lf for lf in seq_leaves if not lf.same], persons, log)
        out["with_same"] = _leaf_bytes(program, [lf for lf in seq_leaves if lf.same], persons, log)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench evaluator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--audiences", type=int, default=100, help="audiences in all (default 100)")
    p.add_argument("--sequences", type=int, default=None,
                   help="how many of them are sequences or absences (default: a third)")
    p.add_argument("--people", type=int, default=1_000_000, help="people in the full recompute (default 1000000)")
    p.add_argument("--persons", type=int, default=1000, help="distinct people receiving events (default 1000)")
    p.add_argument("--events", type=int, default=20_000, help="timed events (default 20000)")
    p.add_argument("--seed", type=int, default=1)
    return p


MODELS = {"page_views": {"path": "STRING", "seconds": "FLOAT"}, "product_views": {"sku": "STRING", "price": "FLOAT"},
          "cart_adds": {"sku": "STRING", "price": "FLOAT"}, "orders": {"sku": "STRING", "total": "FLOAT"}}
MIX = (0.5, 0.25, 0.15, 0.10)  # of page_views, product_views, cart_adds, orders, when there are sequences


def _event(rng: random.Random, mixed: bool) -> tuple[int, dict]:
    paths = ["/pricing", "/home", "/docs", "/blog", "/cart"]
    model = rng.choices(range(4), MIX)[0] if mixed else 0
    if model == 0:
        return 0, {"path": paths[rng.randrange(5)], "seconds": float(rng.randint(1, 60))}
    sku = f"sku-{rng.randrange(20):02d}"
    return model, {"sku": sku, ("total" if model == 3 else "price"): float(rng.randint(1, 200))}


def per_event(evaluator, n_static: int, persons: int, events: int, by_model: list[int], rng: random.Random,
              mixed: bool = False, states: list | None = None, log: list | None = None) -> dict:
    states = states if states is not None else []
    states[:] = [evaluator.new_state() for _ in range(persons)]
    statics = [[bool(rng.getrandbits(1)) for _ in range(n_static)] for _ in range(persons)]
    now = 1_800_000_000 * S
    times = []
    perf = time.perf_counter_ns
    for i in range(events):
        p = rng.randrange(persons)
        now += rng.randint(0, 2 * S)
        model, props = _event(rng, mixed)
        if log is not None:
            log.append((p, model, now, props))
        t0 = perf()
        evaluator.observe(states[p], model, now, props, "")
        values = evaluator.evaluate(states[p], now, statics[p])
        evaluator.next_change(states[p], now)
        times.append((perf() - t0) / 1000)
        assert len(values) == len(by_model)
    return {"p50_us": round(percentile(times, 0.5), 2), "p90_us": round(percentile(times, 0.9), 2),
            "p99_us": round(percentile(times, 0.99), 2), "p999_us": round(percentile(times, 0.999), 2),
            "mean_us": round(sum(times) / len(times), 2), "events": events}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from qualify.evaluator import make_evaluator

    from ._audiences import audience_definitions, sequence_definitions
    from qualify.evaluator.program import SequenceLeaf
    from qualify.server.domain.compile import compile_audiences
    from qualify.server.domain.conditions import parse_condition
    from qualify.server.domain.schema import ValueType
    from qualify.server.domain.static import Column, evaluate_static, without_events

    n_seq = args.audiences // 3 if args.sequences is None else min(args.sequences, args.audiences)
    attrs = {"plan": ValueType.STRING, "ltv": ValueType.FLOAT, "country": ValueType.STRING}
    models = {m: {p: ValueType[t] for p, t in props.items()} for m, props in MODELS.items()}
    index = {m: i for i, m in enumerate(MODELS)}
    defs = (audience_definitions(args.audiences - n_seq, aggregate_property="seconds")
            + sequence_definitions(n_seq, offset=args.audiences - n_seq))
    compiled = compile_audiences([(f"a{i}", parse_condition(d, attrs, models)) for i, d in enumerate(defs)],
                                 index, 30 * 60 * S)
    empty = compile_audiences([], index, 30 * 60 * S)
    seq_leaves = [lf for lf in compiled.program.leaves if isinstance(lf, SequenceLeaf)]
    out = {"scenario": "evaluator", "date": datetime.date.today().isoformat(),
           "config": {"audiences": args.audiences, "sequence_audiences": n_seq,
                      "event_leaves": len(compiled.program.leaves), "sequence_leaves": len(seq_leaves),
                      "static_leaves": len(compiled.statics), "persons": args.persons, "events": args.events,
                      "people": args.people, "event_mix": dict(zip(MODELS, MIX)) if n_seq else {"page_views": 1.0}}}
    for name, reference in (("compiled", False), ("reference", True)):
        n = args.events if not reference else max(1000, args.events // 20)
        states: list = []
        log: list = []
        evaluator = make_evaluator(compiled.program, reference)
        out[name] = per_event(evaluator, len(compiled.statics), args.persons, n, list(range(args.audiences)),
                              random.Random(args.seed), mixed=n_seq > 0, states=states, log=log)
        if not reference and seq_leaves:
            out["state"] = sequence_state(evaluator, states, seq_leaves)
            out["state"]["in_memory"] = sequence_memory(compiled.program, seq_leaves, args.persons, log)
    out["floor"] = per_event(make_evaluator(empty.program), 0, args.persons, args.events, [], random.Random(args.seed),
                             mixed=n_seq > 0)

    # Full recompute over N people, as after a warehouse sync.
    n = args.people
    words = ("free", "starter", "pro", "enterprise")
    countries = ("US", "GB", "DE", "FR", "CA", "JP", "BR", "IN", "AU")
    nrng = np.random.default_rng(args.seed)
    columns = {
        "plan": Column(ValueType.STRING, nrng.integers(0, len(words), n).astype(np.int32), np.ones(n, np.uint8), words),
        "ltv": Column(ValueType.FLOAT, nrng.random(n) * 5000, (nrng.random(n) > 0.05).astype(np.uint8)),
        "country": Column(ValueType.STRING, nrng.integers(0, len(countries), n).astype(np.int32), np.ones(n, np.uint8), countries),
    }
    t0 = time.perf_counter()
    static = [evaluate_static(c, columns, n) for c in compiled.statics]
    t_static = time.perf_counter() - t0
    t1 = time.perf_counter()
    without_events(compiled.program, static, n)  # each audience's value for people with no realtime state
    t_default = time.perf_counter() - t1
    out["recompute"] = {"people": n, "static_subtrees": len(compiled.statics), "statics_seconds": round(t_static, 3),
                        "audience_defaults_seconds": round(t_default, 3), "seconds": round(t_static + t_default, 3)}
    out["targets"] = {**TARGETS, "pass": {
        "event_p99": out["compiled"]["p99_us"] <= TARGETS["event_p99_us_max"],
        "recompute": out["recompute"]["seconds"] <= TARGETS["recompute_seconds_max"]}}
    if "state" in out:
        st = out["state"]
        out["targets"]["sequence_state_bytes_max"] = SEQUENCE_BYTES_MAX
        out["targets"]["pass"]["sequence_state"] = (st["without_same"]["payload_max_bytes"] <= SEQUENCE_BYTES_MAX
                                                    and st["with_same"]["max_bytes_per_value"] <= SEQUENCE_BYTES_MAX)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _print_summary(out, args.audiences)
    return 0



def _print_summary(out: dict, audiences: int) -> None:
    """The run's figures as text (without --json)."""
    c, r = out["compiled"], out["recompute"]
    print(f"per event, {audiences} audiences: p50 {c['p50_us']} µs, p99 {c['p99_us']} µs "
          f"(floor p99 {out['floor']['p99_us']} µs; reference p99 {out['reference']['p99_us']} µs)")
    print(f"full recompute of {r['people']:,} people: {r['seconds']} s")
    if "state" in out:
        w, n = out["state"]["with_same"], out["state"]["without_same"]
        print(f"state per person per sequence leaf: without same p99 {n['payload_p99_bytes']} B, max "
              f"{n['payload_max_bytes']} B (+ {n['framing_bytes']} B of section framing); "
              f"with same max {w['max_bytes']} B for {w['max_values_held']} values (cap {w['values_cap']}), "
              f"at most {w['max_bytes_per_value']} B per value (target {SEQUENCE_BYTES_MAX} B)")
        m = out["state"]["in_memory"].get("without_same", {})
        if m.get("leaves"):
            print(f"in memory per person per sequence leaf without same: {m['bytes_per_leaf']} B mean"
                  + (f", max {m['bytes_per_leaf_max']} B, {m['layouts']}" if "layouts" in m else "")
                  + f"; nbytes per person {out['state']['nbytes_per_person_in_memory']} B")


if __name__ == "__main__":
    sys.exit(main())
