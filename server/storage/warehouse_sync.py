"""Warehouse sync: materialises the parent model and the collections into LMDB.

A sync is one LMDB write transaction, so readers see the previous version or
the new one, never a mix. It is incremental: a row whose encoded record is
byte-for-byte unchanged is not rewritten, and the report counts rows added,
changed and removed. Rows stream from the warehouse in batches.

People get dense integer ids, stable across syncs and never reused, which
index the attribute column arrays the evaluator reads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import lmdb
import numpy as np
import pyarrow as pa

from ..config import Project
from ..wire import encode_records, key_part
from .lmdb_store import CATALOG, GENERATION, ID_KEY, LAST_SYNC, META, PEOPLE, U32, U64, table_of_collection
from .warehouse_columns import AttributeColumns, SyncError, infer_type, to_kind
from .warehouse_sources import KEY_HASH, ROW_HASH, WarehouseError, WarehouseUnavailable, open_source

log = logging.getLogger(__name__)

MAX_KEY_BYTES = 511  # LMDB's key size limit

Progress = Callable[[str, int], None]

@dataclass
class TableReport:
    table: str
    rows: int = 0
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    duplicate_keys: int = 0
    null_keys: int = 0
    invalid_keys: int = 0  # empty, or longer than LMDB's 511-byte key limit
    seconds: float = 0.0


@dataclass
class SyncReport:
    generation: int
    started_at: float
    seconds: float
    people: int
    tables: list[TableReport] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


class Syncer:
    """Runs one sync of a project into an open (writable) LMDB environment.

    ``keep`` (a cluster partition's slice): given a batch's primary key
    column, which of its people to sync; the others are left out as if the
    warehouse did not have them.
    """

    def __init__(self, env, project: Project, keep: Callable[[pa.Array], pa.Array] | None = None):
        self.env = env
        self.project = project
        self.keep = keep

    def run(self, progress: Progress | None = None, txn=None) -> SyncReport:
        """One sync in its own write transaction, or inside ``txn`` (the caller commits it).

        The server passes the writer thread's transaction (Writer.submit):
        LMDB allows one write transaction per environment at a time.
        """
        started = time.time()
        t0 = time.perf_counter()
        project = self.project
        try:
            with open_source(project.warehouse) as source, \
                    (contextlib.nullcontext(txn) if txn is not None else self.env.begin(write=True)) as txn:
                meta = self.env.open_db(META, txn=txn)
                self.env.open_db(b"members", txn=txn)
                pm = project.parent_model
                served = {}
                people_report, people_columns = self._table(
                    txn, meta, source, PEOPLE, pm.query, pm.primary_key, pm.attributes, progress)
                tables = [people_report]
                for c in project.collections:
                    if c.is_parent:
                        served[c.name] = {"db": f"{PEOPLE}.keys", "columns": people_columns, "parent": True}
                        continue
                    table = table_of_collection(c.name)
                    report, columns = self._table(txn, meta, source, table, c.query, c.key, (), progress)
                    tables.append(report)
                    served[c.name] = {"db": f"{table}.keys", "columns": columns, "parent": False}
                raw = txn.get(GENERATION, db=meta)
                generation = (U64.unpack(raw)[0] if raw else 0) + 1
                people = (people_report.rows - people_report.duplicate_keys - people_report.null_keys
                          - people_report.invalid_keys)
                report = SyncReport(generation, started, time.perf_counter() - t0, people, tables)
                old = json.loads(txn.get(CATALOG, db=meta) or b"{}")
                catalog = {"collections": served, "audiences": old.get("audiences", []),
                           "attributes": [{"name": a.name, "type": a.type.name.lower()} for a in pm.attributes]}
                txn.put(CATALOG, json.dumps(catalog).encode(), db=meta)
                txn.put(LAST_SYNC, json.dumps(report.to_json()).encode(), db=meta)
                txn.put(GENERATION, U64.pack(generation), db=meta)
        except WarehouseUnavailable as exc:
            raise SyncError(str(exc)) from None
        except WarehouseError as exc:
            raise SyncError(f"warehouse query failed: {exc}") from None
        except lmdb.MapFullError:
            raise SyncError(f"the LMDB map is full; raise storage.map_size_gb (now {project.map_size / (1 << 30):g})") from None
        except lmdb.Error as exc:
            raise SyncError(f"storage: {exc}") from None
        report.seconds = time.perf_counter() - t0
        log.info("sync %d landed in %.2fs: %s", report.generation, report.seconds,
                 ", ".join(f"{t.table} +{t.added} ~{t.changed} -{t.removed}" for t in report.tables))
        return report

    def _table(self, txn, meta, source, table, query, key, attributes, progress):
        """Syncs one table; returns its report and its columns.

        With a source that hashes rows (DuckDB), rows whose key and row hashes
        equal those stored at the same position in the previous sync are
        skipped in bulk, vectorised; the others take the exact path.
        """
        t0 = time.perf_counter()
        report = TableReport(table)
        keys_db = self.env.open_db(f"{table}.keys".encode(), txn=txn)
        ids_db = self.env.open_db(f"{table}.ids".encode(), txn=txn)
        cols_db = self.env.open_db(f"{table}.cols".encode(), txn=txn)
        next_key = f"next_id:{table}".encode()
        raw = txn.get(next_key, db=meta)
        next_id = U32.unpack(raw)[0] if raw else 0
        cols = AttributeColumns(txn, cols_db, attributes, next_id + 1024)
        seen = np.zeros(len(cols.alive), np.uint8)
        hashed = getattr(source, "row_hashes", False)
        raw = txn.get(b".order", db=cols_db) if hashed else None
        cols.stored[b".order"] = raw
        old_order = np.frombuffer(raw, np.int64) if raw else np.zeros(0, np.int64)
        new_order: list[np.ndarray] = []
        position = 0
        fast = False
        columns: list[str] | None = None
        kinds = key_parts = None
        if hashed:  # the hashing query names the key: say precisely if it is missing
            self._check_columns(table, source.schema(query).names, key, attributes)
        for batch in source.batches(query, self.project.sync_batch_rows, key=key if hashed else None):
            batch = self._kept(table, key, batch)
            if hashed:
                row_hash = batch.column(ROW_HASH).to_numpy(zero_copy_only=False).astype(np.uint64, copy=False)
                key_hash = batch.column(KEY_HASH).to_numpy(zero_copy_only=False).astype(np.uint64, copy=False)
                batch = batch.drop_columns([ROW_HASH, KEY_HASH])
            if columns is None:
                columns = batch.schema.names
                self._check_columns(table, columns, key, attributes)
                declared = {a.name: a.type for a in attributes}
                kinds = [declared.get(n) or infer_type(batch.schema.field(n).type) for n in columns]
                key_parts = [key_part(n) for n in columns]
                # Hashes only stand for records encoded the same way.
                signature = json.dumps([columns, [int(k) for k in kinds], sorted(declared)]).encode()
                fast = hashed and not cols.fresh and txn.get(b".signature", db=cols_db) == signature
            n = batch.num_rows
            cols.grow(next_id + n + 1)
            if len(seen) < len(cols.alive):
                seen = np.concatenate([seen, np.zeros(len(cols.alive) - len(seen), np.uint8)])
            order = np.full(n, -1, np.int64)
            rest = np.arange(n)
            if fast:
                rest = _skip_unchanged(old_order[position:position + n], key_hash, row_hash, cols, seen, order, report)
            if len(rest):
                sub = batch if len(rest) == n else batch.take(pa.array(rest))
                pids, next_id = self._exact(txn, sub, columns, kinds, key_parts, key, attributes, keys_db, ids_db,
                                            cols, seen, next_id, report)
                order[rest] = pids
                if hashed:
                    ok = pids >= 0
                    cols.rowhash[pids[ok]] = row_hash[rest[ok]]
                    cols.keyhash[pids[ok]] = key_hash[rest[ok]]
            new_order.append(order)
            position += n
            report.rows += n
            if progress:
                progress(table, report.rows)
        if columns is None:
            columns = self._empty_columns(source, query, table, key, attributes)
        report.removed = _remove_unseen(txn, cols, seen, attributes, keys_db, ids_db)
        if report.added or report.changed or report.removed or cols.fresh:
            cols.save(next_id)
        if hashed and report.rows:
            cols.put(b".order", np.concatenate(new_order))
            cols.put(b".rowhash", cols.rowhash[:next_id])
            cols.put(b".keyhash", cols.keyhash[:next_id])
            txn.put(b".signature", signature, db=cols_db)
        txn.put(next_key, U32.pack(next_id), db=meta)
        report.seconds = time.perf_counter() - t0
        return report, list(columns)

    def _kept(self, table: str, key: str, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The rows this store keeps (a cluster partition keeps its people's only)."""
        if self.keep is not None and table == PEOPLE and key in batch.schema.names:
            return batch.filter(self.keep(batch.column(key)))
        return batch

    def _exact(self, txn, batch, columns, kinds, key_parts, key, attributes, keys_db, ids_db, cols, seen,
               next_id, report):
        """Encodes rows and compares them with the stored records; returns each row's person id (-1: skipped)."""
        n = batch.num_rows
        values, valids = [], []
        for name, kind in zip(columns, kinds):
            v, ok = to_kind(batch.column(name), kind, name)
            values.append(v)
            valids.append(ok)
        records = encode_records(key_parts, [int(k) for k in kinds], values, valids, n)
        key_arr = batch.column(key)
        if not (pa.types.is_string(key_arr.type) or pa.types.is_large_string(key_arr.type)):
            key_arr = key_arr.cast(pa.string())
        put, get, pack = txn.put, txn.get, U32.pack
        pids = np.full(n, -1, np.int64)
        changed_ids, changed_rows, all_ids, all_rows = [], [], [], []
        for i, (k, rec) in enumerate(zip(key_arr.to_pylist(), records)):
            if k is None:
                report.null_keys += 1
                continue
            kb = k.encode()
            if not 0 < len(kb) <= MAX_KEY_BYTES:
                report.invalid_keys += 1
                continue
            old = get(kb, db=keys_db)
            if old is None:
                pid = next_id
                next_id += 1
                report.added += 1
                put(ID_KEY.pack(pid), kb, db=ids_db)
                put(kb, pack(pid) + rec, db=keys_db)
            else:
                pid = U32.unpack_from(old)[0]
                if seen[pid]:  # the first row with a key wins
                    report.duplicate_keys += 1
                    continue
                pids[i] = pid
                if len(old) == len(rec) + 4 and old.endswith(rec):
                    report.unchanged += 1
                    seen[pid] = 1
                    if cols.fresh:
                        all_ids.append(pid)
                        all_rows.append(i)
                    continue
                report.changed += 1
                put(kb, old[:4] + rec, db=keys_db)
            pids[i] = pid
            seen[pid] = 1
            changed_ids.append(pid)
            changed_rows.append(i)
        cols.update(np.array(changed_ids, np.int64), np.array(changed_rows, np.int64), batch, attributes)
        cols.update(np.array(all_ids, np.int64), np.array(all_rows, np.int64), batch, cols.fresh)
        return pids, next_id

    def _empty_columns(self, source, query, table, key, attributes):
        names = source.schema(query).names
        self._check_columns(table, names, key, attributes)
        return names

    @staticmethod
    def _check_columns(table, columns, key, attributes):
        where = "the parent model" if table == PEOPLE else f"collection {table[2:]!r}"
        missing = [key] if key not in columns else []
        missing += [a.name for a in attributes if a.name not in columns]
        if missing:
            raise SyncError(f"{where}: the query returns no column {', '.join(map(repr, missing))} "
                            f"(it returns {', '.join(columns)})")


def _skip_unchanged(prev, key_hash, row_hash, cols, seen, order, report):
    """The fast path: rows with the stored hashes at their position keep their id; the others' indices."""
    n = len(order)
    cand = np.full(n, -1, np.int64)
    cand[: len(prev)] = prev
    idx = np.where(cand >= 0, cand, 0)
    same = ((cand >= 0) & (cols.keyhash[idx] == key_hash) & (cols.rowhash[idx] == row_hash)
            & (cols.alive[idx] == 1) & (seen[idx] == 0))
    seen[cand[same]] = 1
    order[same] = cand[same]
    report.unchanged += int(same.sum())
    return np.flatnonzero(~same)


def _remove_unseen(txn, cols, seen, attributes, keys_db, ids_db) -> int:
    """Whoever was alive before and was not seen now has been removed; returns how many."""
    gone = np.flatnonzero(cols.alive[: len(seen)] & (1 - seen[: len(cols.alive)]))
    for pid in gone.tolist():
        idk = ID_KEY.pack(pid)
        k = txn.get(idk, db=ids_db)
        if k is not None:
            txn.delete(k, db=keys_db)
            txn.delete(idk, db=ids_db)
    cols.alive[: len(seen)] = seen[: len(cols.alive)]
    for a in attributes:
        cols.valid[a.name][gone] = 0
    return len(gone)
