"""A server's LMDB environment opened read-only in another process: the storage side of LocalReader.

qualify.clients.LocalReader reads records and memberships in the caller's
own process, with no RPC. This module owns what that needs to know about the
key layout (lmdb_store.py's and realtime.py's), so the layout stays in
storage.

Why it is safe beside a running server:

- The environment is opened ``readonly`` with the lock table on: a reader
  takes a slot in ``lock.mdb`` for each open transaction, which is what keeps
  the writer from reusing pages the reader still sees. Without the lock the
  writer would overwrite them under it. ``readahead`` is off (point reads on
  a large map), and ``max_spare_txns`` keeps that many finished read
  transactions for reuse, so a call does not pay for a new slot.
- Every read is one transaction (MVCC): a warehouse sync or an ingest batch
  is either wholly visible or not at all. The catalog (collections, columns,
  membership bits) is the one of the generation the transaction sees; it is
  reloaded when the generation moves, never mixed across two.
- ``map_size=0`` adopts the size the writer gave the map; if the writer grows
  it past this mapping, LMDB refuses the transaction (MDB_MAP_RESIZED) and
  the store adopts the new size and begins again.
- A server restart reuses the same file: nothing to do. A data directory
  that was replaced (a new ``data.mdb``, other inode) is noticed at most
  ``recheck_interval`` seconds later and the environment is opened anew;
  one that disappeared raises StaleStore. A fork is noticed at once: an
  environment must not be used in a child, nor closed there (closing would
  release the parent's reader slots), so the child opens its own.
- The layout version in ``meta`` is checked on every open and catalog load;
  another one raises LayoutMismatch before any record is decoded.
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb

from .lmdb_store import CATALOG, GENERATION, LAYOUT, LAYOUT_VERSION, MEMBERS, META, U32, U64, LayoutMismatch

# realtime.py's and eventlog.py's names, not imported: those modules pull numpy
# and the engine's types into a reader that needs two constants
# (tests/test_local_reader.py holds them equal).
AUDIENCE_MEMBERS = b"audience_members"
EVENTS = b"events"  # the event log: its last key is the position reads wait for
SEQ = struct.Struct(">Q")
_inherited: list = []  # environments opened before a fork: never used or closed again in the child


class StaleStore(RuntimeError):
    """The environment this reader opened is gone, or cannot be read any more."""


@dataclass(frozen=True)
class LocalCollection:
    """One served collection as a local reader needs it."""

    name: str
    db: object
    columns: tuple[str, ...]
    is_parent: bool
    index: dict  # column name -> position in the stored record


@dataclass(frozen=True)
class Catalog:
    """What one warehouse-sync generation serves."""

    generation: int
    collections: dict[str, LocalCollection]
    audience_ids: tuple[str | None, ...]  # bit -> audience (None: a free bit)


class LocalStore:
    """Read-only snapshots of a server's environment; see the module docstring."""

    def __init__(self, path: Path, *, max_spare_txns: int = 8, max_readers: int = 512,
                 recheck_interval: float = 0.05):
        self.path = Path(path)
        self.max_spare_txns = max_spare_txns
        self.max_readers = max_readers
        self.recheck_interval = recheck_interval
        self.env: lmdb.Environment | None = None
        self.catalog: Catalog | None = None
        self._open()

    # -- opening and re-opening --------------------------------------------------------

    def _open(self) -> None:
        data = self.path / "data.mdb"
        try:
            self._inode = os.stat(data).st_ino
        except FileNotFoundError:
            raise StaleStore(f"no Qualify data in {self.path} (start the server, or run `qualify sync`, first)") from None
        self.env = lmdb.open(str(self.path), map_size=0, max_dbs=64, max_readers=self.max_readers, readonly=True,
                             lock=True, readahead=False, max_spare_txns=self.max_spare_txns, subdir=True)
        self._pid = os.getpid()
        self._checked = time.monotonic()
        self.catalog = None
        self._meta = self._members = self._index = self._events = None

    def _reopen(self) -> None:
        if self._pid == os.getpid():
            self.env.close()
        else:
            _inherited.append(self.env)
        self._open()

    def _current(self) -> None:
        """Re-opens after a fork, or when the data file was replaced (checked every recheck_interval)."""
        if self._pid != os.getpid():
            self._reopen()
            return
        now = time.monotonic()
        if now - self._checked < self.recheck_interval:
            return
        self._checked = now
        try:
            inode = os.stat(self.path / "data.mdb").st_ino
        except FileNotFoundError:
            raise StaleStore(f"the Qualify data in {self.path} is gone (the data directory was removed)") from None
        if inode != self._inode:
            self._reopen()

    def close(self) -> None:
        if self.env is not None and self._pid == os.getpid():
            self.env.close()
        self.env = None

    # -- snapshots ----------------------------------------------------------------------

    def begin(self) -> tuple[lmdb.Transaction, Catalog]:
        """A read transaction (buffers: memoryviews valid until it ends) and its generation's catalog."""
        if self.env is None:
            raise StaleStore("the reader is closed")
        self._current()
        for _ in range(100):
            try:
                txn = self.env.begin(buffers=True)
            except lmdb.MapResizedError:  # the writer grew the map past ours: adopt its size
                self.env.set_mapsize(0)
                continue
            catalog = self.catalog
            if catalog is not None:
                raw = txn.get(GENERATION, db=self._meta)
                if (U64.unpack(raw)[0] if raw else 0) == catalog.generation:
                    return txn, catalog
            elif txn.get(META) is None:
                txn.abort()
                raise StaleStore(f"the Qualify data in {self.path} has no meta table yet (the server is starting)")
            txn.abort()
            self._load()  # handles are opened outside the transaction that uses them (see lmdb_store._handle)
        raise StaleStore(f"the catalog in {self.path} kept changing while it was read")

    def _db(self, name: bytes):
        try:
            return self.env.open_db(name, create=False)
        except lmdb.NotFoundError:
            return None

    def _load(self) -> None:
        if self._meta is None:
            self._meta = self._db(META)
        for attr, name in (("_members", MEMBERS), ("_index", AUDIENCE_MEMBERS), ("_events", EVENTS)):
            if getattr(self, attr) is None:
                setattr(self, attr, self._db(name))
        with self.env.begin() as txn:
            layout = txn.get(LAYOUT, db=self._meta)
            raw = txn.get(GENERATION, db=self._meta)
            catalog = json.loads(txn.get(CATALOG, db=self._meta) or b"{}")
        version = U32.unpack(layout)[0] if layout else None
        if version != LAYOUT_VERSION:
            raise LayoutMismatch(
                f"the Qualify data in {self.path} has record layout {version if version is not None else 'unknown'}, "
                f"this reader reads layout {LAYOUT_VERSION}: use a qualify package of the same version as the server")
        collections = {}
        for name, spec in catalog.get("collections", {}).items():
            db = self._db(spec["db"].encode())
            if db is not None:
                columns = tuple(spec["columns"])
                collections[name] = LocalCollection(name, db, columns, bool(spec["parent"]),
                                                    {c: i for i, c in enumerate(columns)})
        self.catalog = Catalog(U64.unpack(raw)[0] if raw else 0, collections,
                               tuple(catalog.get("audiences", ())))

    # -- reads inside a snapshot ------------------------------------------------------------

    def membership(self, txn, key: bytes):
        """The stored membership of a person (a memoryview), or None."""
        return txn.get(key, db=self._members) if self._members is not None else None

    def member_keys(self, txn, audience_id: str, after: str, limit: int) -> tuple[list[str], str]:
        """A page of the audience's member keys in key order after ``after``, and the next page's token."""
        if self._index is None:
            return [], ""
        prefix = audience_id.encode() + b"\x00"
        start = prefix + after.encode()
        cur = txn.cursor(db=self._index)
        keys: list[str] = []
        if cur.set_range(start):
            for k in cur.iternext(values=False):
                k = bytes(k)
                if not k.startswith(prefix):
                    break
                if after and k == start:
                    continue
                if len(keys) == limit:
                    return keys, keys[-1]
                keys.append(k[len(prefix):].decode())
        return keys, ""

    def is_indexed(self, txn, audience_id: str, key: bytes) -> bool:
        return self._index is not None and txn.get(audience_id.encode() + b"\x00" + key, db=self._index) is not None

    def position(self, txn) -> int:
        """The event log position this snapshot covers: the last event appended (0: none).

        Evaluation runs in the transaction that appends the events (see
        writer.py), so a snapshot that holds event N also holds every
        membership change N caused.
        """
        if self._events is None:
            self.catalog = None  # the log did not exist when the handles were opened: look again next time
            return 0
        cur = txn.cursor(db=self._events)
        return SEQ.unpack(cur.key())[0] if cur.last() else 0


def store_path(data_dir) -> Path:
    """The environment folder of a data directory (``<data_dir>/lmdb``), or the folder itself."""
    path = Path(os.fspath(data_dir))
    return path if (path / "data.mdb").exists() or not (path / "lmdb").exists() else path / "lmdb"


__all__ = ["Catalog", "LayoutMismatch", "LocalCollection", "LocalStore", "StaleStore", "store_path"]
