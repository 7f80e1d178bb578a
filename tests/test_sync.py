"""Warehouse sync into LMDB, driven directly through Syncer.

Everything is real: DuckDB files, Parquet and CSV files written by DuckDB, a
throwaway PostgreSQL cluster, and LMDB environments in tmp_path. What was
stored is read back through Reader and decoded with the generated
qualify.v1.Record, and the attribute column arrays are read raw from the
``people.cols`` database (layout: qualify.server.storage.lmdb_store).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path

import duckdb
import lmdb
import numpy as np
import pytest

from qualify.server.config import Project, load_project
from qualify.server.domain.errors import KeyNotFound
from qualify.server.storage.lmdb_store import ID_KEY, U32, Reader, open_env
from qualify.server.storage.warehouse_sync import SyncError, Syncer
from qualify.server.wire import record_message
from qualify.v1.personalize_pb2 import Record

MAP_SIZE = 1 << 30

# ----------------------------------------------------------------- helpers


def toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def duckdb_warehouse(path: Path) -> str:
    return f'type = "duckdb"\npath = {toml_str(str(path))}'


def make_project(folder: Path, warehouse: str, *, query: str = "SELECT * FROM customers", key: str = "user_id",
                 attributes: dict[str, str] | None = None, collections: str = "[collections.customers]\n",
                 batch_rows: int | None = None, extra: str = "") -> Project:
    """Writes qualify.toml into folder and loads it (the real config path)."""
    attrs = "".join(f"{name} = {toml_str(t)}\n" for name, t in (attributes or {}).items())
    storage = f"[storage]\nsync_batch_rows = {batch_rows}\n" if batch_rows else ""
    text = (f"data_dir = \"data\"\n\n[warehouse]\n{warehouse}\n\n"
            f"[parent_model]\nname = \"customers\"\nquery = {toml_str(query)}\nprimary_key = {toml_str(key)}\n\n"
            f"[parent_model.attributes]\n{attrs}\n{collections}\n{storage}\n{extra}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "qualify.toml"
    path.write_text(text, encoding="utf-8")
    return load_project(path)


def duck(db: Path, *statements: str) -> None:
    """Runs statements against a DuckDB file and closes it (the sync opens it read-only)."""
    with duckdb.connect(str(db)) as con:
        for s in statements:
            con.execute(s)


def sync(env, project: Project, progress=None):
    return Syncer(env, project).run(progress)


def table_report(report, table: str = "people"):
    (t,) = [t for t in report.tables if t.table == table]
    return t


def counts(t) -> dict:
    return {k: getattr(t, k) for k in ("rows", "added", "changed", "removed", "unchanged", "duplicate_keys", "null_keys")}


def typed(value) -> tuple[str, object]:
    """A google.protobuf.Value as (kind, python value)."""
    kind = value.WhichOneof("kind")
    if kind == "null_value":
        return ("null", None)
    if kind == "number_value":
        return ("number", value.number_value)
    if kind == "string_value":
        return ("string", value.string_value)
    if kind == "bool_value":
        return ("bool", value.bool_value)
    raise AssertionError(f"unexpected Value kind {kind}")


def rfc3339(v) -> str:
    if isinstance(v, datetime):
        if v.tzinfo is not None:
            v = v.astimezone(timezone.utc).replace(tzinfo=None)
        frac = f".{v.microsecond:06d}" if v.microsecond else ""
        return v.strftime("%Y-%m-%dT%H:%M:%S") + frac + "Z"
    return f"{v.isoformat()}T00:00:00Z"


def expected_value(v) -> tuple[str, object]:
    """What a warehouse value should look like in the record (independent of the codec)."""
    if v is None:
        return ("null", None)
    if isinstance(v, bool):
        return ("bool", v)
    if isinstance(v, (int, float, Decimal)):
        return ("number", float(v))
    if isinstance(v, (datetime, date)):
        return ("string", rfc3339(v))
    return ("string", str(v))


def expected_micros(v) -> int:
    if isinstance(v, datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=timezone.utc)
        delta = v - datetime(1970, 1, 1, tzinfo=timezone.utc)
    else:
        delta = datetime(v.year, v.month, v.day, tzinfo=timezone.utc) - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def read_records(env, collection: str, keys: list[str]) -> dict[str, dict | None]:
    """Each key's record as {field: (kind, value)}, None when absent; one snapshot."""
    view, rows = Reader(env).get(collection, [k.encode() for k in keys])
    out: dict[str, dict | None] = {}
    for k, (stored, _bits) in zip(keys, rows):
        if stored is None:
            out[k] = None
            continue
        rec = Record.FromString(record_message(view.prefix, k.encode(), stored, None, b""))
        assert rec.collection == collection
        assert rec.key == k
        out[k] = {name: typed(v) for name, v in rec.fields.fields.items()}
    return out


def read_record(env, collection: str, key: str) -> dict:
    rec = read_records(env, collection, [key])[key]
    assert rec is not None, f"{key!r} not stored in {collection!r}"
    return rec


def warehouse_rows(db: Path, query: str, key: str) -> dict[str, dict]:
    """The warehouse's own answer, key -> {column: value}."""
    with duckdb.connect(str(db), read_only=True) as con:
        rel = con.sql(query)
        names = rel.columns
        rows = rel.fetchall()
    out = {}
    for r in rows:
        row = dict(zip(names, r))
        if row[key] is not None:
            out[str(row[key])] = row
    return out


def handle(env, name: bytes):
    """A database handle opened by a committed transaction (one opened inside a
    read transaction dies with it); opening an existing database writes nothing."""
    return env.open_db(name, create=False)


def person_ids(env, table: str = "people") -> dict[str, int]:
    """key -> dense person id, read from <table>.keys; checked against <table>.ids."""
    keys_db = handle(env, f"{table}.keys".encode())
    ids_db = handle(env, f"{table}.ids".encode())
    with env.begin() as txn:
        ids = {k.decode(): U32.unpack_from(v)[0] for k, v in txn.cursor(db=keys_db)}
        back = {ID_KEY.unpack(k)[0]: v.decode() for k, v in txn.cursor(db=ids_db)}
    assert back == {pid: k for k, pid in ids.items()}, "people.ids is not the inverse of people.keys"
    return ids


def raw_columns(env, table: str = "people") -> dict[bytes, bytes]:
    db = handle(env, f"{table}.cols".encode())
    with env.begin() as txn:
        return {bytes(k): bytes(v) for k, v in txn.cursor(db=db)}


DTYPES = {"string": np.int32, "int": np.int64, "float": np.float64, "bool": np.uint8, "timestamp": np.int64}


def column(cols: dict[bytes, bytes], name: str, type_name: str):
    values = np.frombuffer(cols[name.encode()], DTYPES[type_name])
    valid = np.frombuffer(cols[name.encode() + b".valid"], np.uint8)
    words = json.loads(cols[name.encode() + b".dict"]) if type_name == "string" else None
    return values, valid, words


def whole_state(env) -> dict:
    """Every named database's every entry: to prove a failed sync changed nothing."""
    state = {}
    with env.begin() as txn:
        names = [bytes(k) for k, _ in txn.cursor()]
    dbs = {name: handle(env, name) for name in names}
    with env.begin() as txn:
        assert [bytes(k) for k, _ in txn.cursor()] == names
        for name, db in dbs.items():
            state[name] = {bytes(k): bytes(v) for k, v in txn.cursor(db=db)}
    return state


@pytest.fixture
def env(tmp_path):
    e = open_env(tmp_path / "lmdb", MAP_SIZE, readonly=False)
    yield e
    e.close()


CUSTOMERS_SQL = """
CREATE OR REPLACE TABLE customers AS
SELECT
    'user-' || i AS user_id,
    CASE WHEN i % 10 = 9 THEN NULL ELSE ['free', 'pro', 'enterprise'][1 + i % 3] END AS plan,
    CASE WHEN i % 10 = 8 THEN NULL ELSE round(i * 1.25, 2)::DOUBLE END AS ltv,
    CASE WHEN i % 10 = 7 THEN NULL ELSE (i * 7)::BIGINT END AS orders,
    CASE WHEN i % 10 = 6 THEN NULL ELSE i % 2 = 0 END AS opt_in,
    CASE WHEN i % 10 = 5 THEN NULL ELSE DATE '2024-01-01' + i::INT END AS signup,
    CASE WHEN i % 10 = 4 THEN NULL ELSE TIMESTAMP '2025-01-01 00:00:00' + to_microseconds(i * 3600000250) END AS last_seen
FROM range({n}) AS t(i)
"""
CUSTOMER_ATTRIBUTES = {"plan": "string", "ltv": "float", "orders": "int", "opt_in": "bool",
                       "signup": "timestamp", "last_seen": "timestamp"}


@pytest.fixture
def customers_db(tmp_path) -> Path:
    """100 customers, each attribute NULL for a tenth of them."""
    db = tmp_path / "wh.duckdb"
    duck(db, CUSTOMERS_SQL.format(n=100))
    return db


@pytest.fixture
def customers_project(tmp_path, customers_db) -> Project:
    return make_project(tmp_path / "proj", duckdb_warehouse(customers_db), attributes=CUSTOMER_ATTRIBUTES)


def assert_records_match_warehouse(env, db: Path, collection: str = "customers",
                                   query: str = "SELECT * FROM customers", key: str = "user_id") -> None:
    want = warehouse_rows(db, query, key)
    got = read_records(env, collection, list(want))
    for k, row in want.items():
        assert got[k] == {c: expected_value(v) for c, v in row.items()}, k
    assert set(person_ids(env)) == set(want)


def assert_columns_match_warehouse(env, db: Path, attributes: dict[str, str],
                                   query: str = "SELECT * FROM customers", key: str = "user_id") -> None:
    want = warehouse_rows(db, query, key)
    ids = person_ids(env)
    cols = raw_columns(env)
    alive = np.frombuffer(cols[b".alive"], np.uint8)
    assert sorted(np.flatnonzero(alive).tolist()) == sorted(ids[k] for k in want)
    for name, type_name in attributes.items():
        values, valid, words = column(cols, name, type_name)
        assert len(values) == len(valid) == len(alive)
        for k, row in want.items():
            pid, v = ids[k], row[name]
            assert valid[pid] == (v is not None), (name, k)
            if v is None:
                continue
            if type_name == "string":
                assert words[values[pid]] == v, (name, k)
            elif type_name == "timestamp":
                assert values[pid] == expected_micros(v), (name, k)
            elif type_name == "bool":
                assert values[pid] == int(v), (name, k)
            elif type_name == "int":
                assert values[pid] == int(v), (name, k)
            else:
                assert values[pid] == float(v), (name, k)


# ----------------------------------------------------------------- incremental sync (DuckDB)


def test_first_sync_adds_everyone_and_a_second_sync_changes_nothing(env, customers_db, customers_project):
    report = sync(env, customers_project)
    assert report.generation == 1
    assert report.people == 100
    assert [t.table for t in report.tables] == ["people"]
    assert counts(table_report(report)) == dict(rows=100, added=100, changed=0, removed=0, unchanged=0,
                                                duplicate_keys=0, null_keys=0)
    assert_records_match_warehouse(env, customers_db)
    assert sorted(person_ids(env).values()) == list(range(100))

    reader = Reader(env)
    assert reader.generation == 1
    assert reader.last_sync()["generation"] == 1
    assert reader.people() == 100

    again = sync(env, customers_project)
    assert again.generation == 2
    assert counts(table_report(again)) == dict(rows=100, added=0, changed=0, removed=0, unchanged=100,
                                               duplicate_keys=0, null_keys=0)
    assert reader.generation == 2
    assert reader.last_sync()["tables"][0]["unchanged"] == 100
    assert_records_match_warehouse(env, customers_db)


def test_update_delete_insert_are_counted_exactly(env, customers_db, customers_project):
    sync(env, customers_project)
    before = person_ids(env)

    changed = [f"user-{i}" for i in (0, 1, 2, 50, 99)]
    removed = [f"user-{i}" for i in (3, 40, 98)]
    added = ["user-100", "user-101", "new-a", "new-b"]
    untouched_update = "user-10"  # an UPDATE that writes the same values changes nothing
    duck(customers_db,
         "UPDATE customers SET plan = 'gold' WHERE user_id IN ('user-0', 'user-1', 'user-2')",
         "UPDATE customers SET ltv = -1.5, last_seen = NULL WHERE user_id = 'user-50'",
         "UPDATE customers SET opt_in = NOT coalesce(opt_in, false) WHERE user_id = 'user-99'",
         f"UPDATE customers SET plan = plan WHERE user_id = '{untouched_update}'",
         "DELETE FROM customers WHERE user_id IN ('user-3', 'user-40', 'user-98')",
         """INSERT INTO customers VALUES
            ('user-100', 'pro', 1.5, 3, true, DATE '2024-02-02', TIMESTAMP '2025-02-02 10:00:00'),
            ('user-101', NULL, NULL, NULL, NULL, NULL, NULL),
            ('new-a', 'free', 0, 0, false, DATE '2020-01-01', TIMESTAMP '2020-01-01 00:00:00'),
            ('new-b', 'Ünïcødé 🚀', 2, 2, true, DATE '2021-01-01', TIMESTAMP '2021-01-01 00:00:00.5')""")

    report = sync(env, customers_project)
    assert report.generation == 2
    assert report.people == 101
    assert counts(table_report(report)) == dict(rows=101, added=len(added), changed=len(changed),
                                                removed=len(removed), unchanged=92, duplicate_keys=0, null_keys=0)

    reader = Reader(env)
    for k in removed:
        with pytest.raises(KeyNotFound):
            reader.get_one("customers", k.encode())
    assert read_record(env, "customers", "user-0")["plan"] == ("string", "gold")
    assert read_record(env, "customers", "user-50")["ltv"] == ("number", -1.5)
    assert read_record(env, "customers", "user-50")["last_seen"] == ("null", None)
    assert read_record(env, "customers", "new-b")["plan"] == ("string", "Ünïcødé 🚀")
    assert read_record(env, "customers", "new-b")["last_seen"] == ("string", "2021-01-01T00:00:00.500000Z")
    assert_records_match_warehouse(env, customers_db)
    assert_columns_match_warehouse(env, customers_db, CUSTOMER_ATTRIBUTES)

    after = person_ids(env)
    for k in before:
        if k not in removed:
            assert after[k] == before[k], f"{k} changed id"
    fresh = sorted(after[k] for k in added)
    assert fresh == [100, 101, 102, 103], "new people take fresh ids, never a removed person's"
    assert not set(fresh) & {before[k] for k in removed}

    cols = raw_columns(env)
    alive = np.frombuffer(cols[b".alive"], np.uint8)
    for k in removed:
        assert alive[before[k]] == 0
        for name, type_name in CUSTOMER_ATTRIBUTES.items():
            assert column(cols, name, type_name)[1][before[k]] == 0, (name, k)

    # And nothing left to do.
    assert counts(table_report(sync(env, customers_project)))["unchanged"] == 101


def test_a_removed_key_that_comes_back_gets_a_fresh_id(env, customers_db, customers_project):
    sync(env, customers_project)
    old_id = person_ids(env)["user-7"]
    duck(customers_db, "CREATE TABLE keep AS SELECT * FROM customers WHERE user_id = 'user-7'",
         "DELETE FROM customers WHERE user_id = 'user-7'")
    assert table_report(sync(env, customers_project)).removed == 1
    assert "user-7" not in person_ids(env)
    duck(customers_db, "INSERT INTO customers SELECT * FROM keep")
    report = sync(env, customers_project)
    assert (table_report(report).added, table_report(report).removed) == (1, 0)
    new_id = person_ids(env)["user-7"]
    assert new_id == 100 and new_id != old_id
    assert_records_match_warehouse(env, customers_db)
    assert_columns_match_warehouse(env, customers_db, CUSTOMER_ATTRIBUTES)


def test_emptying_the_table_removes_everyone(env, customers_db, customers_project):
    sync(env, customers_project)
    duck(customers_db, "DELETE FROM customers")
    report = sync(env, customers_project)
    assert report.people == 0
    assert counts(table_report(report)) == dict(rows=0, added=0, changed=0, removed=100, unchanged=0,
                                                duplicate_keys=0, null_keys=0)
    assert person_ids(env) == {}
    with pytest.raises(KeyNotFound):
        Reader(env).get_one("customers", b"user-1")
    cols = raw_columns(env)
    assert not np.frombuffer(cols[b".alive"], np.uint8).any()
    # The catalog still knows the collection and its columns.
    assert Reader(env).collections()["customers"].columns == ("user_id", "plan", "ltv", "orders", "opt_in", "signup", "last_seen")


def test_progress_reports_cumulative_rows_per_batch(env, tmp_path):
    db = tmp_path / "wh.duckdb"
    duck(db, CUSTOMERS_SQL.format(n=5000))
    project = make_project(tmp_path / "proj", duckdb_warehouse(db), attributes=CUSTOMER_ATTRIBUTES, batch_rows=1000)
    calls = []
    sync(env, project, progress=lambda table, rows: calls.append((table, rows)))
    assert calls == [("people", 1000 * i) for i in range(1, 6)]


def test_integer_primary_key_is_served_as_its_text(env, tmp_path):
    db = tmp_path / "wh.duckdb"
    duck(db, "CREATE TABLE customers AS SELECT i AS id, 'p' || i AS plan FROM range(1, 6) t(i)")
    project = make_project(tmp_path / "proj", duckdb_warehouse(db), key="id", attributes={"plan": "string"})
    sync(env, project)
    assert read_record(env, "customers", "3") == {"id": ("number", 3.0), "plan": ("string", "p3")}
    assert set(person_ids(env)) == {"1", "2", "3", "4", "5"}


# ----------------------------------------------------------------- values per type


TYPES_SQL = r"""
CREATE TABLE customers (
    user_id VARCHAR, s VARCHAR, u VARCHAR, i BIGINT, small INTEGER, f DOUBLE, b BOOLEAN,
    ts TIMESTAMP, d DATE, dec DECIMAL(12, 2), tstz TIMESTAMPTZ
);
INSERT INTO customers VALUES
    ('a', 'hello', 'Zoë — 東京 🚀', 42, -7, 2.5, true,
     TIMESTAMP '2024-09-27 12:34:56', DATE '2024-09-27', 1234.56, TIMESTAMPTZ '2024-09-27 12:00:00+02'),
    ('b', '', 'ключ "quoted" \ back\slash', 1099511627776, 0, -0.125, false,
     TIMESTAMP '2024-09-27 12:34:56.25', DATE '1999-12-31', -0.01, TIMESTAMPTZ '2024-01-01 00:00:00.000001+00'),
    ('c', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
    ('d', 'x', 'y', -9007199254740992, 2147483647, 1e300, true,
     TIMESTAMP '1970-01-01 00:00:00', DATE '1900-03-01', 9999999999.99, TIMESTAMPTZ '1970-01-01 00:00:00-05'),
    ('ключ-é', 'unicode key', 'é', 1, 1, 1, true,
     TIMESTAMP '2000-02-29 00:00:00', DATE '2000-02-29', 0, TIMESTAMPTZ '2000-02-29 23:30:00-01');
"""
TYPES_DECLARED = {"s": "string", "u": "string", "i": "int", "small": "int", "f": "float", "b": "bool",
                  "ts": "timestamp", "d": "timestamp", "dec": "float", "tstz": "timestamp"}
TYPES_EXPECTED = {
    "a": {"user_id": ("string", "a"), "s": ("string", "hello"), "u": ("string", "Zoë — 東京 🚀"),
          "i": ("number", 42.0), "small": ("number", -7.0), "f": ("number", 2.5), "b": ("bool", True),
          "ts": ("string", "2024-09-27T12:34:56Z"), "d": ("string", "2024-09-27T00:00:00Z"),
          "dec": ("number", 1234.56), "tstz": ("string", "2024-09-27T10:00:00Z")},
    "b": {"user_id": ("string", "b"), "s": ("string", ""), "u": ("string", 'ключ "quoted" \\ back\\slash'),
          "i": ("number", 1099511627776.0), "small": ("number", 0.0), "f": ("number", -0.125), "b": ("bool", False),
          "ts": ("string", "2024-09-27T12:34:56.250000Z"), "d": ("string", "1999-12-31T00:00:00Z"),
          "dec": ("number", -0.01), "tstz": ("string", "2024-01-01T00:00:00.000001Z")},
    "c": {"user_id": ("string", "c"), **{c: ("null", None) for c in TYPES_DECLARED}},
    "d": {"user_id": ("string", "d"), "s": ("string", "x"), "u": ("string", "y"),
          "i": ("number", -9007199254740992.0), "small": ("number", 2147483647.0), "f": ("number", 1e300),
          "b": ("bool", True), "ts": ("string", "1970-01-01T00:00:00Z"), "d": ("string", "1900-03-01T00:00:00Z"),
          "dec": ("number", 9999999999.99), "tstz": ("string", "1970-01-01T05:00:00Z")},
    "ключ-é": {"user_id": ("string", "ключ-é"), "s": ("string", "unicode key"), "u": ("string", "é"),
               "i": ("number", 1.0), "small": ("number", 1.0), "f": ("number", 1.0), "b": ("bool", True),
               "ts": ("string", "2000-02-29T00:00:00Z"), "d": ("string", "2000-02-29T00:00:00Z"),
               "dec": ("number", 0.0), "tstz": ("string", "2000-03-01T00:30:00Z")},
}


@pytest.mark.parametrize("declared", [True, False], ids=["declared", "inferred"])
def test_values_round_trip_per_type(env, tmp_path, declared):
    db = tmp_path / "wh.duckdb"
    duck(db, TYPES_SQL)
    project = make_project(tmp_path / "proj", duckdb_warehouse(db), attributes=TYPES_DECLARED if declared else {})
    report = sync(env, project)
    assert table_report(report).added == 5
    got = read_records(env, "customers", list(TYPES_EXPECTED))
    for key, want in TYPES_EXPECTED.items():
        assert got[key] == want, key
    assert Reader(env).collections()["customers"].columns == ("user_id", *TYPES_DECLARED)
    # Encoding is deterministic: nothing changes on a second sync.
    assert table_report(sync(env, project)).unchanged == 5


@pytest.mark.parametrize("declared", [True, False], ids=["declared", "inferred"])
def test_timestamps_before_1970(env, tmp_path, declared):
    db = tmp_path / "wh.duckdb"
    duck(db, """CREATE TABLE customers AS SELECT * FROM (VALUES
        ('a', TIMESTAMP '1969-12-31 23:59:59.5', DATE '1969-07-20'),
        ('b', TIMESTAMP '1965-04-01 12:30:00', DATE '1900-01-01'),
        ('c', TIMESTAMP '1969-12-31 00:00:00', DATE '1969-12-31'),
        ('d', TIMESTAMP '1900-01-01 00:00:01.000001', DATE '1600-02-29')) t(user_id, ts, d)""")
    project = make_project(tmp_path / "proj", duckdb_warehouse(db),
                           attributes={"ts": "timestamp", "d": "timestamp"} if declared else {})
    sync(env, project)
    got = read_records(env, "customers", ["a", "b", "c", "d"])
    assert {k: (r["ts"][1], r["d"][1]) for k, r in got.items()} == {
        "a": ("1969-12-31T23:59:59.500000Z", "1969-07-20T00:00:00Z"),
        "b": ("1965-04-01T12:30:00Z", "1900-01-01T00:00:00Z"),
        "c": ("1969-12-31T00:00:00Z", "1969-12-31T00:00:00Z"),
        "d": ("1900-01-01T00:00:01.000001Z", "1600-02-29T00:00:00Z"),
    }
    if declared:
        assert_columns_match_warehouse(env, db, {"ts": "timestamp", "d": "timestamp"})


@pytest.mark.parametrize("declared", [True, False], ids=["declared", "inferred"])
def test_decimal_values_are_the_nearest_double(env, tmp_path, declared):
    # A price of 19.99 must read 19.99 (the double nearest to it, as DuckDB's
    # own ::DOUBLE and Python's float() give), not 19.990000000000002.
    prices = ["99.99", "19.99", "4.35", "0.07", "1.1", "1234.56", "-0.01", "12345678.91"]
    db = tmp_path / "wh.duckdb"
    rows = ", ".join(f"('u{i}', {p}::DECIMAL(12, 2))" for i, p in enumerate(prices))
    duck(db, f"CREATE TABLE customers AS SELECT * FROM (VALUES {rows}) t(user_id, price)")
    project = make_project(tmp_path / "proj", duckdb_warehouse(db), attributes={"price": "float"} if declared else {})
    sync(env, project)
    got = read_records(env, "customers", [f"u{i}" for i in range(len(prices))])
    assert {k: r["price"] for k, r in got.items()} == {f"u{i}": ("number", float(p)) for i, p in enumerate(prices)}
    if declared:
        values = column(raw_columns(env), "price", "float")[0]
        ids = person_ids(env)
        assert [values[ids[f"u{i}"]] for i in range(len(prices))] == [float(p) for p in prices]


def test_declared_types_convert_the_warehouse_column(env, tmp_path):
    db = tmp_path / "wh.duckdb"
    duck(db, """CREATE TABLE customers AS SELECT * FROM (VALUES
        ('a', '12', 'true', 42, '2024-09-27 08:00:00', 3),
        ('b', '-3', 'false', 7, '2024-09-27', 4)) t(user_id, n_text, flag_text, num, when_text, whole)""")
    project = make_project(tmp_path / "proj", duckdb_warehouse(db), attributes={
        "n_text": "int", "flag_text": "bool", "num": "string", "when_text": "timestamp", "whole": "float"})
    sync(env, project)
    assert read_record(env, "customers", "a") == {
        "user_id": ("string", "a"), "n_text": ("number", 12.0), "flag_text": ("bool", True),
        "num": ("string", "42"), "when_text": ("string", "2024-09-27T08:00:00Z"), "whole": ("number", 3.0)}
    assert read_record(env, "customers", "b")["n_text"] == ("number", -3.0)
    assert read_record(env, "customers", "b")["when_text"] == ("string", "2024-09-27T00:00:00Z")
    cols = raw_columns(env)
    ids = person_ids(env)
    assert column(cols, "n_text", "int")[0][ids["b"]] == -3
    words = column(cols, "num", "string")[2]
    assert words[column(cols, "num", "string")[0][ids["a"]]] == "42"


# ----------------------------------------------------------------- attribute column arrays


def test_attribute_columns_match_the_warehouse(env, customers_db, customers_project):
    sync(env, customers_project)
    assert_columns_match_warehouse(env, customers_db, CUSTOMER_ATTRIBUTES)
    cols = raw_columns(env)
    # Exactly the documented keys: per attribute values, .valid, .type (and .dict for strings), plus .alive,
    # and, for a source that hashes rows (DuckDB), .order, .rowhash, .keyhash and .signature.
    expected_keys = {b".alive", b".order", b".rowhash", b".keyhash", b".signature"}
    for name, type_name in CUSTOMER_ATTRIBUTES.items():
        expected_keys |= {name.encode(), name.encode() + b".valid", name.encode() + b".type"}
        if type_name == "string":
            expected_keys.add(name.encode() + b".dict")
    assert set(cols) == expected_keys
    plan_values, plan_valid, words = column(cols, "plan", "string")
    assert sorted(words) == ["enterprise", "free", "pro"]  # each distinct value once
    assert len(np.frombuffer(cols[b".alive"], np.uint8)) == 100
    ids = person_ids(env)
    assert plan_valid[ids["user-9"]] == 0
    assert column(cols, "ltv", "float")[1][ids["user-8"]] == 0
    assert column(cols, "orders", "int")[0][ids["user-3"]] == 21
    assert column(cols, "signup", "timestamp")[0][ids["user-0"]] == expected_micros(date(2024, 1, 1))

    # A new string value is appended to the dictionary; existing codes keep their meaning.
    duck(customers_db, "UPDATE customers SET plan = 'platinum' WHERE user_id = 'user-1'",
         "UPDATE customers SET plan = NULL WHERE user_id = 'user-2'",
         "UPDATE customers SET plan = 'free' WHERE user_id = 'user-9'")
    sync(env, customers_project)
    cols2 = raw_columns(env)
    words2 = column(cols2, "plan", "string")[2]
    assert words2[: len(words)] == words and words2[len(words):] == ["platinum"]
    assert_columns_match_warehouse(env, customers_db, CUSTOMER_ATTRIBUTES)
    assert column(cols2, "plan", "string")[1][ids["user-2"]] == 0
    assert column(cols2, "plan", "string")[1][ids["user-9"]] == 1


def test_attribute_added_to_the_project_later_is_filled_for_everyone(env, tmp_path, customers_db):
    first = make_project(tmp_path / "p1", duckdb_warehouse(customers_db), attributes={"plan": "string"})
    sync(env, first)
    # Same warehouse, same query; the project now also declares ltv and orders.
    second = make_project(tmp_path / "p2", duckdb_warehouse(customers_db),
                          attributes={"plan": "string", "ltv": "float", "orders": "int"})
    sync(env, second)
    assert_columns_match_warehouse(env, customers_db, {"plan": "string", "ltv": "float", "orders": "int"})


def test_attribute_type_changed_in_the_project_is_rewritten(env, tmp_path, customers_db):
    first = make_project(tmp_path / "p1", duckdb_warehouse(customers_db), attributes={"orders": "int"})
    sync(env, first)
    # orders is now read as a float: the records are byte-identical (both numbers),
    # but the column array's dtype changes from int64 to float64.
    second = make_project(tmp_path / "p2", duckdb_warehouse(customers_db), attributes={"orders": "float"})
    sync(env, second)
    assert_columns_match_warehouse(env, customers_db, {"orders": "float"})


# ----------------------------------------------------------------- atomicity


def test_a_bad_value_in_a_late_batch_fails_the_whole_sync(env, tmp_path):
    db = tmp_path / "wh.duckdb"
    duck(db, "CREATE TABLE customers AS SELECT 'user-' || i AS user_id, 'free' AS plan, "
             "(i * 2)::VARCHAR AS orders FROM range(1000) t(i) ORDER BY i")
    project = make_project(tmp_path / "proj", duckdb_warehouse(db),
                           attributes={"plan": "string", "orders": "int"}, batch_rows=100)
    sync(env, project)
    before = whole_state(env)

    # Early rows change (they would be written by the first batches), a late row cannot be read.
    duck(db, "UPDATE customers SET plan = 'pro' WHERE user_id IN ('user-0', 'user-1')",
         "DELETE FROM customers WHERE user_id = 'user-2'",
         "INSERT INTO customers VALUES ('new-1', 'pro', '5')",
         "UPDATE customers SET orders = 'many' WHERE user_id = 'user-990'")
    with pytest.raises(SyncError) as excinfo:
        sync(env, project)
    message = str(excinfo.value)
    assert message.startswith("column 'orders' of type string cannot be read as int: ")
    assert "many" in message

    assert whole_state(env) == before
    reader = Reader(env)
    assert reader.generation == 1
    assert reader.last_sync()["generation"] == 1
    assert read_record(env, "customers", "user-0")["plan"] == ("string", "free")
    assert read_record(env, "customers", "user-2")["plan"] == ("string", "free")
    assert read_records(env, "customers", ["new-1"]) == {"new-1": None}

    # Fixed in the warehouse, the next sync lands everything.
    duck(db, "UPDATE customers SET orders = '1981' WHERE user_id = 'user-990'")
    report = sync(env, project)
    assert report.generation == 2
    assert counts(table_report(report)) == dict(rows=1000, added=1, changed=3, removed=1, unchanged=996,
                                                duplicate_keys=0, null_keys=0)
    assert read_record(env, "customers", "user-0")["plan"] == ("string", "pro")


def test_a_query_error_leaves_the_previous_generation(env, tmp_path, customers_db, customers_project):
    sync(env, customers_project)
    before = whole_state(env)
    duck(customers_db, "ALTER TABLE customers RENAME TO clients")
    with pytest.raises(SyncError) as excinfo:
        sync(env, customers_project)
    message = str(excinfo.value)
    assert message.startswith("warehouse query failed: ")
    assert "customers" in message and "does not exist" in message
    assert whole_state(env) == before
    assert Reader(env).generation == 1


def test_a_failed_first_sync_leaves_nothing_and_the_next_one_lands(env, tmp_path):
    db = tmp_path / "wh.duckdb"
    duck(db, "CREATE TABLE customers AS SELECT 'user-' || i AS user_id, i::VARCHAR AS orders FROM range(500) t(i)",
         "UPDATE customers SET orders = 'x' WHERE user_id = 'user-499'")
    project = make_project(tmp_path / "proj", duckdb_warehouse(db), attributes={"orders": "int"}, batch_rows=100)
    with pytest.raises(SyncError, match="column 'orders'"):
        sync(env, project)
    assert Reader(env).generation == 0
    duck(db, "UPDATE customers SET orders = '499' WHERE user_id = 'user-499'")
    report = sync(env, project)
    assert report.generation == 1 and table_report(report).added == 500
    assert read_record(env, "customers", "user-499")["orders"] == ("number", 499.0)
    assert_columns_match_warehouse(env, db, {"orders": "int"})


def test_a_full_lmdb_map_is_a_sync_error_and_changes_nothing(tmp_path):
    db = tmp_path / "wh.duckdb"
    duck(db, "CREATE TABLE customers AS SELECT 'user-' || i AS user_id, 'free' AS plan FROM range(100) t(i)")
    project = make_project(tmp_path / "proj", duckdb_warehouse(db), attributes={"plan": "string"})
    small = open_env(tmp_path / "small", 1 << 20, readonly=False)  # 1 MiB
    try:
        sync(small, project)
        before = whole_state(small)
        duck(db, "INSERT INTO customers SELECT 'more-' || i, repeat('x', 200) FROM range(20000) t(i)")
        with pytest.raises(SyncError):
            sync(small, project)
        assert whole_state(small) == before
    finally:
        small.close()


@pytest.mark.parametrize("bad_key, what", [("", "empty"), ("k" * 600, "longer than LMDB's 511-byte key limit")])
def test_a_key_lmdb_cannot_store_is_a_sync_error(env, tmp_path, bad_key, what):
    db = tmp_path / "wh.duckdb"
    duck(db, "CREATE TABLE customers AS SELECT 'user-' || i AS user_id, 'free' AS plan FROM range(10) t(i)",
         f"INSERT INTO customers VALUES ('{bad_key}', 'pro')")
    project = make_project(tmp_path / "proj", duckdb_warehouse(db), attributes={"plan": "string"})
    try:
        sync(env, project)
    except SyncError:
        pass  # refused, with our own error
    except lmdb.Error as exc:
        pytest.fail(f"a {what} key escaped as a raw LMDB error: {type(exc).__name__}: {exc}")
    else:
        # Or the row is skipped and counted; either way the others land.
        assert set(person_ids(env)) == {f"user-{i}" for i in range(10)}


def test_readers_never_see_half_a_sync(env, tmp_path):
    db = tmp_path / "wh.duckdb"
    n = 200_000
    duck(db, f"CREATE TABLE customers AS SELECT 'user-' || i AS user_id, 'old' AS v, i AS n FROM range({n}) t(i) ORDER BY i")
    project = make_project(tmp_path / "proj", duckdb_warehouse(db), attributes={"v": "string"}, batch_rows=1000)
    sync(env, project)
    # The two people are changed together, at both ends of the scan.
    duck(db, f"UPDATE customers SET v = 'new' WHERE user_id IN ('user-0', 'user-{n - 1}')")
    pair = [b"user-0", f"user-{n - 1}".encode()]

    reader = Reader(env)
    seen: list[tuple[float, str, str]] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def read_loop():
        try:
            while not stop.is_set():
                view, rows = reader.get("customers", pair)
                values = []
                for key, (stored, _bits) in zip(pair, rows):
                    rec = Record.FromString(record_message(view.prefix, key, stored, None, b""))
                    values.append(rec.fields.fields["v"].string_value)
                seen.append((time.perf_counter(), values[0], values[1]))
                time.sleep(0)
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    thread = threading.Thread(target=read_loop, daemon=True)
    thread.start()
    while not seen:
        time.sleep(0.001)
    t0 = time.perf_counter()
    report = sync(env, project)
    t1 = time.perf_counter()
    deadline = time.monotonic() + 5
    while not any(t > t1 for t, *_ in seen) and time.monotonic() < deadline:
        time.sleep(0.001)
    stop.set()
    thread.join(10)
    assert not errors, errors
    assert table_report(report).changed == 2

    mixed = [(a, b) for _, a, b in seen if a != b]
    assert not mixed, f"{len(mixed)} reads saw one record new and the other old: {mixed[:3]}"
    during = [(a, b) for t, a, b in seen if t0 < t < t1]
    assert len(during) >= 10, f"only {len(during)} reads while the {t1 - t0:.2f}s sync ran"
    assert ("old", "old") in {(a, b) for _, a, b in seen}
    assert seen[-1][1:] == ("new", "new")


# ----------------------------------------------------------------- files warehouse (Parquet, CSV)


def test_parquet_files_warehouse(env, tmp_path):
    data = tmp_path / "proj" / "data"
    data.mkdir(parents=True)
    src = tmp_path / "src.duckdb"
    duck(src, CUSTOMERS_SQL.format(n=300))
    with duckdb.connect(str(src)) as con:
        con.execute(f"COPY (SELECT * FROM customers WHERE orders IS NULL OR orders < 1000) TO '{data / 'part-1.parquet'}' (FORMAT parquet)")
        con.execute(f"COPY (SELECT * FROM customers WHERE orders >= 1000) TO '{data / 'part-2.parquet'}' (FORMAT parquet)")
    wh = 'type = "files"\n[warehouse.tables]\ncustomers = "data/*.parquet"'
    project = make_project(tmp_path / "proj", wh, attributes=CUSTOMER_ATTRIBUTES)
    report = sync(env, project)
    assert counts(table_report(report))["added"] == 300
    assert_records_match_warehouse(env, src)
    assert_columns_match_warehouse(env, src, CUSTOMER_ATTRIBUTES)

    # A new file appears, one file is rewritten with a change: incremental counts.
    with duckdb.connect(str(src)) as con:
        con.execute("INSERT INTO customers VALUES ('extra-1', 'pro', 1, 1, true, DATE '2024-01-01', TIMESTAMP '2024-01-01 00:00:00')")
        con.execute("UPDATE customers SET plan = 'gold' WHERE user_id = 'user-0'")
        con.execute(f"COPY (SELECT * FROM customers WHERE user_id = 'extra-1') TO '{data / 'part-3.parquet'}' (FORMAT parquet)")
        con.execute(f"COPY (SELECT * FROM customers WHERE user_id <> 'extra-1' AND (orders IS NULL OR orders < 1000)) TO '{data / 'part-1.parquet'}' (FORMAT parquet)")
    report = sync(env, project)
    assert counts(table_report(report)) == dict(rows=301, added=1, changed=1, removed=0, unchanged=299,
                                                duplicate_keys=0, null_keys=0)
    assert read_record(env, "customers", "user-0")["plan"] == ("string", "gold")
    assert_records_match_warehouse(env, src)


def test_csv_files_warehouse(env, tmp_path):
    data = tmp_path / "proj" / "data"
    data.mkdir(parents=True)
    (data / "a.csv").write_text(
        "user_id,plan,ltv,orders,opt_in,signup\n"
        "u1,free,1.5,3,true,2024-09-27\n"
        'u2,"Zoë, 東京",,7,false,2024-01-31\n'
        "u3,,2,,,\n", encoding="utf-8")
    (data / "b.csv").write_text(
        "user_id,plan,ltv,orders,opt_in,signup\n"
        "u4,pro,0.25,0,true,1999-12-31\n", encoding="utf-8")
    wh = 'type = "files"\n[warehouse.tables]\ncustomers = "data/*.csv"'
    attributes = {"plan": "string", "ltv": "float", "orders": "int", "opt_in": "bool", "signup": "timestamp"}
    project = make_project(tmp_path / "proj", wh, attributes=attributes)
    report = sync(env, project)
    assert counts(table_report(report))["added"] == 4
    got = read_records(env, "customers", ["u1", "u2", "u3", "u4"])
    assert got["u1"] == {"user_id": ("string", "u1"), "plan": ("string", "free"), "ltv": ("number", 1.5),
                         "orders": ("number", 3.0), "opt_in": ("bool", True),
                         "signup": ("string", "2024-09-27T00:00:00Z")}
    assert got["u2"]["plan"] == ("string", "Zoë, 東京")
    assert got["u2"]["ltv"] == ("null", None)
    assert got["u3"] == {"user_id": ("string", "u3"), "plan": ("null", None), "ltv": ("number", 2.0),
                         "orders": ("null", None), "opt_in": ("null", None), "signup": ("null", None)}
    assert got["u4"]["signup"] == ("string", "1999-12-31T00:00:00Z")
    cols = raw_columns(env)
    ids = person_ids(env)
    assert column(cols, "orders", "int")[0][ids["u2"]] == 7
    assert column(cols, "ltv", "float")[1][ids["u2"]] == 0

    (data / "b.csv").write_text("user_id,plan,ltv,orders,opt_in,signup\nu5,pro,0.25,0,true,1999-12-31\n")
    report = sync(env, project)
    assert counts(table_report(report)) == dict(rows=4, added=1, changed=0, removed=1, unchanged=3,
                                                duplicate_keys=0, null_keys=0)
    assert read_records(env, "customers", ["u4"]) == {"u4": None}


# ----------------------------------------------------------------- PostgreSQL


@pytest.fixture
def pg_db(postgres):
    """A fresh database per test; yields (dsn, psycopg connection in autocommit)."""
    name = f"sync_{uuid.uuid4().hex[:12]}"
    dsn = postgres.create_database(name)
    con = postgres.connect(name, autocommit=True)
    try:
        yield dsn, con
    finally:
        con.close()
        postgres.drop_database(name)


def postgres_warehouse(dsn: str) -> str:
    return f'type = "postgres"\ndsn = {toml_str(dsn)}'


@pytest.mark.postgres
def test_postgres_records_and_incremental_counts(env, tmp_path, pg_db):
    dsn, con = pg_db
    # A non-UTC session time zone: timestamptz must still come out in UTC.
    con.execute(f"ALTER DATABASE {dsn.rsplit('/', 1)[1]} SET timezone TO 'Asia/Tokyo'")
    con.execute("""CREATE TABLE customers (
        user_id text PRIMARY KEY, plan text, ltv numeric(12, 2), orders integer, big bigint,
        score double precision, opt_in boolean, signup date, last_seen timestamptz, seen_local timestamp)""")
    con.execute("""INSERT INTO customers VALUES
        ('u1', 'free', 1234.56, 3, 9007199254740993, 0.5, true, '2024-09-27', '2024-09-27 12:00:00+02', '2024-09-27 12:00:00'),
        ('u2', 'Zoë 🚀', -0.01, 0, 0, -1.25, false, '1999-12-31', '2024-01-01 00:00:00.25+00', '1999-12-31 23:59:59.5'),
        ('u3', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
        ('u4', 'pro', 0, 7, 1, 3, true, '2000-02-29', '2000-02-29 23:30:00-01', '2000-02-29 00:00:00')""")
    attributes = {"plan": "string", "ltv": "float", "orders": "int", "opt_in": "bool", "last_seen": "timestamp"}
    project = make_project(tmp_path / "proj", postgres_warehouse(dsn), attributes=attributes)
    report = sync(env, project)
    assert counts(table_report(report)) == dict(rows=4, added=4, changed=0, removed=0, unchanged=0,
                                                duplicate_keys=0, null_keys=0)
    got = read_records(env, "customers", ["u1", "u2", "u3", "u4"])
    assert got["u1"] == {
        "user_id": ("string", "u1"), "plan": ("string", "free"), "ltv": ("number", 1234.56),
        "orders": ("number", 3.0), "big": ("number", 9007199254740992.0), "score": ("number", 0.5),
        "opt_in": ("bool", True), "signup": ("string", "2024-09-27T00:00:00Z"),
        "last_seen": ("string", "2024-09-27T10:00:00Z"), "seen_local": ("string", "2024-09-27T12:00:00Z")}
    assert got["u2"]["plan"] == ("string", "Zoë 🚀")
    assert got["u2"]["last_seen"] == ("string", "2024-01-01T00:00:00.250000Z")
    assert got["u2"]["seen_local"] == ("string", "1999-12-31T23:59:59.500000Z")
    assert got["u3"] == {"user_id": ("string", "u3"), **{c: ("null", None) for c in (
        "plan", "ltv", "orders", "big", "score", "opt_in", "signup", "last_seen", "seen_local")}}
    assert got["u4"]["last_seen"] == ("string", "2000-03-01T00:30:00Z")

    cols = raw_columns(env)
    ids = person_ids(env)
    assert column(cols, "ltv", "float")[0][ids["u1"]] == 1234.56
    assert column(cols, "ltv", "float")[1][ids["u3"]] == 0
    assert column(cols, "last_seen", "timestamp")[0][ids["u1"]] == expected_micros(
        datetime(2024, 9, 27, 10, tzinfo=timezone.utc))
    plan_values, _, words = column(cols, "plan", "string")
    assert words[plan_values[ids["u2"]]] == "Zoë 🚀"

    con.execute("UPDATE customers SET plan = 'enterprise', ltv = 99.5 WHERE user_id = 'u1'")
    con.execute("UPDATE customers SET opt_in = true WHERE user_id = 'u3'")
    con.execute("DELETE FROM customers WHERE user_id = 'u4'")
    con.execute("INSERT INTO customers (user_id, plan) VALUES ('u5', 'free')")
    report = sync(env, project)
    assert counts(table_report(report)) == dict(rows=4, added=1, changed=2, removed=1, unchanged=1,
                                                duplicate_keys=0, null_keys=0)
    got = read_records(env, "customers", ["u1", "u3", "u4", "u5"])
    assert got["u1"]["plan"] == ("string", "enterprise") and got["u1"]["ltv"] == ("number", 99.5)
    assert got["u3"]["opt_in"] == ("bool", True)
    assert got["u4"] is None
    assert got["u5"]["plan"] == ("string", "free")
    assert person_ids(env)["u5"] == 4
    assert table_report(sync(env, project)).unchanged == 4


@pytest.mark.postgres
def test_postgres_rows_stream_in_batches(env, tmp_path, pg_db):
    dsn, con = pg_db
    con.execute("CREATE TABLE customers AS SELECT 'user-' || i AS user_id, i AS n, (i % 2 = 0) AS even "
                "FROM generate_series(1, 1000) AS i")
    project = make_project(tmp_path / "proj", postgres_warehouse(dsn), attributes={"n": "int"}, batch_rows=100)
    calls = []
    report = sync(env, project, progress=lambda table, rows: calls.append((table, rows)))
    assert calls == [("people", 100 * i) for i in range(1, 11)]
    assert table_report(report).added == 1000
    assert read_record(env, "customers", "user-1000") == {
        "user_id": ("string", "user-1000"), "n": ("number", 1000.0), "even": ("bool", True)}


@pytest.mark.postgres
def test_postgres_column_types_do_not_depend_on_the_batch(env, tmp_path, pg_db):
    # score is NULL in the whole first batch and not declared as an attribute:
    # its type must come from PostgreSQL, not from the first batch's values.
    dsn, con = pg_db
    con.execute("CREATE TABLE customers AS SELECT 'user-' || i AS user_id, "
                "CASE WHEN i > 100 THEN i END AS score, "
                "CASE WHEN i > 100 THEN i % 2 = 0 END AS flag "
                "FROM generate_series(1, 300) AS i")
    project = make_project(tmp_path / "proj", postgres_warehouse(dsn), batch_rows=100)
    sync(env, project)
    assert read_record(env, "customers", "user-1") == {
        "user_id": ("string", "user-1"), "score": ("null", None), "flag": ("null", None)}
    assert read_record(env, "customers", "user-200") == {
        "user_id": ("string", "user-200"), "score": ("number", 200.0), "flag": ("bool", True)}


@pytest.mark.postgres
def test_postgres_uuid_primary_key(env, tmp_path, pg_db):
    dsn, con = pg_db
    con.execute("CREATE TABLE customers (id uuid PRIMARY KEY, plan text)")
    con.execute("INSERT INTO customers VALUES ('6f1c2a4e-0d7b-4c59-9a38-2f7e1b0c9d11', 'pro'), "
                "('00000000-0000-0000-0000-000000000001', 'free')")
    project = make_project(tmp_path / "proj", postgres_warehouse(dsn), key="id", attributes={"plan": "string"})
    sync(env, project)
    rec = read_record(env, "customers", "6f1c2a4e-0d7b-4c59-9a38-2f7e1b0c9d11")
    assert rec == {"id": ("string", "6f1c2a4e-0d7b-4c59-9a38-2f7e1b0c9d11"), "plan": ("string", "pro")}


@pytest.mark.postgres
def test_postgres_query_error_is_a_sync_error(env, tmp_path, pg_db):
    dsn, _con = pg_db
    project = make_project(tmp_path / "proj", postgres_warehouse(dsn), query="SELECT * FROM nowhere")
    with pytest.raises(SyncError) as excinfo:
        sync(env, project)
    assert str(excinfo.value).startswith("warehouse query failed: ")
    assert 'relation "nowhere" does not exist' in str(excinfo.value)
    assert Reader(env).generation == 0


# ----------------------------------------------------------------- collections with their own query


def test_collection_with_its_own_query_and_key(env, tmp_path, customers_db):
    duck(customers_db, """CREATE TABLE recs AS SELECT * FROM (VALUES
        ('user-1', 'sku-1', 0.9), ('user-2', 'sku-2', 0.5), ('user-3', 'sku-3', NULL), ('ghost', 'sku-9', 0.1))
        t(user_id, product, score)""")
    collections = ('[collections.customers]\n\n[collections.recs]\n'
                   'query = "SELECT user_id, product, score FROM recs"\nkey = "user_id"\n')
    project = make_project(tmp_path / "proj", duckdb_warehouse(customers_db),
                           attributes=CUSTOMER_ATTRIBUTES, collections=collections)
    report = sync(env, project)
    assert [t.table for t in report.tables] == ["people", "c.recs"]
    assert table_report(report, "people").added == 100
    assert counts(table_report(report, "c.recs")) == dict(rows=4, added=4, changed=0, removed=0, unchanged=0,
                                                          duplicate_keys=0, null_keys=0)
    assert report.people == 100  # a collection's rows are not people

    assert set(Reader(env).collections()) == {"customers", "recs"}
    assert Reader(env).collections()["recs"].columns == ("user_id", "product", "score")
    assert not Reader(env).collections()["recs"].is_parent
    assert read_record(env, "recs", "user-1") == {
        "user_id": ("string", "user-1"), "product": ("string", "sku-1"), "score": ("number", 0.9)}
    assert read_record(env, "recs", "ghost")["product"] == ("string", "sku-9")  # not a person: still served
    assert read_record(env, "recs", "user-3")["score"] == ("null", None)
    assert read_records(env, "recs", ["user-4"]) == {"user-4": None}
    assert read_record(env, "customers", "user-4")["user_id"] == ("string", "user-4")
    assert read_records(env, "customers", ["ghost"]) == {"ghost": None}

    duck(customers_db, "UPDATE recs SET product = 'sku-11' WHERE user_id = 'user-1'",
         "DELETE FROM recs WHERE user_id = 'user-2'",
         "INSERT INTO recs VALUES ('user-5', 'sku-5', 1), ('user-6', 'sku-6', 2)")
    report = sync(env, project)
    assert counts(table_report(report, "people"))["unchanged"] == 100
    assert counts(table_report(report, "c.recs")) == dict(rows=5, added=2, changed=1, removed=1, unchanged=2,
                                                          duplicate_keys=0, null_keys=0)
    assert read_record(env, "recs", "user-1")["product"] == ("string", "sku-11")
    assert read_records(env, "recs", ["user-2"]) == {"user-2": None}
    assert read_record(env, "customers", "user-2")["user_id"] == ("string", "user-2")  # parent untouched
    assert sorted(person_ids(env, "c.recs").values()) == [0, 2, 3, 4, 5]


# ----------------------------------------------------------------- missing columns


@pytest.mark.parametrize("empty", [False, True], ids=["rows", "no-rows"])
def test_missing_key_column(env, tmp_path, customers_db, empty):
    if empty:
        duck(customers_db, "DELETE FROM customers")
    project = make_project(tmp_path / "proj", duckdb_warehouse(customers_db), key="customer_id",
                           attributes=CUSTOMER_ATTRIBUTES)
    with pytest.raises(SyncError) as excinfo:
        sync(env, project)
    assert str(excinfo.value) == ("the parent model: the query returns no column 'customer_id' "
                                  "(it returns user_id, plan, ltv, orders, opt_in, signup, last_seen)")
    assert Reader(env).generation == 0


@pytest.mark.parametrize("empty", [False, True], ids=["rows", "no-rows"])
def test_missing_attribute_columns(env, tmp_path, customers_db, empty):
    if empty:
        duck(customers_db, "DELETE FROM customers")
    project = make_project(tmp_path / "proj", duckdb_warehouse(customers_db),
                           query="SELECT user_id, plan FROM customers",
                           attributes={"plan": "string", "tier": "string", "score": "float"})
    with pytest.raises(SyncError) as excinfo:
        sync(env, project)
    assert str(excinfo.value) == ("the parent model: the query returns no column 'tier', 'score' "
                                  "(it returns user_id, plan)")


def test_missing_collection_key_column(env, tmp_path, customers_db, customers_project):
    sync(env, customers_project)
    before = whole_state(env)
    duck(customers_db, "CREATE TABLE recs AS SELECT 'user-1' AS user_id, 'sku-1' AS product")
    collections = '[collections.customers]\n[collections.recs]\nquery = "SELECT * FROM recs"\nkey = "uid"\n'
    project = make_project(tmp_path / "proj2", duckdb_warehouse(customers_db),
                           attributes=CUSTOMER_ATTRIBUTES, collections=collections)
    with pytest.raises(SyncError) as excinfo:
        sync(env, project)
    assert str(excinfo.value) == "collection 'recs': the query returns no column 'uid' (it returns user_id, product)"
    assert whole_state(env) == before


# ----------------------------------------------------------------- duplicate and NULL keys


DUPES_SQL = """CREATE TABLE customers AS SELECT * FROM (VALUES
    (1, 'u1', 'free'), (2, 'u2', 'pro'), (3, 'u2', 'pro'), (4, 'u3', 'free'), (5, 'u3', 'enterprise'),
    (6, NULL, 'free'), (7, NULL, 'pro'), (8, 'u4', 'free')) t(n, user_id, plan)"""


def test_duplicate_and_null_keys_are_counted(env, tmp_path):
    db = tmp_path / "wh.duckdb"
    duck(db, DUPES_SQL)
    project = make_project(tmp_path / "proj", duckdb_warehouse(db), query="SELECT user_id, plan FROM customers ORDER BY n",
                           attributes={"plan": "string"})
    report = sync(env, project)
    t = table_report(report)
    assert (t.rows, t.duplicate_keys, t.null_keys, t.added) == (8, 2, 2, 4)
    assert report.people == 4
    assert set(person_ids(env)) == {"u1", "u2", "u3", "u4"}
    assert read_record(env, "customers", "u3")["plan"] in {("string", "free"), ("string", "enterprise")}
    alive = np.frombuffer(raw_columns(env)[b".alive"], np.uint8)
    assert int(alive.sum()) == 4

    again = table_report(sync(env, project))
    assert (again.rows, again.duplicate_keys, again.null_keys, again.added, again.removed) == (8, 2, 2, 0, 0)


def test_duplicate_rows_are_not_counted_as_changes(env, tmp_path):
    # A report must add up: every key is added, changed or unchanged once;
    # duplicates and NULL keys are counted apart. An unchanged warehouse
    # reports no change.
    db = tmp_path / "wh.duckdb"
    duck(db, DUPES_SQL)
    project = make_project(tmp_path / "proj", duckdb_warehouse(db), query="SELECT user_id, plan FROM customers ORDER BY n",
                           attributes={"plan": "string"})
    first = table_report(sync(env, project))
    assert (first.added, first.changed, first.unchanged) == (4, 0, 0), counts(first)
    second = table_report(sync(env, project))
    assert (second.added, second.changed, second.unchanged) == (0, 0, 4), counts(second)


def test_unchanged_rows_are_skipped_in_bulk_and_reordered_rows_still_compared(env, tmp_path, customers_db):
    """DuckDB hashes each row; a row at its previous position with the same hashes is skipped
    without encoding. Rows in another order, or changed, take the exact path: counts stay exact."""
    asc = make_project(tmp_path / "asc", duckdb_warehouse(customers_db), query="SELECT * FROM customers ORDER BY user_id",
                       attributes={"plan": "string"}, batch_rows=100)
    desc = make_project(tmp_path / "desc", duckdb_warehouse(customers_db),
                        query="SELECT * FROM customers ORDER BY user_id DESC", attributes={"plan": "string"}, batch_rows=100)
    first = table_report(sync(env, asc))
    assert (first.added, first.unchanged) == (100, 0)
    ids = person_ids(env)
    # Same order, one row changed: the other 99 skip in bulk, the change is found.
    duck(customers_db, "UPDATE customers SET plan = 'changed-plan' WHERE user_id = (SELECT min(user_id) FROM customers)")
    again = table_report(sync(env, asc))
    assert (again.added, again.changed, again.unchanged, again.removed) == (0, 1, 99, 0)
    # Reversed order: no row is where it was, so every row is compared exactly; nothing changed.
    reversed_ = table_report(sync(env, desc))
    assert (reversed_.added, reversed_.changed, reversed_.unchanged, reversed_.removed) == (0, 0, 100, 0)
    # A change right after a reorder is still seen, and ids never move.
    duck(customers_db, "UPDATE customers SET plan = 'again' WHERE user_id = (SELECT max(user_id) FROM customers)")
    last = table_report(sync(env, asc))
    assert (last.added, last.changed, last.unchanged, last.removed) == (0, 1, 99, 0)
    assert person_ids(env) == ids
    assert_records_match_warehouse(env, customers_db)
