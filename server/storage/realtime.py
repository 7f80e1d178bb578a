"""LMDB layout of the realtime state: audiences, memberships, the changelog.

Every function takes an open transaction; the engine calls them from the
single writer thread, inside the same write transaction as the events or the
sync that caused the change, so memberships commit atomically with their cause.

Named databases::

    audiences         audience id -> JSON {id, display_name, description, condition, create_us, update_us}
    members           person key -> membership: u16 n | bitset (n bytes) | i64 enter time per set bit
                      (bit i = the catalog's audiences[i]; the catalog lives in meta)
    audience_members  audience id | 0x00 | person key -> b"" (ListMembers pages through it)
    changelog         u64 sequence (big-endian) -> msgpack [audience, person, direction, effective_us, cause, message_id]
                      (positional: a MembershipChange without its sequence, the key)
    rt_state          person key -> i64 next timer (-1: none) | i64 person id (-1: none) | i64 the program
                      generation it was dumped at (little-endian) | the evaluator's dump of their state (the id
                      outlives a warehouse removal: ids are never reused)
    rt_timers         u64 instant (big-endian) | person key -> b"": every pending timer, in time order
    person_events     person key | 0x00 | u64 event sequence (big-endian) -> b"": each person's events in the log
    rt_aliases        anonymous (or aliased) id -> the user id it was linked to
    meta              b"changelog_seq" -> u64 last sequence; b"counts" -> JSON {audience id: members};
                      b"rt_program" -> the fingerprint of the program the stored states were dumped under;
                      b"rt_epochs" -> JSON {generation, leaves: {state key: the generation it joined at}};
                      b"rt_backfill" -> JSON, the audiences being backfilled and how far (see domain/backfill.py)
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator

import lmdb
import msgpack
import numpy as np

from ..domain.changes import Cause, Direction, MembershipChange
from ..domain.schema import ValueType
from ..domain.static import Column
from ..observability import metrics
from .lmdb_store import CATALOG, GENERATION, ID_KEY, META, PEOPLE, U32, U64, delete_prefix, open_env
from .lmdb_store import decode_membership as _decode

AUDIENCES = b"audiences"
MEMBERS = b"members"
AUDIENCE_MEMBERS = b"audience_members"
CHANGELOG = b"changelog"
CHANGELOG_SEQ = b"changelog_seq"
COUNTS = b"counts"
STATES = b"rt_state"
TIMERS = b"rt_timers"
TIMER_KEY = struct.Struct(">Q")
PERSON_EVENTS = b"person_events"
ALIASES = b"rt_aliases"
PROGRAM = b"rt_program"
STATE_HEAD = struct.Struct("<qqq")  # next timer, person id, program generation
EPOCHS = b"rt_epochs"
BACKFILL = b"rt_backfill"
SEQ_KEY = struct.Struct(">Q")
packb = msgpack.Packer().pack
_DTYPES = {ValueType.STRING: np.int32, ValueType.INT: np.int64, ValueType.FLOAT: np.float64,
           ValueType.BOOL: np.uint8, ValueType.TIMESTAMP: np.int64}


def encode_membership(bits: dict[int, int]) -> bytes:
    """{bit: enter_us} -> stored membership."""
    if not bits:
        return b""
    n = max(bits) // 8 + 1
    bitset = bytearray(n)
    for b in bits:
        bitset[b >> 3] |= 1 << (b & 7)
    times = [bits[b] for b in sorted(bits)]
    return struct.pack("<H", n) + bytes(bitset) + struct.pack(f"<{len(times)}q", *times)


def decode_membership(raw: bytes | None) -> dict[int, int]:
    """Stored membership -> {bit: enter_us}."""
    return _decode(raw) if raw else {}


class RealtimeStore:
    """The realtime tables of one LMDB environment (writer side)."""

    def __init__(self, env, txn):
        """Opens (creating) the tables in ``txn``, a write transaction of the writer."""
        self.env = env
        self.meta = env.open_db(META, txn=txn)
        self.audiences = env.open_db(AUDIENCES, txn=txn)
        self.members = env.open_db(MEMBERS, txn=txn)
        self.audience_members = env.open_db(AUDIENCE_MEMBERS, txn=txn)
        self.changelog = env.open_db(CHANGELOG, txn=txn)
        self.people_keys = env.open_db(f"{PEOPLE}.keys".encode(), txn=txn)
        self.people_ids = env.open_db(f"{PEOPLE}.ids".encode(), txn=txn)
        self.people_cols = env.open_db(f"{PEOPLE}.cols".encode(), txn=txn)
        self.states = env.open_db(STATES, txn=txn)
        self.timers = env.open_db(TIMERS, txn=txn)
        self.person_events = env.open_db(PERSON_EVENTS, txn=txn)
        self.aliases_db = env.open_db(ALIASES, txn=txn)
        self._sweep_from = b""  # where the next sweep of the person index resumes

    # -- audiences ------------------------------------------------------------------
    def load_audiences(self, txn) -> list[dict]:
        return [json.loads(v) for _, v in txn.cursor(db=self.audiences)]

    def put_audience(self, txn, record: dict) -> None:
        txn.put(record["id"].encode(), json.dumps(record).encode(), db=self.audiences)

    def delete_audience(self, txn, audience_id: str) -> None:
        txn.delete(audience_id.encode(), db=self.audiences)
        delete_prefix(txn, self.audience_members, audience_id.encode() + b"\x00")

    def catalog_bits(self, txn) -> list[str | None]:
        return _catalog(txn, self.meta)

    def set_catalog_bits(self, txn, bits: list[str | None]) -> None:
        """Publishes the audience of each membership bit; readers reload on the new generation."""
        catalog = json.loads(txn.get(CATALOG, db=self.meta) or b"{}")
        catalog["audiences"] = bits
        txn.put(CATALOG, json.dumps(catalog).encode(), db=self.meta)
        raw = txn.get(GENERATION, db=self.meta)
        txn.put(GENERATION, U64.pack((U64.unpack(raw)[0] if raw else 0) + 1), db=self.meta)

    def counts(self, txn) -> dict[str, int]:
        return json.loads(txn.get(COUNTS, db=self.meta) or b"{}")

    def put_counts(self, txn, counts: dict[str, int]) -> None:
        txn.put(COUNTS, json.dumps(counts).encode(), db=self.meta)

    # -- people and warehouse columns --------------------------------------------------
    def person_id(self, txn, key: str) -> int | None:
        raw = txn.get(key.encode(), db=self.people_keys)
        return U32.unpack_from(raw)[0] if raw else None

    def person_key(self, txn, pid: int) -> str | None:
        raw = txn.get(ID_KEY.pack(pid), db=self.people_ids)
        return raw.decode() if raw else None

    def columns(self, txn, attributes: Iterable[tuple[str, ValueType]]) -> tuple[dict[str, Column], np.ndarray]:
        """Attribute columns and the alive mask, copied out of the map."""
        cols = {}
        for name, vtype in attributes:
            k = name.encode()
            raw, valid = txn.get(k, db=self.people_cols), txn.get(k + b".valid", db=self.people_cols)
            if raw is None or valid is None or txn.get(k + b".type", db=self.people_cols) != vtype.name.encode():
                continue
            words = tuple(json.loads(txn.get(k + b".dict", db=self.people_cols) or b"[]"))
            cols[name] = Column(vtype, np.frombuffer(raw, _DTYPES[vtype]).copy(),
                                np.frombuffer(valid, np.uint8).copy(), words)
        alive = txn.get(b".alive", db=self.people_cols)
        return cols, (np.frombuffer(alive, np.uint8).astype(bool) if alive else np.zeros(0, bool))

    # -- memberships ---------------------------------------------------------------------
    def membership(self, txn, person_key: str) -> dict[int, int]:
        return decode_membership(txn.get(person_key.encode(), db=self.members))

    def put_membership(self, txn, person_key: str, bits: dict[int, int]) -> None:
        k = person_key.encode()
        if bits:
            txn.put(k, encode_membership(bits), db=self.members)
        else:
            txn.delete(k, db=self.members)

    def index_member(self, txn, audience_id: str, person_key: str, member: bool) -> None:
        k = audience_id.encode() + b"\x00" + person_key.encode()
        if member:
            txn.put(k, b"", db=self.audience_members)
        else:
            txn.delete(k, db=self.audience_members)

    def is_member(self, txn, audience_id: str, person_key: str) -> bool:
        """Whether the member index has the person in the audience."""
        return txn.get(audience_id.encode() + b"\x00" + person_key.encode(), db=self.audience_members) is not None

    def list_members(self, txn, audience_id: str, after: str, limit: int) -> tuple[list[str], str]:
        """A page of member keys in key order after ``after``; the token for the next page."""
        return _page(txn, self.audience_members, audience_id, after, limit)

    def member_keys(self, txn, audience_id: str) -> list[str]:
        """Every member of an audience, from the member index."""
        return _page(txn, self.audience_members, audience_id, "", 1 << 62)[0]

    def all_memberships(self, txn) -> Iterator[tuple[str, dict[int, int]]]:
        for k, v in txn.cursor(db=self.members):
            yield k.decode(), decode_membership(v)

    # -- per-person realtime state ------------------------------------------------------
    def program(self, txn) -> bytes | None:
        return txn.get(PROGRAM, db=self.meta)

    def put_program(self, txn, fingerprint: bytes) -> None:
        txn.put(PROGRAM, fingerprint, db=self.meta)

    def epochs(self, txn) -> dict:
        return json.loads(txn.get(EPOCHS, db=self.meta) or b'{"generation": 0, "leaves": {}}')

    def put_epochs(self, txn, epochs: dict) -> None:
        txn.put(EPOCHS, json.dumps(epochs).encode(), db=self.meta)

    def backfill(self, txn) -> dict | None:
        raw = txn.get(BACKFILL, db=self.meta)
        return json.loads(raw) if raw else None

    def put_backfill(self, txn, progress: dict | None) -> None:
        if progress is None:
            txn.delete(BACKFILL, db=self.meta)
        else:
            txn.put(BACKFILL, json.dumps(progress).encode(), db=self.meta)

    def put_state(self, txn, person_key: str, deadline: int | None, pid: int | None, generation: int,
                  raw: bytes) -> None:
        head = STATE_HEAD.pack(-1 if deadline is None else deadline, -1 if pid is None else pid, generation)
        txn.put(person_key.encode(), head + raw, db=self.states)

    def state(self, txn, person_key: str) -> tuple[int | None, int | None, int, bytes] | None:
        """(next timer, person id, generation, the evaluator's dump) of one person; None without realtime state."""
        v = txn.get(person_key.encode(), db=self.states)
        return None if v is None else _stored_state(v)

    def state_count(self, txn) -> int:
        return txn.stat(self.states)["entries"]

    def states_after(self, txn, after: str, limit: int) -> list[tuple[str, tuple[int | None, int | None, int, bytes]]]:
        """Up to ``limit`` people with realtime state, in key order after ``after``, each with ``state``'s tuple."""
        return states_after(txn, self.states, after, limit)

    def stored_states(self, txn) -> Iterator[tuple[str, tuple[int | None, int | None, int, bytes]]]:
        """Everyone with realtime state, in key order, each with ``state``'s tuple."""
        for k, v in txn.cursor(db=self.states):
            yield bytes(k).decode(), _stored_state(v)

    def state_people(self, txn) -> Iterator[tuple[str, int | None]]:
        """(person key, person id as last stored) of everyone with realtime state."""
        for k, v in txn.cursor(db=self.states):
            pid = STATE_HEAD.unpack_from(v)[1]
            yield k.decode(), (None if pid < 0 else pid)

    def has_state(self, txn, person_key: str) -> bool:
        return txn.get(person_key.encode(), db=self.states) is not None

    def delete_state(self, txn, person_key: str) -> None:
        txn.delete(person_key.encode(), db=self.states)

    def clear_states(self, txn) -> None:
        txn.drop(self.states, delete=False)
        txn.drop(self.timers, delete=False)

    def move_timer(self, txn, person_key: str, old: int | None, new: int | None) -> None:
        """Re-files a person's pending timer from ``old`` to ``new`` (None: none)."""
        k = person_key.encode()
        if old is not None:
            txn.delete(TIMER_KEY.pack(max(0, old)) + k, db=self.timers)
        if new is not None:
            txn.put(TIMER_KEY.pack(max(0, new)) + k, b"", db=self.timers)

    def first_timer(self, txn) -> tuple[int, str] | None:
        """The earliest pending timer: (instant, person key)."""
        with txn.cursor(db=self.timers) as cur:
            if not cur.first():
                return None
            k = cur.key()
            return TIMER_KEY.unpack_from(k)[0], bytes(k[TIMER_KEY.size:]).decode()

    def state_keys(self, txn) -> Iterator[str]:
        """Everyone with realtime state."""
        for k in txn.cursor(db=self.states).iternext(values=False):
            yield k.decode()

    def index_event(self, txn, person_key: str, seq: int) -> None:
        txn.put(person_key.encode() + b"\x00" + SEQ_KEY.pack(seq), b"", db=self.person_events)

    def person_seqs(self, txn, person_key: str, upto: int | None = None) -> list[int]:
        """The log sequences of a person's events, ascending (up to ``upto``, inclusive)."""
        return person_seqs(txn, self.person_events, person_key, upto)

    def move_events(self, txn, source: str, into: str) -> None:
        """A merge: ``source``'s events are ``into``'s from now on."""
        for seq in self.person_seqs(txn, source):
            self.index_event(txn, into, seq)
        delete_prefix(txn, self.person_events, source.encode() + b"\x00")

    def sweep_person_events(self, txn, first_seq: int, limit: int) -> int:
        """Looks at up to ``limit`` index entries (round-robin), deleting those of events before ``first_seq``."""
        deleted = 0
        with txn.cursor(db=self.person_events) as cur:
            found = cur.set_range(self._sweep_from) if self._sweep_from else cur.first()
            seen = 0
            while found and seen < limit and cur.key():  # (deleting the last entry leaves the cursor unset)
                seen += 1
                if SEQ_KEY.unpack(cur.key()[-SEQ_KEY.size:])[0] < first_seq:
                    deleted += 1
                    found = cur.delete()
                else:
                    found = cur.next()
            self._sweep_from = cur.key() if found else b""
        return deleted

    def put_alias(self, txn, ident: str, user: str) -> None:
        txn.put(ident.encode(), user.encode(), db=self.aliases_db)

    def aliases(self, txn) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in txn.cursor(db=self.aliases_db)}

    # -- the changelog -------------------------------------------------------------------
    def compact_changelog(self, txn, before_us: int, upto_seq: int, limit: int) -> int:
        """Deletes up to ``limit`` of the oldest changes effective before ``before_us`` and at most ``upto_seq``.

        The head sequence lives in meta, so the next change's sequence never
        depends on what is left.
        """
        deleted = 0
        with txn.cursor(db=self.changelog) as cur:
            found = cur.first()
            while found and deleted < limit and cur.key():  # (deleting the last entry leaves the cursor unset)
                seq = SEQ_KEY.unpack(cur.key())[0]
                if seq > upto_seq or msgpack.unpackb(cur.value())[3] >= before_us:  # [3]: effective_us
                    break
                found = cur.delete()
                deleted += 1
        return deleted

    def changelog_head(self, txn) -> int:
        return changelog_head(txn, self.meta)

    def changes_after(self, txn, seq: int, limit: int) -> list[MembershipChange]:
        return read_changelog(txn, self.changelog, seq, limit)

    def changelog_start(self, txn) -> int:
        """The oldest retained change's sequence (0: none retained)."""
        with txn.cursor(db=self.changelog) as cur:
            return SEQ_KEY.unpack(cur.key())[0] if cur.first() else 0

    def append_changes(self, txn, changes: list[MembershipChange]) -> list[MembershipChange]:
        """Stores changes in order; returns them with their sequences."""
        raw = txn.get(CHANGELOG_SEQ, db=self.meta)
        seq = U64.unpack(raw)[0] if raw else 0
        out = []
        for c in changes:
            seq += 1
            txn.put(SEQ_KEY.pack(seq), packb(pack_change(c)), db=self.changelog, append=True)
            out.append(MembershipChange(c.audience_id, c.person_key, c.direction, c.effective_us, c.cause,
                                        c.message_id, seq))
        txn.put(CHANGELOG_SEQ, U64.pack(seq), db=self.meta)
        metrics.membership_changes((c.audience_id, c.direction) for c in changes)  # counted as written, before the commit
        return out


def _stored_state(v) -> tuple[int | None, int | None, int, bytes]:
    deadline, pid, generation = STATE_HEAD.unpack_from(v)
    return (None if deadline < 0 else deadline), (None if pid < 0 else pid), generation, bytes(v[STATE_HEAD.size:])


def pack_change(c: MembershipChange) -> list:
    """The stored (positional) form of a change: the changelog's, and the dead letters'."""
    return [c.audience_id, c.person_key, int(c.direction), c.effective_us, int(c.cause), c.message_id]


def unpack_change(seq: int, row: list) -> MembershipChange:
    audience, person, direction, effective_us, cause, message_id = row
    return MembershipChange(audience, person, Direction(direction), effective_us, Cause(cause), message_id, seq)


def changelog_head(txn, meta_db) -> int:
    """The last committed changelog sequence (0: none)."""
    raw = txn.get(CHANGELOG_SEQ, db=meta_db)
    return U64.unpack(raw)[0] if raw else 0


def read_changelog(txn, db, after: int = 0, limit: int = 1000) -> list[MembershipChange]:
    """Changes with sequence > after, oldest first (any process)."""
    out = []
    cur = txn.cursor(db=db)
    if cur.set_range(SEQ_KEY.pack(after + 1)):
        for k, v in cur:
            out.append(unpack_change(SEQ_KEY.unpack(k)[0], msgpack.unpackb(v)))
            if len(out) >= limit:
                break
    return out


def _page(txn, index, audience_id: str, after: str, limit: int) -> tuple[list[str], str]:
    prefix = audience_id.encode() + b"\x00"
    cur = txn.cursor(db=index)
    keys: list[str] = []
    if cur.set_range(prefix + after.encode()):
        for k in cur.iternext(values=False):
            if not k.startswith(prefix):
                break
            key = k[len(prefix):].decode()
            if after and key <= after:
                continue
            if len(keys) == limit:
                return keys, keys[-1]
            keys.append(key)
    return keys, ""


def _catalog(txn, meta) -> list[str | None]:
    return list(json.loads(txn.get(CATALOG, db=meta) or b"{}").get("audiences", []))


def stored_audiences(lmdb_dir) -> list[dict] | None:
    """The audience records in a data folder's environment, read-only (beside a running server too).

    None when the folder holds no Qualify data; [] when it holds no audiences yet.
    """
    try:
        env = open_env(lmdb_dir, 0, readonly=True)
    except FileNotFoundError:
        return None
    try:
        try:
            db = env.open_db(AUDIENCES, create=False)
        except lmdb.NotFoundError:
            return []
        with env.begin() as txn:
            return [json.loads(v) for _, v in txn.cursor(db=db)]
    finally:
        env.close()


def states_after(txn, db, after: str, limit: int) -> list[tuple[str, tuple[int | None, int | None, int, bytes]]]:
    """Up to ``limit`` people of the state table ``db`` in key order after ``after``, each with their stored tuple."""
    out = []
    with txn.cursor(db=db) as cur:
        k = after.encode()
        found = cur.set_range(k)
        if found and cur.key() == k:
            found = cur.next()
        while found and len(out) < limit:
            out.append((bytes(cur.key()).decode(), _stored_state(cur.value())))
            found = cur.next()
    return out


def person_seqs(txn, db, person_key: str, upto: int | None = None) -> list[int]:
    """The log sequences in the person index ``db`` of a person's events, ascending (up to ``upto``, inclusive)."""
    prefix = person_key.encode() + b"\x00"
    out = []
    cur = txn.cursor(db=db)
    if cur.set_range(prefix):
        for k in cur.iternext(values=False):
            if not k.startswith(prefix):
                break
            seq = SEQ_KEY.unpack(k[len(prefix):])[0]
            if upto is not None and seq > upto:
                break
            out.append(seq)
    return out
