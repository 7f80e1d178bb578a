"""The engine against a whole-world reference: random audiences, events, time and syncs.

The reference here keeps every event of every person and evaluates condition
trees directly (attribute predicates on the warehouse row, event conditions
through the reference evaluator); the engine keeps bounded state, bitsets,
timers and LMDB tables. At every checkpoint, every person's memberships in
LMDB must equal the reference's, and every change a timer fired must take
effect at an instant where the reference's answer really flips.
"""

from __future__ import annotations

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qualify.evaluator.program import Program
from qualify.evaluator.reference import ReferenceEvaluator, matches_predicate
from qualify.server.config import parse_project
from qualify.server.domain.conditions import And, AttributeCondition, Not, Or, parse_condition
from qualify.server.domain.changes import Cause, Direction
from qualify.server.domain.compile import leaf_for
from qualify.server.domain.engine import ANON, Engine
from qualify.server.domain.events import Event, EventModel, EventType, MatchedEvent, matching_models
from qualify.server.domain.schema import ValueType
from qualify.server.storage.lmdb_store import open_env
from qualify.server.storage.realtime import RealtimeStore
from qualify.server.storage.warehouse_sync import Syncer

S = 1_000_000
T0 = 1_800_000_000 * S
TIMEOUT = 30 * S
ATTRS = [("plan", ValueType.STRING), ("ltv", ValueType.FLOAT), ("orders", ValueType.INT), ("opt_in", ValueType.BOOL)]
MODELS = [
    EventModel("views", EventType.PAGE, "", (), (("path", ValueType.STRING), ("secs", ValueType.FLOAT))),
    EventModel("carts", EventType.TRACK, "Added", (), (("price", ValueType.FLOAT), ("sku", ValueType.STRING))),
]
PEOPLE = [f"u{i}" for i in range(6)]
ANONS = [f"a{i}" for i in range(3)]
PLANS = ["free", "pro", "team"]


# -- the world reference --------------------------------------------------------------------------

class World:
    """Everyone's whole history; answers membership by evaluating trees directly."""

    def __init__(self, rows: dict[str, dict], audiences: dict[str, object]):
        self.rows = rows
        self.audiences = audiences
        self.events: dict[str, list[tuple[int, int, int, dict, str]]] = {}  # person -> (seq, model, ts, props, sid)
        self.aliases: dict[str, str] = {}

    def person(self, kind: str, ident: str) -> str:
        if kind == "anonymous":
            return self.aliases.get(ident, ANON + ident)
        return ident

    def add(self, ev: Event) -> None:
        if ev.type == EventType.IDENTIFY and ev.user_id and ev.anonymous_id and self.aliases.get(ev.anonymous_id) != ev.user_id:
            self.aliases[ev.anonymous_id] = ev.user_id
            # Only events a model matched make a person known; an identify merges what there is.
            src = self.events.pop(ANON + ev.anonymous_id, None)
            if src is not None:
                self.events[ev.user_id] = sorted(self.events.get(ev.user_id, []) + src)
        for m, model in enumerate(MODELS):
            if model.type == ev.type and (not model.event_name or model.event_name == ev.name):
                kind, ident = ("user", ev.user_id) if ev.user_id else ("anonymous", ev.anonymous_id)
                self.events.setdefault(self.person(kind, ident), []).append(
                    (ev.seq, m, ev.timestamp_us, ev.properties, ev.session_id))

    def holds(self, cond, person: str, now: int) -> bool:
        if isinstance(cond, And):
            return all(self.holds(c, person, now) for c in cond.children)
        if isinstance(cond, Or):
            return any(self.holds(c, person, now) for c in cond.children)
        if isinstance(cond, Not):
            return not self.holds(cond.child, person, now)
        if isinstance(cond, AttributeCondition):
            p = cond.predicate
            row = self.rows.get(person)
            return matches_predicate(p.op, p.values, None if row is None else row.get(p.field))
        leaf = leaf_for(cond, {"views": 0, "carts": 1})  # an event, sequence or absence condition
        ref = ReferenceEvaluator(Program((leaf,), (), 0, TIMEOUT))
        state = ref.new_state()
        for _, m, ts, props, sid in self.events.get(person, []):
            ref.observe(state, m, ts, props, sid)
        return ref.leaf(state, 0, now).holds

    def memberships(self, now: int, skip=()) -> dict[str, set[str]]:
        people = set(self.rows) | set(self.events)
        out = {}
        for p in people:
            got = {a for a, c in self.audiences.items() if a not in skip and self.holds(c, p, now)}
            if got:
                out[p] = got
        return out


# -- strategies ------------------------------------------------------------------------------------

def literal(vtype):
    if vtype is ValueType.STRING:
        return st.sampled_from(PLANS + ["/pricing", "/home", "s1"]).map(lambda v: {"string_value": v})
    if vtype is ValueType.BOOL:
        return st.booleans().map(lambda v: {"bool_value": v})
    return st.integers(0, 6).map(lambda v: {"float_value": float(v)})


def predicate(name, vtype, key):
    ops = ["OPERATOR_EQ", "OPERATOR_NE", "OPERATOR_IN", "OPERATOR_NOT_IN", "OPERATOR_IS_SET", "OPERATOR_IS_NOT_SET"]
    if vtype in (ValueType.FLOAT, ValueType.INT):
        ops += ["OPERATOR_LT", "OPERATOR_GE", "OPERATOR_BETWEEN"]
    if vtype is ValueType.STRING:
        ops += ["OPERATOR_STARTS_WITH", "OPERATOR_CONTAINS"]

    @st.composite
    def build(draw):
        op = draw(st.sampled_from(ops))
        body = {key: name, "operator": op}
        if op in ("OPERATOR_IN", "OPERATOR_NOT_IN"):
            body["values"] = draw(st.lists(literal(vtype), min_size=1, max_size=2))
        elif op == "OPERATOR_BETWEEN":
            body["values"] = sorted(draw(st.lists(literal(vtype), min_size=2, max_size=2)), key=lambda d: d["float_value"])
        elif op not in ("OPERATOR_IS_SET", "OPERATOR_IS_NOT_SET"):
            body["value"] = draw(literal(vtype))
        return body

    return build()


@st.composite
def event_condition(draw):
    model = draw(st.sampled_from(MODELS))
    body = {"event_model": model.name, "scope": draw(st.sampled_from(["SCOPE_WITHIN", "SCOPE_SESSION", "SCOPE_EVER"])),
            "comparison": draw(st.sampled_from(["COMPARISON_GE", "COMPARISON_LT", "COMPARISON_EQ", "COMPARISON_NE", "COMPARISON_GT"])),
            "threshold": draw(st.integers(0, 3))}
    if body["scope"] == "SCOPE_WITHIN":
        body["window"] = f"{draw(st.integers(5, 60))}s"
    if draw(st.booleans()):
        name, vtype = draw(st.sampled_from(model.properties))
        body["filters"] = [draw(predicate(name, vtype, "property"))]
    if draw(st.integers(0, 3)) == 0:
        body["aggregation"] = draw(st.sampled_from(["AGGREGATION_SUM", "AGGREGATION_MAX", "AGGREGATION_AVG", "AGGREGATION_MIN"]))
        body["property"] = "secs" if model.name == "views" else "price"
    return {"event": body}


@st.composite
def sequence_condition(draw):
    """A sequence or an absence over views and carts (same sku only when every step is a cart)."""
    absence = draw(st.booleans())
    steps = []
    for _ in range(2 if absence else draw(st.sampled_from([2, 2, 3]))):
        model = draw(st.sampled_from(MODELS))
        step = {"event_model": model.name}
        if draw(st.integers(0, 3)) == 0:
            name, vtype = draw(st.sampled_from(model.properties))
            step["filters"] = [draw(predicate(name, vtype, "property"))]
        steps.append(step)
    scope = draw(st.sampled_from(["SCOPE_WITHIN", "SCOPE_SESSION", "SCOPE_EVER"]))
    within = draw(st.integers(1, 20))
    body = {"scope": scope}
    if scope == "SCOPE_WITHIN":
        body["window"] = f"{draw(st.integers(within + 1, 60))}s"
    if all(step["event_model"] == "carts" for step in steps) and draw(st.booleans()):
        body["same"] = ["sku"]
    if absence:
        return {"absence": {"after": steps[0], "absent": steps[1], "within": f"{within}s", **body}}
    if draw(st.booleans()):
        body["within"] = f"{within}s"
    return {"sequence": {"steps": steps, **body}}


def condition(depth=2):
    attr = st.sampled_from(ATTRS).flatmap(lambda a: predicate(a[0], a[1], "attribute")).map(lambda b: {"attribute": b})
    leaf = st.one_of(attr, event_condition(), event_condition(), sequence_condition(), sequence_condition())
    if depth == 0:
        return leaf
    sub = condition(depth - 1)
    return st.one_of(
        leaf,
        st.lists(sub, min_size=1, max_size=3).map(lambda cs: {"and": {"conditions": cs}}),
        st.lists(sub, min_size=1, max_size=3).map(lambda cs: {"or": {"conditions": cs}}),
        sub.map(lambda c: {"not": {"condition": c}}),
    )


row = st.fixed_dictionaries({"plan": st.sampled_from(PLANS + [None]), "ltv": st.one_of(st.none(), st.integers(0, 6).map(float)),
                             "orders": st.one_of(st.none(), st.integers(0, 6)), "opt_in": st.one_of(st.none(), st.booleans())})


@st.composite
def action(draw):
    kind = draw(st.sampled_from(["events", "events", "events", "advance", "advance", "identify", "sync", "restart",
                                 "redefine", "walk", "walk", "preview"]))
    if kind == "preview":  # a draft, read beside the writer
        return ("preview", draw(condition()))
    if kind in ("restart", "walk"):  # walk: one person further in the backfill of a redefined audience
        return (kind,)
    if kind == "redefine":  # delete an audience, and maybe create it again (it then sees its history anew),
        # or create a deleted one again
        return ("redefine", draw(st.sampled_from(["a1", "a2", "a3"])), draw(st.booleans()))
    if kind == "advance":
        return ("advance", draw(st.sampled_from([1, 5, 10, 29, 31, 61])) * S)
    if kind == "identify":
        return ("identify", draw(st.sampled_from(PEOPLE)), draw(st.sampled_from(ANONS)))
    if kind == "sync":
        return ("sync", draw(st.sampled_from(PEOPLE)), draw(row))
    evs = []
    for _ in range(draw(st.integers(1, 4))):
        who = draw(st.sampled_from(PEOPLE + ANONS))
        model = draw(st.sampled_from(MODELS))
        if model.name == "views":
            props = {"path": draw(st.sampled_from(["/pricing", "/home"])), "secs": float(draw(st.integers(0, 5)))}
        else:
            props = {"price": float(draw(st.integers(0, 5))), "sku": draw(st.sampled_from(["s1", "s2"]))}
        if draw(st.booleans()):
            props.pop(next(iter(props)))
        evs.append((who, model.name, draw(st.integers(-20, 2)) * S, props, draw(st.sampled_from(["", "", "x", "y"]))))
    return ("events", evs)


# -- the test ------------------------------------------------------------------------------------

class Harness:
    def __init__(self, tmp, audiences: dict[str, dict], rows: dict[str, dict], reference: bool):
        self.db = tmp / "wh.duckdb"
        self.rows = rows
        self.write_warehouse()
        self.project = parse_project({
            "warehouse": {"type": "duckdb", "path": str(self.db)},
            "parent_model": {"name": "customers", "query": "SELECT * FROM customers", "primary_key": "user_id",
                             "attributes": {n: t.name.lower() for n, t in ATTRS}},
        }, base=tmp)
        self.env = open_env(tmp / "lmdb", 1 << 30, readonly=False)
        Syncer(self.env, self.project).run()
        with self.env.begin(write=True) as txn:
            self.store = RealtimeStore(self.env, txn)
        self.log: list[Event] = []
        self.reference = reference
        self.replays = 0  # how often the engine read the whole log
        self.engine = self.new_engine()
        self.now = T0
        with self.env.begin(write=True) as txn:
            self.engine.recover(txn, self.now)
            for aid, definition in audiences.items():
                self.engine.put_audience(txn, aid, aid, "", definition, self.now, create=True)
        self.finish_backfill()

    def backfilling(self) -> set[str]:
        progress = self.engine.backfilling
        return set(progress["audiences"]) if progress else set()

    def walk(self) -> list:
        with self.env.begin(write=True) as txn:
            return self.engine.backfill_step(txn, self.now, people=1)

    def finish_backfill(self) -> None:
        for _ in range(10_000):
            if not self.backfilling():
                return
            for c in self.walk():
                assert c.cause == Cause.AUDIENCE_CHANGE
        raise AssertionError("the backfill did not end")

    def new_engine(self) -> Engine:
        def replay(txn):
            self.replays += 1
            return iter(self.log)

        # A cache of two people: most people are evicted and reloaded from their stored state all the time.
        def fields(txn, seq):  # what the event log's fields() reads from a record
            e = self.log[seq - 1]
            return int(e.type), e.name, e.timestamp_us, e.properties, e.session_id

        return Engine(self.store, MODELS, ATTRS, TIMEOUT, read_event=lambda txn, seq: self.log[seq - 1],
                      read_fields=fields, iter_events=replay, reference=self.reference, cache_people=2)

    def restart(self) -> list:
        """A new engine over the same tables, as after a process restart (or a kill -9: no shutdown step)."""
        self.engine = self.new_engine()
        with self.env.begin(write=True) as txn:
            return self.engine.recover(txn, self.now)

    def write_warehouse(self):
        with duckdb.connect(str(self.db)) as con:
            con.execute("CREATE OR REPLACE TABLE customers (user_id VARCHAR, plan VARCHAR, ltv DOUBLE, orders BIGINT, opt_in BOOLEAN)")
            for key, r in self.rows.items():
                con.execute("INSERT INTO customers VALUES (?, ?, ?, ?, ?)", [key, r["plan"], r["ltv"], r["orders"], r["opt_in"]])

    def memberships(self, skip=()) -> dict[str, set[str]]:
        with self.env.begin() as txn:
            out = {k: {self.engine.bits[b] for b in bits} - set(skip) for k, bits in self.store.all_memberships(txn)}
        return {k: v for k, v in out.items() if v}


@pytest.mark.parametrize("reference", [True, False], ids=["reference-evaluator", "compiled-evaluator"])
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(audiences=st.dictionaries(st.sampled_from(["a1", "a2", "a3"]), condition(), min_size=1, max_size=3),
       rows=st.dictionaries(st.sampled_from(PEOPLE[:4]), row, min_size=2, max_size=4),
       actions=st.lists(action(), min_size=1, max_size=12), drafts=st.lists(condition(), max_size=2))
def test_engine_matches_the_world(tmp_path_factory, reference, audiences, rows, actions, drafts):
    attrs = dict(ATTRS)
    models = {m.name: dict(m.properties) for m in MODELS}
    conditions = {a: parse_condition(d, attrs, models) for a, d in audiences.items()}
    h = Harness(tmp_path_factory.mktemp("engine"), audiences, dict(rows), reference)
    world = World(h.rows, conditions)
    assert h.memberships() == world.memberships(h.now)
    for act in actions:
        if act[0] == "advance":
            before = h.now
            h.now += act[1]
            with h.env.begin(write=True) as txn:
                changes = h.engine.tick(txn, h.now)
            for c in changes:  # a lapse takes effect exactly where the answer flips
                assert before < c.effective_us <= h.now
                if c.cause == Cause.AUDIENCE_CHANGE:  # a backfill reached them, at the timer's instant
                    continue
                cond = conditions[c.audience_id]
                assert world.holds(cond, c.person_key, c.effective_us) == (c.direction == Direction.ENTER)
                assert world.holds(cond, c.person_key, c.effective_us - 1) == (c.direction == Direction.EXIT)
        elif act[0] == "walk":
            h.walk()
        elif act[0] == "preview":
            check_preview(h, world, parse_condition(act[1], attrs, models))
        elif act[0] == "restart":
            replays = h.replays
            for c in h.restart():  # only timers that came due exactly now, none made up
                assert c.effective_us <= h.now
            assert h.replays == replays, "a restart replayed the event log instead of reading the stored state"
        elif act[0] == "redefine":
            _, aid, recreate = act
            if aid in world.audiences:
                with h.env.begin(write=True) as txn:
                    h.engine.delete_audience(txn, aid, h.now)
                    if recreate:
                        h.engine.put_audience(txn, aid, aid, "", audiences[aid], h.now, create=True)
                if not recreate:
                    del world.audiences[aid]
            elif aid in audiences and recreate:  # back after a while: what it kept before is stale
                with h.env.begin(write=True) as txn:
                    h.engine.put_audience(txn, aid, aid, "", audiences[aid], h.now, create=True)
                world.audiences[aid] = conditions[aid]
        elif act[0] == "sync":
            h.rows[act[1]] = act[2]
            h.write_warehouse()
            with h.env.begin(write=True) as txn:
                Syncer(h.env, h.project).run(txn=txn)
                h.engine.after_sync(txn, h.now)
        else:
            batch = []
            if act[0] == "identify":
                batch.append(Event(message_id=f"m{len(h.log)}", type=EventType.IDENTIFY, user_id=act[1],
                                   anonymous_id=act[2], timestamp_us=h.now, received_us=h.now))
            else:
                for who, model, dt, props, sid in act[1]:
                    user, anon = (who, "") if who.startswith("u") else ("", who)
                    typ, name = (EventType.PAGE, "") if model == "views" else (EventType.TRACK, "Added")
                    batch.append(Event(message_id=f"m{len(h.log) + len(batch)}", type=typ, name=name, user_id=user,
                                       anonymous_id=anon, timestamp_us=h.now + dt, received_us=h.now,
                                       properties=props, session_id=sid))
            for ev in batch:
                h.log.append(ev)
                ev.seq = len(h.log)
                world.add(ev)
            with h.env.begin(write=True) as txn:
                h.engine.apply(txn, [MatchedEvent(ev, tuple(matching_models(ev, MODELS))) for ev in batch], h.now)
        # An audience being backfilled is exact only once its walk ends; the others are, always.
        assert h.memberships(h.backfilling()) == world.memberships(h.now, h.backfilling()), act
    h.finish_backfill()
    assert h.memberships() == world.memberships(h.now)
    for definition in [*drafts, *audiences.values()]:
        check_preview(h, world, parse_condition(definition, attrs, models))


def check_preview(h: Harness, world: World, draft) -> None:
    """A draft's preview holds everyone the draft would hold now, whatever is being backfilled."""
    with h.env.begin() as txn:
        count, sample = h.engine.preview(txn, draft, h.now, 100, float("inf"))
    expected = {p for p in set(h.rows) | set(world.events) if world.holds(draft, p, h.now)}
    assert (count, set(sample)) == (len(expected), expected), draft


# -- backfill: audiences created or changed beside ingest ----------------------------------------------

EVER_TWO_VIEWS = {"event": {"event_model": "views", "scope": "SCOPE_EVER", "comparison": "COMPARISON_GE", "threshold": 2}}
TWO_CARTS_IN_A_MINUTE = {"event": {"event_model": "carts", "scope": "SCOPE_WITHIN", "window": "60s",
                                   "comparison": "COMPARISON_GE", "threshold": 2}}
FREE_PLAN = {"attribute": {"attribute": "plan", "operator": "OPERATOR_EQ", "value": {"string_value": "free"}}}
ROWS = {p: {"plan": "free" if i % 2 else "pro", "ltv": None, "orders": None, "opt_in": None} for i, p in enumerate(PEOPLE)}


class Backfill:
    """A harness with its world, and events sent through both."""

    def __init__(self, tmp, audiences: dict[str, dict]):
        self.h = Harness(tmp, audiences, dict(ROWS), reference=False)
        self.reads = 0
        read, fields = self.h.engine.read_event, self.h.engine.read_fields
        self.h.engine.read_event = lambda txn, seq: (self.count(), read(txn, seq))[1]
        self.h.engine.read_fields = lambda txn, seq: (self.count(), fields(txn, seq))[1]
        self.world = World(self.h.rows, {a: self.parse(d) for a, d in audiences.items()})

    def count(self):
        self.reads += 1

    @staticmethod
    def parse(definition):
        return parse_condition(definition, dict(ATTRS), {m.name: dict(m.properties) for m in MODELS})

    def send(self, who: str, model: str, n: int = 1) -> list:
        batch = []
        for _ in range(n):
            user, anon = (who, "") if who.startswith("u") else ("", who)
            typ, name = (EventType.PAGE, "") if model == "views" else (EventType.TRACK, "Added")
            ev = Event(message_id=f"m{len(self.h.log)}", type=typ, name=name, user_id=user, anonymous_id=anon,
                       timestamp_us=self.h.now, received_us=self.h.now, properties={})
            self.h.log.append(ev)
            ev.seq = len(self.h.log)
            self.world.add(ev)
            batch.append(ev)
        with self.h.env.begin(write=True) as txn:
            return self.h.engine.apply(txn, [MatchedEvent(ev, tuple(matching_models(ev, MODELS))) for ev in batch],
                                       self.h.now)

    def create(self, aid: str, definition: dict) -> None:
        with self.h.env.begin(write=True) as txn:
            self.h.engine.put_audience(txn, aid, aid, "", definition, self.h.now, create=True)
        self.world.audiences[aid] = self.parse(definition)

    def exact(self) -> bool:
        return self.h.memberships() == self.world.memberships(self.h.now)


def test_a_new_audience_returns_at_once_and_a_walk_brings_its_members(tmp_path):
    b = Backfill(tmp_path, {})
    for i, who in enumerate(PEOPLE[:4]):
        b.send(who, "views", n=i)  # u2 and u3 viewed twice or more
    b.create("two_views", EVER_TWO_VIEWS)
    assert b.reads == 0, "CreateAudience read the event log"
    assert b.h.backfilling() == {"two_views"}
    assert b.h.memberships() == {}  # nobody reached yet
    entered = []
    while b.h.backfilling():
        step = b.h.walk()
        assert all(c.cause == Cause.AUDIENCE_CHANGE and c.direction == Direction.ENTER for c in step)
        entered += [c.person_key for c in step]
    assert sorted(entered) == ["u2", "u3"]
    assert b.exact()
    assert b.reads == 0 + 1 + 2 + 3  # each person's own events, once


def test_explain_reads_a_snapshot_and_grafts_what_the_walk_has_not_brought_yet(tmp_path):
    b = Backfill(tmp_path, {})
    b.send("u2", "views", n=3)
    b.create("two_views", EVER_TWO_VIEWS)
    with b.h.env.begin() as txn:  # a read transaction, as ExplainMembership runs it beside the writer
        member, tree = b.h.engine.explain(txn, "two_views", "u2", b.h.now)
    assert not member  # the walk has not reached them...
    assert tree["value"] and tree["count"] == 3  # ... but the explanation already counts their history
    b.h.finish_backfill()
    with b.h.env.begin() as txn:
        assert b.h.engine.explain(txn, "two_views", "u2", b.h.now)[0]


def test_an_event_before_the_walk_grafts_the_person_once(tmp_path):
    b = Backfill(tmp_path, {})
    b.send("u1", "views")
    b.create("two_views", EVER_TWO_VIEWS)
    changes = b.send("u1", "views")  # the history, grafted, and this event: two views
    assert [(c.person_key, c.direction) for c in changes] == [("u1", Direction.ENTER)]
    b.h.finish_backfill()
    assert b.exact()
    with b.h.env.begin() as txn:
        assert sum(1 for c in b.h.store.changes_after(txn, 0, 100) if c.person_key == "u1") == 1


def test_an_audience_back_after_a_while_learns_again_what_it_missed(tmp_path):
    b = Backfill(tmp_path, {"carts": TWO_CARTS_IN_A_MINUTE})
    b.send("u1", "carts")
    with b.h.env.begin(write=True) as txn:
        b.h.engine.delete_audience(txn, "carts", b.h.now)
    del b.world.audiences["carts"]
    b.send("u1", "carts")  # stored without the leaf now: it left the program
    b.create("carts", TWO_CARTS_IN_A_MINUTE)
    b.h.finish_backfill()
    assert b.h.memberships() == {"u1": {"carts"}}
    assert b.exact()


def test_a_restart_in_the_middle_of_a_walk_resumes_it(tmp_path):
    b = Backfill(tmp_path, {"free": FREE_PLAN})
    for who in PEOPLE:
        b.send(who, "views", n=2)
    b.create("two_views", EVER_TWO_VIEWS)
    b.h.walk()
    b.h.walk()
    done = b.h.engine.backfilling["done"]
    b.h.restart()  # as after a kill -9: no shutdown step
    assert b.h.engine.backfilling["done"] == done == 2
    b.send("u5", "views")
    b.h.finish_backfill()
    assert b.exact()
    assert b.h.memberships()["u0"] == {"two_views"}


def test_the_warehouse_phase_moves_people_without_state_chunk_by_chunk_across_a_restart(tmp_path, monkeypatch):
    """A definition true for everyone without events: the warehouse phase moves them, and nobody with state."""
    from qualify.server.domain import backfill

    monkeypatch.setattr(backfill, "WAREHOUSE_CHUNK", 2)  # six people: three chunks
    not_two_views = {"not": {"condition": EVER_TWO_VIEWS}}
    b = Backfill(tmp_path, {"aud": FREE_PLAN})
    b.send("u1", "views", n=2)  # with realtime state: free, then two views (out of the new definition)
    b.send("u4", "views")  # with realtime state: pro, one view (into it)
    with b.h.env.begin(write=True) as txn:
        b.h.engine.put_audience(txn, "aud", "aud", "", not_two_views, b.h.now, create=False)
    b.world.audiences["aud"] = b.parse(not_two_views)
    moved = []
    while b.h.engine.backfilling["phase"] == "people":
        moved += [(c.person_key, c.direction) for c in b.h.walk()]
    assert sorted(moved) == [("u1", Direction.EXIT), ("u4", Direction.ENTER)]
    assert [(c.person_key, c.direction) for c in b.h.walk()] == [("u0", Direction.ENTER)]  # the first chunk
    assert b.h.engine.backfilling["after"] == 2
    b.h.restart()  # the walk's cache is gone: it resumes from the member index, a page per slice
    monkeypatch.setattr(backfill, "MEMBER_PAGE", 1)
    moved, slices = [], 0
    while b.h.backfilling():
        with b.h.env.begin(write=True) as txn:
            moved += [(c.person_key, c.direction) for c in b.h.engine.backfill_step(txn, b.h.now, seconds=0)]
        slices += 1
        if slices == 1:
            assert b.h.engine.walk.building and b.h.engine.backfilling["after"] == 2
    assert moved == [("u2", Direction.ENTER)]  # u3 and u5 were free: members already
    assert b.exact()
    assert b.h.memberships() == {p: {"aud"} for p in PEOPLE if p != "u1"}


def test_renaming_an_audience_moves_nobody(tmp_path):
    b = Backfill(tmp_path, {"two_views": EVER_TWO_VIEWS})
    b.send("u1", "views", n=2)
    with b.h.env.begin(write=True) as txn:
        _, changes = b.h.engine.put_audience(txn, "two_views", "Two views", "renamed", EVER_TWO_VIEWS, b.h.now,
                                             create=False)
    assert changes == [] and not b.h.backfilling()
    assert b.exact()


def test_a_changed_definition_moves_people_to_it_by_the_walk(tmp_path):
    b = Backfill(tmp_path, {"aud": EVER_TWO_VIEWS})
    b.send("u1", "views", n=2)
    b.send("u2", "carts", n=2)
    assert b.h.memberships() == {"u1": {"aud"}}
    with b.h.env.begin(write=True) as txn:
        b.h.engine.put_audience(txn, "aud", "aud", "", TWO_CARTS_IN_A_MINUTE, b.h.now, create=False)
    b.world.audiences["aud"] = b.parse(TWO_CARTS_IN_A_MINUTE)
    assert b.h.memberships() == {"u1": {"aud"}}  # the old definition's, until the walk reaches them
    b.h.finish_backfill()
    assert b.h.memberships() == {"u2": {"aud"}}
    assert b.exact()
