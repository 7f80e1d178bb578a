"""Realtime syncs: which audiences' changes go where, with which person fields.

One validation path for both ways a sync is declared: the API (SyncService,
from the protobuf message) and the project file (``[[syncs]]``) hand this
module the same plain dict, and get a SyncSpec or an InvalidRequest naming
each bad field by its path.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

from .changes import MembershipChange
from .errors import FieldViolation, InvalidRequest

SYNC_ID = re.compile(r"^[a-z0-9_-]{1,63}$")
DEFAULT_BATCH = 100
MAX_BATCH = 1000
DEFAULT_ATTEMPTS = 10
MAX_ATTEMPTS = 1000
MAX_DELAY = 60.0


@dataclass(frozen=True)
class Webhook:
    url: str
    secret: str
    max_batch_size: int = DEFAULT_BATCH
    max_delay: float = 0.0  # seconds a change may wait for its batch to fill
    max_attempts: int = DEFAULT_ATTEMPTS
    kind = "webhook"


@dataclass(frozen=True)
class Nats:
    url: str
    subject: str
    max_attempts: int = DEFAULT_ATTEMPTS
    max_batch_size: int = DEFAULT_BATCH
    max_delay: float = 0.0
    kind = "nats"


@dataclass(frozen=True)
class SyncSpec:
    id: str
    audience_ids: tuple[str, ...]
    fields: tuple[str, ...]
    destination: Webhook | Nats
    managed_by_project: bool = False

    def to_json(self) -> dict:
        return {"id": self.id, "audience_ids": list(self.audience_ids), "fields": list(self.fields),
                self.destination.kind: asdict(self.destination), "managed_by_project": self.managed_by_project}

    @classmethod
    def from_json(cls, d: dict) -> "SyncSpec":
        dest = Webhook(**d["webhook"]) if "webhook" in d else Nats(**d["nats"])
        return cls(d["id"], tuple(d["audience_ids"]), tuple(d["fields"]), dest, d.get("managed_by_project", False))


@dataclass
class _Check:
    path: str
    violations: list[FieldViolation] = field(default_factory=list)

    def bad(self, name: str, description: str) -> None:
        self.violations.append(FieldViolation(f"{self.path}.{name}", description))

    def url(self, d: dict, schemes: tuple[str, ...]) -> str:
        url = d.get("url") or ""
        parts = urlsplit(url)
        if parts.scheme not in schemes or not parts.hostname:
            self.bad("url", f"must be a URL with a host, starting {' or '.join(s + '://' for s in schemes)}")
        return url

    def integer(self, d: dict, name: str, default: int, lo: int, hi: int) -> int:
        value = d.get(name) or default
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            self.bad(name, f"must be an integer from {lo} to {hi}")
            return default
        return value


def check_sync_id(sync_id: str, path: str = "sync.id") -> None:
    if not SYNC_ID.match(sync_id or ""):
        raise InvalidRequest(f"invalid sync id {sync_id!r}",
                             violations=[FieldViolation(path, "must match [a-z0-9_-]{1,63}")])


def parse_sync(d: dict, *, audiences: set[str] | None, fields: dict[str, set[str]] | None,
               parent: str, path: str = "sync", managed_by_project: bool = False) -> SyncSpec:
    """A SyncSpec from its dict form; raises InvalidRequest with every bad field.

    ``audiences``: the audience ids that exist (None: not checked).
    ``fields``: each collection's field names (None: not checked); a field is
    an attribute of the ``parent`` collection, or ``collection.field``.
    """
    c = _Check(path)
    sync_id = d.get("id") or ""
    if not SYNC_ID.match(sync_id):
        c.bad("id", "must match [a-z0-9_-]{1,63}")
    audience_ids = tuple(d.get("audience_ids") or ())
    if not audience_ids:
        c.bad("audience_ids", "name at least one audience")
    for i, aid in enumerate(audience_ids):
        if audiences is not None and aid not in audiences:
            c.bad(f"audience_ids[{i}]", f"no audience {aid!r}")
    if len(set(audience_ids)) != len(audience_ids):
        c.bad("audience_ids", "names an audience twice")
    names = tuple(d.get("fields") or ())
    for i, name in enumerate(names):
        collection, _, column = name.rpartition(".")
        collection = collection or parent
        if fields is None:
            continue
        if collection not in fields:
            c.bad(f"fields[{i}]", f"{name!r}: no collection {collection!r}")
        elif column not in fields[collection]:
            c.bad(f"fields[{i}]", f"{name!r}: collection {collection!r} has no field {column!r}")
    dest = None
    kinds = [k for k in ("webhook", "nats") if d.get(k) is not None]
    if len(kinds) != 1:
        c.bad("destination", "set exactly one of webhook or nats")
    elif kinds == ["webhook"]:
        w, wc = d["webhook"], _Check(f"{path}.webhook", c.violations)
        url = wc.url(w, ("http", "https"))
        secret = w.get("secret") or ""
        if len(secret) < 16:
            wc.bad("secret", "must be at least 16 characters (it signs every request)")
        delay = w.get("max_delay") or 0.0
        if not isinstance(delay, (int, float)) or isinstance(delay, bool) or not 0 <= delay <= MAX_DELAY:
            wc.bad("max_delay", f"must be from 0 to {MAX_DELAY:g} seconds")
            delay = 0.0
        dest = Webhook(url, secret, wc.integer(w, "max_batch_size", DEFAULT_BATCH, 1, MAX_BATCH), float(delay),
                       wc.integer(w, "max_attempts", DEFAULT_ATTEMPTS, 1, MAX_ATTEMPTS))
    else:
        n, nc = d["nats"], _Check(f"{path}.nats", c.violations)
        url = nc.url(n, ("nats", "tls"))
        subject = n.get("subject") or ""
        if not subject or any(ch in subject for ch in " \t\r\n*>") or ".." in subject or subject.startswith(".") \
                or subject.endswith("."):
            nc.bad("subject", "must be a NATS subject without wildcards, e.g. qualify.{audience}")
        dest = Nats(url, subject, nc.integer(n, "max_attempts", DEFAULT_ATTEMPTS, 1, MAX_ATTEMPTS))
    if c.violations:
        raise InvalidRequest(f"invalid sync {sync_id!r}: {c.violations[0].field} {c.violations[0].description}",
                             violations=c.violations)
    return SyncSpec(sync_id, audience_ids, names, dest, managed_by_project)


@dataclass
class SyncState:
    """A sync's progress, persisted with its cursor (the last sequence it is done with)."""

    cursor: int = 0
    delivered: int = 0
    retries: int = 0
    dead_lettered: int = 0
    last_error: str = ""
    last_error_us: int = 0


@dataclass(frozen=True)
class DeadLetter:
    """A change that used up its attempts, kept until replayed."""

    change: MembershipChange
    attempts: int
    error: str
    dead_us: int
