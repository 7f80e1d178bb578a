"""Sequence and absence audiences through the real server: events in, exact enters and exits out.

The real ``qualify serve`` (a subprocess on port 0, real LMDB, the embedded
demo with its cart_adds and orders models) with a test clock: a window or an
absence lapses when the test rewrites the clock file, never by sleeping, and
the changelog is read straight from LMDB. The headline case: a cart add with
no order lets the clock pass A + 30 min, and the ENTER is recorded at exactly
A + 30 min, by the timer, with no new event (and again after a restart).
"""

from __future__ import annotations

import time

import pytest

from test_audiences import (CAUSE_EVENT, CAUSE_LAPSE, ENTER, EXIT, S, T0, Demo, TestClock, cart_add, changelog,
                            product_view, track, ts_us, wait_for)

MIN = 60 * S
ABANDONERS = {"absence": {"after": {"event_model": "cart_adds"}, "absent": {"event_model": "orders"},
                          "within": "1800s", "same": ["sku"], "scope": "SCOPE_WITHIN", "window": "7200s"}}
VIEWED_THEN_ADDED = {"sequence": {"steps": [{"event_model": "product_views"}, {"event_model": "cart_adds"}],
                                  "within": "600s", "same": ["sku"], "scope": "SCOPE_WITHIN", "window": "3600s"}}


def order(user: str, ts_us: int, sku: str = "sku-0001", total: float = 10.0):
    return track("Order Completed", user, ts_us, sku=sku, total=total)


def rows(d: Demo, audience: str, person: str) -> list[tuple[int, int, int]]:
    """(direction, effective instant, cause) of the person's changes in the audience, oldest first."""
    return [(r[2], r[3], r[4]) for _, r in changelog(d.lmdb) if r[0] == audience and r[1] == person]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    work = tmp_path_factory.mktemp("sequences")
    d = Demo(work, TestClock(work / "clock", T0)).start()
    d.api.create("abandoners", ABANDONERS)
    d.api.create("viewed_then_added", VIEWED_THEN_ADDED)
    yield d
    assert d.stop() == 0, d.server.log()


def test_an_absence_enters_at_exactly_a_plus_t_by_the_timer(srv):
    api, clock = srv.api, srv.clock
    t = clock.now
    api.send(cart_add("abs-1", t - 10 * S, sku="sku-7"))
    assert not api.is_member("abs-1", "abandoners")
    node = api.explain("abandoners", "abs-1").root
    assert ts_us(node.changes_at) == t - 10 * S + 30 * MIN
    assert "qualifies at" in node.summary and "sku = 'sku-7'" in node.summary, node.summary
    clock.set(t - 10 * S + 30 * MIN - 1)
    time.sleep(0.05)
    assert not api.is_member("abs-1", "abandoners")
    clock.set(t + 31 * MIN)  # well past: the timer fires at its own instant, not the clock's
    assert wait_for(lambda: api.is_member("abs-1", "abandoners")), srv.server.log()[-2000:]
    enter = t - 10 * S + 30 * MIN
    assert api.check("abs-1", ["abandoners"]) == {"abandoners": enter}
    assert rows(srv, "abandoners", "abs-1") == [(ENTER, enter, CAUSE_LAPSE)]
    # ... and leaves when the cart leaves the 2-hour window
    clock.set(t + 121 * MIN)
    assert wait_for(lambda: not api.is_member("abs-1", "abandoners"))
    assert rows(srv, "abandoners", "abs-1")[-1] == (EXIT, t - 10 * S + 120 * MIN, CAUSE_LAPSE)


def test_an_order_for_the_same_sku_cancels_and_another_does_not(srv):
    api, clock = srv.api, srv.clock
    t = clock.now
    api.send(cart_add("abs-2", t, sku="sku-1"), order("abs-2", t + 20 * S, sku="sku-1"),
             cart_add("abs-3", t, sku="sku-1"), order("abs-3", t + 20 * S, sku="sku-2"))
    clock.set(t + 31 * MIN)
    assert wait_for(lambda: api.is_member("abs-3", "abandoners"))
    assert not api.is_member("abs-2", "abandoners")
    assert rows(srv, "abandoners", "abs-3") == [(ENTER, t + 30 * MIN, CAUSE_LAPSE)]
    assert rows(srv, "abandoners", "abs-2") == []


def test_a_late_order_ends_the_membership_on_arrival(srv):
    api, clock = srv.api, srv.clock
    t = clock.now
    api.send(cart_add("abs-4", t, sku="sku-3"))
    clock.set(t + 31 * MIN)
    assert wait_for(lambda: api.is_member("abs-4", "abandoners"))
    late = order("abs-4", t + 5 * MIN, sku="sku-3")  # timestamped 5 minutes after the cart, arriving now
    api.send(late)
    assert not api.is_member("abs-4", "abandoners")
    assert rows(srv, "abandoners", "abs-4") == [(ENTER, t + 30 * MIN, CAUSE_LAPSE), (EXIT, t + 31 * MIN, CAUSE_EVENT)]


def test_a_sequence_enters_on_its_last_step_and_exits_with_its_first(srv):
    api, clock = srv.api, srv.clock
    t = clock.now
    api.send(product_view("seq-1", t - 5 * MIN, sku="sku-9"), cart_add("seq-1", t - 4 * MIN, sku="sku-1"))
    assert not api.is_member("seq-1", "viewed_then_added")
    node = api.explain("viewed_then_added", "seq-1").root
    assert node.summary.startswith("step 1 of 2 done") and "sku = 'sku-9'" in node.summary, node.summary
    api.send(cart_add("seq-1", t - 3 * MIN, sku="sku-9"))
    assert api.check("seq-1", ["viewed_then_added"]) == {"viewed_then_added": t}
    assert ts_us(api.explain("viewed_then_added", "seq-1").root.changes_at) == t - 5 * MIN + 60 * MIN
    clock.set(t + 56 * MIN)
    assert wait_for(lambda: not api.is_member("seq-1", "viewed_then_added"))
    assert rows(srv, "viewed_then_added", "seq-1") == [(ENTER, t, CAUSE_EVENT), (EXIT, t + 55 * MIN, CAUSE_LAPSE)]


def test_a_pending_absence_survives_a_restart(tmp_path):
    """The anchor is in the stored state: after a restart the timer still fires at exactly A + T."""
    d = Demo(tmp_path, TestClock(tmp_path / "clock", T0)).start()
    try:
        d.api.create("abandoners", ABANDONERS)
        t = d.clock.now
        d.api.send(cart_add("abs-r", t, sku="sku-5"), cart_add("abs-r", t + 60 * S, sku="sku-6"),
                   order("abs-r", t + 90 * S, sku="sku-6"))
        assert d.stop() == 0, d.server.log()
        d.clock.set(t + 10 * MIN)
        d.start()
        assert not d.api.is_member("abs-r", "abandoners")
        d.clock.set(t + 45 * MIN)
        assert wait_for(lambda: d.api.is_member("abs-r", "abandoners")), d.server.log()[-2000:]
        assert rows(d, "abandoners", "abs-r") == [(ENTER, t + 30 * MIN, CAUSE_LAPSE)]
    finally:
        assert d.stop() == 0, d.server.log()


def test_the_abandoners_walkthrough_on_a_real_clock(tmp_path):
    """`qualify demo --scenario abandoners` against `qualify serve` on the embedded demo, in real time."""
    import subprocess
    import sys

    from conftest import SMALL_DEMO, QualifyServer

    server = QualifyServer(tmp_path, "--demo-people", str(SMALL_DEMO)).start()
    try:
        done = subprocess.run([sys.executable, "-m", "qualify.server.cli", "demo", "--scenario", "abandoners",
                               "--within", "2", "--address", server.address], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        out = done.stdout
        assert "qualifies at" in out and "the cart + 2s, with no new event" in out, out
        assert "not a member: the order cancelled it" in out and "exited on arrival" in out, out
    finally:
        assert server.stop() == 0, server.log()
