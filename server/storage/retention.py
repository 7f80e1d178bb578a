"""Retention: the event log and the changelog keep a bounded history, compacted in bounded slices.

Each call of ``compact_slice`` runs in its own short write transaction on
the writer thread, between ingest batches, and deletes at most ``limit``
entries of each kind, so compaction never holds the writer long:

- events received before ``now - event_retention`` (the newest one always
  stays, so sequences are never reused), and the person index's entries
  for them (swept round-robin);
- changes effective before ``now - changelog_retention`` that every
  realtime sync has delivered: a sync that falls behind holds the
  changelog back, never loses a change.

The dedupe index keeps its own 24 h (storage/eventlog.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Compacted:
    events: int
    index_entries: int
    changes: int
    held_back_by_syncs: bool  # changes old enough to go stayed, because a sync has not delivered them

    @property
    def full(self) -> bool:
        """Whether this slice found events or changes to delete: the next one follows at once."""
        return self.events > 0 or self.changes > 0


class Retention:
    def __init__(self, log, store, tables, event_retention_us: int, changelog_retention_us: int):
        self.log = log
        self.store = store
        self.tables = tables
        self.event_retention_us = event_retention_us
        self.changelog_retention_us = changelog_retention_us

    def compact_slice(self, txn, now_us: int, limit: int = 2000) -> Compacted:
        events = self.log.compact(txn, now_us - self.event_retention_us, limit)
        index = self.store.sweep_person_events(txn, self.log.first_seq(txn), limit)
        head = self.store.changelog_head(txn)
        cursor = self.tables.min_cursor(txn)
        upto = head if cursor is None else min(head, cursor)
        before = now_us - self.changelog_retention_us
        changes = self.store.compact_changelog(txn, before, upto, limit)
        held = cursor is not None and cursor < head and changes < limit and self._old_change_after(txn, upto, before)
        return Compacted(events, index, changes, held)

    def _old_change_after(self, txn, seq: int, before_us: int) -> bool:
        """Whether the change after ``seq`` is old enough to go (so only a sync's cursor keeps it)."""
        nxt = self.store.changes_after(txn, seq, 1)
        return bool(nxt) and nxt[0].effective_us < before_us
