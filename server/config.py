"""The project file, ``qualify.toml``, read into frozen dataclasses.

Every problem is reported at once, each naming its key, the value found and
what is wrong, so that ``qualify check`` can list them all in one run.
"""

from __future__ import annotations

import difflib
import glob
import math
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from qualify.evaluator.program import Op

from .domain.conditions import Predicate, parse_timestamp
from .domain.errors import InvalidRequest
from .domain.syncs import SyncSpec, parse_sync
from .domain.events import EVENT_TYPE_NAMES, EventModel, EventType, Identifier
from .domain.schema import TYPE_NAMES, ValueType
from .operations import SECTIONS as OPERATION_SECTIONS, Operations, parse_operations

DEFAULT_PORT = 50051
DEFAULT_MAP_SIZE = 64 << 30  # LMDB reserves address space, not disk
DEFAULT_SESSION_TIMEOUT = 30 * 60.0
DEFAULT_WATCH_BUFFER = 10_000
DEFAULT_WATCH_MAX_LAG = 1_000_000
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
    event_models: tuple[EventModel, ...] = ()  # [event_models.NAME], in file order
    session_timeout: float = DEFAULT_SESSION_TIMEOUT  # [realtime] session_timeout, seconds
    watch_buffer: int = DEFAULT_WATCH_BUFFER  # [realtime] watch_buffer: live changes held per watch
    watch_max_lag: int = DEFAULT_WATCH_MAX_LAG  # [realtime] watch_max_lag: changes behind before a watch is ended
    syncs: tuple[SyncSpec, ...] = ()  # [[syncs]]
    retry_initial: float = 0.2  # [delivery] retry_initial: first backoff, seconds
    retry_max: float = 30.0  # [delivery] retry_max: longest backoff, seconds
    ops: Operations = field(default_factory=Operations)  # [auth] [tls] [limits] [metrics]

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
    r.unknown_keys(data, ("data_dir", "warehouse", "parent_model", "collections", "server", "storage",
                          "event_models", "realtime", "syncs", "delivery", *OPERATION_SECTIONS), "")

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

    event_models = _event_models(r, data.get("event_models", {}))
    rt = r.table(data, "realtime", ("session_timeout", "watch_buffer", "watch_max_lag"))
    watch_buffer = _int_setting(r, rt, "realtime.watch_buffer", DEFAULT_WATCH_BUFFER, 1, 10_000_000)
    watch_max_lag = _int_setting(r, rt, "realtime.watch_max_lag", DEFAULT_WATCH_MAX_LAG, 1, 10**12)
    session_timeout = DEFAULT_SESSION_TIMEOUT
    if "session_timeout" in rt:
        try:
            session_timeout = parse_duration(rt["session_timeout"])
            if session_timeout <= 0:
                raise ValueError("must be longer than 0")
        except ValueError as exc:
            r.problem("realtime.session_timeout", rt["session_timeout"], str(exc))
            session_timeout = DEFAULT_SESSION_TIMEOUT

    syncs = _syncs(r, data.get("syncs", []), parent.name)
    dl = r.table(data, "delivery", ("retry_initial", "retry_max"))
    retry = {}
    for key, default in (("retry_initial", 0.2), ("retry_max", 30.0)):
        try:
            retry[key] = parse_duration(dl.get(key, default))
            if retry[key] <= 0:
                raise ValueError("must be longer than 0")
        except ValueError as exc:
            r.problem(f"delivery.{key}", dl[key], str(exc))
            retry[key] = default

    ops = parse_operations({name: r.table(data, name, keys) for name, keys in OPERATION_SECTIONS.items()},
                           base, r.problem, _MISSING)

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
        event_models=event_models,
        session_timeout=session_timeout,
        watch_buffer=watch_buffer,
        watch_max_lag=watch_max_lag,
        syncs=syncs,
        retry_initial=retry["retry_initial"],
        retry_max=max(retry["retry_max"], retry["retry_initial"]),
        ops=ops,
    )


# -- [[syncs]] ------------------------------------------------------------------------

_SYNC_KEYS = ("id", "audiences", "fields", "webhook", "nats")
_WEBHOOK_KEYS = ("url", "secret", "secret_env", "max_batch_size", "max_delay", "max_attempts")
_NATS_KEYS = ("url", "subject", "max_attempts")


def _syncs(r: _Reader, raw: Any, parent: str) -> tuple[SyncSpec, ...]:
    """[[syncs]] tables, checked by the same rules as SyncService.CreateSync."""
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        r.problem("syncs", raw, "must be an array of tables ([[syncs]])")
        return ()
    out, seen = [], set()
    for i, t in enumerate(raw):
        at = f"syncs[{i}]"
        r.unknown_keys(t, _SYNC_KEYS, at + ".")
        d = {"id": t.get("id"), "audience_ids": t.get("audiences"), "fields": t.get("fields")}
        wrong = [name for name in ("audiences", "fields")
                 if name in t and (not isinstance(t[name], list) or not all(isinstance(x, str) for x in t[name]))]
        for name in wrong:
            r.problem(f"{at}.{name}", t[name], "must be a list of strings")
        if wrong:
            continue
        if isinstance(t.get("webhook"), dict):
            w = dict(t["webhook"])
            r.unknown_keys(w, _WEBHOOK_KEYS, at + ".webhook.")
            if "secret_env" in w:
                name = w.pop("secret_env")
                w["secret"] = os.environ.get(str(name), "")
                if not w["secret"]:
                    r.problem(f"{at}.webhook.secret_env", name, "names an environment variable that is not set")
                    continue
            if "max_delay" in w:
                try:
                    w["max_delay"] = parse_duration(w["max_delay"])
                except ValueError as exc:
                    r.problem(f"{at}.webhook.max_delay", w["max_delay"], str(exc))
                    continue
            d["webhook"] = w
        if isinstance(t.get("nats"), dict):
            r.unknown_keys(t["nats"], _NATS_KEYS, at + ".nats.")
            d["nats"] = dict(t["nats"])
        try:
            spec = parse_sync(d, audiences=None, fields=None, parent=parent, path=at, managed_by_project=True)
        except InvalidRequest as exc:
            for v in exc.violations:
                key = v.field.replace(f"{at}.audience_ids", f"{at}.audiences")
                r.problem(key, _MISSING, v.description)
            continue
        if spec.id in seen:
            r.problem(f"{at}.id", spec.id, "is used by another [[syncs]] table")
        seen.add(spec.id)
        out.append(spec)
    return tuple(out)


def _int_setting(r: _Reader, table: dict, path: str, default: int, lo: int, hi: int) -> int:
    value = table.get(path.rsplit(".", 1)[1], default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        r.problem(path, value, f"must be an integer from {lo} to {hi}")
        return default
    return value


# -- [event_models.NAME] ---------------------------------------------------------

_OPERATORS = {o.name.lower(): o for o in Op}
_NO_VALUE_OPS = (Op.IS_SET, Op.IS_NOT_SET)
_LIST_OPS = (Op.IN, Op.NOT_IN, Op.BETWEEN)
_ORDERING_OPS = (Op.LT, Op.LE, Op.GT, Op.GE, Op.BETWEEN)
_NUMERIC = (ValueType.INT, ValueType.FLOAT)


def _literal(r: _Reader, key: str, value: Any, vtype: ValueType) -> tuple[bool, Any]:
    """A filter value from TOML as the property's type: (ok, value)."""
    if vtype is ValueType.STRING and isinstance(value, str):
        return True, value
    if vtype in _NUMERIC and isinstance(value, (int, float)) and not isinstance(value, bool):
        # Numbers of either kind compare numerically, as in audience conditions.
        if isinstance(value, float) and not math.isfinite(value):
            r.problem(key, value, "must be a finite number")
            return False, None
        return True, value
    if vtype is ValueType.BOOL and isinstance(value, bool):
        return True, value
    if vtype is ValueType.TIMESTAMP:
        # TOML has native date-times (a naive one is taken as UTC, a date as
        # midnight UTC); an RFC 3339 string works too.
        if isinstance(value, datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=timezone.utc)
            return True, parse_timestamp(value.isoformat())
        if isinstance(value, date):
            return True, parse_timestamp(value.isoformat() + "T00:00:00+00:00")
        if isinstance(value, str):
            try:
                return True, parse_timestamp(value)
            except ValueError:
                pass
    want = {ValueType.STRING: "a string", ValueType.INT: "a number", ValueType.FLOAT: "a number",
            ValueType.BOOL: "true or false", ValueType.TIMESTAMP: "a date-time such as 2024-05-01T00:00:00Z"}[vtype]
    r.problem(key, value, f"must be {want} (the property is {vtype.name.lower()})")
    return False, None


def _filter(r: _Reader, key: str, spec: Any, props: dict[str, ValueType]) -> Predicate | None:
    if not isinstance(spec, dict):
        r.problem(key, spec, 'must be a table such as { property = "path", operator = "eq", value = "/pricing" }')
        return None
    r.unknown_keys(spec, ("property", "operator", "value", "values"), key + ".")
    name = r.string(spec, "property", key + ".property")
    op_name = r.string(spec, "operator", key + ".operator")
    if name is None or op_name is None:
        return None
    vtype = props.get(name)
    if vtype is None:
        known = ", ".join(props) or "none"
        r.problem(key + ".property", name, f"is not a declared property of this model (declared: {known})")
        return None
    op = _OPERATORS.get(op_name.lower().removeprefix("operator_"))
    if op is None:
        r.problem(key + ".operator", op_name, "must be one of " + ", ".join(_OPERATORS))
        return None
    if op in (Op.CONTAINS, Op.STARTS_WITH) and vtype is not ValueType.STRING:
        r.problem(key + ".operator", op_name, f"applies to strings; {name!r} is {vtype.name.lower()}")
        return None
    if op in _ORDERING_OPS and vtype is ValueType.BOOL:
        r.problem(key + ".operator", op_name, f"does not apply to booleans; {name!r} is bool")
        return None
    has_value, has_values = "value" in spec, "values" in spec
    if op in _NO_VALUE_OPS:
        for k in ("value", "values"):
            if k in spec:
                r.problem(f"{key}.{k}", spec[k], f"{op.name.lower()} takes no value")
        return Predicate(name, op, ())
    if op in _LIST_OPS:
        if has_value:
            r.problem(key + ".value", spec["value"], f"{op.name.lower()} takes a list: use values = [...]")
            return None
        raw = spec.get("values", _MISSING)
        if raw is _MISSING or not isinstance(raw, list) or not raw:
            r.problem(key + ".values", raw, f"{op.name.lower()} needs a non-empty list of values")
            return None
        if op is Op.BETWEEN and len(raw) != 2:
            r.problem(key + ".values", raw, "between needs exactly two values: the lower and upper bounds")
            return None
        out = [_literal(r, f"{key}.values[{i}]", v, vtype) for i, v in enumerate(raw)]
        if not all(ok for ok, _ in out):
            return None
        return Predicate(name, op, tuple(v for _, v in out))
    if has_values:
        r.problem(key + ".values", spec["values"], f"{op.name.lower()} takes one value: use value = ...")
        return None
    if not has_value:
        r.problem(key + ".value", _MISSING, f"{op.name.lower()} needs a value")
        return None
    ok, v = _literal(r, key + ".value", spec["value"], vtype)
    return Predicate(name, op, (v,)) if ok else None


def _event_models(r: _Reader, raw: Any) -> tuple[EventModel, ...]:
    if not isinstance(raw, dict):
        r.problem("event_models", raw, "must be a table of [event_models.NAME] tables")
        return ()
    models: list[EventModel] = []
    for name, spec in raw.items():
        key = f"event_models.{name}"
        if not NAME_RE.match(name):
            r.problem(key, _MISSING, "the model name must start with a letter and hold only letters, digits, _ and -")
            continue
        if not isinstance(spec, dict):
            r.problem(key, spec, 'must be a table with at least type = "track" (or page, screen, identify, alias)')
            continue
        r.unknown_keys(spec, ("type", "event", "filters", "identifier", "properties"), key + ".")
        before = len(r.problems)
        tname = r.string(spec, "type", key + ".type")
        etype = None
        if tname is not None:
            try:
                etype = EventType.parse(tname)
            except KeyError:
                r.problem(key + ".type", tname, "must be one of " + ", ".join(EVENT_TYPE_NAMES))
        event_name = spec.get("event", "")
        if not isinstance(event_name, str):
            r.problem(key + ".event", event_name, "must be a string: the event name to match (absent matches any)")
            event_name = ""
        props: dict[str, ValueType] = {}
        raw_props = spec.get("properties", {})
        if not isinstance(raw_props, dict):
            r.problem(key + ".properties", raw_props, 'must be a table of name = "type"')
            raw_props = {}
        for pname, ptype in raw_props.items():
            pkey = f"{key}.properties.{pname}"
            if not pname:
                r.problem(pkey, _MISSING, "a property name must not be empty")
                continue
            try:
                props[pname] = ValueType.parse(ptype)
            except (KeyError, AttributeError):
                r.problem(pkey, ptype, "must be one of " + ", ".join(TYPE_NAMES))
        filters: list[Predicate] = []
        raw_filters = spec.get("filters", [])
        if not isinstance(raw_filters, list):
            r.problem(key + ".filters", raw_filters, "must be a list of tables")
            raw_filters = []
        for i, f in enumerate(raw_filters):
            p = _filter(r, f"{key}.filters[{i}]", f, props)
            if p is not None:
                filters.append(p)
        ident_raw = spec.get("identifier", "user_id")
        identifier, ident_prop = Identifier.USER_ID, ""
        if not isinstance(ident_raw, str):
            r.problem(key + ".identifier", ident_raw, 'must be "user_id", "anonymous_id" or "property:NAME"')
        elif ident_raw.startswith("property:"):
            identifier, ident_prop = Identifier.PROPERTY, ident_raw[len("property:"):]
            if props.get(ident_prop) not in (ValueType.STRING, ValueType.INT):
                r.problem(key + ".identifier", ident_raw,
                          f"the property {ident_prop!r} must be declared under [{key}.properties] "
                          "as string or int: it carries the person's user id")
        elif ident_raw in ("user_id", "anonymous_id"):
            identifier = Identifier(ident_raw)
        else:
            r.problem(key + ".identifier", ident_raw, 'must be "user_id", "anonymous_id" or "property:NAME"')
        if len(r.problems) > before or etype is None:
            continue
        models.append(EventModel(name=name, type=etype, event_name=event_name, filters=tuple(filters),
                                 properties=tuple(props.items()), identifier=identifier,
                                 identifier_property=ident_prop))
    # One event may match several models, and its properties are stored once:
    # a property two overlapping models declare must have one type (int and
    # float mix, as numbers compare numerically).
    for j, b in enumerate(models):
        for a in models[:j]:
            if a.type != b.type or (a.event_name and b.event_name and a.event_name != b.event_name):
                continue
            at = a.property_types()
            for pname, btype in b.properties:
                atype = at.get(pname)
                if atype is not None and atype != btype and not (atype in _NUMERIC and btype in _NUMERIC):
                    r.problem(f"event_models.{b.name}.properties.{pname}", btype.name.lower(),
                              f"event model {a.name!r} matches the same events and declares {pname!r} "
                              f"as {atype.name.lower()}")
    return tuple(models)
