"""The evaluator alone, in process: per-event evaluation and the full recompute.

    python -m bench evaluator --json [--audiences 100] [--people 1000000] [--events 20000]

* per event: a person's event is observed and the audiences on its model are
  evaluated (100 audiences over one event model: windowed counts with
  property filters, sessions, aggregates, each ANDed with a warehouse bit),
  timed per call; the same loop with an empty program is the floor;
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench evaluator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--audiences", type=int, default=100, help="audiences on the event's model (default 100)")
    p.add_argument("--people", type=int, default=1_000_000, help="people in the full recompute (default 1000000)")
    p.add_argument("--persons", type=int, default=1000, help="distinct people receiving events (default 1000)")
    p.add_argument("--events", type=int, default=20_000, help="timed events (default 20000)")
    p.add_argument("--seed", type=int, default=1)
    return p


def per_event(evaluator, n_static: int, persons: int, events: int, by_model: list[int], rng: random.Random) -> dict:
    states = [evaluator.new_state() for _ in range(persons)]
    statics = [[bool(rng.getrandbits(1)) for _ in range(n_static)] for _ in range(persons)]
    paths = ["/pricing", "/home", "/docs", "/blog", "/cart"]
    now = 1_800_000_000 * S
    times = []
    perf = time.perf_counter_ns
    for i in range(events):
        p = rng.randrange(persons)
        now += rng.randint(0, 2 * S)
        props = {"path": paths[rng.randrange(5)], "seconds": float(rng.randint(1, 60))}
        t0 = perf()
        evaluator.observe(states[p], 0, now, props, "")
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

    from ._audiences import audience_definitions
    from qualify.server.domain.compile import compile_audiences
    from qualify.server.domain.conditions import parse_condition
    from qualify.server.domain.schema import ValueType
    from qualify.server.domain.static import Column, evaluate_static, without_events

    attrs = {"plan": ValueType.STRING, "ltv": ValueType.FLOAT, "country": ValueType.STRING}
    models = {"page_views": {"path": ValueType.STRING, "seconds": ValueType.FLOAT}}
    defs = audience_definitions(args.audiences, aggregate_property="seconds")
    compiled = compile_audiences([(f"a{i}", parse_condition(d, attrs, models)) for i, d in enumerate(defs)],
                                 {"page_views": 0}, 30 * 60 * S)
    empty = compile_audiences([], {"page_views": 0}, 30 * 60 * S)
    out = {"scenario": "evaluator", "date": datetime.date.today().isoformat(),
           "config": {"audiences": args.audiences, "event_leaves": len(compiled.program.leaves),
                      "static_leaves": len(compiled.statics), "persons": args.persons, "events": args.events,
                      "people": args.people}}
    for name, reference in (("compiled", False), ("reference", True)):
        n = args.events if not reference else max(1000, args.events // 20)
        out[name] = per_event(make_evaluator(compiled.program, reference), len(compiled.statics), args.persons, n,
                              list(range(args.audiences)), random.Random(args.seed))
    out["floor"] = per_event(make_evaluator(empty.program), 0, args.persons, args.events, [], random.Random(args.seed))

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
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        c, r = out["compiled"], out["recompute"]
        print(f"per event, {args.audiences} audiences: p50 {c['p50_us']} µs, p99 {c['p99_us']} µs "
              f"(floor p99 {out['floor']['p99_us']} µs; reference p99 {out['reference']['p99_us']} µs)")
        print(f"full recompute of {r['people']:,} people: {r['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
