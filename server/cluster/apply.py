"""What an owner does with its partition's stream: every method runs on the partition's writer thread.

A partition is a complete single-node store of its own (one LMDB
environment: the partition's event log, its people's realtime state,
memberships and changelog, and its slice of the warehouse) driven by the
unchanged ``Engine``. ``apply`` takes a batch of decoded stream messages
(cluster/messages.py) and applies them in one write transaction, in stream
order, each at ``max(partition time, its time)``:

- events: matched against the event models; only the people this partition
  owns are observed (an event published here for someone else is skipped).
  An event whose every person is owned here goes through the event log as on
  one node; one that also names people elsewhere (rare: models keyed by
  different identifiers) is evaluated without being logged here, so a replay
  of this log (an audience change, a merge) never re-creates people of another
  partition;
- ticks: due timers fire;
- syncs: the partition's slice of the warehouse (people whose key hashes
  here) is synced, then memberships move as on one node;
- audience changes: applied once per revision (a repeated message is skipped);
- identity handovers and forwarded events (cluster/handover.py).

The partition's first message, whatever it is, is preceded by the first
sync of its slice, at that message's time: a fresh partition evaluates
nothing before it knows its people.

The stream sequence applied and the partition time are stored in the same
transaction as the state they produced, so a snapshot (an LMDB copy) names
exactly where its replay starts.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.compute as pc

from ..domain.engine import Engine
from ..domain.errors import QualifyError
from ..domain.events import EventType, MatchedEvent, matching_models
from ..storage.realtime import RealtimeStore
from ..storage.warehouse_sync import SyncError, Syncer
from .handover import Handovers
from .holds import Holds
from .messages import Item, Kind
from .partitioning import partition_of, person_key, primary_key

log = logging.getLogger(__name__)

# Held by every partition's apply job, so a node's partition writer threads take turns by the job
# rather than by the LMDB call. py-lmdb releases the GIL around each put and get: with 16 partition
# threads runnable at once, every put handed the GIL to another thread and took it back (a futex
# round trip and a context switch per call), and py-spy showed EventLog.append's dedupe put as the
# node's hottest line. One lock costs one hand-off per transaction; the jobs are CPU in Python
# anyway, so on a node's cores they never ran in parallel. The read copy does not take it: it would
# wait behind a partition's long jobs (an audience's walk, a warehouse sync), and reads on this
# node would lag the cluster by as much.
APPLYING = threading.Lock()

CLUSTER_DB = b"cluster"
U64 = struct.Struct("<Q")
I64 = struct.Struct("<q")
LINKS = (EventType.IDENTIFY, EventType.ALIAS)
COMPACT_EVERY_US = 1_000_000
PUBLISHED_CHANGES_KEPT_US = 60 * 1_000_000  # the local changelog is an outbox: the stream keeps the history


@dataclass
class PartitionState:
    """Where the partition stands; stored in its ``cluster`` database with the state it describes."""

    partition: int
    applied: int = 0  # the last stream sequence applied
    now_us: int = 0  # partition time: the latest message time applied
    synced: bool = False  # the first warehouse sync of the slice has landed
    audiences: dict[str, int] = field(default_factory=dict)  # audience id -> the revision applied

    def save(self, txn, db) -> None:
        txn.put(b"applied", U64.pack(self.applied), db=db)
        txn.put(b"now", I64.pack(self.now_us), db=db)
        txn.put(b"synced", b"1" if self.synced else b"0", db=db)
        txn.put(b"audiences", json.dumps(self.audiences).encode(), db=db)
        txn.put(b"partition", U64.pack(self.partition), db=db)

    @classmethod
    def load(cls, txn, db, partition: int) -> "PartitionState":
        raw = txn.get(b"partition", db=db)
        if raw is not None and U64.unpack(raw)[0] != partition:
            raise ValueError(f"this store holds partition {U64.unpack(raw)[0]}, not {partition}")
        get = lambda k, s, d: s.unpack(txn.get(k, db=db))[0] if txn.get(k, db=db) else d  # noqa: E731
        return cls(partition, get(b"applied", U64, 0), get(b"now", I64, 0), txn.get(b"synced", db=db) == b"1",
                   json.loads(txn.get(b"audiences", db=db) or b"{}"))


def slice_filter(partition: int, partitions: int):
    """The Syncer's ``keep``: which rows of a batch (by primary key) belong to ``partition``."""
    def keep(column: pa.Array) -> pa.Array:
        keys = pc.cast(column, pa.string()).to_pylist()
        return pa.array([k is not None and partition_of(k, partitions) == partition for k in keys], pa.bool_())
    return keep


class Applier:
    """One partition's engine and the stream messages it applies (see the module docstring)."""

    def __init__(self, partition: int, partitions: int, env, writer, project, publish):
        self.partition = partition
        self.partitions = partitions
        self.env = env
        self.writer = writer
        self.project = project
        self.publish = publish  # the engine's: called in the transaction with its stored changes
        self.state = PartitionState(partition)
        self.engine: Engine | None = None
        self.published = 0  # set by the outbox (another thread): changes up to here may be compacted
        self.outbox_published = 0  # and cross-partition messages up to here (cluster/handover.py)
        self.notify = lambda: None  # in a transaction: wake the outbox once it commits
        self._compacted_at = 0
        self.handovers: Handovers | None = None

    # -- opening (one writer job) ----------------------------------------------------
    def open(self, txn) -> list:
        """Creates or opens the tables, builds the engine, recovers it at partition time."""
        self.store = RealtimeStore(self.env, txn)
        self.meta = self.env.open_db(CLUSTER_DB, txn=txn)
        self.state = PartitionState.load(txn, self.meta, self.partition)
        p = self.project
        log_ = self.writer.log
        self.handovers = moves = Handovers(self, txn)
        self.holds = Holds(self, txn)

        def read_event(t, seq):
            e = log_.get(t, seq)
            return e if e is None or moves.visible(e) else None

        self.engine = Engine(
            self.store, p.event_models, [(a.name, a.type) for a in p.parent_model.attributes],
            int(p.session_timeout * 1_000_000), read_event=read_event,
            iter_events=lambda t: (e for e in log_.read(t, 1) if moves.visible(e)),
            publish=self.publish, retention_us=int(p.event_retention * 1_000_000), cache_people=p.state_cache)
        changes = self.engine.recover(txn, self.state.now_us)
        self.state.save(txn, self.meta)
        return changes

    def owns(self, key: str) -> bool:
        return partition_of(key, self.partitions) == self.partition

    def partition_of(self, key: str) -> int:
        return partition_of(key, self.partitions)

    # -- applying the stream ------------------------------------------------------------
    def apply(self, txn, items: list[Item]) -> None:
        state = self.state
        try:
            for run in _runs(items):
                now = max(state.now_us, run[0].time_us)
                state.now_us = now
                kind = run[0].kind
                if not state.synced:
                    self._sync(txn, now)
                    if kind == Kind.SYNC:
                        continue
                if kind in (Kind.EVENT, Kind.FORWARD):
                    self._events(txn, run, now)
                elif kind == Kind.TICK:
                    self.engine.tick(txn, now)
                elif kind == Kind.SYNC:
                    self._sync(txn, now)
                elif kind == Kind.AUDIENCE:
                    for item in run:
                        self._audience(txn, item, now)
                elif kind == Kind.HANDOVER:
                    for item in run:
                        self.handovers.receive(txn, item, now)
            state.applied = items[-1].seq
            self._compact(txn, state.now_us)
            self.writer.log.prune_dedupe(txn, state.now_us, max(1000, 2 * len(items)))
            state.save(txn, self.meta)
        except BaseException:
            self.state = PartitionState.load(txn, self.meta, self.partition)  # what the aborted txn leaves
            raise

    def _events(self, txn, items: list[Item], now: int) -> None:
        logged: list[MatchedEvent] = []
        engine = self.engine
        for item in items:
            e = item.event if item.kind == Kind.EVENT else self.handovers.forwarded(item)
            if e.type in (EventType.IDENTIFY, EventType.ALIAS) and e.user_id and not self.owns(e.user_id):
                self._flush(txn, logged, now)
                self.handovers.hand_over(txn, e, now)
                continue
            if item.kind == Kind.EVENT and self.handovers.forward(txn, e, now):
                continue  # an alias moved this person to another partition
            matches = matching_models(e, engine.models)
            own = tuple(m for m in matches if self.owns(person_key(*m[1])))
            if len(own) == len(matches):
                if (self.holds.held or e.type in LINKS) and self._held(txn, MatchedEvent(e, own), logged, now):
                    continue
                if own or item.kind == Kind.FORWARD or self.owns(primary_key(MatchedEvent(e, ()))):
                    logged.append(MatchedEvent(e, own))
            elif own:  # names people elsewhere too: evaluated, not logged (see the module docstring)
                self._flush(txn, logged, now)
                engine.apply(txn, [MatchedEvent(e, own)], now)
        self._flush(txn, logged, now)

    def _held(self, txn, matched: MatchedEvent, logged: list[MatchedEvent], now: int) -> bool:
        """Whether the event is held (cluster/holds.py): it names a held user, or it is a link that holds
        its user until the other partitions' handovers come. Then it is logged, indexed for them, and
        evaluated for the other people it names; a link is applied (its alias recorded) all the same."""
        engine, holds, e = self.engine, self.holds, matched.event
        link = e.type in LINKS and bool(e.user_id)
        awaited = holds.awaited(e, lambda source: self.handovers.received(txn, source, e.message_id)) if link else []
        held = {k for _, who in matched.matches if (k := engine._person(*who)) in holds.held}
        if awaited or (link and e.user_id in holds.held):
            held.add(e.user_id)
        if not held:
            return False
        self._flush(txn, logged, now)
        if not self.writer.log.append(txn, [matched], now)[0]:
            return True  # a repeat
        rest = tuple(m for m in matched.matches if engine._person(*m[1]) not in held)
        if rest or link:
            engine.apply(txn, [MatchedEvent(e, rest)], now)  # (first: what was due fires before the hold)
        if awaited:
            holds.expect(txn, e, now, awaited)
        for key in held:
            holds.hold(txn, key, e.seq, now)
        return True

    def _flush(self, txn, logged: list[MatchedEvent], now: int) -> None:
        if not logged:
            return
        accepted, duplicates = self.writer.log.append(txn, logged, now)
        if accepted:
            self.engine.apply(txn, [logged[i] for i in accepted] if duplicates else list(logged), now)
        logged.clear()

    def _sync(self, txn, now: int) -> None:
        """The partition's slice of the warehouse, then memberships follow (as a sync on one node)."""
        project = replace(self.project, collections=tuple(c for c in self.project.collections if c.is_parent))
        try:
            Syncer(self.env, project, keep=slice_filter(self.partition, self.partitions)).run(txn=txn)
        except SyncError as exc:  # the warehouse is down: the slice keeps what it had, as on one node
            log.error("partition %d: warehouse sync failed, nothing changed: %s", self.partition, exc)
            return
        self.state.synced = True
        self.engine.after_sync(txn, now)

    def _audience(self, txn, item: Item, now: int) -> None:
        revision, op, record = item.body
        aid = record["id"]
        if self.state.audiences.get(aid, 0) >= revision:
            return  # published again (by the API node and by an owner repairing): applied once
        engine = self.engine
        try:
            if op == "put":
                engine.put_audience(txn, aid, record["display_name"], record["description"], record["condition"],
                                    now, create=aid not in engine.audiences)
                self._backfill(txn, now)
            elif aid in engine.audiences:
                engine.delete_audience(txn, aid, now)
        except QualifyError as exc:  # checked where it was made; the same code refuses it everywhere alike
            log.error("partition %d: audience %s revision %d refused: %s", self.partition, aid, revision, exc)
        self.state.audiences[aid] = revision

    def _backfill(self, txn, now: int) -> None:
        """The new definition's walk (domain/backfill.py), whole, here and now.

        On one node it runs in slices beside ingest; a partition runs it to
        its end inside the transaction that applies the audience change, so
        every replay of the stream finds the same members at the same point.
        A partition is a small share of the people: the walk is its share too.
        """
        engine = self.engine
        while getattr(engine, "backfilling", None) is not None:
            engine.backfill_step(txn, now, seconds=float("inf"))

    def _compact(self, txn, now: int) -> None:
        if now - self._compacted_at < COMPACT_EVERY_US:
            return
        self._compacted_at = now
        log_ = self.writer.log
        log_.compact(txn, now - int(self.project.event_retention * 1_000_000), 2000)
        self.store.sweep_person_events(txn, log_.first_seq(txn), 2000)
        self.store.compact_changelog(txn, now - PUBLISHED_CHANGES_KEPT_US, self.published, 2000)
        self.handovers.compact(txn, self.outbox_published)


def _runs(items: list[Item]) -> list[list[Item]]:
    """Consecutive messages of one kind and one time: each run is applied at one instant."""
    runs: list[list[Item]] = []
    for item in items:
        last = runs[-1][-1] if runs else None
        if last is not None and last.kind == item.kind and last.time_us == item.time_us:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs
