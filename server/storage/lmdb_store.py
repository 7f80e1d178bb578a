"""The LMDB environment and its key layout.

One process writes (the warehouse sync, later ingest and evaluation); any
number of processes read the same memory-mapped environment. Readers see the
state of the last committed transaction and never a half-applied sync.

Named databases::

    meta           b"layout" -> u32 LAYOUT_VERSION (written when the writer opens the environment);
                   b"generation" -> u64 syncs landed; b"catalog" -> JSON (what is served);
                   b"last_sync" -> JSON report; b"next_id:<table>" -> u32
    <table>.keys   key (UTF-8) -> u32 dense id | stored record (see qualify.server.wire)
    <table>.ids    u32 dense id (big-endian, so ids sort) -> key
    <table>.cols   attribute name -> column array; "<name>.valid" -> uint8 array;
                   "<name>.type" -> the ValueType name the array was written with;
                   "<name>.dict" -> JSON list (string codes); ".alive" -> uint8 array;
                   with a source that hashes rows (DuckDB): ".rowhash", ".keyhash" -> uint64
                   arrays by id, ".order" -> int64 id per row position of the last sync,
                   ".signature" -> the columns and types the hashes stand for
    members        person key -> memberships (see storage/realtime.py, which owns the
                   realtime tables: audiences, members, audience_members, changelog)
    events         u64 seq (big-endian) -> msgpack'd event: the event log
    events.dedupe  message_id (hashed if over 480 bytes) -> u64 received_us (big-endian)
    events.meta    b"unmatched" -> u64 events that matched no event model
                   (the three are storage/eventlog.py's; written only by storage/writer.py)

``people`` is the parent model's table; a collection with its own query has
the table ``c.<name>``.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
from google.protobuf import json_format, struct_pb2

from ..domain.errors import FieldViolation, KeyNotFound, NotReady, UnknownCollection, UnknownField

PEOPLE = "people"
META = b"meta"
MEMBERS = b"members"
GENERATION = b"generation"
CATALOG = b"catalog"
LAST_SYNC = b"last_sync"
LAYOUT = b"layout"
#: The version of this module's key layout, storage/realtime.py's and the record
#: wire format (qualify.server.wire). Readers in other processes, which may be
#: another Qualify version (qualify.clients.LocalReader), refuse a different
#: one. Bump it with any change a reader of the old layout would misread.
LAYOUT_VERSION = 1
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
ID_KEY = struct.Struct(">I")
ID_SEQ = struct.Struct(">Q")  # the event log's keys (eventlog.py)


def table_of_collection(name: str) -> str:
    return f"c.{name}"


def open_env(path: Path, map_size: int, readonly: bool, max_readers: int = 512) -> lmdb.Environment:
    """Opens the environment; the writer creates it, readers only attach."""
    if not readonly:
        path.mkdir(parents=True, exist_ok=True)
    elif not (path / "data.mdb").exists():
        raise FileNotFoundError(f"no Qualify data in {path} (run `qualify sync` or start the server first)")
    env = lmdb.open(
        str(path),
        map_size=map_size,
        max_dbs=64,
        max_readers=max_readers,
        readonly=readonly,
        lock=True,  # the writer runs concurrently: readers need the lock table
        readahead=False,  # random point reads on a large map
        max_spare_txns=8,
        subdir=True,
    )
    if not readonly:
        # A database handle first opened inside a read transaction dies with
        # it. Opening every existing one now, in a committed write
        # transaction, lets this process's readers use them safely.
        with env.begin(write=True) as txn:
            for name, _ in txn.cursor():
                env.open_db(name, txn=txn, create=False)
            meta = env.open_db(META, txn=txn)
            stamp_layout(txn, meta)
    return env


class LayoutMismatch(RuntimeError):
    """The environment was written with another record layout than this code reads."""


def stamp_layout(txn, meta) -> None:
    """Records LAYOUT_VERSION in a new store; refuses to write over another layout."""
    raw = txn.get(LAYOUT, db=meta)
    if raw is None:
        txn.put(LAYOUT, U32.pack(LAYOUT_VERSION), db=meta)
    elif U32.unpack(raw)[0] != LAYOUT_VERSION:
        raise LayoutMismatch(f"the data was written with record layout {U32.unpack(raw)[0]}; this Qualify "
                             f"writes layout {LAYOUT_VERSION} (use the Qualify version that wrote it, or a new data dir)")


def _handle(env: lmdb.Environment, name: bytes):
    """A handle to an existing named database, valid in transactions begun later.

    A handle first opened inside a read transaction dies with it, and a
    transaction only sees handles that existed when it began. In a read-only
    environment the handle gets a transaction of its own, which commits; in
    the writer's environment every handle was opened by a committed write
    transaction (see open_env and the sync), so a read transaction only looks
    it up.
    """
    if env.flags()["readonly"]:
        return env.open_db(name, create=False)
    with env.begin() as txn:
        return env.open_db(name, txn=txn, create=False)


@dataclass
class CollectionView:
    """What a reader needs to serve one collection, resolved once per catalog."""

    name: str
    db: object
    columns: tuple[str, ...]
    is_parent: bool
    prefix: bytes  # the encoded Record.collection field
    _masks: dict = field(default_factory=dict)

    def mask_indices(self, paths: tuple[str, ...]) -> tuple[int, ...] | None:
        """Column indices for a read mask, compiled once per distinct mask."""
        if not paths:
            return None
        hit = self._masks.get(paths)
        if hit is not None:
            return hit
        index = {c: i for i, c in enumerate(self.columns)}
        bad = [p for p in paths if p not in index]
        if bad:
            raise UnknownField(
                f"collection {self.name!r} has no field {bad[0]!r}",
                violations=[FieldViolation("read_mask.paths", f"{p!r} is not a field of {self.name!r}; fields: {', '.join(self.columns)}") for p in bad],
            )
        compiled = tuple(index[p] for p in paths)
        if len(self._masks) < 1024:
            self._masks[paths] = compiled
        return compiled


class Reader:
    """Point reads for PersonalizeService, each from one consistent snapshot."""

    def __init__(self, env: lmdb.Environment):
        self.env = env
        self._generation = 0
        self._collections: dict[str, CollectionView] = {}
        self._meta = None
        self._members = None
        self._events = None
        self._last_sync: dict | None = None
        self.audience_ids: tuple[str, ...] = ()

    def _snapshot(self):
        """A read transaction whose generation is the one the catalog was loaded for."""
        while True:
            txn = self.env.begin()
            if self._meta is None:
                if txn.get(META) is None:
                    return txn  # nothing has ever been synced here
            else:
                raw = txn.get(GENERATION, db=self._meta)
                if (U64.unpack(raw)[0] if raw else 0) == self._generation:
                    return txn
            txn.abort()
            self._load()

    def _load(self) -> None:
        if self._meta is None:
            self._meta = _handle(self.env, META)
        with self.env.begin() as txn:
            raw = txn.get(GENERATION, db=self._meta)
            generation = U64.unpack(raw)[0] if raw else 0
            catalog = json.loads(txn.get(CATALOG, db=self._meta) or b"{}")
            last = txn.get(LAST_SYNC, db=self._meta)
            has_members = txn.get(MEMBERS) is not None
        from ..wire import length_delimited

        self._collections = {
            name: CollectionView(
                name=name,
                db=_handle(self.env, spec["db"].encode()),
                columns=tuple(spec["columns"]),
                is_parent=spec["parent"],
                prefix=length_delimited(b"\x0a", name.encode()),
            )
            for name, spec in catalog.get("collections", {}).items()
        }
        if self._members is None and has_members:
            self._members = _handle(self.env, MEMBERS)
        self.audience_ids = tuple(catalog.get("audiences", ()))
        self._last_sync = json.loads(last) if last else None
        self._generation = generation

    def refresh(self) -> int:
        """Catches up with the last committed sync; returns its generation (0: none yet)."""
        self._snapshot().abort()
        return self._generation

    @property
    def generation(self) -> int:
        return self.refresh()

    def collections(self) -> dict[str, CollectionView]:
        self.refresh()
        return self._collections

    def last_sync(self) -> dict | None:
        self.refresh()
        return self._last_sync

    def people(self) -> int:
        report = self.last_sync()
        return int(report["people"]) if report else 0

    def _view(self, name: str) -> CollectionView:
        view = self._collections.get(name)
        if view is not None:
            return view
        if self._generation == 0:
            raise NotReady("the first warehouse sync has not landed yet")
        known = ", ".join(sorted(self._collections)) or "none"
        raise UnknownCollection(
            f"unknown collection {name!r}",
            violations=[FieldViolation("collection", f"{name!r} is not a collection; collections: {known}")],
        )

    def get(self, name: str, keys: list[bytes]) -> tuple[CollectionView, list[tuple[bytes | None, dict | None]]]:
        """Stored records and memberships ({bit: enter_us}) for keys, from one snapshot."""
        txn = self._snapshot()
        try:
            view = self._view(name)
            members = self._members if view.is_parent else None
            out = []
            for key in keys:
                stored = txn.get(key, db=view.db)
                raw = txn.get(key, db=members) if stored is not None and members is not None else None
                out.append((stored, decode_membership(raw) if raw else None))
            return view, out
        finally:
            txn.abort()

    def get_one(self, name: str, key: bytes) -> tuple[CollectionView, bytes, dict | None]:
        view, ((stored, bits),) = self.get(name, [key])
        if stored is None:
            raise KeyNotFound(f"no record with key {key.decode(errors='replace')!r} in collection {name!r}",
                              metadata={"collection": name})
        return view, stored, bits


    def field_values(self, name: str, keys: list[str], columns: tuple[str, ...]) -> dict[str, dict]:
        """{key: {column: JSON value}} of the keys that have a record (realtime syncs' ``fields``)."""
        view, found = self.get(name, [k.encode() for k in keys])
        view.mask_indices(columns)  # unknown columns are refused as for a read mask
        wanted = set(columns)
        out = {}
        for key, (stored, _) in zip(keys, found):
            if stored is not None:
                values = json_format.MessageToDict(struct_pb2.Struct.FromString(record_fields(stored)))
                out[key] = {c: v for c, v in values.items() if c in wanted}
        return out

    def position(self) -> int:
        """The event log's last sequence in a new snapshot: what a consistency token is compared with.

        The writer evaluates a batch in the transaction that appends it, so
        a snapshot holding event N holds its effects (domain/consistency.py).
        """
        if self._events is None:
            try:
                self._events = _handle(self.env, b"events")  # eventlog.py's; created when the writer starts
            except lmdb.NotFoundError:
                return 0
        with self.env.begin() as txn, txn.cursor(db=self._events) as cur:
            return ID_SEQ.unpack(cur.key())[0] if cur.last() else 0

    def map_usage(self) -> tuple[int, int]:
        """(bytes in use, map size): the data file's last used page, against the reserved map."""
        info = self.env.info()
        return (info["last_pgno"] + 1) * self.env.stat()["psize"], info["map_size"]


def record_fields(stored: bytes) -> bytes:
    """The ``google.protobuf.Struct`` body of a stored record (see qualify.server.wire: header, then entries)."""
    n = stored[4] | (stored[5] << 8)
    return stored[6 + 4 * n:]


def decode_membership(raw: bytes) -> dict[int, int]:
    """Stored memberships -> {bit: enter_us} (the format is realtime.encode_membership's)."""
    n = struct.unpack_from("<H", raw)[0]
    bits = [i * 8 + b for i, byte in enumerate(raw[2:2 + n]) for b in range(8) if byte >> b & 1]
    return dict(zip(bits, struct.unpack_from(f"<{len(bits)}q", raw, 2 + n)))


def delete_prefix(txn, db, prefix: bytes) -> None:
    """Deletes every key of ``db`` that starts with ``prefix``."""
    cur = txn.cursor(db=db)
    if cur.set_range(prefix):
        while cur.key().startswith(prefix):
            if not cur.delete():
                break


def data_path(data_dir: Path) -> Path:
    return Path(os.fspath(data_dir)) / "lmdb"
