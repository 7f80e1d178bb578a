"""Realtime audiences end to end: events in, exact memberships and changelog out, time from a test clock.

Every test runs the real ``qualify serve`` (a subprocess on port 0, real LMDB)
with QUALIFY_TEST_CLOCK_FILE set: the server reads "now" from that file and
its timers poll it every 5 ms, so a test lets a window lapse by rewriting the
file, never by sleeping. Events carry explicit timestamps relative to the
clock. Memberships are read over gRPC (CheckMembership, ListMembers,
PersonalizeService.Get) and the changelog straight from LMDB.

The last test is differential: hypothesis draws small audiences, event
streams and clock advances, and after every step the server's answers must
equal a pure-Python evaluation built on ``qualify.evaluator.reference``.
"""

from __future__ import annotations

import itertools
import math
import shutil
import time
from pathlib import Path

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import QualifyServer, eventually, run_sql, write_project
from qualify.evaluator.program import EventLeaf, Filter, Program
from qualify.evaluator.reference import ReferenceEvaluator, matches_predicate
from qualify.server.demo import DEMO_ATTRIBUTES, DEMO_EVENT_MODELS
from qualify.server.domain.conditions import And, AttributeCondition, Not, Or, parse_condition
from qualify.server.domain.schema import ValueType
from qualify.v1 import audience_pb2, event_pb2, ingest_pb2, personalize_pb2
from test_audiences import (CAUSE_AUDIENCE, CAUSE_EVENT, CAUSE_LAPSE, CAUSE_MERGE, CAUSE_SESSION_END, CAUSE_SYNC, CLOCK_ENV, ENTER,
                            EXIT, FREE, PRO, S, T0, Api, Demo, TestClock, and_, attr, cart_add, changelog, cond,
                            ev, event, fv, identify, iv, not_, page, path_is, product_view, sv, ts_us, wait_for,
                            warehouse_keys, warehouse_rows)

MINUTE = 60 * S
SESSION_TIMEOUT = 30 * MINUTE  # the demo's default


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    work = tmp_path_factory.mktemp("realtime")
    d = Demo(work, TestClock(work / "clock", T0)).start()
    d.used = set()
    yield d
    assert d.stop() == 0, d.server.log()


def fresh(d, where: str = "TRUE", n: int = 1) -> list[str]:
    """Warehouse people matching ``where`` that no earlier test of this server used."""
    keys = sorted(warehouse_keys(d.warehouse, where) - d.used, key=lambda k: int(k.split("-")[1]))[:n]
    assert len(keys) == n
    d.used.update(keys)
    return keys


def rows_for(lmdb_dir: Path, audience: str, person: str, after: int = 0) -> list[list]:
    return [row for _, row in changelog(lmdb_dir, after) if row[0] == audience and row[1] == person]


def last_seq(lmdb_dir: Path) -> int:
    rows = changelog(lmdb_dir)
    return rows[-1][0] if rows else 0


# ---------------------------------------------------------------- the README walk-through


def test_readme_demo_high_intent_pricing(rt):
    api, clock = rt.api, rt.clock
    definition = and_(ev("page_views", "WITHIN", "600s", "GE", 3, filters=[path_is("path", "/pricing")]), FREE)
    api.create("high_intent_pricing", definition, "High intent pricing")
    person, = fresh(rt, "plan = 'free'")
    now = clock.now
    first = now - 30 * S
    api.send(page(person, "/pricing", first))
    api.send(page(person, "/pricing", now - 20 * S))
    assert api.check(person, ["high_intent_pricing"]) == {}
    assert "high_intent_pricing" not in api.memberships(person)
    third = page(person, "/pricing", now - 10 * S)
    api.send(third)
    assert api.memberships(person)["high_intent_pricing"] == now  # Get on customers: enter_time = the clock
    assert api.check(person, ["high_intent_pricing"]) == {"high_intent_pricing": now}
    leaf = api.explain("high_intent_pricing", person).root.children[0]
    assert ts_us(leaf.changes_at) == first + 600 * S and leaf.summary.startswith("exits at")

    clock.advance(601)  # no new event from here on
    gone = wait_for(lambda: "high_intent_pricing" not in api.memberships(person), 5.0)
    assert gone, "the membership did not lapse by itself"
    assert api.check(person, ["high_intent_pricing"]) == {}
    assert rows_for(rt.lmdb, "high_intent_pricing", person) == [
        ["high_intent_pricing", person, ENTER, now, CAUSE_EVENT, third.message_id],
        ["high_intent_pricing", person, EXIT, first + 600 * S, CAUSE_LAPSE, ""],
    ]
    assert api.get("high_intent_pricing").member_count == 0


# ---------------------------------------------------------------- scopes


def test_session_scope_with_explicit_session_ids(rt):
    api, clock = rt.api, rt.clock
    api.create("sess_two", ev("page_views", "SESSION", comparison="GE", threshold=2))
    u, = fresh(rt)
    t = clock.now
    api.send(page(u, "/a", t - 10 * S, session="s1"))
    assert not api.is_member(u, "sess_two")
    api.send(page(u, "/b", t - 9 * S, session="s1"))
    assert api.check(u, ["sess_two"]) == {"sess_two": t}
    api.send(page(u, "/c", t - 8 * S, session="s2"))  # another session: its count starts again
    assert not api.is_member(u, "sess_two")
    clock.advance(1)
    api.send(page(u, "/d", t - 7 * S, session="s2"))
    assert api.check(u, ["sess_two"]) == {"sess_two": t + S}
    # Inactivity ends even an explicit session: 30 minutes after its latest event.
    end = t - 7 * S + SESSION_TIMEOUT
    clock.set(end - S)
    time.sleep(0.05)
    assert api.is_member(u, "sess_two")
    clock.set(end + 5 * S)
    assert wait_for(lambda: not api.is_member(u, "sess_two")), "the session did not end by itself"
    rows = rows_for(rt.lmdb, "sess_two", u)
    assert [(r[2], r[3]) for r in rows] == [(ENTER, t), (EXIT, t), (ENTER, t + S), (EXIT, end)]
    # A new event after the end starts a new session.
    api.send(page(u, "/e", clock.now, session="s2"))
    assert not api.is_member(u, "sess_two")


def test_session_ends_after_30_minutes_of_inactivity(rt):
    api, clock = rt.api, rt.clock
    api.create("sess_pricing", ev("page_views", "SESSION", comparison="GE", threshold=2,
                                  filters=[path_is("path", "/pricing")]))
    u, = fresh(rt)
    t = clock.now
    api.send(page(u, "/pricing", t - 40 * MINUTE))  # a session that has already ended by now
    assert not api.is_member(u, "sess_pricing")
    api.send(page(u, "/pricing", t - 15 * MINUTE))  # 25 minutes later: the same session, open until t + 15 min
    assert api.check(u, ["sess_pricing"]) == {"sess_pricing": t}
    clock.set(t + 15 * MINUTE - S)
    time.sleep(0.05)
    assert api.is_member(u, "sess_pricing")
    clock.set(t + 20 * MINUTE)
    assert wait_for(lambda: not api.is_member(u, "sess_pricing")), "the session did not end by itself"
    exit_row = rows_for(rt.lmdb, "sess_pricing", u)[-1]
    assert exit_row[2:4] == [EXIT, t + 15 * MINUTE]
    # 30 minutes or more after the latest event: a new session, whose first view alone is not enough.
    api.send(page(u, "/pricing", clock.now))
    assert not api.is_member(u, "sess_pricing")
    api.send(page(u, "/pricing", clock.now))
    assert api.is_member(u, "sess_pricing")


def test_a_session_end_is_recorded_with_cause_session_end(rt):
    """ChangeCause SESSION_END ("the person's session ended") must mark timer exits of a SESSION condition."""
    api, clock = rt.api, rt.clock
    api.create("sess_cause", ev("page_views", "SESSION", comparison="GE", threshold=1))
    u, = fresh(rt)
    t = clock.now
    api.send(page(u, "/", t))
    assert api.is_member(u, "sess_cause")
    clock.set(t + SESSION_TIMEOUT + S)
    assert wait_for(lambda: not api.is_member(u, "sess_cause"))
    row = rows_for(rt.lmdb, "sess_cause", u)[-1]
    assert row[2:4] == [EXIT, t + SESSION_TIMEOUT]
    assert row[4] == CAUSE_SESSION_END, f"a session end was recorded with cause {row[4]}"


def test_ever_scope_never_lapses(rt):
    api, clock = rt.api, rt.clock
    api.create("ever_two_carts", ev("cart_adds", "EVER", comparison="GE", threshold=2))
    u, = fresh(rt)
    t = clock.now
    api.send(cart_add(u, t - 2 * 86400 * S))
    assert not api.is_member(u, "ever_two_carts")
    api.send(cart_add(u, t - 86400 * S))  # old events still count for EVER
    assert api.check(u, ["ever_two_carts"]) == {"ever_two_carts": t}
    clock.advance(3 * 86400)
    time.sleep(0.05)
    assert api.check(u, ["ever_two_carts"]) == {"ever_two_carts": t}
    leaf = api.explain("ever_two_carts", u).root
    assert (leaf.value, leaf.count, leaf.HasField("changes_at")) == (True, 2, False)


def test_did_not_enters_by_itself_when_events_leave_the_window(rt):
    api, clock = rt.api, rt.clock
    api.create("browsed_no_cart", and_(ev("page_views", filters=[path_is("path", "/shop")]),
                                       ev("cart_adds", "WITHIN", "300s", "EQ", 0)))
    api.create("no_cart_at_all", ev("cart_adds", "WITHIN", "300s", "EQ", 0))
    u, idle = fresh(rt, n=2)
    # Did-not holds for everyone with no events at all: a warehouse person is a member by default.
    assert api.is_member(idle, "no_cart_at_all") and "no_cart_at_all" in api.memberships(idle)
    t = clock.now
    api.send(page(u, "/shop", t - 5 * S))
    assert api.check(u, ["browsed_no_cart"]) == {"browsed_no_cart": t}
    cart = cart_add(u, t - 2 * S)
    api.send(cart)
    assert api.check(u, ["browsed_no_cart", "no_cart_at_all"]) == {}
    clock.advance(400)
    assert wait_for(lambda: api.is_member(u, "browsed_no_cart")), "did-not did not re-enter by itself"
    lapse = t - 2 * S + 300 * S
    assert api.check(u, ["browsed_no_cart", "no_cart_at_all"]) == {"browsed_no_cart": lapse, "no_cart_at_all": lapse}
    rows = rows_for(rt.lmdb, "browsed_no_cart", u)
    assert rows == [["browsed_no_cart", u, ENTER, t, CAUSE_EVENT, rows[0][5]],
                    ["browsed_no_cart", u, EXIT, t, CAUSE_EVENT, cart.message_id],
                    ["browsed_no_cart", u, ENTER, lapse, CAUSE_LAPSE, ""]]


def test_aggregates_over_product_view_prices(rt):
    api, clock = rt.api, rt.clock
    audiences = {
        "agg_sum": ev("product_views", "WITHIN", "600s", "GE", 100, aggregation="SUM", prop="price"),
        "agg_min": ev("product_views", "EVER", comparison="LT", threshold=10, aggregation="MIN", prop="price"),
        "agg_max": ev("product_views", "SESSION", comparison="GE", threshold=500, aggregation="MAX", prop="price"),
        "agg_avg": ev("product_views", "WITHIN", "600s", "GT", 50, aggregation="AVG", prop="price"),
        "agg_avg_ne": ev("product_views", "EVER", comparison="NE", threshold=50, aggregation="AVG", prop="price"),
    }
    for aid, d in audiences.items():
        api.create(aid, d)
    u, = fresh(rt)
    t = clock.now
    ids = list(audiences)

    def now_in():
        return set(api.check(u, ids))

    # No events: every aggregate is missing, which satisfies only NE.
    assert now_in() == {"agg_avg_ne"}
    api.send(product_view(u, t - 100 * S, 40.0))
    assert now_in() == {"agg_avg_ne"}
    api.send(product_view(u, t - 90 * S, 60.0))  # sum 100, avg 50
    assert now_in() == {"agg_sum"}
    api.send(product_view(u, t - 80 * S, 5.0))  # min 5, avg 35
    assert now_in() == {"agg_sum", "agg_min", "agg_avg_ne"}
    api.send(product_view(u, t - 70 * S, 600.0), product_view(u, t - 60 * S))  # the second has no price
    assert now_in() == set(ids)
    e = api.explain("agg_avg", u).root
    assert (e.count, e.aggregate) == (5, 705.0 / 4)
    # The window empties (the last priced view leaves at t + 530 s): SUM and AVG go missing.
    clock.set(t + 600 * S)
    assert wait_for(lambda: now_in() == {"agg_min", "agg_max", "agg_avg_ne"}), now_in()
    for aid in ("agg_sum", "agg_avg"):
        assert rows_for(rt.lmdb, aid, u)[-1][2:5] == [EXIT, t + 530 * S, CAUSE_LAPSE]
    # The session (latest event t - 60 s) ends 30 minutes later: MAX over the session goes missing.
    clock.set(t + 1800 * S)
    assert wait_for(lambda: now_in() == {"agg_min", "agg_avg_ne"}), now_in()
    assert rows_for(rt.lmdb, "agg_max", u)[-1][2:4] == [EXIT, t - 60 * S + SESSION_TIMEOUT]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_prices_are_refused_and_the_aggregate_still_works(rt, bad):
    """A NaN once stuck in SUM for good: the person never entered "SUM(price) >= 500" again."""
    api, t = rt.api, rt.clock.now
    aid = f"agg_sum_finite_{ {math.inf: 'inf', -math.inf: 'ninf'}.get(bad, 'nan') }"
    api.create(aid, ev("product_views", "EVER", comparison="GE", threshold=500, aggregation="SUM", prop="price"))
    u, = fresh(rt)
    poison = product_view(u, t - 50 * S, bad)
    r = api.ingest.TrackBatch(ingest_pb2.TrackBatchRequest(events=[product_view(u, t - 60 * S, 1.0), poison]))
    assert r.accepted == 1 and [(x.index, x.reason) for x in r.rejections] == [
        (1, ingest_pb2.REJECTION_REASON_PROPERTY_TYPE)], r
    assert "price" in r.rejections[0].description
    assert not api.is_member(u, aid)
    api.send(product_view(u, t - 40 * S, 1000.0))
    assert api.is_member(u, aid)
    assert api.explain(aid, u).root.aggregate == 1001.0


def test_old_events_are_stored_but_change_no_window(rt):
    api, clock = rt.api, rt.clock
    api.create("old_window", ev("page_views", "WITHIN", "600s", "GE", 1, filters=[path_is("path", "/old")]))
    api.create("old_ever", ev("page_views", "EVER", comparison="GE", threshold=1, filters=[path_is("path", "/old")]))
    u, = fresh(rt)
    t = clock.now
    r = api.send(page(u, "/old", t - 3600 * S))
    assert r.accepted == 1
    assert api.check(u, ["old_window", "old_ever"]) == {"old_ever": t}
    e = api.explain("old_window", u).root
    assert (e.value, e.count, e.HasField("changes_at")) == (False, 0, False)


def test_updating_a_windowed_audience_moves_members_at_once_and_reschedules(rt):
    api, clock = rt.api, rt.clock

    def definition(window: str) -> dict:
        return ev("page_views", "WITHIN", window, "GE", 1, filters=[path_is("path", "/upd")])

    api.create("upd_window", definition("600s"))
    u, = fresh(rt)
    t = clock.now
    api.send(page(u, "/upd", t - 100 * S))
    assert api.check(u, ["upd_window"]) == {"upd_window": t}

    def update(window: str) -> None:
        a = audience_pb2.Audience(id="upd_window", display_name="upd_window")
        a.condition.CopyFrom(cond(definition(window)))
        api.aud.UpdateAudience(audience_pb2.UpdateAudienceRequest(audience=a), timeout=30)
        api.wait_live("upd_window")

    clock.set(t + S)
    update("60s")  # the view is 101 s old: out at once
    assert api.check(u, ["upd_window"]) == {}
    clock.set(t + 2 * S)
    update("600s")
    assert api.check(u, ["upd_window"]) == {"upd_window": t + 2 * S}
    clock.set(t + 501 * S)
    assert wait_for(lambda: not api.is_member(u, "upd_window")), "no lapse after the update"
    assert [r[2:5] for r in rows_for(rt.lmdb, "upd_window", u)] == [
        [ENTER, t, CAUSE_EVENT], [EXIT, t + S, CAUSE_AUDIENCE], [ENTER, t + 2 * S, CAUSE_AUDIENCE],
        [EXIT, t + 500 * S, CAUSE_LAPSE]]


# ---------------------------------------------------------------- identity, duplicates


def test_identify_moves_anonymous_history_and_memberships(rt):
    api, clock = rt.api, rt.clock
    anon_ok = and_(ev("page_views", filters=[path_is("path", "/id")], comparison="GE", threshold=2),
                   attr("plan", "NE", sv("no-such-plan")))  # a missing plan satisfies NE
    api.create("id_twice", anon_ok)
    api.create("id_twice_free", and_(ev("page_views", filters=[path_is("path", "/id")], threshold=2), FREE))
    api.create("id_thrice", ev("page_views", filters=[path_is("path", "/id")], threshold=3))
    user, = fresh(rt, "plan = 'free'")
    anon = f"anon-{user}"
    t = clock.now
    api.send(page("", "/id", t - 10 * S, anon=anon), page("", "/id", t - 9 * S, anon=anon))
    ids = ["id_twice", "id_twice_free", "id_thrice"]
    assert api.check(f"anon:{anon}", ids) == {"id_twice": t}
    assert api.check(user, ids) == {}
    clock.advance(1)
    link = identify(user, anon, clock.now)
    api.send(link)
    assert api.check(f"anon:{anon}", ids) == {}
    assert api.check(user, ids) == {"id_twice": t + S, "id_twice_free": t + S}
    assert set(api.memberships(user)) >= {"id_twice", "id_twice_free"}
    rows = [r for _, r in changelog(rt.lmdb) if r[0] in ids and r[1] in (user, f"anon:{anon}")]
    assert sorted(rows) == sorted([
        ["id_twice", f"anon:{anon}", ENTER, t, CAUSE_EVENT, rows[0][5]],
        ["id_twice", f"anon:{anon}", EXIT, t + S, CAUSE_MERGE, link.message_id],
        ["id_twice", user, ENTER, t + S, CAUSE_MERGE, link.message_id],
        ["id_twice_free", user, ENTER, t + S, CAUSE_MERGE, link.message_id],
    ])
    # Later anonymous-only events count for the user.
    api.send(page("", "/id", clock.now, anon=anon))
    assert api.check(user, ids) == {"id_twice": t + S, "id_twice_free": t + S, "id_thrice": clock.now}
    assert api.check(f"anon:{anon}", ids) == {}
    assert api.explain("id_thrice", user).root.count == 3


def test_alias_merges_a_previous_id(rt):
    api, clock = rt.api, rt.clock
    api.create("alias_two", ev("cart_adds", threshold=2))
    user, = fresh(rt)
    anon = f"alias-{user}"
    t = clock.now
    api.send(cart_add("", t - 5 * S, anon=anon))
    api.send(cart_add(user, t - 4 * S))
    assert api.check(user, ["alias_two"]) == {} and api.check(f"anon:{anon}", ["alias_two"]) == {}
    api.send(event(event_pb2.EVENT_TYPE_ALIAS, user, ts_us=t, previous_id=anon))
    assert api.check(user, ["alias_two"]) == {"alias_two": t}


def test_a_repeated_message_id_does_not_count_twice(rt):
    api = rt.api
    api.create("dup_three", ev("page_views", filters=[path_is("path", "/dup")], threshold=3))
    u, = fresh(rt)
    t = rt.clock.now
    first, second = page(u, "/dup", t - 3 * S), page(u, "/dup", t - 2 * S)
    api.send(first, second)
    again = api.send(second)
    assert (again.accepted, again.duplicates) == (0, 1)
    assert api.ingest.Track(ingest_pb2.TrackRequest(event=first)).duplicate is True
    assert not api.is_member(u, "dup_three")
    assert api.explain("dup_three", u).root.count == 2
    third = page(u, "/dup", t - 1 * S)
    r = api.send(third, third)  # the same event twice in one batch counts once
    assert (r.accepted, r.duplicates) == (1, 1)
    assert api.explain("dup_three", u).root.count == 3 and api.is_member(u, "dup_three")


# ---------------------------------------------------------------- timers and events in the same instant


def test_due_timers_fire_before_a_later_event_is_evaluated(rt):
    """An event processed at now must not swallow a lapse that was due earlier (its exit and the re-entry).

    The clock jumps past a lapse and an event arrives at once, before the 5 ms
    timer poll: the changelog must still say "exit at the lapse, enter at the event".
    """
    api, clock = rt.api, rt.clock
    api.create("race_window", ev("page_views", "WITHIN", "10s", "GE", 1, filters=[path_is("path", "/race")]))
    # The timer polls every 5 ms, so one try can go either way; without the fix about half of them fail.
    swallowed = []
    for u in fresh(rt, n=15):
        t = clock.now
        api.send(page(u, "/race", t))
        clock.set(t + 20 * S)
        api.send(page(u, "/race", t + 20 * S))
        rows = [r[2:5] for r in rows_for(rt.lmdb, "race_window", u)]
        if rows != [[ENTER, t, CAUSE_EVENT], [EXIT, t + 10 * S, CAUSE_LAPSE], [ENTER, t + 20 * S, CAUSE_EVENT]]:
            swallowed.append((u, rows, api.check(u, ["race_window"])))
    assert not swallowed, f"{len(swallowed)} of 15 lapses were swallowed by a later event: {swallowed[:2]}"


# ---------------------------------------------------------------- restart after kill -9


def snapshot(api: Api, people: list[str]) -> dict:
    audiences = list(api.aud.ListAudiences(audience_pb2.ListAudiencesRequest(), timeout=10).audiences)
    return {
        "audiences": audiences,
        "members": {a.id: api.members(a.id) for a in audiences},
        "check": {p: api.check(p) for p in people},
        "get": {p: api.memberships(p) for p in people if not p.startswith("anon:")},
    }


def test_restart_after_kill_9_keeps_everything_and_fires_lapses_at_startup(tmp_path):
    clock = TestClock(tmp_path / "clock", T0)
    d = Demo(tmp_path, clock).start()
    try:
        api, t = d.api, T0
        free = sorted(warehouse_keys(d.warehouse, "plan = 'free'"))
        a, b, c = free[:3]
        api.create("r_window", and_(ev("page_views", "WITHIN", "600s", "GE", 2, filters=[path_is("path", "/pricing")]),
                                    FREE))
        api.create("r_ever", ev("cart_adds", threshold=1))
        api.create("r_static", PRO)
        api.create("r_session", ev("page_views", "SESSION", comparison="GE", threshold=1))
        api.send(page(a, "/pricing", t - 300 * S), page(a, "/pricing", t - 290 * S),  # lapses at t + 300 s
                 page(b, "/pricing", t - 10 * S), page(b, "/pricing", t - 5 * S),  # lapses at t + 590 s
                 cart_add(c, t - 5 * S), page("", "/x", t - 1 * S, anon="r-anon"),
                 page("", "/y", t - 2 * S, anon="r-anon2"), identify(free[3], "r-anon2", t))
        people = [a, b, c, "anon:r-anon", free[3], "anon:r-anon2"]
        before = snapshot(api, people)
        assert before["check"][a].keys() == {"r_window", "r_session"} and before["check"][b].keys() == {"r_window", "r_session"}
        assert before["check"]["anon:r-anon"].keys() == {"r_session"}
        rows_before = changelog(d.lmdb)

        d.kill9()
        d.start()
        assert snapshot(d.api, people) == before
        assert changelog(d.lmdb) == rows_before  # nothing changed, nothing recorded
        assert before["check"][free[3]].keys() == {"r_session"} and before["check"]["anon:r-anon2"] == {}
        # The identify survived too: anonymous-only events still count for the user.
        d.api.send(page("", "/z", t, anon="r-anon2"))
        assert d.api.explain("r_session", free[3]).root.count == 2
        assert d.api.check("anon:r-anon2") == {}
        people.remove("anon:r-anon2")
        before = snapshot(d.api, people)
        rows_before = changelog(d.lmdb)

        # After the restart the timers run again: a lapses by itself at t + 300 s.
        clock.set(t + 301 * S)
        assert wait_for(lambda: not d.api.is_member(a, "r_window")), "no lapse after the restart"
        assert rows_for(d.lmdb, "r_window", a)[-1] == ["r_window", a, EXIT, t + 300 * S, CAUSE_LAPSE, ""]
        assert d.api.is_member(b, "r_window")

        # Down while b's window lapses: the exit happens at startup, effective at the lapse instant.
        d.kill9()
        seq = last_seq(d.lmdb)
        clock.set(t + 700 * S)
        d.start()
        after = changelog(d.lmdb, seq)
        assert ["r_window", b, EXIT, t + 590 * S, CAUSE_LAPSE, ""] in [r for _, r in after]
        assert not d.api.is_member(b, "r_window")
        assert d.api.get("r_window").member_count == 0 and d.api.members("r_window") == []
        assert d.api.check(c) == before["check"][c]  # EVER and warehouse memberships are untouched
        assert d.api.members("r_static") == before["members"]["r_static"]
        # Each lapse exactly once.
        assert sum(1 for _, r in changelog(d.lmdb) if r[0] == "r_window" and r[1] == b and r[2] == EXIT) == 1
        assert d.stop() == 0, d.server.log()
        # A clean restart changes nothing either.
        d.start()
        assert d.api.check(c) == before["check"][c] and not d.api.is_member(b, "r_window")
    finally:
        d.stop()


# ---------------------------------------------------------------- project file: nulls, operators, syncs

EVENT_MODELS_TOML = "".join(
    f'[event_models.{name}]\ntype = "{m["type"]}"\n' + (f'event = "{m["event"]}"\n' if "event" in m else "")
    + f"[event_models.{name}.properties]\n" + "".join(f'{p} = "{t}"\n' for p, t in m["properties"].items()) + "\n"
    for name, m in DEMO_EVENT_MODELS.items())
ATTRIBUTES_TOML = "".join(f'{n} = "{t}"\n' for n, t in DEMO_ATTRIBUTES.items())
# Some of everyone's attributes missing, so the missing-value semantics show.
NULLS = """
UPDATE customers SET plan = NULL WHERE CAST(substr(user_id, 6) AS INT) % 17 = 0;
UPDATE customers SET ltv = NULL WHERE CAST(substr(user_id, 6) AS INT) % 13 = 0;
UPDATE customers SET country = NULL WHERE CAST(substr(user_id, 6) AS INT) % 11 = 0;
UPDATE customers SET email_opt_in = NULL WHERE CAST(substr(user_id, 6) AS INT) % 7 = 0;
UPDATE customers SET recommended_product = NULL WHERE CAST(substr(user_id, 6) AS INT) % 19 = 0;
UPDATE customers SET signup_date = NULL WHERE CAST(substr(user_id, 6) AS INT) % 23 = 0;
UPDATE customers SET orders_count = NULL WHERE CAST(substr(user_id, 6) AS INT) % 29 = 0;
UPDATE customers SET loyalty_tier = NULL WHERE CAST(substr(user_id, 6) AS INT) % 31 = 0;
UPDATE customers SET predicted_churn = NULL WHERE CAST(substr(user_id, 6) AS INT) % 37 = 0;
UPDATE customers SET last_order_at = NULL WHERE CAST(substr(user_id, 6) AS INT) % 41 = 0;
"""


class ProjectServer:
    def __init__(self, folder: Path, demo_warehouse: Path):
        self.warehouse = folder / "warehouse.duckdb"
        shutil.copyfile(demo_warehouse, self.warehouse)
        run_sql(self.warehouse, NULLS)
        self.clock = TestClock(folder / "clock", T0)
        project = write_project(folder, f'type = "duckdb"\npath = "{self.warehouse}"', attributes=ATTRIBUTES_TOML,
                                extra='[server]\nsync_interval = "1s"\n\n' + EVENT_MODELS_TOML)
        self.server = QualifyServer(folder, "--project", str(project), env={CLOCK_ENV: str(self.clock.path)}).start()
        self.api = Api(self.server.address)
        self.lmdb = folder / "data" / "lmdb"


@pytest.fixture(scope="module")
def wh(tmp_path_factory, demo_warehouse):
    p = ProjectServer(tmp_path_factory.mktemp("project"), demo_warehouse)
    yield p
    p.api.close()
    assert p.server.stop() == 0, p.server.log()


def ts_lit(iso: str) -> dict:
    return {"timestamp_value": iso}


OPERATORS = [
    # (id, condition, DuckDB predicate with the same missing-value semantics)
    ("eq", attr("plan", "EQ", sv("free")), "plan = 'free'"),
    ("ne", attr("plan", "NE", sv("free")), "plan IS DISTINCT FROM 'free'"),
    ("lt", attr("ltv", "LT", fv(500)), "ltv < 500"),
    ("le", attr("orders_count", "LE", iv(3)), "orders_count <= 3"),
    ("gt", attr("predicted_churn", "GT", fv(0.8)), "predicted_churn > 0.8"),
    ("ge", attr("signup_date", "GE", ts_lit("2023-01-01T00:00:00Z")), "signup_date >= DATE '2023-01-01'"),
    ("in", attr("loyalty_tier", "IN", values=[sv("gold"), sv("platinum")]), "loyalty_tier IN ('gold', 'platinum')"),
    ("not_in", attr("country", "NOT_IN", values=[sv("US"), sv("GB")]),
     "country IS NULL OR country NOT IN ('US', 'GB')"),
    ("between", attr("ltv", "BETWEEN", values=[fv(1000), fv(2000)]), "ltv BETWEEN 1000 AND 2000"),
    ("contains", attr("recommended_product", "CONTAINS", sv("01")), "contains(recommended_product, '01')"),
    ("starts_with", attr("recommended_product", "STARTS_WITH", sv("sku-00")),
     "starts_with(recommended_product, 'sku-00')"),
    ("is_set", attr("email_opt_in", "IS_SET"), "email_opt_in IS NOT NULL"),
    ("is_not_set", attr("plan", "IS_NOT_SET"), "plan IS NULL"),
    # More types and edges.
    ("eq_bool", attr("email_opt_in", "EQ", {"bool_value": True}), "email_opt_in"),
    ("ne_bool", attr("email_opt_in", "NE", {"bool_value": True}), "email_opt_in IS DISTINCT FROM TRUE"),
    ("lt_timestamp", attr("last_order_at", "LT", ts_lit("2025-06-01T00:00:00Z")),
     "last_order_at < TIMESTAMP '2025-06-01 00:00:00'"),
    ("in_ints", attr("orders_count", "IN", values=[iv(0), iv(1), iv(2)]), "orders_count IN (0, 1, 2)"),
    ("gt_int_on_float", attr("ltv", "GT", iv(4000)), "ltv > 4000"),
    ("between_strings", attr("plan", "BETWEEN", values=[sv("enterprise"), sv("pro")]),
     "plan BETWEEN 'enterprise' AND 'pro'"),
    ("ge_string", attr("country", "GE", sv("FR")), "country >= 'FR'"),
    ("not_is_set", not_(attr("ltv", "IS_SET")), "ltv IS NULL"),
    ("or_and", {"or": {"conditions": [and_(attr("plan", "EQ", sv("pro")), attr("ltv", "GE", fv(100))),
                                      attr("country", "IS_NOT_SET")]}},
     "(plan = 'pro' AND ltv >= 100) OR country IS NULL"),
]


def test_every_attribute_operator_matches_duckdb(wh):
    api = wh.api
    rows = warehouse_rows(wh.warehouse, "user_id")
    # A value that really occurs, to test BETWEEN's and EQ's inclusive edges on floats.
    with duckdb.connect(str(wh.warehouse), read_only=True) as con:
        lo, hi = con.execute("SELECT min(ltv), max(ltv) FROM customers WHERE ltv BETWEEN 1500 AND 2500").fetchone()
    cases = OPERATORS + [("between_edges", attr("ltv", "BETWEEN", values=[fv(lo), fv(hi)]), f"ltv BETWEEN {lo} AND {hi}"),
                         ("eq_float", attr("ltv", "EQ", fv(lo)), f"ltv = {lo}")]
    for name, definition, where in cases:
        want = warehouse_keys(wh.warehouse, where)
        got = api.create(f"op_{name}", definition)
        members = api.members(f"op_{name}", 500)
        in_warehouse = {k for k in members if k in rows}
        assert in_warehouse == want, (name, sorted(in_warehouse ^ want)[:10])
        assert got.member_count == len(members) == api.get(f"op_{name}").member_count, name
        preview = api.aud.PreviewAudience(audience_pb2.PreviewAudienceRequest(condition=got.condition))
        assert preview.count == len(members), name
    # Someone the warehouse does not know (seen in events) has every attribute missing.
    api.send(page("ghost-1", "/", wh.clock.now), page("", "/", wh.clock.now, anon="op-anon"))
    for name, definition, _ in cases:
        missing_holds = name in ("ne", "not_in", "is_not_set", "ne_bool", "not_is_set", "or_and")
        for key in ("ghost-1", "anon:op-anon"):
            assert api.is_member(key, f"op_{name}") == missing_holds, (name, key)
    # (The audiences stay: deleting them here would leave the engine with stale state, see
    # test_warehouse_syncs_continue_after_an_audience_is_deleted.)


def test_a_warehouse_sync_moves_people_at_once(wh):
    api, clock = wh.api, wh.clock
    db = wh.warehouse
    free = sorted(warehouse_keys(db, "plan = 'free'"), key=lambda k: int(k.split("-")[1]))
    pro = sorted(warehouse_keys(db, "plan = 'pro'"), key=lambda k: int(k.split("-")[1]))
    active, idle = free[-1], free[-2]  # with and without realtime state
    convert = pro[-1]
    api.create("sync_free_active", and_(ev("page_views", threshold=1), FREE))
    api.create("sync_free", FREE)
    t = clock.now
    api.send(page(active, "/", t - S), page(convert, "/", t - S))
    assert api.check(active) .keys() >= {"sync_free_active", "sync_free"}
    assert api.check(idle, ["sync_free_active", "sync_free"]).keys() == {"sync_free"}
    assert api.check(convert, ["sync_free_active", "sync_free"]) == {}
    seq = last_seq(wh.lmdb)
    clock.advance(5)
    run_sql(db, f"UPDATE customers SET plan = 'pro' WHERE user_id IN ('{active}', '{idle}');"
                f"UPDATE customers SET plan = 'free' WHERE user_id = '{convert}'")
    ids = ["sync_free_active", "sync_free"]
    assert wait_for(lambda: api.check(active, ids) == {} and api.check(idle, ids) == {}
                    and set(api.check(convert, ids)) == set(ids), 15.0), wh.server.log()[-3000:]
    rows = [r for _, r in changelog(wh.lmdb, seq) if r[0] in ids]
    assert sorted(rows) == sorted([
        ["sync_free_active", active, EXIT, clock.now, CAUSE_SYNC, ""],
        ["sync_free", active, EXIT, clock.now, CAUSE_SYNC, ""],
        ["sync_free", idle, EXIT, clock.now, CAUSE_SYNC, ""],
        ["sync_free_active", convert, ENTER, clock.now, CAUSE_SYNC, ""],
        ["sync_free", convert, ENTER, clock.now, CAUSE_SYNC, ""],
    ])
    assert api.get("sync_free").member_count == len(warehouse_keys(db, "plan = 'free'"))
    assert set(api.members("sync_free")) == warehouse_keys(db, "plan = 'free'")
    # Removing a person from the warehouse makes them leave too.
    run_sql(db, f"DELETE FROM customers WHERE user_id = '{convert}'")
    assert wait_for(lambda: api.check(convert, ids) == {}, 15.0)


def test_warehouse_syncs_continue_after_an_audience_is_deleted(tmp_path, demo_warehouse):
    """Deleting an audience while people have realtime state must not stop the periodic sync."""
    p = ProjectServer(tmp_path, demo_warehouse)
    try:
        api, t = p.api, p.clock.now
        api.create("keep", and_(ev("cart_adds", threshold=1), FREE))
        api.create("drop", ev("page_views", threshold=1))
        api.send(page("user-5", "/", t - S), cart_add("user-6", t - S))
        landed = p.server.log().count("landed in")  # "sync N landed in ...s", one per warehouse sync
        api.delete("drop")
        # At least two syncs land after the delete (so one ran wholly with the remaining audience).
        eventually(lambda: p.server.log().count("landed in") >= landed + 2,
                   lambda: "no two syncs after the delete:\n" + p.server.log()[-2000:], timeout=15)
        run_sql(p.warehouse, "UPDATE customers SET country = 'ZZ' WHERE user_id = 'user-7'")

        def synced():
            r = api.pers.Get(personalize_pb2.GetRequest(collection="customers", key="user-7"), timeout=5).record
            return r.fields.fields["country"].string_value == "ZZ"

        assert wait_for(synced, 6.0), "the warehouse change was never synced:\n" + p.server.log()[-2000:]
        api.send(cart_add("user-8", t))  # and ingest still evaluates
    finally:
        p.api.close()
        p.server.stop()


def test_a_restart_while_the_warehouse_is_down_serves_what_it_stored(tmp_path, demo_warehouse):
    """A restart is ready at once on what it stored (health says SERVING), and does not wait for the warehouse."""
    p = ProjectServer(tmp_path, demo_warehouse)
    try:
        api, t = p.api, p.clock.now
        api.create("carted", ev("cart_adds", threshold=1))
        api.send(cart_add("user-6", t - S))
        before = api.pers.Get(personalize_pb2.GetRequest(collection="customers", key="user-7"), timeout=5).record
        api.close()
        assert p.server.stop() == 0, p.server.log()
        held = duckdb.connect(str(p.warehouse))  # another process's write lock: the warehouse cannot be read
        p.server.start()
        api = p.api = Api(p.server.address)
        after = api.pers.Get(personalize_pb2.GetRequest(collection="customers", key="user-7"), timeout=5).record
        assert after == before and after.fields.fields["country"].string_value
        assert "carted" in api.check("user-6", ["carted"])
        eventually(lambda: "warehouse sync failed, nothing changed" in p.server.log(), lambda: p.server.log()[-2000:])
        landed = p.server.log().count("landed in")
        held.close()  # back: the next sync lands, ingest goes on
        eventually(lambda: p.server.log().count("landed in") > landed, lambda: p.server.log()[-2000:], timeout=15)
        api.send(cart_add("user-8", p.clock.now))
        assert "carted" in api.check("user-8", ["carted"])
    finally:
        p.api.close()
        p.server.stop()


# ---------------------------------------------------------------- differential, against the reference

MODEL_INDEX = {name: i for i, name in enumerate(DEMO_EVENT_MODELS)}
ATTR_TYPES = {n: ValueType[t.upper()] for n, t in DEMO_ATTRIBUTES.items()}
MODEL_PROPS = {n: {p: ValueType[t.upper()] for p, t in m["properties"].items()} for n, m in DEMO_EVENT_MODELS.items()}
PLANS = ["free", "starter", "pro", "enterprise"]


class Reference:
    """Everyone's whole history in arrival order; answers membership by evaluating trees directly."""

    def __init__(self, rows: dict[str, dict]):
        self.rows = rows
        self.events: dict[str, list[tuple[int, int, int, dict, str]]] = {}
        self.aliases: dict[str, str] = {}
        self.seq = itertools.count(1)

    def add(self, e: event_pb2.Event, props: dict) -> None:
        seq = next(self.seq)
        if e.type == event_pb2.EVENT_TYPE_IDENTIFY:
            if self.aliases.get(e.anonymous_id) != e.user_id:
                self.aliases[e.anonymous_id] = e.user_id
                src = self.events.pop("anon:" + e.anonymous_id, None)
                if src is not None:
                    self.events[e.user_id] = sorted(self.events.get(e.user_id, []) + src)
            return
        model = "page_views" if e.type == event_pb2.EVENT_TYPE_PAGE else {
            "Product Viewed": "product_views", "Product Added": "cart_adds"}[e.name]
        person = e.user_id or self.aliases.get(e.anonymous_id, "anon:" + e.anonymous_id)
        self.events.setdefault(person, []).append((seq, MODEL_INDEX[model], ts_us(e.timestamp), props, e.session_id))

    def known(self, person: str) -> bool:
        return person in self.rows or person in self.events

    def holds(self, c, person: str, now: int) -> bool:
        if isinstance(c, And):
            return all(self.holds(x, person, now) for x in c.children)
        if isinstance(c, Or):
            return any(self.holds(x, person, now) for x in c.children)
        if isinstance(c, Not):
            return not self.holds(c.child, person, now)
        if isinstance(c, AttributeCondition):
            p = c.predicate
            return matches_predicate(p.op, p.values, self.rows.get(person, {}).get(p.field))
        leaf = EventLeaf(MODEL_INDEX[c.event_model], tuple(Filter(p.field, p.op, p.values) for p in c.filters),
                         c.scope, c.window_us, c.aggregation, c.property, c.comparison, c.threshold)
        ref = ReferenceEvaluator(Program((leaf,), (), 0, SESSION_TIMEOUT))
        state = ref.new_state()
        for _, m, ts, props, sid in self.events.get(person, []):
            ref.observe(state, m, ts, props, sid)
        return ref.leaf(state, 0, now).holds


def literal(values):
    return st.sampled_from(values)


@st.composite
def attribute_leaf(draw):
    if draw(st.booleans()):
        op = draw(st.sampled_from(["EQ", "NE", "IN", "NOT_IN", "IS_SET", "IS_NOT_SET"]))
        if op in ("IN", "NOT_IN"):
            return attr("plan", op, values=[sv(p) for p in draw(st.lists(literal(PLANS), min_size=1, max_size=2))])
        return attr("plan", op) if op.startswith("IS") else attr("plan", op, sv(draw(literal(PLANS))))
    op = draw(st.sampled_from(["GT", "LT", "BETWEEN"]))
    if op == "BETWEEN":
        lo = draw(literal([0.0, 500.0, 1000.0]))
        return attr("ltv", op, values=[fv(lo), fv(lo + draw(literal([500.0, 2000.0])))])
    return attr("ltv", op, fv(draw(literal([100.0, 1000.0, 2500.0]))))


@st.composite
def event_leaf(draw):
    model = draw(st.sampled_from(["page_views", "cart_adds"]))
    scope = draw(st.sampled_from(["WITHIN", "WITHIN", "SESSION", "EVER"]))
    window = f"{draw(st.sampled_from([5, 10, 30, 60]))}s" if scope == "WITHIN" else None
    comparison = draw(st.sampled_from(["GE", "GE", "GT", "LT", "LE", "EQ", "NE"]))
    filters = None
    if model == "page_views" and draw(st.booleans()):
        filters = [{"property": "path", "operator": f"OPERATOR_{draw(st.sampled_from(['EQ', 'NE']))}",
                    "value": sv(draw(st.sampled_from(["/pricing", "/home"])))}]
    if model == "cart_adds" and draw(st.integers(0, 2)) == 0:
        agg = draw(st.sampled_from(["SUM", "MIN", "MAX", "AVG"]))
        return ev(model, scope, window, comparison, float(draw(st.integers(0, 8))), aggregation=agg, prop="price")
    return ev(model, scope, window, comparison, draw(st.integers(0, 3)), filters=filters)


def condition(depth: int = 2):
    leaf = st.one_of(attribute_leaf(), event_leaf(), event_leaf())
    if depth == 0:
        return leaf
    sub = condition(depth - 1)
    return st.one_of(leaf,
                     st.lists(sub, min_size=1, max_size=3).map(lambda cs: {"and": {"conditions": cs}}),
                     st.lists(sub, min_size=1, max_size=3).map(lambda cs: {"or": {"conditions": cs}}),
                     sub.map(lambda c: {"not": {"condition": c}}))


WHO = [0, 1, 2, "anon"]


@st.composite
def step(draw):
    kind = draw(st.sampled_from(["events", "events", "events", "advance", "advance", "advance", "identify"]))
    if kind == "advance":
        return ("advance", draw(st.sampled_from([1, 5, 10, 29, 31, 61, 1801])))
    if kind == "identify":
        return ("identify", draw(st.sampled_from([0, 1])))
    evs = []
    for _ in range(draw(st.integers(1, 4))):
        who = draw(st.sampled_from(WHO))
        model = draw(st.sampled_from(["page_views", "cart_adds"]))
        if model == "page_views":
            props = {"path": draw(st.sampled_from(["/pricing", "/home"]))}
        else:
            props = {"sku": "s1"}
            if draw(st.integers(0, 3)):
                props["price"] = float(draw(st.integers(0, 5)))
        evs.append((who, model, draw(st.integers(-20, 2)), props, draw(st.sampled_from(["", "", "x", "y"]))))
    return ("events", evs)


_examples = itertools.count()


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(audiences=st.lists(condition(), min_size=2, max_size=3), steps=st.lists(step(), min_size=4, max_size=14))
def test_server_matches_the_reference(rt, audiences, steps):
    api, clock = rt.api, rt.clock
    n = next(_examples)
    base = 1500 + 4 * n
    users = [f"user-{base + i}" if base + i <= 2000 else f"ghost-{n}-{i}" for i in range(3)]
    anon = f"hyp-{n}"
    warehouse = warehouse_rows(rt.warehouse, "user_id, plan, ltv")
    rows = {u: warehouse[u] for u in users if u in warehouse}
    ref = Reference(rows)
    parsed = {}
    seq = last_seq(rt.lmdb)
    for i, definition in enumerate(audiences):
        aid = f"hyp_{n}_{i}"
        api.create(aid, definition)
        parsed[aid] = parse_condition(definition, ATTR_TYPES, MODEL_PROPS)
    people = users + [f"anon:{anon}"]
    start = clock.now

    def expected():
        return {p: {a for a, c in parsed.items() if ref.known(p) and ref.holds(c, p, clock.now)} for p in people}

    def actual():
        return {p: set(api.check(p, list(parsed))) for p in people}

    assert actual() == expected(), "after create"
    for s in steps:
        if s[0] == "advance":
            clock.advance(s[1])
            time.sleep(0.05)  # let the 5 ms timer poll fire what is due before anything else arrives
            want = expected()
            got = wait_for(lambda: actual() == want, 3.0) and want or actual()
            assert got == want, (s, clock.now)
            # Every change a timer made took effect exactly where the reference's answer flips.
            rows = changelog(rt.lmdb, seq)
            seq = rows[-1][0] if rows else seq
            for _, (aid, person, direction, eff, cause, _mid) in rows:
                if aid in parsed and person in people and cause in (CAUSE_LAPSE, CAUSE_SESSION_END):
                    c = parsed[aid]
                    why = (aid, person, direction, eff, clock.now, ref.events.get(person),
                           [r for _, r in changelog(rt.lmdb) if r[1] == person])
                    assert start < eff <= clock.now, why
                    assert ref.holds(c, person, eff) == (direction == ENTER), why
                    assert ref.holds(c, person, eff - 1) == (direction == EXIT), why
            continue
        batch = []
        if s[0] == "identify":
            e = identify(users[s[1]], anon, clock.now)
            batch.append((e, {}))
        else:
            for who, model, dt, props, sid in s[1]:
                user, anon_id = ("", anon) if who == "anon" else (users[who], "")
                tsu = clock.now + dt * S
                if model == "page_views":
                    e = event(event_pb2.EVENT_TYPE_PAGE, user, anon=anon_id, ts_us=tsu, name=props["path"],
                              props=props, session=sid)
                else:
                    e = event(event_pb2.EVENT_TYPE_TRACK, user, anon=anon_id, ts_us=tsu, name="Product Added",
                              props=props, session=sid)
                batch.append((e, props))
        api.send(*[e for e, _ in batch])
        for e, props in batch:
            ref.add(e, props)
        assert actual() == expected(), (s, clock.now)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.integers(0, 2047), st.integers(-2**63, 2**63 - 1), max_size=80))
def test_a_stored_membership_is_its_documented_layout_and_reads_back(bits):
    """<H: bitset bytes>, the bitset (bit b at byte b >> 3, 1 << (b & 7)), then each enter time (<q) in bit order."""
    import struct

    from qualify.server.storage.realtime import decode_membership, encode_membership

    raw = encode_membership(bits)
    if bits:
        n = max(bits) // 8 + 1
        bitset = bytearray(n)
        for b in bits:
            bitset[b >> 3] |= 1 << (b & 7)
        assert raw == struct.pack("<H", n) + bytes(bitset) + b"".join(struct.pack("<q", bits[b]) for b in sorted(bits))
    else:
        assert raw == b""
    assert decode_membership(raw) == bits
