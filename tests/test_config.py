"""qualify.toml → Project: good files, bad files, and exactly what is reported.

Every problem must name its key, the value found (or none, when the key is
missing or unknown) and what is wrong; every problem in a file is reported in
one ProjectError.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import duckdb
import pytest

from qualify.server.config import (
    DEFAULT_MAP_SIZE,
    DEFAULT_PORT,
    Attribute,
    Collection,
    Problem,
    ProjectError,
    load_project,
    parse_project,
)
from qualify.server.domain.schema import ValueType

DURATION_MESSAGE = "must be a duration such as '15m', '30s', '1h' or a number of seconds"


# ----------------------------------------------------------------- helpers


def make_duckdb(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE customers AS SELECT 'user-' || i AS user_id, 'free' AS plan FROM range(3) t(i)")
    return path


def write(folder: Path, text: str, name: str = "qualify.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


GOOD_MODEL = """
[parent_model]
name = "customers"
query = "SELECT * FROM customers"
primary_key = "user_id"

[parent_model.attributes]
plan = "string"
"""


@pytest.fixture
def project_dir(tmp_path) -> Path:
    """A folder holding wh.duckdb, for project files that point at it."""
    make_duckdb(tmp_path / "wh.duckdb")
    return tmp_path


def good(extra: str = "", model: str = GOOD_MODEL, warehouse: str = 'type = "duckdb"\npath = "wh.duckdb"',
         top: str = "") -> str:
    """A valid project (over wh.duckdb) with pieces replaced or added."""
    return f"{top}\n[warehouse]\n{warehouse}\n{model}\n{extra}"


def problems_of(excinfo) -> list[Problem]:
    return list(excinfo.value.problems)


def shown(problems: list[Problem]) -> list[str]:
    """Each problem as the user sees it: 'key = value: message' or 'key: message'."""
    return [str(p) for p in problems]


def load_text(folder: Path, text: str):
    return load_project(write(folder, text))


def only_problem(folder: Path, text: str) -> Problem:
    with pytest.raises(ProjectError) as excinfo:
        load_text(folder, text)
    problems = problems_of(excinfo)
    assert len(problems) == 1, shown(problems)
    return problems[0]


def assert_no_value(p: Problem) -> None:
    """The problem is about a missing or unknown key: no value is shown."""
    assert str(p) == f"{p.key}: {p.message}", str(p)


# ----------------------------------------------------------------- good files and defaults


def test_minimal_project_gets_every_default(project_dir, tmp_path_factory, monkeypatch):
    path = write(project_dir / "proj", """\
        [warehouse]
        type = "duckdb"
        path = "../wh.duckdb"

        [parent_model]
        query = "SELECT * FROM customers"
        primary_key = "user_id"
        """)
    # Relative paths are relative to the project file, not to the working folder.
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    project = load_project(path)

    assert project.path == path
    assert project.data_dir == (project_dir / "proj").resolve() / "qualify-data"
    assert project.warehouse.kind == "duckdb"
    assert project.warehouse.path == (project_dir / "wh.duckdb").resolve()
    assert project.warehouse.path.is_absolute()
    assert project.parent_model.name == "people"
    assert project.parent_model.query == "SELECT * FROM customers"
    assert project.parent_model.primary_key == "user_id"
    assert project.parent_model.attributes == ()
    # No [collections]: the parent model is served under its own name.
    assert project.collections == (Collection(name="people", key="user_id", query=None),)
    assert project.collections[0].is_parent
    assert project.server.host == "127.0.0.1"
    assert project.server.port == DEFAULT_PORT == 50051
    assert project.server.workers == 1
    assert project.server.sync_interval is None
    assert project.map_size == DEFAULT_MAP_SIZE == 64 << 30
    assert project.sync_batch_rows == 50_000


def test_full_project_reads_every_setting(project_dir):
    project = load_text(project_dir, good("""
        [collections.customers]

        [collections.profile]
        key = "user_id"

        [collections.recs]
        query = "SELECT user_id, product FROM recs"
        key = "user_id"

        [server]
        host = "0.0.0.0"
        port = 0
        workers = 4
        sync_interval = "15m"

        [storage]
        map_size_gb = 0.5
        sync_batch_rows = 1000
        """, top='data_dir = "state/here"', model="""
        [parent_model]
        name = "customers"
        query = "SELECT * FROM customers"
        primary_key = "user_id"

        [parent_model.attributes]
        plan = "string"
        ltv = "float"
        orders_count = "int"
        email_opt_in = "bool"
        signup_date = "timestamp"
        """))
    assert project.data_dir == project_dir.resolve() / "state" / "here"
    assert project.parent_model.name == "customers"
    assert project.parent_model.attributes == (
        Attribute("plan", ValueType.STRING),
        Attribute("ltv", ValueType.FLOAT),
        Attribute("orders_count", ValueType.INT),
        Attribute("email_opt_in", ValueType.BOOL),
        Attribute("signup_date", ValueType.TIMESTAMP),
    )
    assert project.collections == (
        Collection("customers", "user_id", None),
        Collection("profile", "user_id", None),
        Collection("recs", "user_id", "SELECT user_id, product FROM recs"),
    )
    assert project.collection("customers").is_parent
    assert project.collection("profile").is_parent
    assert not project.collection("recs").is_parent
    assert project.collection("nope") is None
    assert (project.server.host, project.server.port, project.server.workers) == ("0.0.0.0", 0, 4)
    assert project.server.sync_interval == 900.0
    assert project.map_size == 1 << 29
    assert project.sync_batch_rows == 1000


def test_data_dir_absolute_is_kept(project_dir, tmp_path_factory):
    target = tmp_path_factory.mktemp("abs-data")
    project = load_text(project_dir, good(top=f'data_dir = "{target}"'))
    assert project.data_dir == target


def test_collections_default_to_the_parent_model_under_its_name(project_dir):
    project = load_text(project_dir, good())
    assert project.collections == (Collection(name="customers", key="user_id"),)
    assert project.collection("customers").is_parent


def test_a_collection_with_only_its_own_query_does_not_add_the_parent(project_dir):
    project = load_text(project_dir, good("""
        [collections.recs]
        query = "SELECT * FROM recs"
        key = "user_id"
        """))
    assert [c.name for c in project.collections] == ["recs"]


def test_empty_collection_table_serves_the_parent_model_by_its_primary_key(project_dir):
    project = load_text(project_dir, good("[collections.profile]\n"))
    assert project.collections == (Collection(name="profile", key="user_id", query=None),)


@pytest.mark.parametrize("written, seconds", [
    ('"15m"', 900.0),
    ('"30s"', 30.0),
    ("2", 2.0),
    ('"500ms"', 0.5),
    ('"1h"', 3600.0),
    ('"1.5h"', 5400.0),
    ('"2d"', 172800.0),
    ('"45"', 45.0),
    ("0.25", 0.25),
    ('" 10 s "', 10.0),
])
def test_sync_interval_parsing(project_dir, written, seconds):
    project = load_text(project_dir, good(f"[server]\nsync_interval = {written}\n"))
    assert project.server.sync_interval == pytest.approx(seconds)
    assert isinstance(project.server.sync_interval, float)


@pytest.mark.parametrize("written", ["0", '"0s"', '"0ms"'])
def test_zero_sync_interval_means_sync_only_at_start(project_dir, written):
    project = load_text(project_dir, good(f"[server]\nsync_interval = {written}\n"))
    assert project.server.sync_interval is None


@pytest.mark.parametrize("alias, vtype", [
    ("text", ValueType.STRING), ("varchar", ValueType.STRING), ("STRING", ValueType.STRING),
    ("bigint", ValueType.INT), ("integer", ValueType.INT), ("double", ValueType.FLOAT),
    ("number", ValueType.FLOAT), ("boolean", ValueType.BOOL), ("date", ValueType.TIMESTAMP),
    ("datetime", ValueType.TIMESTAMP), ("Timestamp", ValueType.TIMESTAMP),
])
def test_attribute_type_aliases(project_dir, alias, vtype):
    project = load_text(project_dir, good(model=GOOD_MODEL.replace('plan = "string"', f'plan = "{alias}"')))
    assert project.parent_model.attributes == (Attribute("plan", vtype),)


@pytest.mark.parametrize("port", [0, 1, 65535])
def test_port_bounds_accepted(project_dir, port):
    assert load_text(project_dir, good(f"[server]\nport = {port}\n")).server.port == port


@pytest.mark.parametrize("workers", [1, 256])
def test_worker_bounds_accepted(project_dir, workers):
    assert load_text(project_dir, good(f"[server]\nworkers = {workers}\n")).server.workers == workers


def test_postgres_warehouse(tmp_path):
    project = load_text(tmp_path, good(warehouse='type = "postgres"\ndsn = "postgresql://u@127.0.0.1:5/db"'))
    assert project.warehouse.kind == "postgres"
    assert project.warehouse.dsn == "postgresql://u@127.0.0.1:5/db"
    assert project.warehouse.path is None


def test_files_warehouse_globs_resolve_relative_to_the_project_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with duckdb.connect() as con:
        con.execute(f"COPY (SELECT 1 AS user_id) TO '{data / 'a.parquet'}' (FORMAT parquet)")
        con.execute(f"COPY (SELECT 1 AS user_id, 'x' AS product) TO '{data / 'recs.csv'}' (FORMAT csv, HEADER)")
    project = load_text(tmp_path, good(warehouse="""type = "files"
[warehouse.tables]
customers = "data/*.parquet"
recs = "data/recs.csv"
"""))
    assert project.warehouse.kind == "files"
    assert project.warehouse.tables == (
        ("customers", str(tmp_path.resolve() / "data" / "*.parquet")),
        ("recs", str(tmp_path.resolve() / "data" / "recs.csv")),
    )


def test_parse_project_without_a_path_names_qualify_toml(tmp_path):
    with pytest.raises(ProjectError) as excinfo:
        parse_project({}, base=tmp_path)
    assert excinfo.value.path == "qualify.toml"
    assert str(excinfo.value).startswith("qualify.toml: 2 problem(s)\n")


# ----------------------------------------------------------------- unknown keys


@pytest.mark.parametrize("text, key, message", [
    (good() + "\n[parnt_model]\nquery = 'x'\n", "parnt_model", "unknown key (did you mean 'parent_model'?)"),
    (good(top="data_dri = 'x'"), "data_dri", "unknown key (did you mean 'data_dir'?)"),
    (good(warehouse='type = "duckdb"\npath = "wh.duckdb"\npth = "x"'), "warehouse.pth", "unknown key (did you mean 'path'?)"),
    (good("[server]\nprot = 1\n"), "server.prot", "unknown key (did you mean 'port'?)"),
    (good("[server]\nworker = 2\n"), "server.worker", "unknown key (did you mean 'workers'?)"),
    (good("[storage]\nsync_batch_row = 200\n"), "storage.sync_batch_row", "unknown key (did you mean 'sync_batch_rows'?)"),
    (good(model=GOOD_MODEL.replace("primary_key", "primary_key = 'user_id'\nprimary_keys")),
     "parent_model.primary_keys", "unknown key (did you mean 'primary_key'?)"),
    (good("[collections.recs]\nqeury = 'SELECT 1'\nkey = 'user_id'\n"),
     "collections.recs.qeury", "unknown key (did you mean 'query'?)"),
    (good("[server]\nzzz = 1\n"), "server.zzz", "unknown key (known keys: host, port, workers, sync_interval)"),
])
def test_unknown_keys_with_did_you_mean(project_dir, text, key, message):
    p = only_problem(project_dir, text)
    assert (p.key, p.message) == (key, message)
    assert_no_value(p)


# ----------------------------------------------------------------- bad types and values


@pytest.mark.parametrize("port", ["70000", "-1", '"50051"', "true", "1.5", "65536"])
def test_bad_ports(project_dir, port):
    p = only_problem(project_dir, good(f"[server]\nport = {port}\n"))
    expected = {"70000": 70000, "-1": -1, '"50051"': "50051", "true": True, "1.5": 1.5, "65536": 65536}[port]
    assert p.key == "server.port"
    assert p.value == expected and type(p.value) is type(expected)
    assert p.message == "must be an integer from 0 to 65535"
    assert str(p) == f"server.port = {expected!r}: must be an integer from 0 to 65535"


@pytest.mark.parametrize("workers, expected", [("0", 0), ("257", 257), ('"4"', "4"), ("true", True), ("2.0", 2.0)])
def test_bad_workers(project_dir, workers, expected):
    p = only_problem(project_dir, good(f"[server]\nworkers = {workers}\n"))
    assert (p.key, p.value, p.message) == ("server.workers", expected, "must be an integer from 1 to 256")
    assert type(p.value) is type(expected)


@pytest.mark.parametrize("written, value, message", [
    ('"5 minutes"', "5 minutes", DURATION_MESSAGE),
    ('"15x"', "15x", DURATION_MESSAGE),
    ('"m"', "m", DURATION_MESSAGE),
    ('""', "", DURATION_MESSAGE),
    ('"-5s"', "-5s", DURATION_MESSAGE),
    ('"1h30m"', "1h30m", DURATION_MESSAGE),
    ("-5", -5, "must not be negative"),
    ("-0.5", -0.5, "must not be negative"),
    ("true", True, "must be a duration such as '15m' or a number of seconds"),
    ("[1]", [1], DURATION_MESSAGE),
])
def test_bad_durations(project_dir, written, value, message):
    p = only_problem(project_dir, good(f"[server]\nsync_interval = {written}\n"))
    assert (p.key, p.value, p.message) == ("server.sync_interval", value, message)


def test_nan_sync_interval_is_rejected(project_dir):
    # TOML has a nan float; it passes the "not negative" check (nan < 0 is
    # False) and would reach asyncio.sleep as the interval.
    p = only_problem(project_dir, good("[server]\nsync_interval = nan\n"))
    assert p.key == "server.sync_interval"
    assert isinstance(p.value, float) and math.isnan(p.value)


@pytest.mark.parametrize("setting, key, value, message", [
    ("map_size_gb = 0", "storage.map_size_gb", 0, "must be a number of GiB between 0.01 and 1048576"),
    ("map_size_gb = '1'", "storage.map_size_gb", "1", "must be a number of GiB between 0.01 and 1048576"),
    ("map_size_gb = true", "storage.map_size_gb", True, "must be a number of GiB between 0.01 and 1048576"),
    ("map_size_gb = 2000000", "storage.map_size_gb", 2000000, "must be a number of GiB between 0.01 and 1048576"),
    ("sync_batch_rows = 99", "storage.sync_batch_rows", 99, "must be an integer from 100 to 10000000"),
    ("sync_batch_rows = 10000001", "storage.sync_batch_rows", 10000001, "must be an integer from 100 to 10000000"),
    ("sync_batch_rows = 1000.0", "storage.sync_batch_rows", 1000.0, "must be an integer from 100 to 10000000"),
    ("sync_batch_rows = '1000'", "storage.sync_batch_rows", "1000", "must be an integer from 100 to 10000000"),
])
def test_bad_storage_settings(project_dir, setting, key, value, message):
    p = only_problem(project_dir, good(f"[storage]\n{setting}\n"))
    assert (p.key, p.value, p.message) == (key, value, message)


def test_bad_attribute_types(project_dir):
    with pytest.raises(ProjectError) as excinfo:
        load_text(project_dir, good(model=GOOD_MODEL + 'ltv = "money"\nscore = 3\nplan2 = ""\n'))
    assert shown(problems_of(excinfo)) == [
        "parent_model.attributes.ltv = 'money': must be one of string, int, float, bool, timestamp",
        "parent_model.attributes.score = 3: must be one of string, int, float, bool, timestamp",
        "parent_model.attributes.plan2 = '': must be one of string, int, float, bool, timestamp",
    ]


@pytest.mark.parametrize("text, expected", [
    (good(warehouse='type = "snowflake"'), "warehouse.type = 'snowflake': must be one of duckdb, files, postgres"),
    (good(warehouse="type = 3"), "warehouse.type = 3: must be a non-empty string"),
    (good(warehouse='type = "duckdb"\npath = 7'), "warehouse.path = 7: must be a non-empty string"),
    (good(warehouse='type = "postgres"\ndsn = "  "'), "warehouse.dsn = '  ': must be a non-empty string"),
    (good(model=GOOD_MODEL.replace('query = "SELECT * FROM customers"', 'query = ""')),
     "parent_model.query = '': must be a non-empty string"),
    (good(model=GOOD_MODEL.replace('primary_key = "user_id"', "primary_key = 1")),
     "parent_model.primary_key = 1: must be a non-empty string"),
    (good(model=GOOD_MODEL.replace('name = "customers"', "name = false")),
     "parent_model.name = False: must be a non-empty string"),
    (good(model=GOOD_MODEL.replace("[parent_model.attributes]\nplan = \"string\"", "").replace(
        'primary_key = "user_id"', 'primary_key = "user_id"\nattributes = "plan"')),
     "parent_model.attributes = 'plan': must be a table of name = \"type\""),
    (good("[server]\nhost = 1\n"), "server.host = 1: must be a non-empty string"),
    (good("[collections.recs]\nquery = 5\nkey = 'user_id'\n"), "collections.recs.query = 5: must be a non-empty string"),
    (good(top="server = 3"), "server = 3: must be a table"),
    (good(top='data_dir = ""'), "data_dir = '': must be a non-empty string"),
])
def test_bad_types_and_values(project_dir, text, expected):
    p = only_problem(project_dir, text)
    assert str(p) == expected


def test_collections_must_be_tables(project_dir):
    with pytest.raises(ProjectError) as excinfo:
        load_text(project_dir, good(top="collections = 3"))
    assert shown(problems_of(excinfo)) == ["collections = 3: must be a table of [collections.NAME] tables"]

    with pytest.raises(ProjectError) as excinfo:
        load_text(project_dir, good('[collections]\nrecs = 3\n"1bad" = {}\n'))
    problems = problems_of(excinfo)
    assert shown(problems) == [
        "collections.recs = 3: must be a table (empty serves the parent model)",
        "collections.1bad: the collection name must start with a letter and hold only letters, digits, _ and -",
    ]


def test_warehouse_that_is_not_a_table_is_one_problem(project_dir):
    # `warehouse = "duckdb"` is one mistake; a second, invented
    # "warehouse.type: is required" only misleads.
    with pytest.raises(ProjectError) as excinfo:
        load_text(project_dir, 'warehouse = "duckdb"\n' + GOOD_MODEL)
    assert shown(problems_of(excinfo)) == ["warehouse = 'duckdb': must be a table"]


# ----------------------------------------------------------------- missing required keys


def test_empty_file_reports_both_required_tables(tmp_path):
    with pytest.raises(ProjectError) as excinfo:
        load_text(tmp_path, "")
    problems = problems_of(excinfo)
    assert shown(problems) == [
        "warehouse: is required (a [warehouse] table with type = duckdb, files or postgres)",
        "parent_model: is required (one row per person: query, primary_key, attributes)",
    ]
    for p in problems:
        assert_no_value(p)


@pytest.mark.parametrize("text, expected", [
    (good(warehouse=""), "warehouse.type: is required"),
    (good(warehouse='type = "duckdb"'), "warehouse.path: is required"),
    (good(warehouse='type = "postgres"'), "warehouse.dsn: is required"),
    (good(model=GOOD_MODEL.replace('query = "SELECT * FROM customers"', "")), "parent_model.query: is required"),
    (good(model=GOOD_MODEL.replace('primary_key = "user_id"', "")), "parent_model.primary_key: is required"),
    (good("[collections.recs]\nquery = 'SELECT * FROM recs'\n"), "collections.recs.key: is required"),
])
def test_missing_required_keys(project_dir, text, expected):
    p = only_problem(project_dir, text)
    assert str(p) == expected
    assert_no_value(p)


def test_files_warehouse_without_tables_is_reported_as_missing(tmp_path):
    p = only_problem(tmp_path, good(warehouse='type = "files"'))
    assert p.key == "warehouse.tables"
    # Nothing was written, so no value (least of all Python's None) is shown.
    assert_no_value(p)


def test_files_warehouse_with_empty_tables(tmp_path):
    p = only_problem(tmp_path, good(warehouse='type = "files"\ntables = {}'))
    assert (p.key, p.value) == ("warehouse.tables", {})
    assert p.message == 'must be a table of view name = "file.parquet" or "data/*.csv"'


# ----------------------------------------------------------------- files that do not exist


def test_missing_duckdb_file(tmp_path):
    p = only_problem(tmp_path, good(warehouse='type = "duckdb"\npath = "nope/wh.duckdb"'))
    full = (tmp_path / "nope" / "wh.duckdb").resolve()
    assert (p.key, p.value, p.message) == ("warehouse.path", "nope/wh.duckdb", f"no such DuckDB file ({full})")


def test_duckdb_path_that_is_a_folder(tmp_path):
    (tmp_path / "wh.duckdb").mkdir()
    p = only_problem(tmp_path, good())
    assert (p.key, p.value) == ("warehouse.path", "wh.duckdb")
    assert p.message.startswith("no such DuckDB file")


def test_files_glob_matching_nothing(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "customers.csv").write_text("user_id\n1\n")  # a CSV, but the glob asks for Parquet
    p = only_problem(tmp_path, good(warehouse='type = "files"\n[warehouse.tables]\ncustomers = "data/*.parquet"'))
    assert (p.key, p.value, p.message) == ("warehouse.tables.customers", "data/*.parquet", "matches no file")


def test_files_missing_folder(tmp_path):
    p = only_problem(tmp_path, good(warehouse='type = "files"\n[warehouse.tables]\ncustomers = "nowhere/x.csv"'))
    assert (p.key, p.value, p.message) == ("warehouse.tables.customers", "nowhere/x.csv", "matches no file")


@pytest.mark.parametrize("pattern, value", [('"data/x.json"', "data/x.json"), ("5", 5), ('"data/x.parquet.bak"', "data/x.parquet.bak")])
def test_files_bad_extension(tmp_path, pattern, value):
    p = only_problem(tmp_path, good(warehouse=f'type = "files"\n[warehouse.tables]\ncustomers = {pattern}'))
    assert (p.key, p.value) == ("warehouse.tables.customers", value)
    assert p.message == "must be a path or glob ending in .parquet, .csv, .csv.gz or .tsv"


def test_files_bad_view_name(tmp_path):
    (tmp_path / "x.csv").write_text("user_id\n1\n")
    p = only_problem(tmp_path, good(warehouse='type = "files"\n[warehouse.tables]\n"bad name" = "x.csv"'))
    assert p.key == "warehouse.tables.bad name"
    assert "view name" in p.message
    assert_no_value(p)


def test_files_glob_with_a_wildcard_folder_matches(tmp_path):
    # DuckDB reads data/*/part.parquet (Hive-style partition folders), so the
    # check must accept it when such files exist.
    for part in ("2024", "2025"):
        (tmp_path / "data" / part).mkdir(parents=True)
        with duckdb.connect() as con:
            con.execute(f"COPY (SELECT 1 AS user_id) TO '{tmp_path / 'data' / part / 'part.parquet'}' (FORMAT parquet)")
    project = load_text(tmp_path, good(warehouse='type = "files"\n[warehouse.tables]\ncustomers = "data/*/part.parquet"'))
    assert project.warehouse.tables == (("customers", str(tmp_path.resolve() / "data" / "*" / "part.parquet")),)


# ----------------------------------------------------------------- collections


def test_collection_without_query_but_with_a_different_key(project_dir):
    p = only_problem(project_dir, good("[collections.profile]\nkey = 'email'\n"))
    assert p.key == "collections.profile.key"
    assert p.value == "email"
    assert p.message == "a collection without a query serves the parent model, keyed by its primary key 'user_id'"


def test_collection_without_query_with_the_same_key_is_fine(project_dir):
    project = load_text(project_dir, good("[collections.profile]\nkey = 'user_id'\n"))
    assert project.collections == (Collection("profile", "user_id", None),)


# ----------------------------------------------------------------- the file itself


def test_invalid_toml(tmp_path):
    path = write(tmp_path, '[warehouse]\ntype = "duckdb\n')
    with pytest.raises(ProjectError) as excinfo:
        load_project(path)
    assert excinfo.value.path == str(path)
    (p,) = problems_of(excinfo)
    assert p.key == "(syntax)"
    assert p.message.startswith("not valid TOML: ")
    assert "line 2" in p.message  # tomllib says where
    assert_no_value(p)
    assert str(excinfo.value).startswith(f"{path}: 1 problem(s)\n  (syntax): not valid TOML: ")


def test_duplicate_key_is_invalid_toml(tmp_path):
    with pytest.raises(ProjectError) as excinfo:
        load_text(tmp_path, good("[server]\nport = 1\nport = 2\n"))
    assert [p.key for p in problems_of(excinfo)] == ["(syntax)"]


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ProjectError) as excinfo:
        load_project(path)
    (p,) = problems_of(excinfo)
    assert (p.key, p.value, p.message) == ("(file)", str(path), "cannot be read: No such file or directory")
    assert excinfo.value.path == str(path)


def test_project_path_that_is_a_folder(tmp_path):
    with pytest.raises(ProjectError) as excinfo:
        load_project(tmp_path)
    (p,) = problems_of(excinfo)
    assert (p.key, p.value, p.message) == ("(file)", str(tmp_path), "cannot be read: Is a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = write(tmp_path, good())
    path.chmod(0)
    try:
        with pytest.raises(ProjectError) as excinfo:
            load_project(path)
    finally:
        path.chmod(0o644)
    (p,) = problems_of(excinfo)
    assert (p.key, p.message) == ("(file)", "cannot be read: Permission denied")


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "qualify.toml"
    path.write_bytes(good().encode() + b'\n# caf\xe9 in Latin-1\n')
    with pytest.raises(ProjectError) as excinfo:
        load_project(path)
    (p,) = problems_of(excinfo)
    assert p.key in ("(file)", "(syntax)")
    assert "UTF-8" in p.message or "utf-8" in p.message


# ----------------------------------------------------------------- many problems at once


def test_every_problem_is_reported_in_one_error(tmp_path):
    path = write(tmp_path, """\
        data_dri = "x"

        [warehouse]
        type = "duckdb"
        path = "missing.duckdb"

        [parent_model]
        query = "SELECT * FROM customers"

        [parent_model.attributes]
        plan = "str"
        ltv = "money"

        [collections.profile]
        key = "email"

        [collections.recs]
        query = "SELECT 1"

        [server]
        port = 99999
        workers = 0
        sync_interval = "soon"

        [storage]
        sync_batch_rows = 5
        """)
    with pytest.raises(ProjectError) as excinfo:
        load_project(path)
    full = (tmp_path / "missing.duckdb").resolve()
    expected = [
        "data_dri: unknown key (did you mean 'data_dir'?)",
        f"warehouse.path = 'missing.duckdb': no such DuckDB file ({full})",
        "parent_model.primary_key: is required",
        "parent_model.attributes.ltv = 'money': must be one of string, int, float, bool, timestamp",
        "collections.profile.key = 'email': a collection without a query serves the parent model, keyed by its primary key ''",
        "collections.recs.key: is required",
        "server.port = 99999: must be an integer from 0 to 65535",
        "server.workers = 0: must be an integer from 1 to 256",
        f"server.sync_interval = 'soon': {DURATION_MESSAGE}",
        "storage.sync_batch_rows = 5: must be an integer from 100 to 10000000",
    ]
    assert shown(problems_of(excinfo)) == expected
    message = str(excinfo.value)
    assert message.splitlines() == [f"{path}: {len(expected)} problem(s)"] + [f"  {line}" for line in expected]


# ----------------------------------------------------------------- [[syncs]], [delivery], realtime watch settings

SYNCS = """
[[syncs]]
id = "crm"
audiences = ["high_intent"]
fields = ["plan", "customers.ltv"]
[syncs.webhook]
url = "https://hooks.example.com/qualify"
secret = "0123456789abcdef"
max_batch_size = 50
max_delay = "20ms"
max_attempts = 5

[[syncs]]
id = "bus"
audiences = ["high_intent", "churn_risk"]
[syncs.nats]
url = "nats://127.0.0.1:4222"
subject = "qualify.{audience}"

[delivery]
retry_initial = "100ms"
retry_max = "1m"

[realtime]
watch_buffer = 500
watch_max_lag = 20000
"""


def test_syncs_and_delivery_settings(project_dir):
    from qualify.server.domain.syncs import Nats, Webhook

    project = load_text(project_dir, good(SYNCS))
    crm, bus = project.syncs
    assert (crm.id, crm.audience_ids, crm.fields, crm.managed_by_project) == (
        "crm", ("high_intent",), ("plan", "customers.ltv"), True)
    assert crm.destination == Webhook("https://hooks.example.com/qualify", "0123456789abcdef", 50, 0.02, 5)
    assert bus.destination == Nats("nats://127.0.0.1:4222", "qualify.{audience}", 10)
    assert (project.retry_initial, project.retry_max) == (0.1, 60.0)
    assert (project.watch_buffer, project.watch_max_lag) == (500, 20000)


def test_webhook_secret_from_the_environment(project_dir, monkeypatch):
    text = good(SYNCS.replace('secret = "0123456789abcdef"', 'secret_env = "CRM_SECRET"'))
    monkeypatch.setenv("CRM_SECRET", "from-the-environment")
    assert load_text(project_dir, text).syncs[0].destination.secret == "from-the-environment"
    monkeypatch.delenv("CRM_SECRET")
    p = only_problem(project_dir, text)
    assert (p.key, p.value) == ("syncs[0].webhook.secret_env", "CRM_SECRET")


@pytest.mark.parametrize("old, new, key", [
    ('id = "crm"', 'id = "CRM!"', "syncs[0].id"),
    ('audiences = ["high_intent"]', "audiences = []", "syncs[0].audiences"),
    ('audiences = ["high_intent"]', 'audiences = "high_intent"', "syncs[0].audiences"),
    ('url = "https://hooks.example.com/qualify"', 'url = "hooks.example.com"', "syncs[0].webhook.url"),
    ('secret = "0123456789abcdef"', 'secret = "short"', "syncs[0].webhook.secret"),
    ("max_batch_size = 50", "max_batch_size = 0.5", "syncs[0].webhook.max_batch_size"),
    ('max_delay = "20ms"', 'max_delay = "soon"', "syncs[0].webhook.max_delay"),
    ('max_delay = "20ms"', 'max_dealy = "20ms"', "syncs[0].webhook.max_dealy"),
    ('subject = "qualify.{audience}"', 'subject = "qualify.>"', "syncs[1].nats.subject"),
    ('id = "bus"', 'id = "crm"', "syncs[1].id"),
    ('retry_initial = "100ms"', 'retry_initial = 0', "delivery.retry_initial"),
    ("watch_buffer = 500", "watch_buffer = 0", "realtime.watch_buffer"),
])
def test_bad_syncs(project_dir, old, new, key):
    assert old in SYNCS
    p = only_problem(project_dir, good(SYNCS.replace(old, new, 1)))
    assert p.key == key, str(p)


def test_a_sync_needs_one_destination(project_dir):
    p = only_problem(project_dir, good('[[syncs]]\nid = "x"\naudiences = ["a"]\n'))
    assert p.key == "syncs[0].destination"
