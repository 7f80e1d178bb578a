"""Shared fixtures: real servers on port 0, real LMDB, DuckDB and PostgreSQL.

``QualifyServer`` runs ``qualify serve`` as a real process (the same command
users run), waits for its ready file and for health SERVING, and stops it
with SIGTERM, asserting a clean exit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import pg
from qualify.server.demo import generate_demo_warehouse

SMALL_DEMO = 2_000


class QualifyServer:
    """``qualify serve`` in a subprocess; ``address`` once started."""

    def __init__(self, workdir: Path, *args: str, env: dict | None = None,
                 credentials: grpc.ChannelCredentials | None = None):
        self.workdir = workdir
        self.credentials = credentials  # TLS: how clients (and the readiness probe) connect
        self.ready_file = workdir / f"ready-{time.monotonic_ns()}.json"
        self.log_path = workdir / f"server-{time.monotonic_ns()}.log"
        # --http-port 0: the HTTP listener on a free port, so parallel servers
        # (and the demo's default 8080) never collide.
        http = () if "--http-port" in args else ("--http-port", "0")
        self.args = [sys.executable, "-m", "qualify.server.cli", "serve", "--port", "0",
                     "--ready-file", str(self.ready_file), *http, *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.port = 0
        self.http_port: int | None = None

    def start(self, timeout: float = 60.0, serving: bool = True) -> "QualifyServer":
        """Waits for the ready file and (``serving``) for health SERVING."""
        self.ready_file.unlink(missing_ok=True)  # a kill -9 left the last run's behind
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"qualify serve exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"qualify serve not ready in {timeout}s:\n{self.log()}")
            time.sleep(0.02)
        info = json.loads(self.ready_file.read_text())
        self.address, self.port, self.http_port = info["address"], info["port"], info.get("http_port")
        if serving:
            wait_serving(self.address, deadline - time.monotonic(), credentials=self.credentials)
        return self

    @property
    def http_url(self) -> str:
        scheme = "https" if self.credentials is not None else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def channel(self) -> grpc.Channel:
        if self.credentials is not None:
            return grpc.secure_channel(self.address, self.credentials)
        return grpc.insecure_channel(self.address)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then the exit code (a clean shutdown is 0)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"qualify serve ignored SIGTERM for {timeout}s:\n{self.log()}")
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_serving(address: str, timeout: float = 30.0, service: str = "",
                 credentials: grpc.ChannelCredentials | None = None) -> None:
    deadline = time.monotonic() + timeout
    with (grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{address} not SERVING within {timeout}s")
            time.sleep(0.05)


def write_project(folder: Path, warehouse: str, extra: str = "", attributes: str | None = None,
                  collections: str = "[collections.customers]\n", auth: bool = False) -> Path:
    """A qualify.toml over the demo ``customers`` table in ``warehouse``.

    API keys are off (``[auth] enabled = false``) unless ``auth`` or ``extra``
    has an ``[auth]`` table: tests of other parts call without keys, and
    tests/test_security.py covers keys against every service.
    """
    if not auth and "[auth]" not in extra:
        extra += "\n[auth]\nenabled = false\n"
    attributes = attributes if attributes is not None else textwrap.dedent("""\
        plan = "string"
        loyalty_tier = "string"
        ltv = "float"
        orders_count = "int"
        email_opt_in = "bool"
        signup_date = "timestamp"
        """)
    text = textwrap.dedent(f"""\
        data_dir = "data"

        [warehouse]
        {warehouse}

        [parent_model]
        name = "customers"
        query = "SELECT * FROM customers"
        primary_key = "user_id"

        [parent_model.attributes]
        """) + attributes + "\n" + collections + "\n" + extra
    path = folder / "qualify.toml"
    path.write_text(text)
    return path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for servers that take a fixed port, e.g. /metrics)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eventually(condition, message=lambda: "", timeout: float = 10.0) -> None:
    """Waits for ``condition()``; fails with ``message()`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message()
        time.sleep(0.02)


def make_key(data_dir: Path, *scopes: str, name: str = "test") -> str:
    """A new API key with ``scopes`` in ``data_dir`` (what `qualify keys create` does); returns the key."""
    from qualify.server.security.keys import KeyFile, keys_path

    return KeyFile(keys_path(data_dir)).create(name, scopes)[1]


def run_sql(path: Path, sql: str, timeout: float = 10.0) -> None:
    """Runs SQL on the DuckDB file, retrying while a sync holds it open."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with duckdb.connect(str(path)) as con:
                con.execute(sql)
            return
        except duckdb.IOException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def demo_event_models_toml() -> str:
    """The embedded demo's event models, as [event_models.*] tables."""
    from qualify.server.demo import DEMO_EVENT_MODELS

    out = []
    for name, spec in DEMO_EVENT_MODELS.items():
        out.append(f"[event_models.{name}]")
        out += [f"{k} = {json.dumps(v)}" for k, v in spec.items() if k != "properties"]
        out.append(f"[event_models.{name}.properties]")
        out += [f"{k} = {json.dumps(v)}" for k, v in spec["properties"].items()]
        out.append("")
    return "\n".join(out)


def write_realtime_project(folder: Path, warehouse: Path, extra: str = "") -> Path:
    """write_project over a demo warehouse file, with the demo's event models and ``extra`` TOML."""
    return write_project(folder, f'type = "duckdb"\npath = "{warehouse}"', demo_event_models_toml() + "\n" + extra)


@pytest.fixture(scope="session")
def demo_warehouse(tmp_path_factory) -> Path:
    """A small demo DuckDB warehouse (same generator as the embedded default)."""
    return generate_demo_warehouse(tmp_path_factory.mktemp("warehouse") / "demo.duckdb", SMALL_DEMO)


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory):
    """``qualify serve`` on the embedded demo (no project file), shared by read-only tests."""
    work = tmp_path_factory.mktemp("demo-server")
    server = QualifyServer(work, "--demo-people", str(SMALL_DEMO)).start()
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture
def server_factory(tmp_path):
    """Starts servers with given arguments; stops them after the test."""
    started: list[QualifyServer] = []

    def start(*args: str, workdir: Path | None = None, **kw) -> QualifyServer:
        s = QualifyServer(workdir or tmp_path, *args, **kw).start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster (initdb + pg_ctl in a temporary folder)."""
    bin_dir = pg.find_pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed; .ci/run installs them with apt")
    cluster = pg.PostgresCluster(bin_dir)
    cluster.start()
    yield cluster
    cluster.stop()


EDGE_SCOPES = {"ingest": ("ingest",), "personalize": ("personalize",), "admin": ("admin",),
               "audiences": ("audiences:read",)}


@pytest.fixture(scope="session")
def edge_server(tmp_path_factory, demo_warehouse):
    """``qualify serve`` with API keys on, the demo's event models and the HTTP API (tests/test_http_*.py).

    ``edge_server.keys``: a key per EDGE_SCOPES entry, plus ``publishable``
    (personalize, only ``plan`` and ``recommended_product`` of ``customers``).
    """
    folder = tmp_path_factory.mktemp("edge")
    extra = ('[auth]\nenabled = true\n[http]\ncors_origins = ["https://shop.example"]\n')
    attributes = 'plan = "string"\nltv = "float"\nloyalty_tier = "string"\norders_count = "int"\n' \
                 'email_opt_in = "bool"\nrecommended_product = "string"\n'
    project = write_project(folder, f'type = "duckdb"\npath = "{demo_warehouse}"',
                            demo_event_models_toml() + "\n" + extra, attributes=attributes)
    from qualify.server.security.keys import KeyFile, keys_path

    keys = {name: make_key(folder / "data", *scopes, name=name) for name, scopes in EDGE_SCOPES.items()}
    keys["publishable"] = KeyFile(keys_path(folder / "data")).create(
        "web", ["personalize"], collections=["customers"], fields=["plan", "recommended_product"])[1]
    server = QualifyServer(folder, "--project", str(project)).start()
    server.keys = keys
    yield server
    assert server.stop() == 0, server.log()
