"""The HTTP listener itself: [http] settings, --http-port, the ready file, TLS, and --workers N."""

from __future__ import annotations

import json
import uuid

import grpc
import pytest
import requests

from certs import make_ca, make_leaf
from conftest import QualifyServer, demo_event_models_toml, write_project
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


def test_workers_mode_serves_http_from_the_writer(tmp_path, demo_warehouse):
    server = QualifyServer(tmp_path, "--project", project(tmp_path, demo_warehouse), "--workers", "2").start()
    try:
        msg = {"type": "page", "messageId": str(uuid.uuid4()), "userId": "user-3", "properties": {"path": "/"}}
        r = requests.post(f"{server.http_url}/v1/batch", data=json.dumps({"batch": [msg]}), timeout=5)
        assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
        assert requests.get(f"{server.http_url}/v1/collections/customers/records/user-3", timeout=5).ok
    finally:
        assert server.stop() == 0, server.log()
