"""SimulateAudience: a saved audience replayed over recorded history equals what the live server wrote.

A real ``qualify serve`` on the embedded demo, with a test clock, lives
through six hours of events (cart adds, orders, product views, an
identify that merges an anonymous history, late events), its timers firing as
the clock moves. Then SimulateAudience replays the retained log for each
audience over a span of that history, and its enters and exits per bucket,
its members at each bucket's end and its sampled people's changes must be
those of the changelog the live server wrote.
"""

from __future__ import annotations

import random

import grpc
import pytest
from google.protobuf import json_format

from qualify.v1 import audience_pb2
from test_audiences import (ENTER, S, T0, Demo, TestClock, cart_add, changelog, error_of, identify, product_view, track,
                            warehouse_keys)

MIN = 60 * S
HOUR = 60 * MIN
AUDIENCES = {
    "sim_abandoners": {"absence": {"after": {"event_model": "cart_adds"}, "absent": {"event_model": "orders"},
                                   "within": "1200s", "same": ["sku"], "scope": "SCOPE_WITHIN", "window": "5400s"}},
    "sim_viewed_added_free": {"and": {"conditions": [
        {"sequence": {"steps": [{"event_model": "product_views"}, {"event_model": "cart_adds"}],
                      "within": "900s", "same": ["sku"], "scope": "SCOPE_WITHIN", "window": "3600s"}},
        {"attribute": {"attribute": "plan", "operator": "OPERATOR_EQ", "value": {"string_value": "free"}}}]}},
    "sim_busy_session": {"event": {"event_model": "product_views", "scope": "SCOPE_SESSION",
                                   "comparison": "COMPARISON_GE", "threshold": 3}},
}


def order(user, ts_us, sku, **kw):
    return track("Order Completed", user, ts_us, sku=sku, total=10.0, **kw)


@pytest.fixture(scope="module")
def lived(tmp_path_factory):
    """The server, after six hours of history; (demo, first event instant, last instant)."""
    work = tmp_path_factory.mktemp("simulate")
    d = Demo(work, TestClock(work / "clock", T0)).start()
    for aid, definition in AUDIENCES.items():
        d.api.create(aid, definition)
    users = sorted(warehouse_keys(d.warehouse, "TRUE"), key=lambda k: int(k.split("-")[1]))[:12]
    rnd = random.Random(15)
    start = d.clock.now + MIN
    t = start
    anon_linked = False
    while t < start + 6 * HOUR:
        d.clock.set(t)
        batch = []
        for _ in range(rnd.randint(1, 4)):
            who, sku = rnd.choice(users), f"sku-{rnd.randint(1, 3)}"
            ts = t - rnd.choice([0, 0, 0, 0, 30 * S, 4 * MIN])  # some late
            kind = rnd.random()
            if kind < 0.35:
                batch.append(product_view(who, ts, sku=sku))
            elif kind < 0.7:
                batch.append(cart_add(who, ts, sku=sku))
            elif kind < 0.85:
                batch.append(order(who, ts, sku=sku))
            else:  # anonymous activity, linked to a user half-way through
                batch.append(cart_add("", ts, sku=sku, anon="anon-sim"))
        if not anon_linked and t > start + 3 * HOUR:
            batch.append(identify(users[0], "anon-sim", t))
            anon_linked = True
        d.api.send(*batch)
        t += rnd.choice([MIN, 3 * MIN, 7 * MIN, 13 * MIN])
    d.clock.set(t + 2 * HOUR)  # let every window lapse, live
    d.api.send(product_view(users[1], t + 2 * HOUR))  # and an event after them, so that every timer has fired
    yield d, start, t
    assert d.stop() == 0, d.server.log()


def simulate(d, aid, start, end, bucket, sample=100, **target):
    req = audience_pb2.SimulateAudienceRequest(sample_size=sample, **({"id": aid} if not target else target))
    req.start_time.FromMicroseconds(start)
    req.end_time.FromMicroseconds(end)
    req.bucket.FromMicroseconds(bucket)
    return d.api.aud.SimulateAudience(req, timeout=120)


def live(d, aid, start, end, bucket):
    """Per bucket (enters, exits, members at its end) from the changelog; members at start; per person changes."""
    rows = [r for _, r in changelog(d.lmdb) if r[0] == aid]
    n = -(-(end - start) // bucket)
    per = [[0, 0, 0] for _ in range(n)]
    people: dict[str, list[tuple[int, int]]] = {}
    for _, person, direction, at, _, _ in rows:
        if start <= at < end:
            per[(at - start) // bucket][0 if direction == ENTER else 1] += 1
            people.setdefault(person, []).append((direction, at))

    def members(t):
        return sum(1 if r[2] == ENTER else -1 for r in rows if r[3] < t)
    for i in range(n):
        per[i][2] = members(min(end, start + (i + 1) * bucket))
    return per, members(start), people


@pytest.mark.parametrize("aid", sorted(AUDIENCES))
@pytest.mark.parametrize("span", ["all", "middle"])
def test_simulation_equals_the_live_changelog(lived, aid, span):
    d, first, last = lived
    start, end = (first - MIN, last + 3 * HOUR) if span == "all" else (first + 2 * HOUR + 7 * MIN, first + 5 * HOUR)
    bucket = 30 * MIN
    got = simulate(d, aid, start, end, bucket)
    per, at_start, people = live(d, aid, start, end, bucket)
    assert sum(p[0] for p in per) > 0 and sum(p[1] for p in per) > 0, "the history moves nobody: the test is void"
    assert [(b.enters, b.exits, b.members) for b in got.buckets] == [tuple(p) for p in per]
    assert got.members_at_start == at_start
    assert [b.start_time.ToMicroseconds() for b in got.buckets] == [start + i * bucket for i in range(len(per))]
    assert {p.person_key: [(c.direction, c.effective_time.ToMicroseconds()) for c in p.changes]
            for p in got.sample} == people
    assert got.events_replayed > 100


def test_a_draft_simulates_like_the_saved_audience(lived):
    d, first, last = lived
    cond = audience_pb2.Audience().condition
    json_format.ParseDict(AUDIENCES["sim_abandoners"], cond)
    draft = simulate(d, None, first, last, HOUR, sample=3, condition=cond)
    saved = simulate(d, "sim_abandoners", first, last, HOUR, sample=3)
    assert [(b.enters, b.exits, b.members) for b in draft.buckets] == [(b.enters, b.exits, b.members)
                                                                        for b in saved.buckets]
    assert len(draft.sample) == 3


@pytest.mark.parametrize("fields,violation", [
    ({"start": 10, "end": 5, "bucket": 1}, "start_time"),
    ({"start": 0, "end": 10 * HOUR, "bucket": 0}, "bucket"),
    ({"start": 0, "end": 10_001 * S, "bucket": S}, "bucket"),
])
def test_bad_spans_are_refused_with_the_field(lived, fields, violation):
    d, _, _ = lived
    req = audience_pb2.SimulateAudienceRequest(id="sim_abandoners")
    req.start_time.FromMicroseconds(T0 + fields["start"])
    req.end_time.FromMicroseconds(T0 + fields["end"])
    req.bucket.FromMicroseconds(fields["bucket"])
    code, err = error_of(d.api.aud.SimulateAudience, req, timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in err.field_violations] == [violation]
    code, _ = error_of(d.api.aud.SimulateAudience, audience_pb2.SimulateAudienceRequest(id="nope"), timeout=10)
    assert code == grpc.StatusCode.NOT_FOUND


def test_the_cli_prints_the_timeline_and_draws_it(lived, tmp_path):
    import subprocess
    import sys

    d, first, last = lived
    draft = tmp_path / "abandoners.json"
    draft.write_text(__import__("json").dumps({"condition": AUDIENCES["sim_abandoners"]}))
    png = tmp_path / "timeline.png"
    done = subprocess.run([sys.executable, "-m", "qualify.server.cli", "audiences", "simulate", str(draft),
                           "--last", "9h", "--bucket", "1h", "--sample", "2", "--plot", str(png),
                           "--address", d.server.address], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1].split() == ["BUCKET", "MEMBERS", "ENTERS", "EXITS"], done.stdout
    rows = [line.split() for line in lines[2:] if line[:1].isdigit()]
    assert len(rows) == 9
    saved = simulate(d, "sim_abandoners", d.clock.now - 9 * HOUR, d.clock.now, HOUR)  # the server's now: its clock
    assert [(int(r[2]), int(r[3]), int(r[4])) for r in rows] == [(b.members, b.enters, b.exits) for b in saved.buckets]
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([sys.executable, "-m", "qualify.server.cli", "audiences", "simulate", "--last", "soon",
                          "--id", "sim_abandoners", "--address", d.server.address], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a duration" in bad.stderr


def _replay_children(server_pid: int) -> list[int]:
    """The server's simulation processes (qualify.server.storage.replay_process), by /proc."""
    import os
    from pathlib import Path

    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat[1]) == server_pid and b"replay_process\x00simulations" in cmd:
                found.append(int(entry))
    return found


def test_the_replay_runs_in_a_process_of_its_own_and_a_dead_one_is_replaced(lived):
    import os
    import signal

    d, first, last = lived
    before = simulate(d, "sim_abandoners", first, last, HOUR)
    children = _replay_children(d.server.proc.pid)
    assert len(children) == 1, "one long-lived simulation process beside the server"
    assert os.getpriority(os.PRIO_PROCESS, children[0]) == os.getpriority(os.PRIO_PROCESS, d.server.proc.pid) + 10
    os.kill(children[0], signal.SIGKILL)
    again = simulate(d, "sim_abandoners", first, last, HOUR)
    assert [(b.enters, b.exits, b.members) for b in again.buckets] == [(b.enters, b.exits, b.members)
                                                                        for b in before.buckets]
    assert _replay_children(d.server.proc.pid) not in ([], children)


def _plan(d, deadline):
    """The saved abandoners' plan over the last 9 hours, made as the server makes it (domain/simulate.plan)."""
    import math
    from types import SimpleNamespace

    from qualify.server.demo import demo_project
    from qualify.server.domain.conditions import parse_condition
    from qualify.server.domain.events import compile_models
    from qualify.server.domain.simulate import plan
    from qualify.server.domain.warehouse_parts import WarehouseParts

    project = demo_project(d.lmdb.parent, people=len(warehouse_keys(d.warehouse, "TRUE")))
    models = compile_models(project.event_models)
    engine = SimpleNamespace(  # what plan() reads of the engine; the abandoners read no warehouse attribute
        models=models, model_index={m.name: i for i, m in enumerate(models.models)},
        session_timeout_us=int(project.session_timeout * 1_000_000), reference=False, warehouse=WarehouseParts())
    condition = parse_condition(AUDIENCES["sim_abandoners"], {a.name: a.type for a in project.parent_model.attributes},
                                {m.name: dict(m.properties) for m in models.models})
    return plan(engine, condition, d.clock.now - 9 * HOUR, d.clock.now, HOUR, 0, deadline if deadline else math.inf)


def test_past_its_deadline_or_cancelled_a_replay_answers_with_its_error_and_the_next_one_runs(lived):
    import threading
    import time

    import lmdb

    from qualify.server.domain.simulate import SimulationTooSlow
    from qualify.server.storage.replay_process import ReplayProcess

    d, _, _ = lived
    env = lmdb.open(str(d.lmdb), readonly=True, lock=True, max_dbs=64)
    runner = ReplayProcess(env, d.lmdb, 1 << 30)
    try:
        with pytest.raises(SimulationTooSlow):
            runner.run(_plan(d, time.monotonic() - 1), threading.Event())
        cancelled = threading.Event()
        cancelled.set()
        try:  # it may have answered before it saw the cancellation: either way the process serves the next one
            runner.run(_plan(d, None), cancelled)
        except SimulationTooSlow:
            pass
        done = runner.run(_plan(d, None), threading.Event())
        saved = simulate(d, "sim_abandoners", d.clock.now - 9 * HOUR, d.clock.now, HOUR)
        assert [(b.enters, b.exits) for b in done.buckets] == [(b.enters, b.exits) for b in saved.buckets]
        proc = runner._proc
    finally:
        runner.close()
        env.close()
    assert proc.wait(5) == 0, "closing its pipe ends the simulation process"
