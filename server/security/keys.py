"""API keys: stored hashed in one JSON file in the data directory, picked up without a restart.

A key is ``qk_`` followed by 43 characters of ``secrets.token_urlsafe(32)``
(256 random bits). The file keeps, per key, an id, a name, its scopes, when it
was created and revoked, and the SHA-256 of the key: never the key itself,
which ``qualify keys create`` prints once. A fast unsalted hash is enough here
because the keys are random, not chosen by people: there is no dictionary to
try, and 256 bits cannot be searched.

``keys.json`` is only ever replaced whole (write a temporary file, fsync,
rename), under an flock so two ``qualify keys`` commands cannot lose each
other's change. Every serving process stats it at most every
``CHECK_SECONDS`` and re-reads it when it changed (a rename always gives a new
inode), so a created or revoked key takes effect in every process within
that time, with no signal and no shared state beyond the file. A file that
fails to parse is logged and ignored: the keys already loaded stay in force.
Each load bumps ``KeyStore.generation``, so a long-lived stream re-checks its
key only when the number moved (transport/gate.py), not on every message.

Scopes: ``ingest`` (IngestService), ``personalize`` (PersonalizeService),
``audiences:read`` and ``audiences:write`` (AudienceService reads and
changes), ``syncs:admin`` (SyncService) and ``admin`` (everything, including
DiagnosticsService.GetServerInfo).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..domain.access import EVERYTHING, Access

log = logging.getLogger(__name__)

SCOPES = ("ingest", "personalize", "audiences:read", "audiences:write", "syncs:admin", "admin")
PREFIX = "qk_"
FILE_NAME = "keys.json"
CHECK_SECONDS = 0.25
MAX_NAME = 100


class KeyCommandError(ValueError):
    """A key command that cannot be done (unknown id, bad scope, bad name)."""


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    scopes: frozenset[str]
    created: str  # RFC 3339, UTC
    revoked: str | None  # RFC 3339, UTC; None while valid
    sha256: str  # hex digest of the key
    collections: frozenset[str] | None = None  # None: every collection (a publishable key names its few)
    fields: frozenset[str] | None = None  # None: every field

    @property
    def access(self) -> Access:
        """What this key may read, as the Personalize use case checks it."""
        if self.collections is None and self.fields is None:
            return EVERYTHING
        return Access(self.collections, self.fields, self.id)

    def allows(self, scope: str | None) -> bool:
        """Whether the key may call an RPC needing ``scope`` (None: any valid key)."""
        return scope is None or scope in self.scopes or "admin" in self.scopes

    def to_json(self) -> dict:
        out = {"id": self.id, "name": self.name, "scopes": sorted(self.scopes), "created": self.created,
               "revoked": self.revoked, "sha256": self.sha256}
        if self.collections is not None:
            out["collections"] = sorted(self.collections)
        if self.fields is not None:
            out["fields"] = sorted(self.fields)
        return out

    @classmethod
    def from_json(cls, raw: dict) -> "ApiKey":
        limit = lambda name: frozenset(map(str, raw[name])) if raw.get(name) is not None else None  # noqa: E731
        return cls(id=str(raw["id"]), name=str(raw.get("name", "")), scopes=frozenset(raw["scopes"]),
                   created=str(raw["created"]), revoked=raw.get("revoked"), sha256=str(raw["sha256"]),
                   collections=limit("collections"), fields=limit("fields"))


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def keys_path(data_dir: Path) -> Path:
    return Path(data_dir) / FILE_NAME


def parse_scopes(values: Iterable[str]) -> frozenset[str]:
    """Scopes from ``--scope`` arguments (repeated or comma-separated)."""
    scopes = frozenset(s.strip() for v in values for s in v.split(",") if s.strip())
    unknown = sorted(scopes - set(SCOPES))
    if unknown:
        raise KeyCommandError(f"unknown scope(s) {', '.join(unknown)}; the scopes are {', '.join(SCOPES)}")
    if not scopes:
        raise KeyCommandError(f"a key needs at least one scope: {', '.join(SCOPES)}")
    return scopes


def _names(values: Iterable[str] | None, what: str) -> frozenset[str] | None:
    """Names from ``--collection`` / ``--fields`` arguments (repeated or comma-separated); None: no limit."""
    if values is None:
        return None
    names = frozenset(s.strip() for v in values for s in v.split(",") if s.strip())
    if not names:
        raise KeyCommandError(f"a limited key needs at least one {what} name")
    return names


class KeyFile:
    """Reads and changes ``keys.json`` (the ``qualify keys`` commands)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> list[ApiKey]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        return [ApiKey.from_json(k) for k in raw["keys"]]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[ApiKey]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            keys = self.read()
            yield keys
            self._write(keys)

    def _write(self, keys: list[ApiKey]) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # hashes only, still nobody else's business
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": 1, "keys": [k.to_json() for k in keys]}, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def create(self, name: str, scopes: Iterable[str], collections: Iterable[str] | None = None,
               fields: Iterable[str] | None = None) -> tuple[ApiKey, str]:
        """A new key: (its record, the plain key, which is not stored anywhere).

        ``collections`` / ``fields`` (None: no limit) make a key that reads only those.
        """
        scopes = parse_scopes(scopes)
        collections, fields = _names(collections, "collection"), _names(fields, "field")
        if len(name) > MAX_NAME or any(not c.isprintable() for c in name):
            raise KeyCommandError(f"the name must be at most {MAX_NAME} printable characters")
        token = PREFIX + secrets.token_urlsafe(32)
        with self._locked() as keys:
            taken = {k.id for k in keys}
            key_id = "key_" + secrets.token_hex(4)
            while key_id in taken:
                key_id = "key_" + secrets.token_hex(4)
            key = ApiKey(id=key_id, name=name, scopes=scopes, created=_now(), revoked=None,
                         sha256=digest(token).hex(), collections=collections, fields=fields)
            keys.append(key)
        return key, token

    def revoke(self, key_id: str) -> ApiKey:
        with self._locked() as keys:
            for i, k in enumerate(keys):
                if k.id == key_id:
                    if k.revoked is None:
                        keys[i] = k = dataclasses.replace(k, revoked=_now())
                    return k
        raise KeyCommandError(f"no key with id {key_id!r} (see `qualify keys list`)")


class KeyStore:
    """The server's view of ``keys.json``: valid keys by hash, refreshed when the file changes."""

    def __init__(self, path: Path, check_seconds: float = CHECK_SECONDS, clock=time.monotonic):
        self.path = Path(path)
        self.check_seconds = check_seconds
        self.clock = clock
        self._by_digest: dict[bytes, ApiKey] = {}
        self._valid_ids: frozenset[str] = frozenset()
        self.generation = 0  # bumped whenever the loaded keys change
        self._signature: tuple | None = None
        self._next_check = 0.0
        self._refresh(clock())

    @property
    def count(self) -> int:
        return len(self._by_digest)

    def authenticate(self, token: str) -> ApiKey | None:
        """The valid (not revoked) key ``token`` is, or None."""
        now = self.clock()
        if now >= self._next_check:
            self._refresh(now)
        return self._by_digest.get(digest(token))

    def refresh(self) -> int:
        """Re-reads the file if it changed and the check is due; returns the generation."""
        now = self.clock()
        if now >= self._next_check:
            self._refresh(now)
        return self.generation

    def is_valid(self, key_id: str) -> bool:
        """Whether the key with this id is still loaded and not revoked."""
        return key_id in self._valid_ids

    def _refresh(self, now: float) -> None:
        self._next_check = now + self.check_seconds
        try:
            st = os.stat(self.path)
            signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            signature = None
        if signature == self._signature:
            return
        self._signature = signature
        try:
            keys = KeyFile(self.path).read()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("%s cannot be read (%s); the keys loaded before stay in force", self.path, exc)
            return
        self._by_digest = {bytes.fromhex(k.sha256): k for k in keys if k.revoked is None}
        self._valid_ids = frozenset(k.id for k in self._by_digest.values())
        self.generation += 1
        log.info("API keys loaded from %s: %d valid, %d revoked", self.path, len(self._by_digest),
                 len(keys) - len(self._by_digest))
