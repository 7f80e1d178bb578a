"""Warehouse readers: run a model's query and stream its rows as Arrow batches.

DuckDB reads its own files and, through views, Parquet and CSV files;
PostgreSQL is read with a server-side cursor. Either way rows arrive in
batches of a bounded size, so memory stays flat whatever the table's size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa

from ..config import Warehouse

log = logging.getLogger(__name__)


class WarehouseError(Exception):
    """A query that could not run, with the warehouse's own explanation."""


class WarehouseUnavailable(WarehouseError):
    """The warehouse could not be opened or connected to."""


ROW_HASH = "__qualify_row_hash"
KEY_HASH = "__qualify_key_hash"


class DuckDBSource:
    #: batches(..., key=) adds a 64-bit hash of each row and of its key, computed
    #: by DuckDB, which lets an incremental sync skip unchanged rows in bulk.
    row_hashes = True

    def __init__(self, warehouse: Warehouse):
        import duckdb

        self._duckdb = duckdb
        try:
            if warehouse.kind == "duckdb":
                self.con = duckdb.connect(str(warehouse.path), read_only=True)
            else:
                self.con = duckdb.connect()
                for name, pattern in warehouse.tables:
                    reader = "read_parquet" if pattern.endswith(".parquet") else "read_csv_auto"
                    literal = "'" + pattern.replace("'", "''") + "'"  # DuckDB takes no parameters in DDL
                    self.con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM {reader}({literal})')
        except duckdb.Error as exc:
            raise WarehouseUnavailable(f"cannot open the DuckDB warehouse: {exc}") from None

    def batches(self, query: str, rows: int, key: str | None = None) -> Iterator[pa.RecordBatch]:
        if key is not None:
            quoted = '"' + key.replace('"', '""') + '"'
            query = (f"SELECT __qualify_q.*, hash(__qualify_q) AS {ROW_HASH}, hash(__qualify_q.{quoted}) AS {KEY_HASH} "
                     f"FROM ({query}) AS __qualify_q")
        try:
            reader = self.con.sql(query).to_arrow_reader(rows)
            yield from reader
        except self._duckdb.Error as exc:
            raise WarehouseError(str(exc).strip()) from None

    def schema(self, query: str) -> pa.Schema:
        try:
            return self.con.sql(f"SELECT * FROM ({query}) AS q LIMIT 0").to_arrow_table().schema
        except self._duckdb.Error as exc:
            raise WarehouseError(str(exc).strip()) from None

    def close(self) -> None:
        self.con.close()


def _pg_arrow_type(type_name: str) -> tuple[pa.DataType, object]:
    """The Arrow type for a PostgreSQL type name, and how to convert each value."""
    if type_name in ("int2", "int4", "int8", "oid"):
        return pa.int64(), None
    if type_name in ("float4", "float8"):
        return pa.float64(), None
    if type_name == "numeric":
        return pa.float64(), float  # float(Decimal) is the nearest double
    if type_name == "bool":
        return pa.bool_(), None
    if type_name == "timestamp":
        return pa.timestamp("us"), None
    if type_name == "timestamptz":
        return pa.timestamp("us", tz="UTC"), None
    if type_name == "date":
        return pa.date32(), None
    if type_name in ("text", "varchar", "bpchar", "name", "citext"):
        return pa.string(), None
    return pa.string(), str  # uuid, json, arrays, ...: their text form


class PostgresSource:
    """Reads every query of one sync from one REPEATABLE READ snapshot."""

    row_hashes = False

    def __init__(self, warehouse: Warehouse):
        import psycopg

        self._psycopg = psycopg
        try:
            self.con = psycopg.connect(warehouse.dsn, autocommit=False, connect_timeout=10)
            self.con.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            self.con.read_only = True
        except psycopg.Error as exc:
            raise WarehouseUnavailable(f"cannot connect to PostgreSQL: {exc}".strip()) from None

    def _types(self, description) -> list[tuple[pa.DataType, object]]:
        out = []
        for d in description:
            info = self.con.adapters.types.get(d.type_code)
            out.append(_pg_arrow_type(info.name if info else ""))
        return out

    def batches(self, query: str, rows: int, key: str | None = None) -> Iterator[pa.RecordBatch]:
        # A named (server-side) cursor streams; a plain one would load every row.
        try:
            with self.con.cursor(name="qualify_sync") as cur:
                cur.itersize = rows
                cur.execute(query)
                names = [d.name for d in cur.description]
                types = self._types(cur.description)
                while chunk := cur.fetchmany(rows):
                    arrays = []
                    for (arrow_type, convert), column in zip(types, zip(*chunk)):
                        if convert is not None:
                            column = [None if v is None else convert(v) for v in column]
                        arrays.append(pa.array(column, type=arrow_type))
                    yield pa.RecordBatch.from_arrays(arrays, names=names)
        except self._psycopg.Error as exc:
            raise WarehouseError(str(exc).strip()) from None

    def schema(self, query: str) -> pa.Schema:
        try:
            with self.con.transaction(), self.con.cursor() as cur:  # a savepoint: a failure spoils nothing
                cur.execute(f"SELECT * FROM ({query}) AS q LIMIT 0")
                types = self._types(cur.description)
                return pa.schema([pa.field(d.name, t) for d, (t, _) in zip(cur.description, types)])
        except self._psycopg.Error as exc:
            raise WarehouseError(str(exc).strip()) from None

    def close(self) -> None:
        self.con.close()  # ends the read-only snapshot


@contextmanager
def open_source(warehouse: Warehouse):
    """The reader for a project's warehouse, closed on exit."""
    source = PostgresSource(warehouse) if warehouse.kind == "postgres" else DuckDBSource(warehouse)
    try:
        yield source
    finally:
        source.close()
