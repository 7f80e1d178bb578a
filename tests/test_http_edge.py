"""The HTTP listener itself: [http] settings, --http-port, the ready file, TLS, and --workers N."""

from __future__ import annotations

import json
import uuid

import grpc
import pytest
import requests

from certs import make_ca, make_leaf
from conftest import QualifyServer, demo_event_models_toml, make_key, write_project
from qualify.server.config import ProjectError, parse_project
from qualify.server.demo import DEMO_HTTP_PORT, demo_project


def project(tmp_path, warehouse, extra: str = "") -> str:
    return str(write_project(tmp_path, f'type = "duckdb"\npath = "{warehouse}"', demo_event_models_toml() + extra))


def test_http_is_off_unless_set_and_on_by_default_on_the_demo(tmp_path):
    assert demo_project(tmp_path / "demo", people=10).ops.http.port == DEMO_HTTP_PORT == 8080
    base = {"warehouse": {"type": "duckdb", "path": str(tmp_path / "demo" / "demo-warehouse-10.duckdb")},
            "parent_model": {"query": "SELECT 1", "primary_key": "user_id", "attributes": {"plan": "string"}}}
    assert not parse_project(base, base=tmp_path).ops.http.enabled
    on = parse_project({**base, "http": {"port": 0, "cors_origins": ["https://a.example/"]}}, base=tmp_path).ops.http
    assert on.enabled and on.port == 0 and on.cors_origins == ("https://a.example",)
    with pytest.raises(ProjectError) as info:
        parse_project({**base, "http": {"port": 70000, "host": "", "cors_origins": "*", "tls": 1}}, base=tmp_path)
    text = str(info.value)
    for needle in ("http.port = 70000", "http.host", "http.cors_origins", "http.tls"):
        assert needle in text, text


def test_http_port_minus_one_turns_it_off(tmp_path, demo_warehouse):
    """(The other servers here, and every test server, run it on --http-port 0 and read the port back.)"""
    off = QualifyServer(tmp_path, "--project", project(tmp_path, demo_warehouse), "--http-port", "-1").start()
    try:
        assert off.http_port is None
    finally:
        assert off.stop() == 0, off.log()


def test_https_from_the_tls_settings(tmp_path, demo_warehouse):
    pki = tmp_path / "pki"
    ca = make_ca(pki)
    pair = make_leaf(pki, "server", ca)
    extra = f'\n[tls]\ncert = "{pair.cert}"\nkey = "{pair.key}"\n'
    server = QualifyServer(tmp_path, "--project", project(tmp_path, demo_warehouse, extra),
                           credentials=grpc.ssl_channel_credentials(ca.cert_bytes())).start()
    try:
        assert server.http_url.startswith("https://")
        r = requests.get(f"{server.http_url}/v1/collections/customers/records/user-1", verify=str(ca.cert), timeout=5)
        assert r.status_code == 200
        with pytest.raises(requests.exceptions.ConnectionError):  # plain text to a TLS port
            requests.get(f"http://127.0.0.1:{server.http_port}/v1/collections/customers/records/user-1", timeout=5)
    finally:
        assert server.stop() == 0, server.log()


def test_workers_serve_http_in_every_serving_process_and_forward_events_to_the_writer(tmp_path, demo_warehouse):
    path = project(tmp_path, demo_warehouse, "\n[auth]\nenabled = true\n")
    keys = {s: make_key(tmp_path / "data", s) for s in ("ingest", "personalize")}
    server = QualifyServer(tmp_path, "--project", path, "--workers", "2").start()
    batch_url = f"{server.http_url}/v1/batch"
    ingest = (keys["ingest"], "")
    try:
        good = [{"type": "page", "messageId": str(uuid.uuid4()), "userId": "user-3", "properties": {"path": "/"}}
                for _ in range(2)]
        bad = {"type": "track", "event": "Product Viewed", "messageId": str(uuid.uuid4()), "userId": "user-3",
               "properties": {"price": "free"}}
        big = {**good[0], "messageId": str(uuid.uuid4()), "properties": {"path": "x" * 33_000}}
        body = json.dumps({"batch": [good[0], bad, big, good[1]]})
        r = requests.post(batch_url, data=body, auth=ingest, timeout=5)
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == 2 and [(x["index"], x["reason"]) for x in r.json()["rejected"]] == [
            (1, "REJECTION_REASON_PROPERTY_TYPE"), (2, "REJECTION_REASON_TOO_LARGE")]
        again = requests.post(batch_url, data=body, auth=ingest, timeout=5).json()
        assert again["accepted"] == 0 and again["duplicates"] == 2  # deduplicated by the one writer
        assert requests.post(batch_url, data=body, auth=("qk_nope", ""), timeout=5).status_code == 401
        single = requests.post(f"{server.http_url}/v1/track", data=json.dumps(bad), auth=ingest, timeout=5)
        assert single.status_code == 400 and single.json()["error"]["details"][0]["reason"] == "EVENT_REJECTED"
        read = requests.get(f"{server.http_url}/v1/collections/customers/records/user-3", timeout=5,
                            headers={"Authorization": f"Bearer {keys['personalize']}"})
        assert read.status_code == 200 and read.json()["key"] == "user-3"
    finally:
        assert server.stop() == 0, server.log()
