"""The ``qualify`` command as users run it: check, sync and get, in subprocesses.

Each case runs ``python -m qualify.server.cli`` in its own folder, so no
stray ./qualify.toml is picked up, and checks the exit code and that the
output names what is wrong without a Python traceback.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from conftest import QualifyServer, write_project, write_realtime_project
from qualify.clients import Client
from test_audiences import Api, and_, attr, ev, fv


def qualify(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "qualify.server.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    for stream in (proc.stdout, proc.stderr):
        assert "Traceback" not in stream, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc


def duckdb_warehouse(path: Path) -> str:
    return f'type = "duckdb"\npath = "{path}"'


# ---------------------------------------------------------------- check


def test_check_accepts_a_good_project(tmp_path, demo_warehouse):
    project = write_project(tmp_path, duckdb_warehouse(demo_warehouse))
    proc = qualify("check", "--project", str(project), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == f"{project}: ok (6 attributes, collections: customers)"


def test_check_defaults_to_the_project_in_the_current_folder(tmp_path, demo_warehouse):
    write_project(tmp_path, duckdb_warehouse(demo_warehouse))
    proc = qualify("check", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "qualify.toml: ok" in proc.stdout


def _set(project: Path, old: str, new: str) -> None:
    text = project.read_text()
    assert old in text, f"{old!r} not in\n{text}"
    project.write_text(text.replace(old, new, 1))


# Each case: (how to break a good project, lines the output must contain).
BAD = {
    "unknown-key-did-you-mean": (
        lambda p, wh: _set(p, 'primary_key = "user_id"\n', 'primary_key = "user_id"\nqeury = "SELECT 1"\n'),
        ["parent_model.qeury: unknown key (did you mean 'query'?)"]),
    "unknown-server-key": (
        lambda p, wh: p.write_text(p.read_text() + '\n[server]\nsync_intreval = "1s"\n'),
        ["server.sync_intreval: unknown key (did you mean 'sync_interval'?)"]),
    "attribute-type-name": (
        lambda p, wh: _set(p, 'ltv = "float"', 'ltv = "flaot"'),
        ["parent_model.attributes.ltv = 'flaot': must be one of string, int, float, bool, timestamp"]),
    "missing-primary-key": (
        lambda p, wh: _set(p, 'primary_key = "user_id"\n', ""),
        ["parent_model.primary_key: is required"]),
    "warehouse-file-missing": (
        lambda p, wh: _set(p, f'path = "{wh}"', 'path = "nowhere/missing.duckdb"'),
        ["warehouse.path = 'nowhere/missing.duckdb': no such DuckDB file"]),
    "query-missing-column": (
        lambda p, wh: _set(p, 'query = "SELECT * FROM customers"', 'query = "SELECT user_id, plan, shoe_size FROM customers"'),
        ["parent_model.query: the query fails:", "shoe_size"]),
    "attribute-missing-column": (
        lambda p, wh: _set(p, 'plan = "string"', 'plan = "string"\nshoe_size = "int"'),
        ["parent_model.attributes.shoe_size = 'shoe_size': the query returns no such column"]),
    "primary-key-missing-column": (
        lambda p, wh: _set(p, 'primary_key = "user_id"', 'primary_key = "customer_id"'),
        ["parent_model.primary_key = 'customer_id': the query returns no such column"]),
    "invalid-toml": (
        lambda p, wh: p.write_text(p.read_text() + '\n[server\nport = 1\n'),
        ["(syntax): not valid TOML:", "(at line"]),
    "port-out-of-range": (
        lambda p, wh: p.write_text(p.read_text() + "\n[server]\nport = 70000\n"),
        ["server.port = 70000: must be an integer from 0 to 65535"]),
    "negative-port": (
        lambda p, wh: p.write_text(p.read_text() + "\n[server]\nport = -1\n"),
        ["server.port = -1: must be an integer from 0 to 65535"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_check_names_the_key_and_value(tmp_path, demo_warehouse, case):
    project = write_project(tmp_path, duckdb_warehouse(demo_warehouse))
    breaks, lines = BAD[case]
    breaks(project, demo_warehouse)
    proc = qualify("check", "--project", str(project), cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"{project}: 1 problem(s)\n"), proc.stdout
    for line in lines:
        assert line in proc.stdout, proc.stdout


def test_check_lists_every_problem_at_once(tmp_path, demo_warehouse):
    project = write_project(tmp_path, duckdb_warehouse(demo_warehouse),
                            extra='[server]\nport = 99999\nworkers = 0\n')
    _set(project, 'ltv = "float"', 'ltv = "decimal"')
    proc = qualify("check", "--project", str(project), cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout.startswith(f"{project}: 3 problem(s)\n"), proc.stdout
    for line in ["parent_model.attributes.ltv = 'decimal'", "server.port = 99999", "server.workers = 0"]:
        assert line in proc.stdout


def test_check_of_a_missing_project_file(tmp_path):
    proc = qualify("check", "--project", str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert proc.returncode == 1
    assert "cannot be read" in proc.stdout and "nope.toml" in proc.stdout


def test_check_without_a_project_file_says_it_needs_one(tmp_path):
    proc = qualify("check", cwd=tmp_path)
    assert proc.returncode == 2, proc
    assert "--project" in proc.stderr and "embedded demo" in proc.stderr


def test_check_says_per_key_rates_multiply_with_workers(tmp_path, demo_warehouse):
    project = write_project(tmp_path, duckdb_warehouse(demo_warehouse), extra="[server]\nworkers = 3\n",
                            auth=True)
    proc = qualify("check", "--project", str(project), cwd=tmp_path)
    assert proc.returncode == 0, proc
    assert "3 serving processes" in proc.stdout and "30000 requests/s" in proc.stdout, proc.stdout


def test_check_refuses_stored_audiences_whose_windows_outlast_the_event_retention(tmp_path, demo_warehouse):
    """The audiences live in the data folder's LMDB: check reads them (read-only, beside the server too)."""
    project = write_realtime_project(tmp_path, demo_warehouse, '[realtime]\nevent_retention = "2h"\n')
    server = QualifyServer(tmp_path, "--project", str(project)).start()
    try:
        api = Api(server.address)
        api.create("last_hour", ev("page_views", "WITHIN", "3600s", threshold=2))
        api.create("last_ten_minutes", and_(ev("cart_adds", "WITHIN", "600s"), attr("ltv", "GT", fv(100.0))))
        api.create("ever_viewed", ev("page_views"))
        api.close()
        proc = qualify("check", "--project", str(project), cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "3 stored audiences checked against [realtime] event_retention (7200s)" in proc.stdout, proc.stdout

        _set(project, 'event_retention = "2h"', 'event_retention = "30m"')  # while the server runs
        proc = qualify("check", "--project", str(project), cwd=tmp_path)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert proc.stdout.startswith(f"{project}: 1 problem(s)\n"), proc.stdout
        assert "audience 'last_hour'" in proc.stdout, proc.stdout
        assert "a window of 3600s is longer than [realtime] event_retention (1800s)" in proc.stdout, proc.stdout
        assert "last_ten_minutes" not in proc.stdout and "ever_viewed" not in proc.stdout
    finally:
        assert server.stop() == 0, server.log()

    _set(project, 'event_retention = "30m"', 'event_retention = "5m"')
    proc = qualify("check", "--project", str(project), cwd=tmp_path)
    assert proc.returncode == 1 and proc.stdout.startswith(f"{project}: 2 problem(s)\n"), proc.stdout
    assert "audience 'last_ten_minutes'" in proc.stdout and "a window of 600s" in proc.stdout, proc.stdout
    # A stored audience that no longer parses against the project is named too (serve would fail on it).
    _set(project, 'event_retention = "5m"', 'event_retention = "1h"')
    _set(project, 'ltv = "float"\n', "")
    proc = qualify("check", "--project", str(project), cwd=tmp_path)
    assert proc.returncode == 1 and proc.stdout.startswith(f"{project}: 1 problem(s)\n"), proc.stdout
    assert "audience 'last_ten_minutes'" in proc.stdout and "no longer fits this project" in proc.stdout
    assert "ltv" in proc.stdout, proc.stdout


def test_log_options_work_after_the_subcommand_too(tmp_path, demo_warehouse):
    project = write_project(tmp_path, duckdb_warehouse(demo_warehouse))
    for args in (("--log-format", "json", "check"), ("check", "--log-format", "json", "--log-level", "DEBUG"),
                 ("keys", "list", "--log-format", "text")):
        proc = qualify(*args, "--project", str(project), cwd=tmp_path) if args[0] != "keys" else \
            qualify("keys", "--project", str(project), *args[1:], cwd=tmp_path)
        assert proc.returncode == 0, (args, proc)


def test_keys_create_prints_the_id_beside_the_key_and_list_says_when_there_are_none(tmp_path, demo_warehouse):
    project = write_project(tmp_path, duckdb_warehouse(demo_warehouse), auth=True)
    empty = qualify("keys", "--project", str(project), "list", cwd=tmp_path)
    assert empty.returncode == 0 and empty.stdout == "" and "no API keys" in empty.stderr, empty
    made = qualify("keys", "--project", str(project), "create", "--scope", "ingest", cwd=tmp_path)
    key, key_id = made.stdout.split()
    assert key.startswith("qk_") and key_id.startswith("key_"), made.stdout
    listed = qualify("keys", "--project", str(project), "list", cwd=tmp_path)
    assert listed.stdout.startswith(key_id) and "no API keys" not in listed.stderr


# ---------------------------------------------------------------- sync


def test_sync_reports_added_then_nothing_new(tmp_path, demo_warehouse):
    warehouse = tmp_path / "warehouse.duckdb"
    shutil.copyfile(demo_warehouse, warehouse)
    project = write_project(tmp_path, duckdb_warehouse(warehouse))

    first = qualify("sync", "--project", str(project), "--json", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["generation"] == 1 and report["people"] == 2000
    (people,) = report["tables"]
    assert (people["table"], people["rows"], people["added"], people["changed"], people["removed"]) == ("people", 2000, 2000, 0, 0)
    assert (tmp_path / "data" / "lmdb" / "data.mdb").is_file()  # data_dir = "data", relative to the project

    second = json.loads(qualify("sync", "--project", str(project), "--json", cwd=tmp_path).stdout)
    assert second["generation"] == 2 and second["people"] == 2000
    (people,) = second["tables"]
    assert (people["added"], people["changed"], people["removed"], people["unchanged"]) == (0, 0, 0, 2000)

    with duckdb.connect(str(warehouse)) as con:
        con.execute("UPDATE customers SET plan = 'diamond' WHERE user_id IN ('user-1', 'user-2')")
        con.execute("DELETE FROM customers WHERE user_id = 'user-3'")
    third = json.loads(qualify("sync", "--project", str(project), "--json", cwd=tmp_path).stdout)
    (people,) = third["tables"]
    assert (people["added"], people["changed"], people["removed"], people["unchanged"]) == (0, 2, 1, 1997)
    assert third["people"] == 1999


def test_sync_prints_a_summary_without_json(tmp_path, demo_warehouse):
    project = write_project(tmp_path, duckdb_warehouse(demo_warehouse))
    proc = qualify("sync", "--project", str(project), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "2,000 people" in proc.stdout
    assert "people: 2,000 rows, 2,000 added, 0 changed, 0 removed, 0 unchanged" in proc.stdout


def test_sync_failure_exits_nonzero_with_the_reason(tmp_path, demo_warehouse):
    project = write_project(tmp_path, duckdb_warehouse(demo_warehouse))
    _set(project, 'query = "SELECT * FROM customers"', 'query = "SELEC * FROM customers"')
    proc = qualify("sync", "--project", str(project), "--json", cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert "qualify sync: warehouse query failed:" in proc.stderr
    assert "syntax error" in proc.stderr and "SELEC" in proc.stderr


def test_sync_with_a_wrongly_typed_attribute_fails_cleanly(tmp_path, demo_warehouse):
    project = write_project(tmp_path, duckdb_warehouse(demo_warehouse))
    _set(project, 'email_opt_in = "bool"', 'email_opt_in = "timestamp"\nplan_as_int = "int"')
    _set(project, 'query = "SELECT * FROM customers"', 'query = "SELECT *, plan AS plan_as_int FROM customers"')
    proc = qualify("sync", "--project", str(project), cwd=tmp_path)
    assert proc.returncode != 0
    assert "qualify sync:" in proc.stderr
    assert "'email_opt_in'" in proc.stderr or "'plan_as_int'" in proc.stderr, proc.stderr


def test_sync_of_a_bad_project_file(tmp_path, demo_warehouse):
    project = write_project(tmp_path, duckdb_warehouse(demo_warehouse), extra="[server]\nport = 70000\n")
    proc = qualify("sync", "--project", str(project), cwd=tmp_path)
    assert proc.returncode == 1
    assert "server.port = 70000: must be an integer from 0 to 65535" in proc.stderr


# ---------------------------------------------------------------- get


def test_get_prints_the_record_as_json(tmp_path, demo_server):
    proc = qualify("get", "user-42", "--address", demo_server.address, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    with Client(demo_server.address) as client:
        assert printed == client.get("user-42").to_json_dict()
    assert printed["key"] == "user-42" and printed["collection"] == "customers"
    assert printed["fields"]["user_id"] == "user-42"
    assert printed["memberships"] == []


def test_get_with_fields(tmp_path, demo_server):
    proc = qualify("get", "user-42", "--fields", "plan", "--address", demo_server.address, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    with Client(demo_server.address) as client:
        assert printed["fields"] == {"plan": client.get("user-42").fields["plan"]}

    proc = qualify("get", "user-42", "--fields", "plan,ltv", "--address", demo_server.address, cwd=tmp_path)
    assert set(json.loads(proc.stdout)["fields"]) == {"plan", "ltv"}


def test_get_of_an_unknown_key_exits_2(tmp_path, demo_server):
    proc = qualify("get", "user-999999", "--address", demo_server.address, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("qualify get: NOT_FOUND (KEY_NOT_FOUND):"), proc.stderr
    assert "user-999999" in proc.stderr


def test_get_of_an_unknown_field_exits_1(tmp_path, demo_server):
    proc = qualify("get", "user-1", "--fields", "shoe_size", "--address", demo_server.address, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("qualify get: INVALID_ARGUMENT (UNKNOWN_FIELD):"), proc.stderr


def test_get_with_no_server_exits_1(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = qualify("get", "user-1", "--address", f"127.0.0.1:{port}", "--timeout", "0.5", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("qualify get: UNAVAILABLE"), proc.stderr
