"""AudienceService against the real server: CRUD, validation, preview, membership queries, explanations.

Every test talks to ``qualify serve`` on the embedded demo (2,000 people) in a
subprocess, with a test clock (QUALIFY_TEST_CLOCK_FILE) so enter times and
window explanations are exact. Warehouse-only answers are checked against a
DuckDB query over the demo warehouse file the server generated; the changelog
is read straight from LMDB (read-only, as any reader process would).

The helpers at the top are shared with tests/test_realtime.py.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import duckdb
import grpc
import lmdb
import pytest
from google.protobuf import field_mask_pb2, json_format

from conftest import SMALL_DEMO, QualifyServer
from qualify.clients._errors import error_from_rpc_error
from qualify.server.storage.realtime import read_changelog
from qualify.v1 import (audience_pb2, audience_pb2_grpc, condition_pb2, event_pb2, ingest_pb2, ingest_pb2_grpc,
                        personalize_pb2, personalize_pb2_grpc)

S = 1_000_000
T0 = 1_795_867_200 * S  # 2026-11-28T12:00:00Z
CLOCK_ENV = "QUALIFY_TEST_CLOCK_FILE"
ENTER, EXIT = 1, 2
CAUSE_EVENT, CAUSE_SYNC, CAUSE_LAPSE, CAUSE_SESSION_END, CAUSE_MERGE, CAUSE_AUDIENCE = 1, 2, 3, 4, 5, 6


# ---------------------------------------------------------------- shared helpers


class TestClock:
    """The file the server reads "now" from; written atomically (the server may read at any moment)."""

    __test__ = False

    def __init__(self, path: Path, now_us: int = T0):
        self.path = path
        self.set(now_us)

    def set(self, now_us: int) -> int:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(str(int(now_us)))
        os.replace(tmp, self.path)
        self.now = int(now_us)
        return self.now

    def advance(self, seconds: float) -> int:
        return self.set(self.now + int(round(seconds * S)))


def cond(d: dict) -> condition_pb2.Condition:
    """A qualify.v1.Condition from its JSON mapping (proto field names)."""
    return json_format.ParseDict(d, condition_pb2.Condition())


def as_dict(c: condition_pb2.Condition) -> dict:
    return json_format.MessageToDict(c, preserving_proto_field_name=True)


def attr(name: str, op: str, value=None, values=None) -> dict:
    body = {"attribute": name, "operator": f"OPERATOR_{op}"}
    if value is not None:
        body["value"] = value
    if values is not None:
        body["values"] = values
    return {"attribute": body}


def sv(v: str) -> dict:
    return {"string_value": v}


def fv(v: float) -> dict:
    return {"float_value": v}


def iv(v: int) -> dict:
    return {"int_value": str(v)}


def ev(model: str, scope: str = "EVER", window: str | None = None, comparison: str = "GE", threshold: float = 1,
       filters: list | None = None, aggregation: str | None = None, prop: str | None = None) -> dict:
    body = {"event_model": model, "scope": f"SCOPE_{scope}", "comparison": f"COMPARISON_{comparison}",
            "threshold": threshold}
    if window is not None:
        body["window"] = window
    if filters:
        body["filters"] = filters
    if aggregation is not None:
        body["aggregation"] = f"AGGREGATION_{aggregation}"
    if prop is not None:
        body["property"] = prop
    return {"event": body}


def path_is(prop: str, value: str) -> dict:
    return {"property": prop, "operator": "OPERATOR_EQ", "value": sv(value)}


def and_(*cs) -> dict:
    return {"and": {"conditions": list(cs)}}


def or_(*cs) -> dict:
    return {"or": {"conditions": list(cs)}}


def not_(c) -> dict:
    return {"not": {"condition": c}}


def mid() -> str:
    return str(uuid.uuid4())


def event(type_: int, user: str = "", anon: str = "", ts_us: int | None = None, name: str = "",
          props: dict | None = None, session: str = "", message_id: str | None = None,
          previous_id: str = "") -> event_pb2.Event:
    e = event_pb2.Event(message_id=message_id or mid(), type=type_, name=name, user_id=user, anonymous_id=anon,
                        session_id=session, previous_id=previous_id)
    if props:
        e.properties.update(props)
    if ts_us is not None:
        e.timestamp.FromMicroseconds(ts_us)
    return e


def page(user: str = "", path: str = "/", ts_us: int | None = None, **kw) -> event_pb2.Event:
    return event(event_pb2.EVENT_TYPE_PAGE, user, ts_us=ts_us, name=path, props={"path": path, "title": path}, **kw)


def track(name: str, user: str = "", ts_us: int | None = None, **props_and_kw) -> event_pb2.Event:
    kw = {k: props_and_kw.pop(k) for k in ("anon", "session", "message_id") if k in props_and_kw}
    return event(event_pb2.EVENT_TYPE_TRACK, user, ts_us=ts_us, name=name, props=props_and_kw or None, **kw)


def product_view(user: str, ts_us: int, price: float | None = None, sku: str = "sku-0001", **kw):
    props = {"sku": sku} if price is None else {"sku": sku, "price": price}
    return track("Product Viewed", user, ts_us, **props, **kw)


def cart_add(user: str, ts_us: int, price: float = 10.0, sku: str = "sku-0001", **kw):
    return track("Product Added", user, ts_us, sku=sku, price=price, **kw)


def identify(user: str, anon: str, ts_us: int | None = None) -> event_pb2.Event:
    return event(event_pb2.EVENT_TYPE_IDENTIFY, user, anon=anon, ts_us=ts_us)


def error_of(call, *args, **kw):
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kw)
    return info.value.code(), error_from_rpc_error(info.value)


def ts_us(ts) -> int:
    return ts.seconds * S + ts.nanos // 1000


class Api:
    """Stubs of one server, with the calls the tests make over and over."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address)
        self.aud = audience_pb2_grpc.AudienceServiceStub(self.channel)
        self.ingest = ingest_pb2_grpc.IngestServiceStub(self.channel)
        self.pers = personalize_pb2_grpc.PersonalizeServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def create(self, aid: str, condition: dict, display_name: str = "", description: str = "",
               wait: bool = True) -> audience_pb2.Audience:
        a = audience_pb2.Audience(id=aid, display_name=display_name or aid, description=description,
                                  condition=cond(condition))
        created = self.aud.CreateAudience(audience_pb2.CreateAudienceRequest(audience=a), timeout=30).audience
        return self.wait_live(aid) if wait else created

    def wait_live(self, aid: str, timeout: float = 30.0) -> audience_pb2.Audience:
        """The audience, once its backfill has ended."""
        deadline = time.monotonic() + timeout
        while (got := self.get(aid)).state != audience_pb2.Audience.LIVE:
            assert time.monotonic() < deadline, f"{aid} still backfilling ({got.backfill_progress:.0%})"
            time.sleep(0.01)
        return got

    def get(self, aid: str) -> audience_pb2.Audience:
        return self.aud.GetAudience(audience_pb2.GetAudienceRequest(id=aid), timeout=10).audience

    def delete(self, aid: str) -> None:
        self.aud.DeleteAudience(audience_pb2.DeleteAudienceRequest(id=aid), timeout=30)

    def check(self, key: str, ids=()) -> dict[str, int]:
        r = self.aud.CheckMembership(audience_pb2.CheckMembershipRequest(person_key=key, audience_ids=list(ids)),
                                     timeout=10)
        return {m.audience_id: ts_us(m.enter_time) for m in r.memberships}

    def is_member(self, key: str, aid: str) -> bool:
        return aid in self.check(key, [aid])

    def memberships(self, key: str, collection: str = "customers") -> dict[str, int]:
        r = self.pers.Get(personalize_pb2.GetRequest(collection=collection, key=key), timeout=10).record
        return {m.audience_id: ts_us(m.enter_time) for m in r.memberships}

    def members(self, aid: str, page_size: int = 0) -> list[str]:
        keys, token, pages = [], "", 0
        while True:
            r = self.aud.ListMembers(audience_pb2.ListMembersRequest(id=aid, page_size=page_size, page_token=token),
                                     timeout=10)
            if page_size:
                assert len(r.person_keys) <= page_size
            keys += r.person_keys
            token = r.next_page_token
            pages += 1
            assert pages < 100_000
            if not token:
                return keys

    def explain(self, aid: str, key: str) -> audience_pb2.ExplainMembershipResponse:
        return self.aud.ExplainMembership(audience_pb2.ExplainMembershipRequest(id=aid, person_key=key), timeout=10)

    def send(self, *events: event_pb2.Event) -> ingest_pb2.TrackBatchResponse:
        r = self.ingest.TrackBatch(ingest_pb2.TrackBatchRequest(events=list(events)), timeout=30)
        assert not r.rejections, r.rejections
        return r


def warehouse_keys(db: Path, where: str) -> set[str]:
    with duckdb.connect(str(db), read_only=True) as con:
        return {r[0] for r in con.execute(f"SELECT user_id FROM customers WHERE {where}").fetchall()}


def warehouse_rows(db: Path, columns: str = "*") -> dict[str, dict]:
    with duckdb.connect(str(db), read_only=True) as con:
        cur = con.execute(f"SELECT {columns} FROM customers")
        names = [d[0] for d in cur.description]
        return {row[names.index("user_id")]: dict(zip(names, row)) for row in cur.fetchall()}


def changelog(lmdb_dir: Path, after: int = 0) -> list[tuple[int, list]]:
    """(sequence, [audience, person, direction, effective_us, cause, message_id]) rows, oldest first."""
    env = lmdb.open(str(lmdb_dir), readonly=True, lock=True, max_dbs=64)
    try:
        db = env.open_db(b"changelog", create=False)
        with env.begin() as txn:
            return [(c.sequence, [c.audience_id, c.person_key, int(c.direction), c.effective_us, int(c.cause),
                                  c.message_id]) for c in read_changelog(txn, db, after, limit=10**9)]
    finally:
        env.close()


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.01):
    """Polls until predicate() is truthy; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


class Demo:
    """A running demo server with its clock, its warehouse file and its LMDB directory."""

    def __init__(self, workdir: Path, clock: TestClock, *extra: str):
        self.workdir = workdir
        self.clock = clock
        self.args = ("--demo-people", str(SMALL_DEMO), *extra)
        self.server: QualifyServer | None = None
        self.api: Api | None = None

    def start(self) -> "Demo":
        self.server = QualifyServer(self.workdir, *self.args, env={CLOCK_ENV: str(self.clock.path)}).start()
        self.api = Api(self.server.address)
        return self

    def kill9(self) -> None:
        if self.api is not None:
            self.api.close()
        self.server.kill()  # SIGKILL

    def stop(self) -> int:
        if self.api is not None:
            self.api.close()
        return self.server.stop()

    @property
    def warehouse(self) -> Path:
        return self.workdir / "qualify-data" / f"demo-warehouse-{SMALL_DEMO}.duckdb"

    @property
    def lmdb(self) -> Path:
        return self.workdir / "qualify-data" / "lmdb"


# ---------------------------------------------------------------- the shared server


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    work = tmp_path_factory.mktemp("audiences")
    d = Demo(work, TestClock(work / "clock", T0)).start()
    yield d
    assert d.stop() == 0, d.server.log()


@pytest.fixture
def api(demo) -> Api:
    return demo.api


FREE = attr("plan", "EQ", sv("free"))
PRO = attr("plan", "EQ", sv("pro"))


# ---------------------------------------------------------------- CRUD


def test_create_get_list_update_delete(demo, api):
    db = demo.warehouse
    free, pro = warehouse_keys(db, "plan = 'free'"), warehouse_keys(db, "plan = 'pro'")
    demo.clock.advance(1)
    created_at = demo.clock.now

    got = api.create("crud_free", FREE, "Free plan", "everyone on the free plan")
    assert (got.id, got.display_name, got.description) == ("crud_free", "Free plan", "everyone on the free plan")
    assert as_dict(got.condition) == FREE
    assert ts_us(got.create_time) == ts_us(got.update_time) == created_at
    assert got.member_count == len(free) > 0
    assert api.get("crud_free") == got

    code, err = error_of(api.create, "crud_free", PRO)
    assert (code, err.reason) == (grpc.StatusCode.ALREADY_EXISTS, "AUDIENCE_ALREADY_EXISTS")
    assert api.get("crud_free") == got  # untouched

    api.create("crud_gold", attr("loyalty_tier", "IN", values=[sv("gold"), sv("platinum")]))
    api.create("crud_ltv", attr("ltv", "GT", fv(2000)))

    # ListAudiences, one per page: every audience exactly once, in id order, same as one big page.
    everything = api.aud.ListAudiences(audience_pb2.ListAudiencesRequest(), timeout=10)
    assert everything.next_page_token == ""
    ids = [a.id for a in everything.audiences]
    assert {"crud_free", "crud_gold", "crud_ltv"} <= set(ids) and ids == sorted(ids)
    paged, token = [], ""
    for _ in range(len(ids) + 1):
        r = api.aud.ListAudiences(audience_pb2.ListAudiencesRequest(page_size=1, page_token=token), timeout=10)
        assert len(r.audiences) == 1
        paged += list(r.audiences)
        token = r.next_page_token
        if not token:
            break
    assert paged == list(everything.audiences)
    for a in paged:
        assert a.member_count == api.get(a.id).member_count == len(api.members(a.id))
    code, err = error_of(api.aud.ListAudiences, audience_pb2.ListAudiencesRequest(page_size=-1))
    assert (code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")

    # A full update (no mask) replaces every writable field; memberships follow at once.
    member_free = sorted(free)[0]
    member_pro = sorted(pro)[0]
    assert "crud_free" in api.memberships(member_free) and "crud_free" not in api.memberships(member_pro)
    demo.clock.advance(10)
    updated_at = demo.clock.now
    new = audience_pb2.Audience(id="crud_free", display_name="Pro plan", description="", condition=cond(PRO))
    up = api.aud.UpdateAudience(audience_pb2.UpdateAudienceRequest(audience=new), timeout=30).audience
    assert (up.display_name, up.description, as_dict(up.condition)) == ("Pro plan", "", PRO)
    assert ts_us(up.create_time) == created_at and ts_us(up.update_time) == updated_at
    assert up.state in (audience_pb2.Audience.BACKFILLING, audience_pb2.Audience.LIVE)  # it returned at once
    assert api.wait_live("crud_free").member_count == len(pro)
    assert set(api.members("crud_free")) == pro
    assert "crud_free" not in api.memberships(member_free)
    assert api.memberships(member_pro)["crud_free"] == updated_at

    # A display_name mask changes only the display name.
    demo.clock.advance(10)
    other = audience_pb2.Audience(id="crud_free", display_name="Renamed", description="not applied",
                                  condition=cond(FREE))
    up2 = api.aud.UpdateAudience(audience_pb2.UpdateAudienceRequest(
        audience=other, update_mask=field_mask_pb2.FieldMask(paths=["display_name"])), timeout=30).audience
    assert (up2.display_name, up2.description, as_dict(up2.condition)) == ("Renamed", "", PRO)
    assert up2.member_count == len(pro) and up2.state == audience_pb2.Audience.LIVE  # nobody moves: no backfill
    assert ts_us(up2.update_time) == demo.clock.now
    assert set(api.members("crud_free")) == pro
    assert api.memberships(member_pro)["crud_free"] == updated_at  # still the same membership: entered then

    code, err = error_of(api.aud.UpdateAudience, audience_pb2.UpdateAudienceRequest(
        audience=other, update_mask=field_mask_pb2.FieldMask(paths=["id"])))
    assert (code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert [f for f, _ in err.field_violations] == ["update_mask.paths"]
    code, err = error_of(api.aud.UpdateAudience, audience_pb2.UpdateAudienceRequest(
        audience=audience_pb2.Audience(id="crud_missing", condition=cond(FREE))))
    assert (code, err.reason) == (grpc.StatusCode.NOT_FOUND, "AUDIENCE_NOT_FOUND")

    # Delete: every member exits (Get shows no membership); the audience is gone everywhere.
    seq = changelog(demo.lmdb)[-1][0]
    demo.clock.advance(1)
    api.delete("crud_free")
    assert "crud_free" not in api.memberships(member_pro)
    exits = [row for _, row in changelog(demo.lmdb, seq)]
    assert sorted(r[1] for r in exits) == sorted(pro)
    assert all(r[0] == "crud_free" and r[2] == EXIT and r[3] == demo.clock.now and r[4] == CAUSE_AUDIENCE
               for r in exits)
    assert "crud_free" not in [a.id for a in api.aud.ListAudiences(audience_pb2.ListAudiencesRequest()).audiences]
    for call, request in [(api.aud.GetAudience, audience_pb2.GetAudienceRequest(id="crud_free")),
                          (api.aud.DeleteAudience, audience_pb2.DeleteAudienceRequest(id="crud_free")),
                          (api.aud.ListMembers, audience_pb2.ListMembersRequest(id="crud_free")),
                          (api.aud.CheckMembership, audience_pb2.CheckMembershipRequest(
                              person_key=member_pro, audience_ids=["crud_free"]))]:
        code, err = error_of(call, request)
        assert (code, err.reason) == (grpc.StatusCode.NOT_FOUND, "AUDIENCE_NOT_FOUND"), call

    # The id can be used again, and the new audience's members are exactly its own.
    again = api.create("crud_free", attr("plan", "EQ", sv("enterprise")))
    ent = warehouse_keys(db, "plan = 'enterprise'")
    assert again.member_count == len(ent) and set(api.members("crud_free")) == ent
    assert "crud_free" not in api.memberships(member_pro)
    for aid in ("crud_free", "crud_gold", "crud_ltv"):
        api.delete(aid)


@pytest.mark.parametrize("rpc,request_", [
    ("GetAudience", audience_pb2.GetAudienceRequest(id="nope")),
    ("DeleteAudience", audience_pb2.DeleteAudienceRequest(id="nope")),
    ("UpdateAudience", audience_pb2.UpdateAudienceRequest(audience=audience_pb2.Audience(id="nope", condition=cond(FREE)))),
    ("PreviewAudience", audience_pb2.PreviewAudienceRequest(id="nope")),
    ("CheckMembership", audience_pb2.CheckMembershipRequest(person_key="user-1", audience_ids=["nope"])),
    ("ListMembers", audience_pb2.ListMembersRequest(id="nope")),
    ("ExplainMembership", audience_pb2.ExplainMembershipRequest(id="nope", person_key="user-1")),
])
def test_unknown_audience_is_not_found(api, rpc, request_):
    code, err = error_of(getattr(api.aud, rpc), request_, timeout=10)
    assert (code, err.reason) == (grpc.StatusCode.NOT_FOUND, "AUDIENCE_NOT_FOUND")


# ---------------------------------------------------------------- validation

P = "audience.condition"
DEEP_OK = FREE
for _ in range(32):
    DEEP_OK = not_(DEEP_OK)
DEEP_BAD = not_(DEEP_OK)  # the attribute sits at depth 33

INVALID = {
    "window missing": (and_(FREE, ev("page_views", "WITHIN")), f"{P}.and.conditions[1].event.window"),
    "window zero": (and_(FREE, ev("page_views", "WITHIN", "0s")), f"{P}.and.conditions[1].event.window"),
    "window on ever": (ev("page_views", "EVER", "60s"), f"{P}.event.window"),
    "unknown attribute": (attr("shoe_size", "EQ", iv(42)), f"{P}.attribute.attribute"),
    "unknown event model": (ev("pricing_views"), f"{P}.event.event_model"),
    "unknown property": (ev("page_views", filters=[path_is("referrer", "x")]), f"{P}.event.filters[0].property"),
    "wrong literal type": (attr("plan", "EQ", iv(3)), f"{P}.attribute.value.int_value"),
    "wrong property literal type": (ev("page_views", filters=[{"property": "path", "operator": "OPERATOR_EQ",
                                                              "value": fv(1.0)}]),
                                    f"{P}.event.filters[0].value.float_value"),
    "string for a number": (attr("ltv", "GT", sv("100")), f"{P}.attribute.value.string_value"),
    "between one value": (attr("ltv", "BETWEEN", values=[fv(1)]), f"{P}.attribute.values"),
    "in without values": (attr("plan", "IN"), f"{P}.attribute.values"),
    "eq without value": (attr("plan", "EQ"), f"{P}.attribute.value"),
    "contains on a number": (attr("ltv", "CONTAINS", fv(1)), f"{P}.attribute.operator"),
    "starts_with on a number": (attr("orders_count", "STARTS_WITH", iv(1)), f"{P}.attribute.operator"),
    "lt on a bool": (attr("email_opt_in", "LT", {"bool_value": True}), f"{P}.attribute.operator"),
    "operator unspecified": ({"attribute": {"attribute": "plan", "value": sv("free")}}, f"{P}.attribute.operator"),
    "aggregation without property": (ev("product_views", aggregation="SUM", threshold=10), f"{P}.event.property"),
    "aggregation of a string": (ev("product_views", aggregation="AVG", prop="sku"), f"{P}.event.property"),
    "count with a property": (ev("product_views", aggregation="COUNT", prop="price"), f"{P}.event.property"),
    "count threshold fractional": (ev("page_views", threshold=1.5), f"{P}.event.threshold"),
    "count threshold negative": (ev("page_views", comparison="GT", threshold=-1), f"{P}.event.threshold"),
    "scope unspecified": ({"event": {"event_model": "page_views", "comparison": "COMPARISON_GE", "threshold": 1}},
                          f"{P}.event.scope"),
    "comparison unspecified": ({"event": {"event_model": "page_views", "scope": "SCOPE_EVER", "threshold": 1}},
                               f"{P}.event.comparison"),
    "nesting too deep": (DEEP_BAD, P + ".not.condition" * 33),
    "empty and": ({"and": {}}, f"{P}.and.conditions"),
    "empty or": (and_(FREE, {"or": {}}), f"{P}.and.conditions[1].or.conditions"),
    "no kind": ({}, P),
    "not without child": ({"not": {}}, f"{P}.not.condition"),
}


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_definition_names_the_field(api, name):
    definition, field = INVALID[name]
    a = audience_pb2.Audience(id="invalid_one")
    a.condition.CopyFrom(cond(definition))
    a.condition.SetInParent()
    code, err = error_of(api.aud.CreateAudience, audience_pb2.CreateAudienceRequest(audience=a), timeout=10)
    assert (code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_AUDIENCE"), err
    assert [f for f, _ in err.field_violations] == [field], err.field_violations
    assert all(d for _, d in err.field_violations)
    # Nothing was created, and an update with the same definition is refused the same way.
    assert error_of(api.get, "invalid_one")[0] == grpc.StatusCode.NOT_FOUND
    api.create("invalid_one", FREE)
    try:
        code, err = error_of(api.aud.UpdateAudience, audience_pb2.UpdateAudienceRequest(audience=a), timeout=10)
        assert (code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_AUDIENCE")
        assert [f for f, _ in err.field_violations] == [field]
        assert as_dict(api.get("invalid_one").condition) == FREE
    finally:
        api.delete("invalid_one")


def _window(seconds: int, nanos: int = 0) -> condition_pb2.Condition:
    c = cond(ev("page_views", "WITHIN", "60s"))
    c.event.window.seconds, c.event.window.nanos = seconds, nanos
    return c


def _literal(seconds: int, nanos: int = 0) -> condition_pb2.Condition:
    c = cond(attr("signup_date", "GT", {"timestamp_value": "2020-01-01T00:00:00Z"}))
    c.attribute.value.timestamp_value.seconds, c.attribute.value.timestamp_value.nanos = seconds, nanos
    return c


def _filter_literal(seconds: int, nanos: int = 0) -> condition_pb2.Condition:
    c = cond(and_(FREE, ev("product_views", filters=[{"property": "price", "operator": "OPERATOR_IN",
                                                     "values": [fv(1), fv(2)]}])))
    literal = getattr(c, "and").conditions[1].event.filters[0].values[1].timestamp_value
    literal.seconds, literal.nanos = seconds, nanos
    return c


# Durations and Timestamps the JSON mapping cannot write (they once answered INTERNAL).
OUT_OF_RANGE = {
    "window seconds 2**63-1": (lambda: _window(2**63 - 1), ".event.window"),
    "window nanos 2e9": (lambda: _window(60, 2_000_000_000), ".event.window"),
    "window mixed signs": (lambda: _window(60, -1), ".event.window"),
    "literal seconds 2**62": (lambda: _literal(2**62), ".attribute.value.timestamp_value"),
    "literal seconds -2**62": (lambda: _literal(-2**62), ".attribute.value.timestamp_value"),
    "literal nanos -1": (lambda: _literal(0, -1), ".attribute.value.timestamp_value"),
    "filter literal in a list": (lambda: _filter_literal(2**62),
                                 ".and.conditions[1].event.filters[0].values[1].timestamp_value"),
}


@pytest.mark.parametrize("name", list(OUT_OF_RANGE))
def test_out_of_range_durations_and_timestamps_are_invalid_with_the_field(api, name):
    make, field = OUT_OF_RANGE[name]
    condition = make()
    create = audience_pb2.CreateAudienceRequest(audience=audience_pb2.Audience(id="out_of_range", condition=condition))
    update = audience_pb2.UpdateAudienceRequest(audience=audience_pb2.Audience(id="out_of_range", condition=condition))
    preview = audience_pb2.PreviewAudienceRequest(condition=condition)
    for call, request_, prefix in ((api.aud.CreateAudience, create, P), (api.aud.UpdateAudience, update, P),
                                   (api.aud.PreviewAudience, preview, "condition")):
        code, err = error_of(call, request_, timeout=10)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (call, err)
        assert [f for f, _ in err.field_violations] == [prefix + field], err.field_violations


def test_nesting_of_exactly_32_levels_is_accepted(api):
    got = api.create("deep_32", DEEP_OK)
    assert as_dict(got.condition) == DEEP_OK
    api.delete("deep_32")


def test_every_violation_is_reported(api):
    definition = and_(attr("shoe_size", "EQ", iv(1)), ev("nope"), attr("plan", "BETWEEN", values=[sv("a")]))
    code, err = error_of(api.create, "several_bad", definition)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in err.field_violations] == [f"{P}.and.conditions[0].attribute.attribute",
                                                    f"{P}.and.conditions[1].event.event_model",
                                                    f"{P}.and.conditions[2].attribute.values"]


def test_missing_condition_is_invalid(api):
    code, err = error_of(api.aud.CreateAudience,
                         audience_pb2.CreateAudienceRequest(audience=audience_pb2.Audience(id="no_condition")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and err.reason in ("INVALID_REQUEST", "INVALID_AUDIENCE")
    assert [f for f, _ in err.field_violations] == ["audience.condition"]


@pytest.mark.parametrize("bad_id", ["", "Upper", "with space", "a" * 64, "dots.are.out", "ünïcode", "slash/no"])
def test_bad_audience_ids(api, bad_id):
    code, err = error_of(api.create, bad_id, FREE)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and err.reason in ("INVALID_REQUEST", "INVALID_AUDIENCE")
    assert [f for f, _ in err.field_violations] == ["audience.id"]


def test_longest_and_odd_but_valid_ids(api):
    for aid in ["a" * 63, "0", "a-b_c-9"]:
        assert api.create(aid, FREE).id == aid
        api.delete(aid)


@pytest.mark.parametrize("rpc", ["CreateAudience", "UpdateAudience", "DeleteAudience", "GetAudience", "ListAudiences",
                                 "PreviewAudience", "CheckMembership", "ListMembers", "ExplainMembership"])
def test_malformed_bytes_are_invalid_argument(demo, rpc):
    with grpc.insecure_channel(demo.server.address) as ch:
        code, err = error_of(ch.unary_unary(f"/qualify.v1.AudienceService/{rpc}"), b"\xff\xff\xff", timeout=5)
    assert (code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert [f for f, _ in err.field_violations] == ["(request)"]


# ---------------------------------------------------------------- preview, check, members


def test_preview_a_draft_warehouse_condition(demo, api):
    draft = and_(attr("plan", "IN", values=[sv("free"), sv("starter")]), attr("ltv", "GE", fv(1000)),
                 not_(attr("country", "EQ", sv("US"))))
    want = warehouse_keys(demo.warehouse, "plan IN ('free', 'starter') AND ltv >= 1000 AND country <> 'US'")
    r = api.aud.PreviewAudience(audience_pb2.PreviewAudienceRequest(condition=cond(draft), sample_size=10), timeout=10)
    assert r.count == len(want) > 10
    assert len(r.sample_keys) == 10 and set(r.sample_keys) <= want
    assert len(set(r.sample_keys)) == 10
    # A draft is not saved.
    assert all(a.condition != cond(draft) for a in api.aud.ListAudiences(audience_pb2.ListAudiencesRequest()).audiences)
    r0 = api.aud.PreviewAudience(audience_pb2.PreviewAudienceRequest(condition=cond(draft)), timeout=10)
    assert (r0.count, list(r0.sample_keys)) == (len(want), [])
    big = api.aud.PreviewAudience(audience_pb2.PreviewAudienceRequest(condition=cond(FREE), sample_size=100))
    assert len(big.sample_keys) == 100 and set(big.sample_keys) <= warehouse_keys(demo.warehouse, "plan = 'free'")


def test_preview_rejects_bad_requests(api):
    code, err = error_of(api.aud.PreviewAudience, audience_pb2.PreviewAudienceRequest(
        condition=cond(attr("shoe_size", "EQ", iv(1)))))
    assert (code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_AUDIENCE")
    assert [f for f, _ in err.field_violations] == ["condition.attribute.attribute"]
    for request in [audience_pb2.PreviewAudienceRequest(condition=cond(FREE), sample_size=101),
                    audience_pb2.PreviewAudienceRequest(condition=cond(FREE), sample_size=-1),
                    audience_pb2.PreviewAudienceRequest()]:
        code, err = error_of(api.aud.PreviewAudience, request)
        assert (code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"), request


def test_preview_saved_and_realtime_drafts(demo, api):
    db = demo.warehouse
    rich = warehouse_keys(db, "ltv > 3000")
    saved = api.create("preview_rich", attr("ltv", "GT", fv(3000)))
    r = api.aud.PreviewAudience(audience_pb2.PreviewAudienceRequest(id="preview_rich", sample_size=5))
    assert r.count == saved.member_count == len(rich) and set(r.sample_keys) <= rich and len(r.sample_keys) == 5

    # A draft over events replays each person's own events: only the people who did it qualify.
    now = demo.clock.now
    a, b, c = "user-1901", "user-1902", "user-1903"
    api.send(page(a, "/preview-x", now - 5 * S), page(a, "/preview-x", now - 4 * S),
             page(b, "/preview-x", now - 3 * S), page(c, "/elsewhere", now - 3 * S))
    draft = ev("page_views", "WITHIN", "60s", "GE", 1, filters=[path_is("path", "/preview-x")])
    r = api.aud.PreviewAudience(audience_pb2.PreviewAudienceRequest(condition=cond(draft), sample_size=10))
    assert (r.count, sorted(r.sample_keys)) == (2, [a, b])
    twice = ev("page_views", "WITHIN", "60s", "GE", 2, filters=[path_is("path", "/preview-x")])
    r = api.aud.PreviewAudience(audience_pb2.PreviewAudienceRequest(condition=cond(twice), sample_size=10))
    assert (r.count, list(r.sample_keys)) == (1, [a])
    # Did-not: everyone but a and b (the warehouse's 2,000, plus anyone with events outside it).
    never = ev("page_views", "WITHIN", "60s", "EQ", 0, filters=[path_is("path", "/preview-x")])
    r = api.aud.PreviewAudience(audience_pb2.PreviewAudienceRequest(condition=cond(never), sample_size=100))
    assert a not in r.sample_keys and b not in r.sample_keys
    assert r.count >= SMALL_DEMO - 2
    # Drafts see "now": once the window has moved, nobody qualifies.
    demo.clock.advance(61)
    r = api.aud.PreviewAudience(audience_pb2.PreviewAudienceRequest(condition=cond(draft), sample_size=10))
    assert (r.count, list(r.sample_keys)) == (0, [])
    api.delete("preview_rich")


def test_check_membership(demo, api):
    db = demo.warehouse
    free = sorted(warehouse_keys(db, "plan = 'free'"))[5]
    pro = sorted(warehouse_keys(db, "plan = 'pro'"))[5]
    demo.clock.advance(1)
    at = demo.clock.now
    api.create("check_free", FREE)
    api.create("check_pro", PRO)
    assert api.check(free, ["check_free", "check_pro"]) == {"check_free": at}
    assert api.check(pro, ["check_free", "check_pro"]) == {"check_pro": at}
    everything = api.check(free)  # empty audience_ids: every audience
    assert everything["check_free"] == at and "check_pro" not in everything
    assert api.check("user-999999", ["check_free", "check_pro"]) == {}  # unknown people are simply not members
    assert api.check("anon:never-seen", ["check_free"]) == {}
    code, err = error_of(api.aud.CheckMembership, audience_pb2.CheckMembershipRequest(audience_ids=["check_free"]))
    assert (code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    code, err = error_of(api.aud.CheckMembership, audience_pb2.CheckMembershipRequest(
        person_key=free, audience_ids=["check_free", "check_nope"]))
    assert (code, err.reason) == (grpc.StatusCode.NOT_FOUND, "AUDIENCE_NOT_FOUND")
    # Personalize Get agrees.
    got = api.memberships(free)
    assert got["check_free"] == at and "check_pro" not in got
    api.delete("check_free")
    api.delete("check_pro")


def test_list_members_pages_cover_exactly_the_members(demo, api):
    db = demo.warehouse
    free = warehouse_keys(db, "plan = 'free'")
    small = warehouse_keys(db, "plan = 'pro' AND loyalty_tier = 'platinum'")
    assert 0 < len(small) < 200
    api.create("members_free", FREE)
    api.create("members_small", and_(PRO, attr("loyalty_tier", "EQ", sv("platinum"))))
    for size in (0, 37, 1000):
        keys = api.members("members_free", size)
        assert len(keys) == len(set(keys)) and set(keys) == free and keys == sorted(keys), size
    one = api.members("members_small", 1)
    assert one == sorted(small)
    assert api.get("members_free").member_count == len(free)
    assert api.get("members_small").member_count == len(small)
    # A page that ends exactly at the last member says so.
    r = api.aud.ListMembers(audience_pb2.ListMembersRequest(id="members_small", page_size=len(small)))
    assert list(r.person_keys) == sorted(small) and r.next_page_token == ""
    code, err = error_of(api.aud.ListMembers, audience_pb2.ListMembersRequest(id="members_small", page_size=-5))
    assert (code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    api.delete("members_free")
    api.delete("members_small")


# ---------------------------------------------------------------- explain


def joined(parent: str, rel: str) -> str:
    return rel if parent == "" else f"{parent}.{rel}"


def test_explain_membership_windowed(demo, api):
    db = demo.warehouse
    person = sorted(warehouse_keys(db, "plan = 'free'"))[7]
    pro = sorted(warehouse_keys(db, "plan = 'pro'"))[7]
    definition = and_(ev("page_views", "WITHIN", "600s", "GE", 3, filters=[path_is("path", "/pricing")]), FREE)
    api.create("explain_pricing", definition)
    now = demo.clock.now
    first = now - 50 * S
    api.send(page(person, "/pricing", first), page(pro, "/pricing", first))

    r = api.explain("explain_pricing", person)
    root = r.root
    assert r.member is False and root.value is False
    assert root.path in ("", "condition")
    leaf, plan = root.children
    assert leaf.path == joined(root.path, "and.conditions[0]") and plan.path == joined(root.path, "and.conditions[1]")
    assert (leaf.value, leaf.count, leaf.HasField("changes_at")) == (False, 1, False)
    assert not leaf.HasField("aggregate")  # a count leaf: the count is in `count`
    assert leaf.summary == "qualifies after 2 more page_views events"
    assert plan.value is True and "free" in plan.summary and not plan.children

    api.send(page(person, "/pricing", now - 40 * S))
    leaf = api.explain("explain_pricing", person).root.children[0]
    assert (leaf.count, leaf.summary) == (2, "qualifies after 1 more page_views event")
    api.send(page(person, "/pricing", now - 30 * S), page(person, "/home", now - 20 * S))
    r = api.explain("explain_pricing", person)
    leaf = r.root.children[0]
    assert r.member is True and r.root.value is True
    assert (leaf.value, leaf.count) == (True, 3)
    assert ts_us(leaf.changes_at) == first + 600 * S  # the first view leaves the window then
    assert leaf.summary.startswith("exits at ")

    # The pro person: the event leaf holds nowhere near, the plan leaf does not.
    r = api.explain("explain_pricing", pro)
    assert r.member is False
    assert [(c.value, c.count) for c in r.root.children] == [(False, 1), (False, 0)]
    assert "pro" in r.root.children[1].summary

    # Someone with no events and no record: counts 0, attributes missing.
    r = api.explain("explain_pricing", "user-999999")
    assert r.member is False and r.root.children[0].count == 0 and r.root.children[1].value is False
    code, err = error_of(api.aud.ExplainMembership, audience_pb2.ExplainMembershipRequest(id="explain_pricing"))
    assert (code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    api.delete("explain_pricing")


def test_explain_aggregates_and_not(demo, api):
    person = "user-1950"
    now = demo.clock.now
    definition = or_(ev("product_views", "WITHIN", "600s", "GE", 100, aggregation="SUM", prop="price"),
                     not_(ev("product_views", "EVER", comparison="GE", threshold=1)))
    api.create("explain_sum", definition)
    r = api.explain("explain_sum", person)
    assert r.member is True  # nothing viewed yet: the NOT holds
    total, negation = r.root.children
    assert total.value is False and not total.HasField("aggregate")  # a sum over no events is missing
    assert negation.value is True and negation.children[0].path == joined(negation.path, "not.condition")
    api.send(product_view(person, now - 10 * S, 30.0), product_view(person, now - 5 * S, 45.5),
             product_view(person, now - 4 * S))  # no price: counted, not summed
    r = api.explain("explain_sum", person)
    total, negation = r.root.children
    assert r.member is False and not api.is_member(person, "explain_sum")
    assert (total.value, total.count, total.aggregate) == (False, 3, 75.5)
    assert negation.value is False and negation.children[0].count == 3
    api.send(product_view(person, now - 3 * S, 24.5))
    r = api.explain("explain_sum", person)
    assert r.member is True and r.root.children[0].aggregate == 100.0
    assert ts_us(r.root.children[0].changes_at) == now - 10 * S + 600 * S
    api.delete("explain_sum")


# ---------------------------------------------------------------- deleting one audience leaves the others right


@pytest.fixture
def two_audiences(tmp_path):
    """A fresh server with del_a (page views of /a AND plan free) then del_b (2+ cart adds AND plan pro)."""
    d = Demo(tmp_path, TestClock(tmp_path / "clock", T0)).start()
    d.api.create("del_a", and_(ev("page_views", filters=[path_is("path", "/a")]), FREE))
    d.api.create("del_b", and_(ev("cart_adds", "EVER", comparison="GE", threshold=2), PRO))
    yield d
    assert d.stop() == 0, d.server.log()


def test_after_a_delete_people_with_realtime_state_are_still_evaluated(two_audiences):
    d = two_audiences
    api, now = d.api, d.clock.now
    early = sorted(warehouse_keys(d.warehouse, "plan = 'pro'"))[0]
    api.send(page(early, "/a", now - 5 * S), cart_add(early, now - 5 * S))
    api.delete("del_a")
    api.send(cart_add(early, now - 4 * S))  # the server must still accept and evaluate this
    assert api.check(early, ["del_b"]) == {"del_b": now}
    assert api.members("del_b") == [early]


def test_after_a_delete_the_remaining_audiences_read_their_own_warehouse_parts(two_audiences):
    d = two_audiences
    api, now = d.api, d.clock.now
    pro = sorted(warehouse_keys(d.warehouse, "plan = 'pro'"))[1]
    free = sorted(warehouse_keys(d.warehouse, "plan = 'free'"))[1]
    api.delete("del_a")
    api.send(cart_add(pro, now - 3 * S), cart_add(pro, now - 2 * S),
             cart_add(free, now - 3 * S), cart_add(free, now - 2 * S))
    assert api.check(pro, ["del_b"]) == {"del_b": now}
    assert api.check(free, ["del_b"]) == {}
    assert api.members("del_b") == [pro]
