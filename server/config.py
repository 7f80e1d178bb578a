"""The project file, ``qualify.toml``, read into frozen dataclasses.

Every problem is reported at once, each naming its key, the value found and
what is wrong, so that ``qualify check`` can list them all in one run.
"""

from __future__ import annotations

import difflib
import glob
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .domain.schema import TYPE_NAMES, ValueType

DEFAULT_PORT = 50051
DEFAULT_MAP_SIZE = 64 << 30  # LMDB reserves address space, not disk
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,62}$")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a project file."""

    key: str
    value: Any
    message: str

    def __str__(self) -> str:
        shown = "" if self.value is _MISSING else f" = {self.value!r}"
        return f"{self.key}{shown}: {self.message}"


class ProjectError(Exception):
    """A project file that cannot be used; ``problems`` lists why."""

    def __init__(self, path: str, problems: list[Problem]):
        self.path = path
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{path}: {len(problems)} problem(s)\n{lines}")


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
    sync_batch_rows: int = 50_000

    def collection(self, name: str) -> Collection | None:
        for c in self.collections:
            if c.name == name:
                return c
        return None


_MISSING = object()
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: Any) -> float:
    """'15m', '30s', '1h', '500ms' or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as '15m' or a number of seconds")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION_RE.match(str(value))
        if not m:
            raise ValueError("must be a duration such as '15m', '30s', '1h' or a number of seconds")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not math.isfinite(seconds):
        raise ValueError("must be a finite duration")
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


class _Reader:
    """Walks the parsed TOML, collecting problems instead of stopping at the first."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def problem(self, key: str, value: Any, message: str) -> None:
        self.problems.append(Problem(key, value, message))

    def table(self, data: dict, key: str, allowed: tuple[str, ...], prefix: str = "") -> dict:
        value = data.get(key, _MISSING)
        path = prefix + key
        if value is _MISSING:
            return {}
        if not isinstance(value, dict):
            self.problem(path, value, "must be a table")
            return {}
        self.unknown_keys(value, allowed, path + ".")
        return value

    def unknown_keys(self, data: dict, allowed: tuple[str, ...], prefix: str) -> None:
        for k in data:
            if k not in allowed:
                hint = difflib.get_close_matches(k, allowed, n=1)
                more = f" (did you mean '{hint[0]}'?)" if hint else f" (known keys: {', '.join(allowed)})"
                self.problem(prefix + k, _MISSING, "unknown key" + more)

    def string(self, data: dict, key: str, path: str, required: bool = True, default: str | None = None) -> str | None:
        value = data.get(key, _MISSING)
        if value is _MISSING:
            if required:
                self.problem(path, _MISSING, "is required")
            return default
        if not isinstance(value, str) or not value.strip():
            self.problem(path, value, "must be a non-empty string")
            return default
        return value


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
        raise ProjectError(str(path), [Problem("(syntax)", _MISSING, f"not valid TOML: {exc}")]) from None
    return parse_project(data, base=path.parent.resolve(), path=path)


def parse_project(data: dict, base: Path, path: Path | None = None) -> Project:
    r = _Reader()
    r.unknown_keys(data, ("data_dir", "warehouse", "parent_model", "collections", "server", "storage"), "")

    data_dir = base / (r.string(data, "data_dir", "data_dir", required=False, default="qualify-data") or "qualify-data")

    # [warehouse]
    wh = r.table(data, "warehouse", ("type", "path", "dsn", "tables"))
    if "warehouse" not in data:
        r.problem("warehouse", _MISSING, "is required (a [warehouse] table with type = duckdb, files or postgres)")
    kind = r.string(wh, "type", "warehouse.type", required=isinstance(data.get("warehouse"), dict))
    warehouse = Warehouse(kind=kind or "duckdb")
    if kind is not None and kind not in ("duckdb", "files", "postgres"):
        r.problem("warehouse.type", kind, "must be one of duckdb, files, postgres")
    elif kind == "duckdb":
        p = r.string(wh, "path", "warehouse.path")
        if p is not None:
            full = (base / p).resolve()
            if not full.is_file():
                r.problem("warehouse.path", p, f"no such DuckDB file ({full})")
            warehouse = Warehouse(kind="duckdb", path=full)
    elif kind == "postgres":
        dsn = r.string(wh, "dsn", "warehouse.dsn")
        warehouse = Warehouse(kind="postgres", dsn=dsn)
    elif kind == "files":
        tables = wh.get("tables", _MISSING)
        entries: list[tuple[str, str]] = []
        if tables is _MISSING or not isinstance(tables, dict) or not tables:
            r.problem("warehouse.tables", tables,
                      "must be a table of view name = \"file.parquet\" or \"data/*.csv\"")
        else:
            for name, pattern in tables.items():
                key = f"warehouse.tables.{name}"
                if not NAME_RE.match(name):
                    r.problem(key, _MISSING, "the view name must be letters, digits and _")
                elif not isinstance(pattern, str) or not pattern.endswith((".parquet", ".csv", ".csv.gz", ".tsv")):
                    r.problem(key, pattern, "must be a path or glob ending in .parquet, .csv, .csv.gz or .tsv")
                else:
                    full = str((base / pattern))
                    if not glob.glob(full, recursive=True):
                        r.problem(key, pattern, "matches no file")
                    entries.append((name, full))
        warehouse = Warehouse(kind="files", tables=tuple(entries))

    # [parent_model]
    pm = r.table(data, "parent_model", ("name", "query", "primary_key", "attributes"))
    if "parent_model" not in data:
        r.problem("parent_model", _MISSING, "is required (one row per person: query, primary_key, attributes)")
    pm_name = r.string(pm, "name", "parent_model.name", required=False, default="people") or "people"
    query = r.string(pm, "query", "parent_model.query", required="parent_model" in data) or ""
    pk = r.string(pm, "primary_key", "parent_model.primary_key", required="parent_model" in data) or ""
    attrs: list[Attribute] = []
    raw_attrs = pm.get("attributes", {})
    if not isinstance(raw_attrs, dict):
        r.problem("parent_model.attributes", raw_attrs, 'must be a table of name = "type"')
        raw_attrs = {}
    for name, tname in raw_attrs.items():
        key = f"parent_model.attributes.{name}"
        try:
            attrs.append(Attribute(name, ValueType.parse(tname)))
        except (KeyError, AttributeError):
            r.problem(key, tname, "must be one of " + ", ".join(TYPE_NAMES))
    parent = ParentModel(name=pm_name, query=query, primary_key=pk, attributes=tuple(attrs))

    # [collections.NAME]
    colls: list[Collection] = []
    raw_colls = data.get("collections", {})
    if not isinstance(raw_colls, dict):
        r.problem("collections", raw_colls, "must be a table of [collections.NAME] tables")
        raw_colls = {}
    for name, spec in raw_colls.items():
        key = f"collections.{name}"
        if not NAME_RE.match(name):
            r.problem(key, _MISSING, "the collection name must start with a letter and hold only letters, digits, _ and -")
            continue
        if not isinstance(spec, dict):
            r.problem(key, spec, "must be a table (empty serves the parent model)")
            continue
        r.unknown_keys(spec, ("query", "key"), key + ".")
        cq = r.string(spec, "query", key + ".query", required=False)
        if cq is None:
            ckey = r.string(spec, "key", key + ".key", required=False, default=pk) or pk
            if ckey != pk:
                r.problem(key + ".key", ckey, f"a collection without a query serves the parent model, keyed by its primary key {pk!r}")
        else:
            ckey = r.string(spec, "key", key + ".key") or ""
        colls.append(Collection(name=name, key=ckey, query=cq))
    if not colls and "parent_model" in data:
        colls.append(Collection(name=pm_name, key=pk))

    # [server]
    srv = r.table(data, "server", ("host", "port", "workers", "sync_interval"))
    host = r.string(srv, "host", "server.host", required=False, default="127.0.0.1") or "127.0.0.1"
    port = srv.get("port", DEFAULT_PORT)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        r.problem("server.port", port, "must be an integer from 0 to 65535")
        port = DEFAULT_PORT
    workers = srv.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 256:
        r.problem("server.workers", workers, "must be an integer from 1 to 256")
        workers = 1
    interval = None
    if "sync_interval" in srv:
        try:
            interval = parse_duration(srv["sync_interval"]) or None
        except ValueError as exc:
            r.problem("server.sync_interval", srv["sync_interval"], str(exc))

    # [storage]
    st = r.table(data, "storage", ("map_size_gb", "sync_batch_rows"))
    map_gb = st.get("map_size_gb", DEFAULT_MAP_SIZE >> 30)
    if not isinstance(map_gb, (int, float)) or isinstance(map_gb, bool) or not 0.01 <= map_gb <= 1 << 20:
        r.problem("storage.map_size_gb", map_gb, "must be a number of GiB between 0.01 and 1048576")
        map_gb = DEFAULT_MAP_SIZE >> 30
    batch_rows = st.get("sync_batch_rows", 50_000)
    if not isinstance(batch_rows, int) or isinstance(batch_rows, bool) or not 100 <= batch_rows <= 10_000_000:
        r.problem("storage.sync_batch_rows", batch_rows, "must be an integer from 100 to 10000000")
        batch_rows = 50_000

    if r.problems:
        raise ProjectError(str(path or "qualify.toml"), r.problems)
    return Project(
        path=path,
        data_dir=data_dir,
        warehouse=warehouse,
        parent_model=parent,
        collections=tuple(colls),
        server=ServerSettings(host=host, port=port, workers=workers, sync_interval=interval),
        map_size=int(map_gb * (1 << 30)),
        sync_batch_rows=batch_rows,
    )
