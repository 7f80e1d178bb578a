"""qualify.toml -> a frozen ``Project``: the warehouse, the parent model, collections, server and storage.

``load_project`` reads the file, ``parse_project`` the parsed TOML; each section
is read by its own function, the realtime and sync sections by their modules
beside this one, and every problem is collected before one ProjectError is raised.
"""

from __future__ import annotations

import glob
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..domain.events import EventModel
from ..domain.schema import TYPE_NAMES, ValueType
from ..domain.syncs import SyncSpec
from .cluster import KEYS as CLUSTER_KEYS, ClusterSettings, parse_cluster
from .operations import SECTIONS as OPERATION_SECTIONS, Operations, parse_operations
from .reader import MISSING, NAME_RE, Problem, ProjectError, Reader
from .realtime import (DEFAULT_CHANGELOG_RETENTION, DEFAULT_EVENT_RETENTION, DEFAULT_PREVIEW_TIMEOUT,
                       DEFAULT_SESSION_TIMEOUT, DEFAULT_STATE_CACHE, DEFAULT_WATCH_BUFFER, DEFAULT_WATCH_MAX_LAG, REALTIME_KEYS,
                       parse_event_models, parse_realtime)
from .syncs import DELIVERY_KEYS, parse_delivery, parse_syncs

DEFAULT_PORT = 50051
DEFAULT_MAP_SIZE = 64 << 30  # LMDB reserves address space, not disk
_DEFAULT_BATCH_ROWS = 50_000
_TOP_KEYS = ("data_dir", "warehouse", "parent_model", "collections", "server", "storage",
             "event_models", "realtime", "syncs", "delivery", "cluster", *OPERATION_SECTIONS)


@dataclass(frozen=True)
class Warehouse:
    """Where models are read from. ``kind`` is duckdb, files or postgres."""

    kind: str
    path: Path | None = None  # duckdb: the database file
    dsn: str | None = None  # postgres: a libpq connection string
    tables: tuple[tuple[str, str], ...] = ()  # files: view name -> file or glob


@dataclass(frozen=True)
class Attribute:
    name: str
    type: ValueType


@dataclass(frozen=True)
class ParentModel:
    """One row per person: the primary key and the typed attributes."""

    name: str
    query: str
    primary_key: str
    attributes: tuple[Attribute, ...]


@dataclass(frozen=True)
class Collection:
    """A dataset served by PersonalizeService. ``query`` None serves the parent model."""

    name: str
    key: str
    query: str | None = None

    @property
    def is_parent(self) -> bool:
        return self.query is None


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    workers: int = 1
    sync_interval: float | None = None  # seconds; None syncs only at start


@dataclass(frozen=True)
class Project:
    path: Path | None
    data_dir: Path
    warehouse: Warehouse
    parent_model: ParentModel
    collections: tuple[Collection, ...]
    server: ServerSettings = field(default_factory=ServerSettings)
    map_size: int = DEFAULT_MAP_SIZE
    sync_batch_rows: int = _DEFAULT_BATCH_ROWS
    event_models: tuple[EventModel, ...] = ()  # [event_models.NAME], in file order
    session_timeout: float = DEFAULT_SESSION_TIMEOUT  # [realtime] session_timeout, seconds
    watch_buffer: int = DEFAULT_WATCH_BUFFER  # [realtime] watch_buffer: live changes held per watch
    watch_max_lag: int = DEFAULT_WATCH_MAX_LAG  # [realtime] watch_max_lag: changes behind before a watch is ended
    event_retention: float = DEFAULT_EVENT_RETENTION  # [realtime] event_retention, seconds: the event log's history
    changelog_retention: float = DEFAULT_CHANGELOG_RETENTION  # [realtime] changelog_retention, seconds
    preview_timeout: float = DEFAULT_PREVIEW_TIMEOUT  # [realtime] preview_timeout, seconds: a PreviewAudience's deadline
    state_cache: int = DEFAULT_STATE_CACHE  # [realtime] state_cache: people whose realtime state stays in memory
    syncs: tuple[SyncSpec, ...] = ()  # [[syncs]]
    retry_initial: float = 0.2  # [delivery] retry_initial: first backoff, seconds
    retry_max: float = 30.0  # [delivery] retry_max: longest backoff, seconds
    ops: Operations = field(default_factory=Operations)  # [auth] [tls] [limits] [metrics]
    cluster: ClusterSettings | None = None  # [cluster]; None: one node on its own

    def event_model(self, name: str) -> EventModel | None:
        for m in self.event_models:
            if m.name == name:
                return m
        return None

    def collection(self, name: str) -> Collection | None:
        for c in self.collections:
            if c.name == name:
                return c
        return None


def load_project(path: str | Path) -> Project:
    """Reads and validates a project file; raises ProjectError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProjectError(str(path), [Problem("(file)", str(path), f"cannot be read: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise ProjectError(str(path), [Problem("(file)", str(path), f"is not UTF-8 text (byte {exc.start})")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProjectError(str(path), [Problem("(syntax)", MISSING, f"not valid TOML: {exc}")]) from None
    return parse_project(data, base=path.parent.resolve(), path=path)


def parse_project(data: dict, base: Path, path: Path | None = None) -> Project:
    """The parsed TOML of a project file (paths relative to ``base``); raises ProjectError listing every problem."""
    r = Reader()
    r.unknown_keys(data, _TOP_KEYS, "")
    data_dir = base / (r.string(data, "data_dir", "data_dir", required=False, default="qualify-data") or "qualify-data")
    # The sections in file-documentation order, which is the order problems are listed in.
    warehouse = _warehouse(r, data, base)
    parent = _parent_model(r, data)
    collections = _collections(r, data, parent)
    server = _server(r, r.table(data, "server", ("host", "port", "workers", "sync_interval")))
    storage = _storage(r, r.table(data, "storage", ("map_size_gb", "sync_batch_rows")))
    event_models = parse_event_models(r, data.get("event_models", {}))
    realtime = parse_realtime(r, r.table(data, "realtime", REALTIME_KEYS))
    syncs = parse_syncs(r, data.get("syncs", []), parent.name)
    delivery = parse_delivery(r, r.table(data, "delivery", DELIVERY_KEYS))
    ops = parse_operations({name: r.table(data, name, keys) for name, keys in OPERATION_SECTIONS.items()},
                           base, r.problem, MISSING)
    cluster = parse_cluster(r, r.table(data, "cluster", CLUSTER_KEYS), "cluster" in data)
    if r.problems:
        raise ProjectError(str(path or "qualify.toml"), r.problems)
    return Project(path=path, data_dir=data_dir, warehouse=warehouse, parent_model=parent,
                   collections=collections, server=server, event_models=event_models, syncs=syncs, ops=ops,
                   cluster=cluster, **storage, **realtime, **delivery)


# -- [warehouse] ------------------------------------------------------------------

def _warehouse(r: Reader, data: dict, base: Path) -> Warehouse:
    wh = r.table(data, "warehouse", ("type", "path", "dsn", "tables"))
    if "warehouse" not in data:
        r.problem("warehouse", MISSING, "is required (a [warehouse] table with type = duckdb, files or postgres)")
    kind = r.string(wh, "type", "warehouse.type", required=isinstance(data.get("warehouse"), dict))
    if kind is not None and kind not in ("duckdb", "files", "postgres"):
        r.problem("warehouse.type", kind, "must be one of duckdb, files, postgres")
    elif kind == "duckdb":
        p = r.string(wh, "path", "warehouse.path")
        if p is not None:
            full = (base / p).resolve()
            if not full.is_file():
                r.problem("warehouse.path", p, f"no such DuckDB file ({full})")
            return Warehouse(kind="duckdb", path=full)
    elif kind == "postgres":
        return Warehouse(kind="postgres", dsn=r.string(wh, "dsn", "warehouse.dsn"))
    elif kind == "files":
        return Warehouse(kind="files", tables=_files_tables(r, wh, base))
    return Warehouse(kind=kind or "duckdb")


def _files_tables(r: Reader, wh: dict, base: Path) -> tuple[tuple[str, str], ...]:
    """[warehouse] tables: view name = a file or glob of Parquet or CSV, relative to the project file."""
    tables = wh.get("tables", MISSING)
    if tables is MISSING or not isinstance(tables, dict) or not tables:
        r.problem("warehouse.tables", tables, "must be a table of view name = \"file.parquet\" or \"data/*.csv\"")
        return ()
    entries: list[tuple[str, str]] = []
    for name, pattern in tables.items():
        key = f"warehouse.tables.{name}"
        if not NAME_RE.match(name):
            r.problem(key, MISSING, "the view name must be letters, digits and _")
        elif not isinstance(pattern, str) or not pattern.endswith((".parquet", ".csv", ".csv.gz", ".tsv")):
            r.problem(key, pattern, "must be a path or glob ending in .parquet, .csv, .csv.gz or .tsv")
        else:
            full = str((base / pattern))
            if not glob.glob(full, recursive=True):
                r.problem(key, pattern, "matches no file")
            entries.append((name, full))
    return tuple(entries)


# -- [parent_model] and [collections.NAME] ---------------------------------------------

def _parent_model(r: Reader, data: dict) -> ParentModel:
    pm = r.table(data, "parent_model", ("name", "query", "primary_key", "attributes"))
    present = "parent_model" in data
    if not present:
        r.problem("parent_model", MISSING, "is required (one row per person: query, primary_key, attributes)")
    name = r.string(pm, "name", "parent_model.name", required=False, default="people") or "people"
    query = r.string(pm, "query", "parent_model.query", required=present) or ""
    pk = r.string(pm, "primary_key", "parent_model.primary_key", required=present) or ""
    attrs: list[Attribute] = []
    raw_attrs = pm.get("attributes", {})
    if not isinstance(raw_attrs, dict):
        r.problem("parent_model.attributes", raw_attrs, 'must be a table of name = "type"')
        raw_attrs = {}
    for aname, tname in raw_attrs.items():
        try:
            attrs.append(Attribute(aname, ValueType.parse(tname)))
        except (KeyError, AttributeError):
            r.problem(f"parent_model.attributes.{aname}", tname, "must be one of " + ", ".join(TYPE_NAMES))
    return ParentModel(name=name, query=query, primary_key=pk, attributes=tuple(attrs))


def _collections(r: Reader, data: dict, parent: ParentModel) -> tuple[Collection, ...]:
    """[collections.NAME] tables; none serves the parent model under its own name."""
    pk = parent.primary_key
    colls: list[Collection] = []
    raw_colls = data.get("collections", {})
    if not isinstance(raw_colls, dict):
        r.problem("collections", raw_colls, "must be a table of [collections.NAME] tables")
        raw_colls = {}
    for name, spec in raw_colls.items():
        key = f"collections.{name}"
        if not NAME_RE.match(name):
            r.problem(key, MISSING, "the collection name must start with a letter and hold only letters, digits, _ and -")
            continue
        if not isinstance(spec, dict):
            r.problem(key, spec, "must be a table (empty serves the parent model)")
            continue
        r.unknown_keys(spec, ("query", "key"), key + ".")
        cq = r.string(spec, "query", key + ".query", required=False)
        if cq is None:
            ckey = r.string(spec, "key", key + ".key", required=False, default=pk) or pk
            if ckey != pk:
                r.problem(key + ".key", ckey,
                          f"a collection without a query serves the parent model, keyed by its primary key {pk!r}")
        else:
            ckey = r.string(spec, "key", key + ".key") or ""
        colls.append(Collection(name=name, key=ckey, query=cq))
    if not colls and "parent_model" in data:
        colls.append(Collection(name=parent.name, key=pk))
    return tuple(colls)


# -- [server] and [storage] ----------------------------------------------------------

def _server(r: Reader, srv: dict) -> ServerSettings:
    host = r.string(srv, "host", "server.host", required=False, default="127.0.0.1") or "127.0.0.1"
    port = r.integer(srv, "server.port", DEFAULT_PORT, 0, 65535)
    workers = r.integer(srv, "server.workers", 1, 1, 256)
    interval = r.duration(srv, "server.sync_interval", None) or None  # 0: only at start
    return ServerSettings(host=host, port=port, workers=workers, sync_interval=interval)


def _storage(r: Reader, st: dict) -> dict:
    """Project fields map_size (bytes) and sync_batch_rows."""
    map_gb = st.get("map_size_gb", DEFAULT_MAP_SIZE >> 30)
    if not isinstance(map_gb, (int, float)) or isinstance(map_gb, bool) or not 0.01 <= map_gb <= 1 << 20:
        r.problem("storage.map_size_gb", map_gb, "must be a number of GiB between 0.01 and 1048576")
        map_gb = DEFAULT_MAP_SIZE >> 30
    batch_rows = r.integer(st, "storage.sync_batch_rows", _DEFAULT_BATCH_ROWS, 100, 10_000_000)
    return {"map_size": int(map_gb * (1 << 30)), "sync_batch_rows": batch_rows}
