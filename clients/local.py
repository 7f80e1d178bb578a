"""LocalReader: a server's records and memberships read in the caller's own process, with no RPC.

A service on the same machine as a Qualify server (a checkout service, an
edge worker, a recommender in the same pod) opens the server's LMDB
environment read-only and reads it directly: a ``get`` is one read
transaction, two B-tree lookups and a decode of the stored wire form in
Cython, in microseconds. Answers are the ones ``PersonalizeService.Get``
gives, as the same ``Record`` type the RPC clients return.

>>> from qualify.clients import LocalReader
>>> with LocalReader("/var/lib/qualify") as reader:           # the server's --data-dir
...     record = reader.get("user-42", fields=["plan"])        # None when there is no such key
...     reader.is_member("user-42", "high_value")
...     with reader.snapshot():                                # several reads, one MVCC snapshot
...         a, b = reader.get("user-1"), reader.get("user-2")

Read-your-writes: pass the ``consistency_token`` of an acknowledgement as
``min_token`` and the read waits (at most ``max_wait`` seconds) until this
process sees that event log position, or raises NotYetConsistentError.

Access control is the file system: the reader needs read permission on the
data directory's ``lmdb/data.mdb`` and read-write on ``lmdb/lock.mdb`` (its
reader slot lives there); API keys and scopes do not apply. What opening,
re-opening and the layout check guarantee is in qualify.server.storage.local.

This module imports neither grpc nor protobuf.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from os import PathLike

from qualify.server.domain.consistency import DEFAULT_MAX_WAIT, decode_token
from qualify.server.domain.errors import InvalidRequest
from qualify.server.storage.local import LayoutMismatch, LocalStore, StaleStore, store_path
from qualify.server.wire import decode_fields, decode_memberships

from ._values import BatchResult, MembersPage, Membership, Record

MAX_KEY_BYTES = 511  # LMDB's key size limit, as PersonalizeService checks it
MAX_BATCH_KEYS = 1000
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class LocalReaderError(Exception):
    """A read the local reader refused; ``reason`` is the qualify.v1.ErrorReason name Get would give."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.message = message
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class StaleReaderError(LocalReaderError):
    """The environment is gone or not readable (data directory removed, reader closed, server never started)."""

    def __init__(self, message: str):
        super().__init__(message, "STORAGE_UNAVAILABLE")


class LayoutMismatchError(LocalReaderError):
    """The server wrote another record layout than this qualify package reads."""

    def __init__(self, message: str):
        super().__init__(message, "LAYOUT_MISMATCH")


class NotYetConsistentError(LocalReaderError):
    """``min_token``'s position was not visible within ``max_wait``; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message, "NOT_YET_CONSISTENT")
        self.retry_after = retry_after


class LocalReader:
    """Reads of one server's data directory; thread-safe, one per process (re-opened after a fork)."""

    def __init__(self, data_dir: str | PathLike, *, max_spare_txns: int = 8, max_wait: float = DEFAULT_MAX_WAIT,
                 recheck_interval: float = 0.05):
        """``data_dir``: the server's data directory (or its ``lmdb`` folder).

        ``max_spare_txns``: finished read transactions kept for reuse; size it to
        the threads that read at once. ``max_wait``: the default bound of a
        ``min_token`` wait. ``recheck_interval``: how often (seconds) to look
        whether the data file was replaced.
        """
        self.max_wait = max_wait
        self._local = threading.local()
        self._masks: dict = {}
        self._masks_generation = -1
        try:
            self._store = LocalStore(store_path(data_dir), max_spare_txns=max_spare_txns,
                                     recheck_interval=recheck_interval)
        except StaleStore as err:
            raise StaleReaderError(str(err)) from None

    # -- snapshots -------------------------------------------------------------------------

    def _begin(self):
        try:
            return self._store.begin()
        except StaleStore as err:
            raise StaleReaderError(str(err)) from None
        except LayoutMismatch as err:
            raise LayoutMismatchError(str(err)) from None

    @contextmanager
    def _txn(self):
        held = getattr(self._local, "snap", None)
        if held is not None:
            yield held
            return
        txn, catalog = self._begin()
        try:
            yield txn, catalog
        finally:
            txn.abort()

    @contextmanager
    def snapshot(self, *, min_token: bytes | None = None, max_wait: float | None = None) -> Iterator[LocalReader]:
        """Every read in the ``with`` block (on this thread) sees one MVCC snapshot.

        A read inside it given a ``min_token`` the snapshot does not cover
        raises NotYetConsistentError at once: a snapshot cannot move. Give the
        token here instead to wait before the snapshot is taken.
        """
        if getattr(self._local, "snap", None) is not None:
            raise RuntimeError("snapshots do not nest")
        if min_token:
            self.wait_for(min_token, max_wait)
        txn, catalog = self._begin()
        self._local.snap = (txn, catalog)
        try:
            yield self
        finally:
            self._local.snap = None
            txn.abort()

    def position(self) -> int:
        """The event log position this process sees now (what ``min_token`` is compared with)."""
        with self._txn() as (txn, _):
            return self._store.position(txn)

    def wait_for(self, min_token: bytes, max_wait: float | None = None) -> None:
        """Returns once this process sees ``min_token``'s position; NotYetConsistentError after ``max_wait``."""
        try:
            want = decode_token(bytes(min_token))
        except InvalidRequest as err:
            raise LocalReaderError(str(err), err.reason) from None
        if not want:
            return
        if getattr(self._local, "snap", None) is not None:
            if self.position() < want:
                raise NotYetConsistentError("the open snapshot is older than min_token; take a new snapshot", 0.001)
            return
        budget = self.max_wait if max_wait is None else max_wait
        deadline = time.monotonic() + budget
        pause = 20e-6
        # Polling, not a notification: the writer commits, then acknowledges,
        # so a token a caller holds is almost always visible at the first
        # look; waiting is for tokens carried to another host or process
        # faster than the commit reached this one, and a look costs ~1 µs.
        while self.position() < want:
            if time.monotonic() >= deadline:
                raise NotYetConsistentError(f"the event log position of min_token was not visible within {budget:g}s",
                                            0.05)
            time.sleep(pause)
            pause = min(pause * 2, 0.001)

    # -- reads ------------------------------------------------------------------------------

    def _collection(self, catalog, name: str):
        coll = catalog.collections.get(name)
        if coll is not None:
            return coll
        if catalog.generation == 0:
            raise LocalReaderError("the first warehouse sync has not landed yet", "NOT_READY")
        known = ", ".join(sorted(catalog.collections)) or "none"
        raise LocalReaderError(f"unknown collection {name!r}; collections: {known}", "UNKNOWN_COLLECTION")

    def _mask(self, catalog, coll, fields) -> tuple[int, ...] | None:
        if fields is None:
            return None
        if isinstance(fields, (str, bytes)):
            raise TypeError(f"fields must be a sequence of strings, not {type(fields).__name__}")
        paths = tuple(fields)
        if self._masks_generation != catalog.generation:
            self._masks, self._masks_generation = {}, catalog.generation
        hit = self._masks.get((coll.name, paths))
        if hit is None:
            bad = [p for p in paths if p not in coll.index]
            if bad:
                raise LocalReaderError(f"collection {coll.name!r} has no field {bad[0]!r}; fields: "
                                       f"{', '.join(coll.columns)}", "UNKNOWN_FIELD")
            hit = tuple(coll.index[p] for p in paths)
            if len(self._masks) < 1024:
                self._masks[(coll.name, paths)] = hit
        return hit

    def _record(self, txn, catalog, coll, key: str, raw: bytes, mask) -> Record | None:
        stored = txn.get(raw, db=coll.db)
        if stored is None:
            return None
        members = []
        if coll.is_parent:
            bits = self._store.membership(txn, raw)
            if bits is not None:
                members = [Membership(aid, _EPOCH + timedelta(microseconds=us))
                           for aid, us in decode_memberships(bits, catalog.audience_ids)]
        return Record(coll.name, key, decode_fields(stored, mask), members)

    def get(self, key: str, collection: str = "customers", fields: Iterable[str] | None = None, *,
            min_token: bytes | None = None, max_wait: float | None = None) -> Record | None:
        """The key's record with the person's memberships, as Get answers it; None when there is none."""
        raw = _check_key(key, "key")
        if min_token:
            self.wait_for(min_token, max_wait)
        # The hot path: no context manager (a generator-based one costs ~1 µs of a ~6 µs call).
        held = getattr(self._local, "snap", None)
        txn, catalog = held if held is not None else self._begin()
        try:
            coll = catalog.collections.get(collection) or self._collection(catalog, collection)
            return self._record(txn, catalog, coll, key, raw, None if fields is None else
                                self._mask(catalog, coll, fields))
        finally:
            if held is None:
                txn.abort()

    def batch_get(self, keys: Iterable[str], collection: str = "customers", fields: Iterable[str] | None = None, *,
                  min_token: bytes | None = None, max_wait: float | None = None) -> BatchResult:
        """The records found, in request order, and the keys with none: BatchGet's answer, from one snapshot."""
        if isinstance(keys, (str, bytes)):
            raise TypeError(f"keys must be a sequence of strings, not {type(keys).__name__}")
        keys = list(keys)
        if len(keys) > MAX_BATCH_KEYS:
            raise LocalReaderError(f"{len(keys)} keys in one batch_get; the limit is {MAX_BATCH_KEYS}",
                                   "BATCH_TOO_LARGE")
        raws = [_check_key(k, f"keys[{i}]") for i, k in enumerate(keys)]
        if min_token:
            self.wait_for(min_token, max_wait)
        found, missing = [], []
        with self._txn() as (txn, catalog):
            coll = self._collection(catalog, collection)
            mask = self._mask(catalog, coll, fields)
            for key, raw in zip(keys, raws):
                record = self._record(txn, catalog, coll, key, raw, mask)
                if record is None:
                    missing.append(key)
                else:
                    found.append(record)
        return BatchResult(found, missing)

    def _audience(self, catalog, audience_id: str) -> None:
        if not audience_id or audience_id not in catalog.audience_ids:
            raise LocalReaderError(f"no audience {audience_id!r}", "AUDIENCE_NOT_FOUND")

    def is_member(self, key: str, audience_id: str, *, min_token: bytes | None = None,
                  max_wait: float | None = None) -> bool:
        """Whether the person is in the audience now (AUDIENCE_NOT_FOUND for an audience that does not exist)."""
        raw = _check_key(key, "person_key")
        if min_token:
            self.wait_for(min_token, max_wait)
        with self._txn() as (txn, catalog):
            self._audience(catalog, audience_id)
            return self._store.is_indexed(txn, audience_id, raw)

    def members_of(self, audience_id: str, *, page_size: int = 0, page_token: str = "") -> MembersPage:
        """A page of the audience's member keys in key order, as ListMembers pages (0: 1,000 a page)."""
        if page_size < 0:
            raise LocalReaderError("page_size must not be negative", "INVALID_REQUEST")
        with self._txn() as (txn, catalog):
            self._audience(catalog, audience_id)
            keys, token = self._store.member_keys(txn, audience_id, page_token, min(page_size or 1000, 10_000))
        return MembersPage(keys, token)

    # -- life cycle ---------------------------------------------------------------------------

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> LocalReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_key(key: str, field: str) -> bytes:
    if not isinstance(key, str):
        raise TypeError(f"{field} must be a str, not {type(key).__name__}")
    raw = key.encode()
    if not raw or len(raw) > MAX_KEY_BYTES:
        raise LocalReaderError(f"{field} must be a non-empty key of at most {MAX_KEY_BYTES} bytes of UTF-8",
                               "INVALID_REQUEST")
    return raw
