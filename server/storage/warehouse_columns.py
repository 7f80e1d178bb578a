"""The parent model's synced attribute columns in LMDB: one array per attribute, indexed by person id.

Arrow columns from the warehouse become typed arrays (strings as dictionary
codes) with a validity array each; ``AttributeColumns`` loads, grows,
updates and writes them within a sync's transaction.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import Attribute
from ..domain.schema import ValueType


class SyncError(Exception):
    """A sync that could not land; nothing was changed."""


_DTYPES = {
    ValueType.STRING: np.int32,  # dictionary codes
    ValueType.INT: np.int64,
    ValueType.FLOAT: np.float64,
    ValueType.BOOL: np.uint8,
    ValueType.TIMESTAMP: np.int64,  # microseconds since the epoch, UTC
}



def infer_type(t: pa.DataType) -> ValueType:
    if pa.types.is_boolean(t):
        return ValueType.BOOL
    if pa.types.is_integer(t):
        return ValueType.INT
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return ValueType.FLOAT
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return ValueType.TIMESTAMP
    return ValueType.STRING


def to_kind(arr: pa.Array, kind: ValueType, name: str):
    """An Arrow column as (values, valid) for the codec; NULLs have valid 0."""
    valid = arr.is_valid().to_numpy(zero_copy_only=False).view(np.uint8)
    try:
        if kind == ValueType.STRING:
            if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
                arr = arr.cast(pa.string())
            return arr.to_numpy(zero_copy_only=False), valid
        if kind == ValueType.INT:
            return arr.cast(pa.int64()).fill_null(0).to_numpy(), valid
        if kind == ValueType.FLOAT:
            if pa.types.is_decimal(arr.type):  # Arrow's direct cast is not correctly rounded
                arr = arr.cast(pa.string())
            return arr.cast(pa.float64()).fill_null(0).to_numpy(), valid
        if kind == ValueType.BOOL:
            return arr.cast(pa.bool_()).fill_null(False).to_numpy(zero_copy_only=False).view(np.uint8), valid
        if pa.types.is_timestamp(arr.type) and arr.type.tz is not None:
            arr = arr.cast(pa.timestamp("us", tz="UTC")).cast(pa.timestamp("us"))
        elif not pa.types.is_timestamp(arr.type) or arr.type.unit != "us":
            arr = arr.cast(pa.timestamp("us"))
        return arr.cast(pa.int64()).fill_null(0).to_numpy(), valid
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise SyncError(f"column {name!r} of type {arr.type} cannot be read as {kind.name.lower()}: {exc}") from None


class AttributeColumns:
    """The parent model's attribute arrays, indexed by person id."""

    def __init__(self, txn, db, attributes: tuple[Attribute, ...], capacity: int):
        self.txn, self.db = txn, db
        self.stored: dict[bytes, bytes | None] = {}  # what each array's key held when loaded
        self.attributes = attributes
        self.values: dict[str, np.ndarray] = {}
        self.valid: dict[str, np.ndarray] = {}
        self.dicts: dict[str, list[str]] = {}
        self.codes: dict[str, dict[str, int]] = {}
        self.fresh: list[Attribute] = []  # new or retyped: every row is (re)written
        for a in attributes:
            k = a.name.encode()
            if txn.get(k + b".type", db=db) != a.type.name.encode():
                self.fresh.append(a)
                for suffix in (b"", b".valid", b".dict"):
                    txn.delete(k + suffix, db=db)
            self.values[a.name] = self._load(k, _DTYPES[a.type], capacity)
            self.valid[a.name] = self._load(k + b".valid", np.uint8, capacity)
            if a.type == ValueType.STRING:
                words = json.loads(txn.get(k + b".dict", db=db) or b"[]")
                self.dicts[a.name] = words
                self.codes[a.name] = {w: i for i, w in enumerate(words)}
        self.alive = self._load(b".alive", np.uint8, capacity)
        self.rowhash = self._load(b".rowhash", np.uint64, capacity)  # DuckDB's hash of the row, by person id
        self.keyhash = self._load(b".keyhash", np.uint64, capacity)

    def _load(self, key: bytes, dtype, capacity: int) -> np.ndarray:
        raw = self.txn.get(key, db=self.db)
        self.stored[key] = raw
        old = np.frombuffer(raw, dtype=dtype) if raw else np.zeros(0, dtype)
        out = np.zeros(max(capacity, len(old)), dtype)
        out[: len(old)] = old
        return out

    def put(self, key: bytes, arr: np.ndarray) -> None:
        """Writes an array unless its bytes are what is stored (copy-on-write pages are not free)."""
        data = arr.tobytes()
        if self.stored.get(key) != data:
            self.txn.put(key, data, db=self.db)
            self.stored[key] = data

    def grow(self, capacity: int) -> None:
        if capacity <= len(self.alive):
            return
        capacity = max(capacity, 2 * len(self.alive))
        for d in (self.values, self.valid):
            for name, arr in d.items():
                grown = np.zeros(capacity, arr.dtype)
                grown[: len(arr)] = arr
                d[name] = grown
        for name in ("alive", "rowhash", "keyhash"):
            old = getattr(self, name)
            grown = np.zeros(capacity, old.dtype)
            grown[: len(old)] = old
            setattr(self, name, grown)

    def update(self, ids: np.ndarray, rows: np.ndarray, batch: pa.RecordBatch, attributes) -> None:
        """Copies rows' attributes into the arrays at their ids."""
        if len(ids) == 0 or not attributes:
            return
        take = pa.array(rows)
        for a in attributes:
            arr = batch.column(a.name).take(take)
            if a.type == ValueType.STRING:
                if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
                    arr = arr.cast(pa.string())
                enc = pc.dictionary_encode(arr)
                mapping = np.array([self._code(a.name, w) for w in enc.dictionary.to_pylist()] or [0], np.int32)
                values = mapping[enc.indices.fill_null(0).to_numpy()]
                valid = arr.is_valid().to_numpy(zero_copy_only=False).view(np.uint8)
            else:
                values, valid = to_kind(arr, a.type, a.name)
            self.values[a.name][ids] = values
            self.valid[a.name][ids] = valid

    def _code(self, name: str, word: str) -> int:
        codes = self.codes[name]
        code = codes.get(word)
        if code is None:
            code = codes[word] = len(codes)
            self.dicts[name].append(word)
        return code

    def save(self, size: int) -> None:
        for a in self.attributes:
            k = a.name.encode()
            self.put(k, self.values[a.name][:size])
            self.put(k + b".valid", self.valid[a.name][:size])
            self.txn.put(k + b".type", a.type.name.encode(), db=self.db)
            if a.type == ValueType.STRING:
                self.txn.put(k + b".dict", json.dumps(self.dicts[a.name]).encode(), db=self.db)
        self.put(b".alive", self.alive[:size])
