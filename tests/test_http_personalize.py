"""The Personalization API over HTTP/JSON: records, batches, membership, AIP-193 errors, CORS, keys for browsers.

Against the real server of ``edge_server`` (keys on) over real HTTP. The
error mapping is checked twice: every reason an HTTP route can meet, by
provoking it for real; and every reason in the README's table, through the
one mapping function both transports use, so a reason only gRPC reaches
today still has its HTTP status the day a route does.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest
import requests

from conftest import QualifyServer, eventually, demo_event_models_toml, make_key, write_project
from qualify.clients import Client, PermissionDeniedError
from qualify.server.domain import errors as domain_errors
from qualify.server.domain.events import EventRejected
from qualify.server.transport.errors import http_error_of

CUSTOMERS = "/v1/collections/customers"


def get(server, path: str, key: str | None = "personalize", **kw) -> requests.Response:
    headers = {"Authorization": f"Bearer {server.keys[key]}"} if key else {}
    return requests.get(server.http_url + path, headers={**headers, **kw.pop("headers", {})}, timeout=5, **kw)


def batch_get(server, body, key: str = "personalize", **headers) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(f"{server.http_url}{CUSTOMERS}/records:batchGet", data=data, timeout=5,
                         headers={"Authorization": f"Bearer {server.keys[key]}", **headers})


def reason(r: requests.Response) -> tuple[int, str, str]:
    err = r.json()["error"]
    assert err["code"] == r.status_code and err["details"][0]["@type"].endswith("google.rpc.ErrorInfo")
    assert err["details"][0]["domain"] == "qualify.dev"
    return r.status_code, err["status"], err["details"][0]["reason"]


def test_get_a_record_with_fields_and_memberships_as_grpc_has_it(edge_server):
    r = get(edge_server, f"{CUSTOMERS}/records/user-42", params={"fields": "plan,ltv"})
    assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store" and r.headers["X-Request-Id"]
    body = r.json()
    with Client(edge_server.address, api_key=edge_server.keys["personalize"]) as c:
        rec = c.get("user-42", collection="customers", fields=["plan", "ltv"])
    assert body["collection"] == "customers" and body["key"] == "user-42"
    assert body["fields"] == {"plan": rec.fields["plan"], "ltv": rec.fields["ltv"]}
    assert body["memberships"] == []
    full = get(edge_server, f"{CUSTOMERS}/records/user-42").json()["fields"]
    assert {"plan", "ltv", "loyalty_tier", "orders_count"} <= set(full)


def test_batch_get_keeps_order_and_lists_missing_keys_gzip_too(edge_server):
    body = {"keys": ["user-2", "nobody", "user-1"], "fields": ["plan"]}
    r = batch_get(edge_server, gzip.compress(json.dumps(body).encode()), **{"Content-Encoding": "gzip"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [x["key"] for x in out["records"]] == ["user-2", "user-1"] and out["missingKeys"] == ["nobody"]
    assert all(set(x["fields"]) == {"plan"} for x in out["records"])


def test_membership_check(edge_server):
    with Client(edge_server.address, api_key=edge_server.keys["admin"], timeout=5) as c:
        c.create_audience("http_pros", {"attribute": {"attribute": "plan", "operator": "OPERATOR_EQ",
                                                      "value": {"string_value": "pro"}}})
        c.wait_live("http_pros")
        pro = next(k for k in (f"user-{i}" for i in range(1, 200)) if c.get(k).fields["plan"] == "pro")
        other = next(k for k in (f"user-{i}" for i in range(1, 200)) if c.get(k).fields["plan"] != "pro")
    r = get(edge_server, f"{CUSTOMERS}/audiences/http_pros/members/{pro}")
    assert r.status_code == 200 and r.json()["member"] is True and r.json()["enteredAt"].endswith("Z")
    assert get(edge_server, f"{CUSTOMERS}/audiences/http_pros/members/{other}").json()["member"] is False
    assert reason(get(edge_server, f"{CUSTOMERS}/audiences/nope/members/{pro}")) == (404, "NOT_FOUND", "AUDIENCE_NOT_FOUND")


def test_every_reason_an_http_route_meets(edge_server):
    cases = {
        (404, "NOT_FOUND", "KEY_NOT_FOUND"): get(edge_server, f"{CUSTOMERS}/records/nobody"),
        (400, "INVALID_ARGUMENT", "UNKNOWN_COLLECTION"): get(edge_server, "/v1/collections/nope/records/user-1"),
        (400, "INVALID_ARGUMENT", "UNKNOWN_FIELD"): get(edge_server, f"{CUSTOMERS}/records/user-1",
                                                        params={"fields": "plan,nope"}),
        (400, "INVALID_ARGUMENT", "BATCH_TOO_LARGE"): batch_get(edge_server, {"keys": ["k"] * 1001}),
        (400, "INVALID_ARGUMENT", "INVALID_REQUEST"): get(edge_server, f"{CUSTOMERS}/records/{'k' * 512}"),
        (401, "UNAUTHENTICATED", "UNAUTHENTICATED"): get(edge_server, f"{CUSTOMERS}/records/user-1", key=None),
        (403, "PERMISSION_DENIED", "PERMISSION_DENIED"): get(edge_server, f"{CUSTOMERS}/records/user-1", key="ingest"),
    }
    for expected, r in cases.items():
        assert reason(r) == expected, r.text
    bad = batch_get(edge_server, b"not json")
    assert reason(bad) == (400, "INVALID_ARGUMENT", "INVALID_REQUEST")
    assert bad.json()["error"]["details"][1]["fieldViolations"][0]["field"] == "keys"
    r = requests.post(f"{edge_server.http_url}/v1/track", data=json.dumps({"messageId": "m", "event": "x"}),
                      auth=(edge_server.keys["ingest"], ""), timeout=5)
    assert reason(r) == (400, "INVALID_ARGUMENT", "EVENT_REJECTED")
    r = requests.get(f"{edge_server.http_url}/v1/nothing-here", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["status"] == "NOT_FOUND"
    big = requests.post(f"{edge_server.http_url}/v1/batch", data=b"x" * (5 << 20), timeout=5,
                        auth=(edge_server.keys["ingest"], ""))
    assert big.status_code == 413 and big.json()["error"]["status"] == "RESOURCE_EXHAUSTED"


def _domain_errors():
    seen, todo = [], [domain_errors.QualifyError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen


HTTP_OF_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "UNAUTHENTICATED": 401,
                  "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "RESOURCE_EXHAUSTED": 429,
                  "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "INTERNAL": 500}


@pytest.mark.parametrize("cls", _domain_errors(), ids=lambda c: c.reason)
def test_every_domain_error_has_its_http_status_from_the_one_table(cls):
    """README's table by reason: the HTTP status follows the gRPC status each reason has there."""
    err = cls("message", metadata={"k": "v"}, violations=[domain_errors.FieldViolation("f", "bad")])
    status, body, headers = http_error_of(err)
    assert status == HTTP_OF_STATUS[cls.status.value]
    assert body["error"]["status"] == cls.status.value and body["error"]["code"] == status
    assert body["error"]["details"][0] == {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": cls.reason,
                                           "domain": "qualify.dev", "metadata": {"k": "v"}}
    assert body["error"]["details"][1]["fieldViolations"] == [{"field": "f", "description": "bad"}]
    assert EventRejected in _domain_errors()


def test_rate_limited_is_429_with_retry_after(tmp_path, demo_warehouse):
    extra = "[auth]\nenabled = true\n[limits]\nrequests_per_second = 0.5\nburst = 2\n"
    project = write_project(tmp_path, f'type = "duckdb"\npath = "{demo_warehouse}"', demo_event_models_toml() + extra)
    key = make_key(tmp_path / "data", "personalize")
    server = QualifyServer(tmp_path, "--project", str(project)).start()
    server.keys = {"personalize": key}
    try:
        answers = [get(server, f"{CUSTOMERS}/records/user-1") for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 429]
        assert reason(answers[2]) == (429, "RESOURCE_EXHAUSTED", "RATE_LIMITED")
        assert int(answers[2].headers["Retry-After"]) >= 1
        assert answers[2].json()["error"]["details"][1]["@type"].endswith("google.rpc.RetryInfo")
    finally:
        assert server.stop() == 0, server.log()


def test_cors_preflight_and_allow_list(edge_server):
    path = f"{edge_server.http_url}{CUSTOMERS}/records/user-1"
    pre = {"Origin": "https://shop.example", "Access-Control-Request-Method": "GET",
           "Access-Control-Request-Headers": "authorization"}
    ok = requests.options(path, headers=pre, timeout=5)
    assert ok.status_code == 204 and ok.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    assert "GET" in ok.headers["Access-Control-Allow-Methods"]
    assert "authorization" in ok.headers["Access-Control-Allow-Headers"].lower()
    refused = requests.options(path, headers={**pre, "Origin": "https://evil.example"}, timeout=5)
    assert refused.status_code == 403 and "Access-Control-Allow-Origin" not in refused.headers
    r = get(edge_server, f"{CUSTOMERS}/records/user-1", headers={"Origin": "https://shop.example"})
    assert r.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    r = get(edge_server, f"{CUSTOMERS}/records/user-1", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers


def test_a_publishable_key_reads_only_its_fields_over_http_and_grpc(edge_server):
    r = get(edge_server, f"{CUSTOMERS}/records/user-7", key="publishable")
    assert r.status_code == 200 and set(r.json()["fields"]) == {"plan", "recommended_product"}
    assert get(edge_server, f"{CUSTOMERS}/records/user-7", key="publishable", params={"fields": "plan"}).ok
    refused = get(edge_server, f"{CUSTOMERS}/records/user-7", key="publishable", params={"fields": "plan,ltv"})
    assert reason(refused) == (403, "PERMISSION_DENIED", "PERMISSION_DENIED")
    assert refused.json()["error"]["details"][0]["metadata"]["field"] == "ltv"
    other = get(edge_server, "/v1/collections/orders/records/user-7", key="publishable")
    assert reason(other) == (403, "PERMISSION_DENIED", "PERMISSION_DENIED")  # before "no such collection"
    r = batch_get(edge_server, {"keys": ["user-7"], "fields": ["ltv"]}, key="publishable")
    assert r.status_code == 403
    with Client(edge_server.address, api_key=edge_server.keys["admin"], timeout=5) as c:
        c.create_audience("http_web", {"attribute": {"attribute": "plan", "operator": "OPERATOR_IS_SET"}})
        c.wait_live("http_web")
    member = lambda: get(edge_server, f"{CUSTOMERS}/audiences/http_web/members/user-7", key="publishable")  # noqa: E731
    eventually(lambda: member().status_code == 200, lambda: member().text, timeout=5)
    assert member().json()["member"] is True  # membership is the page's to know
    with Client(edge_server.address, api_key=edge_server.keys["publishable"], retries=0) as c:
        assert set(c.get("user-7").fields) == {"plan", "recommended_product"}
        with pytest.raises(PermissionDeniedError):
            c.get("user-7", fields=["ltv"])
        with pytest.raises(PermissionDeniedError):
            c.batch_get(["user-7"], fields=["plan", "email_opt_in"])
        with pytest.raises(PermissionDeniedError):
            c.get("user-7", collection="orders")


def test_keys_create_limits_collections_and_fields(tmp_path):
    out = subprocess.run([sys.executable, "-m", "qualify.server.cli", "keys", "--data-dir", str(tmp_path), "create",
                          "--name", "web", "--scope", "personalize", "--collection", "customers",
                          "--fields", "plan,recommended_sku", "--json"], capture_output=True, text=True, check=True)
    made = json.loads(out.stdout)
    assert made["collections"] == ["customers"] and made["fields"] == ["plan", "recommended_sku"]
    listed = subprocess.run([sys.executable, "-m", "qualify.server.cli", "keys", "--data-dir", str(tmp_path), "list"],
                            capture_output=True, text=True, check=True).stdout
    assert "collections customers" in listed and "fields plan,recommended_sku" in listed


def test_read_your_writes_over_http_with_the_tracking_answers_token(edge_server):
    with Client(edge_server.address, api_key=edge_server.keys["admin"], timeout=5) as c:
        c.create_audience("http_ryw", {"event": {"event_model": "page_views", "scope": "SCOPE_EVER",
                                                 "comparison": "COMPARISON_GE", "threshold": 1}})
        c.wait_live("http_ryw")
    for i in range(20):  # each read follows its write at once, with the write's token: never stale
        person = f"user-{300 + i}"
        r = requests.post(f"{edge_server.http_url}/v1/page", auth=(edge_server.keys["ingest"], ""), timeout=5,
                          json={"messageId": f"ryw-{i}", "userId": person, "name": "Pricing",
                                "properties": {"path": "/pricing"}})
        assert r.status_code == 200, r.text
        token = r.json()["consistencyToken"]
        got = get(edge_server, f"{CUSTOMERS}/records/{person}", params={"minToken": token})
        assert "http_ryw" in [m["audience"] for m in got.json()["memberships"]], got.text
        member = get(edge_server, f"{CUSTOMERS}/audiences/http_ryw/members/{person}", params={"minToken": token})
        assert member.json()["member"] is True
    import base64
    future = base64.b64encode(b"\x01" + (2**62).to_bytes(8, "big")).decode()
    assert reason(get(edge_server, f"{CUSTOMERS}/records/user-1", params={"minToken": future})) == (
        503, "UNAVAILABLE", "NOT_YET_CONSISTENT")
    assert reason(get(edge_server, f"{CUSTOMERS}/records/user-1", params={"minToken": "!!"}))[0] == 400
