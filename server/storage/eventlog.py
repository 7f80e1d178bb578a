"""The event log in LMDB: every accepted event, in arrival order, and the dedupe index.

Named databases (beside those in lmdb_store's layout)::

    events         u64 seq (big-endian, so cursor order is log order) -> msgpack of
                   (1, message_id, type, name, user_id, anonymous_id, timestamp_us,
                    received_us, properties, traits, session_id, previous_id, context)
                   The leading 1 is the record format version.
    events.dedupe  message_id (UTF-8; b"\\x00" + blake2b-256 of it when longer than
                   480 bytes or starting with NUL) -> u64 received_us (big-endian) of the
                   first acceptance. An entry older than 24 h is ignored on lookup
                   (the message is accepted again and the entry rewritten) and
                   removed by a sweep that examines a bounded number of entries
                   per write transaction.
    events.meta    b"unmatched" -> u64 (little-endian) events logged that matched
                   no event model

Why these choices:

- seq numbers start at 1 and have no gaps; ``last_seq`` is the last key, so
  no counter has to be kept in step with the log. Appends use MDB_APPEND.
- msgpack of a tuple, not pickle (a log must never execute code when read)
  and not protobuf (storage does not import the wire contract); it is compact
  and about as fast as anything Python can call.
- message ids are keys as sent, not hashed: a B-tree insert costs a page
  write per key when keys are random (at a million keys, 20-40 µs an event on
  the development machine, against about 1-2 µs), and time-ordered ids (UUIDv7,
  which qualify.clients.EventEmitter generates) land next to each other at the
  right edge of the tree, where one page holds a whole batch; hashing would
  throw that locality away. Only ids too long for LMDB's 511-byte key limit are
  hashed (256 bits: collisions are not a concern).
- received times are big-endian so the sweep compares raw bytes.

Every function takes an open transaction; writes happen only on the writer
thread (see writer.py), in the transaction that also runs evaluation.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sequence

import lmdb
import msgpack

from qualify.evaluator import RecordScan

from ..domain.events import DEDUPE_WINDOW_US, Event, EventType, MatchedEvent
from ..domain.simulate import Wanted
from .lmdb_store import _handle

EVENTS = b"events"
DEDUPE = b"events.dedupe"
EVENTS_META = b"events.meta"
UNMATCHED = b"unmatched"
FORMAT = 1

SEQ = struct.Struct(">Q")
TIME = struct.Struct(">Q")
U64 = struct.Struct("<Q")


MAX_RAW_ID = 480


def dedupe_key(message_id: str) -> bytes:
    raw = message_id.encode()
    if len(raw) <= MAX_RAW_ID and raw[:1] != b"\x00":
        return raw
    return b"\x00" + hashlib.blake2b(raw, digest_size=32).digest()


def event_record(e: Event) -> tuple:
    """The event as its log record, before packing (``encode_event`` packs it; a cluster packs many in one call)."""
    return (FORMAT, e.message_id, int(e.type), e.name, e.user_id, e.anonymous_id, e.timestamp_us,
            e.received_us, e.properties, e.traits, e.session_id, e.previous_id, e.context, e.arrival)


def encode_event(e: Event, _packb=msgpack.packb) -> bytes:
    return _packb(event_record(e))


_TYPE_OF = {int(t): t for t in EventType}  # EventType(n) is an enum call, ten times a dict lookup


def decode_event(seq: int, raw) -> Event:
    return event_of_record(seq, msgpack.unpackb(raw))


def event_of_record(seq: int, t) -> Event:
    """An event from its unpacked log record (``event_record``'s tuple, or the list msgpack makes of it)."""
    if t[0] != FORMAT:
        raise ValueError(f"event {seq}: unknown record format {t[0]}")
    kind = _TYPE_OF.get(t[2])
    return Event(message_id=t[1], type=kind if kind is not None else EventType(t[2]), name=t[3], user_id=t[4],
                 anonymous_id=t[5], timestamp_us=t[6], received_us=t[7], properties=t[8], traits=t[9],
                 session_id=t[10], previous_id=t[11], context=t[12], seq=seq, arrival=t[13] if len(t) > 13 else 0)


class EventLog:
    """Handles to the event log's databases; every method takes a transaction."""

    def __init__(self, env: lmdb.Environment, txn: lmdb.Transaction | None = None):
        """Opens (creating) the databases inside ``txn``, a write transaction that must commit.

        Without ``txn`` the databases must exist (lmdb.NotFoundError otherwise):
        that is how a reader, or a read-only environment, opens the log.
        """
        self.env = env
        if txn is None:
            self.events, self.dedupe, self.meta = (_handle(env, n) for n in (EVENTS, DEDUPE, EVENTS_META))
        else:
            self.events = env.open_db(EVENTS, txn=txn)
            self.dedupe = env.open_db(DEDUPE, txn=txn)
            self.meta = env.open_db(EVENTS_META, txn=txn)
        self._sweep_from = b""  # where the next dedupe sweep resumes (in key order)

    # -- writes ---------------------------------------------------------------------

    def append(self, txn: lmdb.Transaction, events: Sequence[MatchedEvent], now_us: int) -> tuple[list[int], list[int]]:
        """Logs the events that are not duplicates; returns (accepted, duplicate) indices.

        Accepted events get ``seq``. A message_id repeated inside ``events``
        counts as a duplicate after its first occurrence. Events that match
        no model are counted as unmatched.
        """
        accepted: list[int] = []
        duplicates: list[int] = []
        put, get = txn.put, txn.get
        dedupe = self.dedupe
        stamp = TIME.pack(now_us)
        horizon = TIME.pack(max(0, now_us - DEDUPE_WINDOW_US))
        for i, m in enumerate(events):
            k = dedupe_key(m.event.message_id)
            if not put(k, stamp, db=dedupe, overwrite=False):
                if get(k, db=dedupe) > horizon:
                    duplicates.append(i)
                    continue
                put(k, stamp, db=dedupe)  # seen more than 24 h ago: a new message
            accepted.append(i)
        if not accepted:
            return accepted, duplicates
        seq = self.last_seq(txn)
        items = []
        unmatched = 0
        for i in accepted:
            m = events[i]
            seq += 1
            m.event.seq = seq
            items.append((SEQ.pack(seq), encode_event(m.event)))
            if not m.matches:
                unmatched += 1
        with txn.cursor(db=self.events) as cur:
            cur.putmulti(items, append=True)
        if unmatched:
            put(UNMATCHED, U64.pack(self.unmatched(txn) + unmatched), db=self.meta)
        return accepted, duplicates

    def prune_dedupe(self, txn: lmdb.Transaction, now_us: int, limit: int) -> int:
        """Examines up to ``limit`` dedupe entries, deleting those over 24 h old; returns deletions.

        The sweep walks the (hashed, so evenly spread) keys round-robin,
        resuming where the last call stopped, so each entry is looked at once
        per pass; with ``limit`` above the insert rate the index stays within
        about a day's worth of message ids.
        """
        horizon = TIME.pack(max(0, now_us - DEDUPE_WINDOW_US))
        deleted = 0
        with txn.cursor(db=self.dedupe) as cur:
            found = cur.set_range(self._sweep_from) if self._sweep_from else cur.first()
            seen = 0
            while found and seen < limit:
                seen += 1
                if cur.value() <= horizon:
                    deleted += 1
                    found = cur.delete()  # moves to the next entry
                else:
                    found = cur.next()
            self._sweep_from = cur.key() if found else b""
        return deleted

    # -- reads --------------------------------------------------------------------

    def last_seq(self, txn: lmdb.Transaction) -> int:
        with txn.cursor(db=self.events) as cur:
            return SEQ.unpack(cur.key())[0] if cur.last() else 0

    def count(self, txn: lmdb.Transaction) -> int:
        return txn.stat(self.events)["entries"]

    def unmatched(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(UNMATCHED, db=self.meta)
        return U64.unpack(raw)[0] if raw else 0

    def first_seq(self, txn: lmdb.Transaction) -> int:
        """The oldest retained event's seq (0: none)."""
        with txn.cursor(db=self.events) as cur:
            return SEQ.unpack(cur.key())[0] if cur.first() else 0

    def fields(self, txn: lmdb.Transaction, seq: int) -> tuple | None:
        """(type, name, timestamp_us, properties, session_id) of the event ``seq``, without making an Event."""
        raw = txn.get(SEQ.pack(seq), db=self.events)
        if raw is None:
            return None
        t = msgpack.unpackb(raw)
        if t[0] != FORMAT:
            raise ValueError(f"event {seq}: unknown record format {t[0]}")
        return t[2], t[3], t[6], t[8], t[10]

    def get(self, txn: lmdb.Transaction, seq: int) -> Event | None:
        """The event ``seq``, or None once retention removed it."""
        raw = txn.get(SEQ.pack(seq), db=self.events)
        return decode_event(seq, raw) if raw is not None else None

    def compact(self, txn: lmdb.Transaction, before_us: int, limit: int) -> int:
        """Deletes up to ``limit`` of the oldest events received before ``before_us``; returns how many.

        The newest event always stays: the next append continues from its seq,
        and sequences must never be reused (the person index and message ids
        of changes point at them).
        """
        deleted = 0
        with txn.cursor(db=self.events) as cur:
            found = cur.first()
            last = self.last_seq(txn)
            while found and deleted < limit:
                seq = SEQ.unpack(cur.key())[0]
                if seq == last or msgpack.unpackb(cur.value())[7] >= before_us:  # [7]: received_us
                    break
                found = cur.delete()
                deleted += 1
        return deleted

    def read(self, txn: lmdb.Transaction, from_seq: int = 1, limit: int | None = None) -> Iterator[Event]:
        """Events with seq >= from_seq, in log order (decoded copies: safe after the txn)."""
        n = 0
        unpack = msgpack.unpackb
        with txn.cursor(db=self.events) as cur:
            if not cur.set_range(SEQ.pack(max(0, from_seq))):
                return
            for k, v in cur:
                if limit is not None and n >= limit:
                    return
                n += 1
                yield event_of_record(SEQ.unpack(k)[0], unpack(v))

    def select(self, txn: lmdb.Transaction, wanted: Wanted) -> Iterator[Event]:
        """The events ``wanted`` names, in log order, up to the first received at ``wanted.until_us`` or later.

        The others are never decoded: RecordScan reads the type, name and
        received time in place (fields 2, 3 and 7 of the record), so a replay
        that needs a few models' events pays little for the rest of the log.
        """
        scan = RecordScan(2, 3, 7, wanted.named, wanted.kinds, wanted.everything, wanted.until_us)
        unpack = msgpack.unpackb
        try:
            with txn.cursor(db=self.events) as cur:
                if not cur.first():
                    return
                for k, v in scan.scan(cur.iternext(), wanted.tick):
                    yield event_of_record(SEQ.unpack(k)[0], unpack(v))
        finally:
            wanted.read, wanted.first_us = scan.read, scan.first_time

    def seen(self, txn: lmdb.Transaction, message_id: str, now_us: int) -> bool:
        """Whether message_id was accepted within the last 24 hours."""
        raw = txn.get(dedupe_key(message_id), db=self.dedupe)
        return raw is not None and raw > TIME.pack(max(0, now_us - DEDUPE_WINDOW_US))


class EventLogView:
    """Counts for GetServerInfo from any process (read-only environments too).

    Until the writer has created the databases, the counts are 0.
    """

    def __init__(self, env: lmdb.Environment):
        self.env = env
        self._events = None
        self._meta = None

    def counts(self) -> tuple[int, int]:
        """(events logged, events that matched no model)."""
        if self._events is None:
            try:
                self._events = _handle(self.env, EVENTS)
                self._meta = _handle(self.env, EVENTS_META)
            except lmdb.NotFoundError:
                self._events = None
                return 0, 0
        with self.env.begin() as txn:
            logged = txn.stat(self._events)["entries"]
            raw = txn.get(UNMATCHED, db=self._meta)
        return logged, (U64.unpack(raw)[0] if raw else 0)
