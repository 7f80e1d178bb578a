"""The ports: what the domain and the services need from storage, as Protocols that storage implements.

Nothing here names LMDB. ``txn`` parameters are opaque handles that a port
hands out (through ``Jobs.submit``) and takes back; only storage looks
inside them. The composition root (app.py) is the one place that builds
the concrete adapters and passes them in.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from .changes import MembershipChange
from .events import MatchedEvent
from .schema import ValueType
from .syncs import DeadLetter, SyncSpec, SyncState


class Jobs(Protocol):
    """The single writer: runs ``fn(txn)`` in a write transaction of its own, in order with ingest."""

    def submit(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future: ...

    def after_commit(self, fn: Callable[[], None]) -> None:
        """From inside a transaction: call ``fn`` once it committed (never if it aborts)."""


class IngestResult(Protocol):
    duplicates: int
    position: int  # the event log position the write committed at (see domain/consistency.py)


class EventWriter(Jobs, Protocol):
    async def ingest(self, events: Sequence[MatchedEvent]) -> IngestResult:
        """Makes the events durable (deduplicated by message id); resolves after the commit."""


class CollectionView(Protocol):
    """One served collection: its name, columns, and encoded ``collection`` field."""

    name: str
    columns: tuple[str, ...]
    prefix: bytes

    def mask_indices(self, paths: tuple[str, ...]) -> tuple[int, ...] | None: ...


class RecordReader(Protocol):
    """Consistent point reads of collection records and memberships, from any process."""

    audience_ids: tuple[str | None, ...]

    @property
    def generation(self) -> int:
        """The last warehouse sync that landed (0: none yet)."""

    def collections(self) -> dict[str, CollectionView]: ...

    def people(self) -> int: ...

    def get(self, name: str, keys: list[bytes]) -> tuple[CollectionView, list[tuple[bytes | None, dict | None]]]: ...

    def get_one(self, name: str, key: bytes) -> tuple[CollectionView, bytes, dict | None]: ...

    def field_values(self, name: str, keys: list[str], columns: tuple[str, ...]) -> dict[str, dict]: ...

    def map_usage(self) -> tuple[int, int]:
        """(bytes in use, bytes reserved) of the store."""

    def position(self) -> int:
        """The event log position a new snapshot sees (see Positions)."""


class Positions(Protocol):
    """The event log position a new snapshot of this process sees (what a min_token is compared with)."""

    def position(self) -> int: ...


class EventCounts(Protocol):
    def counts(self) -> tuple[int, int]:
        """(events logged, events that matched no model)."""


class ChangelogReader(Protocol):
    """The changelog from any process, each call one consistent read."""

    def head(self) -> int: ...

    def start(self) -> int:
        """The oldest retained change's sequence (0: none retained)."""

    def read(self, after: int, limit: int) -> list[MembershipChange]: ...

    def audiences(self) -> tuple[list[str], int]:
        """The audiences that exist, and the head, read together."""

    def snapshot(self, audience_ids: list[str]) -> Iterator:
        """The head, then (audience, person key, enter time) of every current member, read together."""


class AudienceReads(Protocol):
    """Audiences and memberships as committed, each call one read transaction."""

    def read(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(txn)`` in a read snapshot of its own."""
    def audience(self, audience_id: str) -> tuple[dict | None, int]: ...
    def all(self) -> list[tuple[dict, int]]: ...
    def memberships(self, person_key: str, audience_ids: list[str]) -> tuple[list[str], list[tuple[str, int]]]: ...
    def list_members(self, audience_id: str, after: str, limit: int) -> tuple[bool, list[str], str]: ...


class RealtimeTables(Protocol):
    """The engine's tables: audiences, memberships, the member index, the changelog, people."""

    def load_audiences(self, txn) -> list[dict]: ...
    def put_audience(self, txn, record: dict) -> None: ...
    def delete_audience(self, txn, audience_id: str) -> None: ...
    def catalog_bits(self, txn) -> list[str | None]: ...
    def set_catalog_bits(self, txn, bits: list[str | None]) -> None: ...
    def counts(self, txn) -> dict[str, int]: ...
    def put_counts(self, txn, counts: dict[str, int]) -> None: ...
    def person_id(self, txn, key: str) -> int | None: ...
    def person_key(self, txn, pid: int) -> str | None: ...
    def columns(self, txn, attributes: Iterable[tuple[str, ValueType]]) -> tuple[dict, Any]: ...
    def membership(self, txn, person_key: str) -> dict[int, int]: ...
    def put_membership(self, txn, person_key: str, bits: dict[int, int]) -> None: ...
    def index_member(self, txn, audience_id: str, person_key: str, member: bool) -> None: ...
    def list_members(self, txn, audience_id: str, after: str, limit: int) -> tuple[list[str], str]: ...
    def member_keys(self, txn, audience_id: str) -> list[str]: ...
    def all_memberships(self, txn) -> Iterator[tuple[str, dict[int, int]]]: ...

    def append_changes(self, txn, changes: list[MembershipChange]) -> list[MembershipChange]:
        """Stores changes in order; returns them with their sequences."""


class SyncStore(Protocol):
    """Realtime syncs' definitions, progress and dead letters."""

    def read(self, fn: Callable[[Any], Any]) -> Any: ...
    def changelog_head(self, txn) -> int: ...
    def exists(self, txn, sync_id: str) -> bool: ...
    def load(self, txn) -> list[tuple[SyncSpec, SyncState]]: ...
    def put_spec(self, txn, spec: SyncSpec) -> None: ...
    def put_state(self, txn, sync_id: str, state: SyncState) -> None: ...
    def delete(self, txn, sync_id: str) -> None: ...
    def add_dead(self, txn, sync_id: str, changes: list[MembershipChange], attempts: int, error: str,
                 now_us: int) -> None: ...
    def remove_dead(self, txn, sync_id: str, seqs: list[int]) -> None: ...
    def dead_letters(self, txn, sync_id: str, after: int = 0, limit: int = 100) -> list[DeadLetter]: ...


class SyncRunners(Protocol):
    """The delivery side of the realtime syncs, as SyncService manages it."""

    parent: str
    runners: dict

    def runner(self, sync_id: str): ...
    async def create(self, spec: SyncSpec): ...
    async def update(self, spec: SyncSpec): ...
    async def delete(self, sync_id: str) -> None: ...
    def dead_letters(self, sync_id: str, after: int, limit: int) -> list[DeadLetter]: ...
    async def replay(self, sync_id: str) -> int: ...
    def lag_us(self, runner) -> int: ...
    def holds_changelog(self, runner) -> bool: ...


class Simulations(Protocol):
    """Runs replays (domain/simulate.py) away from the server's interpreter (storage/replay_process.py)."""

    def run(self, plan: Any, cancelled: threading.Event) -> Any:
        """The plan's Timeline, blocking; gives up soon after ``cancelled`` is set. Raises the replay's errors."""

    def close(self) -> None: ...


class Donors(Protocol):
    """Makes the backfill's donor pages (domain/donors.py) away from the writer (storage/replay_process.py)."""

    def ask(self, plan: Any) -> bool:
        """Hands a DonorPlan over, without waiting; False if it cannot be (the page is then not made)."""

    def answers(self) -> list[Any]:
        """The DonorPages made since the last call; never waits."""

    def idle(self) -> bool:
        """Whether no plan asked for is still being made (each was answered, or was lost with its process)."""

    def close(self) -> None: ...
