"""The Segment tracking API, driven by the real Segment and RudderStack Python SDKs and by plain HTTP.

Every server is ``qualify serve`` with keys on (the ``edge_server`` fixture):
the SDKs' write key is a Qualify key with the ingest scope. What is checked
is what a customer switching their SDK's host would rely on: events logged
once, a realtime audience reacting, 401 for a wrong key, a bad event
refused while its neighbours are kept, gzip, Segment's size limits and
its sentAt clock-skew correction.
"""

from __future__ import annotations

import gzip
import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import requests
from hypothesis import given, settings, strategies as st
import rudderstack.analytics as rudder_analytics
import segment.analytics as segment_analytics

from conftest import eventually
from qualify.clients import Client
from qualify.server.transport.http.segment import parse_body

PRICING = {"event": {"event_model": "page_views",
                     "filters": [{"property": "path", "operator": "OPERATOR_EQ", "value": {"string_value": "/pricing"}}],
                     "scope": "SCOPE_WITHIN", "window": "600s", "comparison": "COMPARISON_GE", "threshold": 3}}


def now_iso(delta: float = 0.0) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=delta)).isoformat()


def admin(server) -> Client:
    return Client(server.address, api_key=server.keys["admin"], timeout=5)


def logged(server) -> int:
    with admin(server) as c:
        return c.server_info()["events_logged"]


def record(server, key: str, **params) -> dict:
    r = requests.get(f"{server.http_url}/v1/collections/customers/records/{key}", params=params,
                     headers={"Authorization": f"Bearer {server.keys['personalize']}"}, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


def post(server, path: str, body, key: str | None = "ingest", **kw) -> requests.Response:
    auth = (server.keys[key], "") if key else None
    return requests.post(f"{server.http_url}{path}", data=body if isinstance(body, bytes) else json.dumps(body),
                         auth=auth, timeout=5, **kw)


def page(user: str, path: str = "/pricing", **extra) -> dict:
    return {"type": "page", "name": "Pricing", "messageId": str(uuid.uuid4()), "userId": user,
            "properties": {"path": path}, "timestamp": now_iso(), **extra}


@pytest.fixture(scope="module")
def pricing_audience(edge_server):
    with admin(edge_server) as c:
        c.create_audience("http_pricing", PRICING)
        c.wait_live("http_pricing")
    return "http_pricing"


@pytest.mark.parametrize("sdk", [segment_analytics, rudder_analytics], ids=["segment", "rudderstack"])
def test_sdks_send_track_page_identify_alias_logged_once_and_an_audience_reacts(edge_server, pricing_audience, sdk):
    errors = []
    client = sdk.Client(edge_server.keys["ingest"], host=edge_server.http_url, sync_mode=True,
                        on_error=lambda e, batch: errors.append(e), max_retries=0)
    user = f"user-{ {segment_analytics: 11, rudder_analytics: 12}[sdk] }"
    before = logged(edge_server)
    ids = [str(uuid.uuid4()) for _ in range(6)]
    for i in range(3):
        client.page(user_id=user, name="Pricing", properties={"path": "/pricing"}, message_id=ids[i])
    client.track(user_id=user, event="Product Viewed", properties={"sku": "sku-0001", "price": 9.5}, message_id=ids[3])
    client.identify(user_id=user, anonymous_id=f"anon-{user}", traits={"plan": "pro"}, message_id=ids[4])
    client.alias(previous_id=f"old-{user}", user_id=user, message_id=ids[5])
    client.page(user_id=user, name="Pricing", properties={"path": "/pricing"}, message_id=ids[0])  # a resend
    client.flush()
    assert errors == []
    assert logged(edge_server) - before == 6  # each message once, the resent page not again
    # The 200s came after the commit; the audience is evaluated with it.
    eventually(lambda: pricing_audience in [m["audience"] for m in record(edge_server, user)["memberships"]],
               lambda: str(record(edge_server, user)), timeout=5)
    entered = record(edge_server, user)["memberships"][0]["enteredAt"]
    assert entered.endswith("Z")


@pytest.mark.parametrize("sdk", [segment_analytics, rudder_analytics], ids=["segment", "rudderstack"])
def test_a_wrong_write_key_gets_401(edge_server, sdk):
    client = sdk.Client("qk_not-a-key", host=edge_server.http_url, sync_mode=True, max_retries=0)
    with pytest.raises(Exception) as info:
        client.track(user_id="user-1", event="Product Viewed", message_id=str(uuid.uuid4()))
    assert getattr(info.value, "status", None) == 401
    assert post(edge_server, "/v1/batch", {"batch": [page("user-1")]}, key=None).status_code == 401
    r = post(edge_server, "/v1/batch", {"batch": [page("user-1")]}, key="personalize")
    assert r.status_code == 403 and r.json()["error"]["details"][0]["reason"] == "PERMISSION_DENIED"


def test_a_bad_event_is_rejected_and_its_neighbours_kept(edge_server):
    good = [page("user-21"), page("user-22")]
    bad = {"type": "track", "event": "Product Viewed", "messageId": str(uuid.uuid4()), "userId": "user-21",
           "properties": {"price": "not a number"}}
    unreadable = {"type": "page", "messageId": str(uuid.uuid4()), "userId": "user-21", "timestamp": "yesterday"}
    before = logged(edge_server)
    r = post(edge_server, "/v1/batch", {"batch": [good[0], bad, {"type": "track", "messageId": "x"}, unreadable, good[1]]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["accepted"] == 2 and body["duplicates"] == 0
    assert [(x["index"], x["reason"]) for x in body["rejected"]] == [
        (1, "REJECTION_REASON_PROPERTY_TYPE"), (2, "REJECTION_REASON_MISSING_IDENTITY"),
        (3, "REJECTION_REASON_UNSPECIFIED")]
    assert logged(edge_server) - before == 2
    # The same bad event alone: 400, as Track answers it.
    r = post(edge_server, "/v1/track", bad)
    assert r.status_code == 400
    info = r.json()["error"]["details"][0]
    assert info["reason"] == "EVENT_REJECTED" and info["metadata"]["rejection"] == "REJECTION_REASON_PROPERTY_TYPE"


def test_gzip_bodies_dedupe_and_every_single_endpoint(edge_server):
    msg = page("user-31")
    body = gzip.compress(json.dumps({"batch": [msg]}).encode())
    before = logged(edge_server)
    for _ in range(2):
        r = post(edge_server, "/v1/batch", body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
        assert r.status_code == 200, r.text
    assert r.json()["duplicates"] == 1
    singles = {"track": {"event": "Signed Up"}, "page": {"name": "Home"}, "screen": {"name": "Home"},
               "identify": {"traits": {"plan": "pro"}}, "alias": {"previousId": "old-31"},
               "group": {"groupId": "acme", "traits": {"employees": 40}}}
    for endpoint, fields in singles.items():
        r = post(edge_server, f"/v1/{endpoint}", {"messageId": str(uuid.uuid4()), "userId": "user-31", **fields})
        assert r.status_code == 200 and r.json()["success"] is True and r.json()["duplicate"] is False, (endpoint, r.text)
        assert r.json()["consistencyToken"], (endpoint, r.text)  # read-your-writes: see test_http_personalize
    assert logged(edge_server) - before == 1 + len(singles)


def test_segment_limits_500kb_batches_and_32kb_events(edge_server):
    big = page("user-41", blob="x" * (33 * 1024))
    r = post(edge_server, "/v1/batch", {"batch": [page("user-41"), big]})
    assert r.status_code == 200 and [x["reason"] for x in r.json()["rejected"]] == ["REJECTION_REASON_TOO_LARGE"]
    # 11,000 characters, 33,000 bytes of UTF-8: measured in bytes, as sent.
    euros = page("user-41", blob="\u20ac" * 11_000)
    r = requests.post(f"{edge_server.http_url}/v1/batch", auth=(edge_server.keys["ingest"], ""), timeout=5,
                      data=json.dumps({"batch": [euros, page("user-41")]}, ensure_ascii=False).encode())
    assert r.status_code == 200 and [x["index"] for x in r.json()["rejected"]] == [0], r.text
    batch = [page("user-42", blob="y" * (20 * 1024)) for _ in range(26)]  # 26 fine events, over 500 KB together
    r = post(edge_server, "/v1/batch", {"batch": batch})
    assert r.status_code == 400 and r.json()["error"]["details"][0]["reason"] == "BATCH_TOO_LARGE"


def test_sent_at_corrects_the_device_clock(edge_server, tmp_path):
    """A device an hour fast: its timestamp is moved by receivedAt - sentAt, as Segment does."""
    user = "user-51"
    ahead = 3600.0
    msgs = [page(user, timestamp=now_iso(ahead), sentAt=now_iso(ahead)) for _ in range(3)]
    r = post(edge_server, "/v1/batch", {"batch": msgs})
    assert r.status_code == 200 and r.json()["rejected"] == []  # not FUTURE_TIMESTAMP: corrected first
    # Corrected into "now", the three views count in a 10-minute window: the audience reacts.
    with admin(edge_server) as c:
        c.create_audience("http_pricing_skew", PRICING)
        c.wait_live("http_pricing_skew")
    eventually(lambda: "http_pricing_skew" in [m["audience"] for m in record(edge_server, user)["memberships"]],
               lambda: str(record(edge_server, user)), timeout=5)
    # Without sentAt the same timestamps are an hour ahead, and refused.
    r = post(edge_server, "/v1/batch", {"batch": [page(user, timestamp=now_iso(ahead))]})
    assert [x["reason"] for x in r.json()["rejected"]] == ["REJECTION_REASON_FUTURE_TIMESTAMP"]


def test_write_key_in_the_body_as_analytics_js_sends_it(edge_server):
    r = requests.post(f"{edge_server.http_url}/v1/t", data=json.dumps(
        {"type": "track", "event": "Signed Up", "messageId": str(uuid.uuid4()), "anonymousId": "a-61",
         "writeKey": edge_server.keys["ingest"]}), headers={"Content-Type": "text/plain"}, timeout=5)
    assert r.status_code == 200, r.text


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
                           max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(batch=st.lists(json_values, max_size=6), other=st.dictionaries(st.text(max_size=5), json_values, max_size=3),
       indent=st.sampled_from([None, 0, 2]), ascii_only=st.booleans())
def test_parse_body_reads_what_json_loads_reads_and_measures_each_message(batch, other, indent, ascii_only):
    body = {**other, "batch": batch}
    text = json.dumps(body, indent=indent, ensure_ascii=ascii_only)
    parsed, sizes = parse_body(text)
    assert parsed == json.loads(text)
    assert len(sizes) == len(batch)
    if indent is None and text.isascii():  # each message's own text, as sent
        assert sizes == [len(json.dumps(m, ensure_ascii=ascii_only)) for m in batch]


@pytest.mark.parametrize("text", ["", "[]", "{", '{"batch": [1,]}', '{"a": 1} x', '{"a" 1}', "{'a': 1}", '{"a": 1,}'])
def test_parse_body_refuses_what_json_loads_refuses(text):
    with pytest.raises((ValueError, StopIteration)):
        parse_body(text)
    with pytest.raises(ValueError):
        if not isinstance(json.loads(text), dict):
            raise ValueError("not an object")
