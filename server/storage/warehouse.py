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


class DuckDBSource:
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
                    self.con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM {reader}(?)', [pattern])
        except duckdb.Error as exc:
            raise WarehouseError(f"cannot open the DuckDB warehouse: {exc}") from None

    def batches(self, query: str, rows: int) -> Iterator[pa.RecordBatch]:
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


class PostgresSource:
    def __init__(self, warehouse: Warehouse):
        import psycopg

        self._psycopg = psycopg
        try:
            self.con = psycopg.connect(warehouse.dsn, autocommit=False, connect_timeout=10)
        except psycopg.Error as exc:
            raise WarehouseError(f"cannot connect to PostgreSQL: {exc}".strip()) from None

    def batches(self, query: str, rows: int) -> Iterator[pa.RecordBatch]:
        # A named (server-side) cursor streams; a plain one would load every row.
        try:
            with self.con.transaction(), self.con.cursor(name="qualify_sync") as cur:
                cur.itersize = rows
                cur.execute(query)
                names = [d.name for d in cur.description]
                while chunk := cur.fetchmany(rows):
                    columns = list(zip(*chunk))
                    yield pa.RecordBatch.from_arrays([pa.array(c) for c in columns], names=names)
        except self._psycopg.Error as exc:
            raise WarehouseError(str(exc).strip()) from None

    def schema(self, query: str) -> pa.Schema:
        try:
            with self.con.transaction(), self.con.cursor() as cur:
                cur.execute(f"SELECT * FROM ({query}) AS q LIMIT 0")
                return pa.schema([pa.field(d.name, pa.null()) for d in cur.description])
        except self._psycopg.Error as exc:
            raise WarehouseError(str(exc).strip()) from None

    def close(self) -> None:
        self.con.close()


@contextmanager
def open_source(warehouse: Warehouse):
    """The reader for a project's warehouse, closed on exit."""
    source = PostgresSource(warehouse) if warehouse.kind == "postgres" else DuckDBSource(warehouse)
    try:
        yield source
    finally:
        source.close()
