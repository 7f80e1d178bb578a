"""LMDB tables of the realtime syncs: definitions, delivery state, dead letters.

The changelog is the outbox: every change a sync must deliver is already
durable there, committed with its cause. A sync only needs its cursor (the
sequence delivered up to) to resume after an outage or a restart, so no
change is copied per sync on the ingest path. Changes that used up their
attempts move to the dead-letter table in the same transaction that moves the
cursor past them.

Named databases::

    syncs          sync id -> JSON SyncSpec (the webhook secret included)
    sync_state     sync id -> JSON {cursor, delivered, retries, dead_lettered, last_error, last_error_us}
    dead_letters   sync id | 0x00 | u64 sequence (big-endian) -> msgpack [change row, attempts, error, dead_us]
"""

from __future__ import annotations

import json
from dataclasses import asdict

import msgpack

from ..domain.changes import MembershipChange
from ..domain.syncs import DeadLetter, SyncSpec, SyncState
from .lmdb_store import META, delete_prefix
from .realtime import SEQ_KEY, changelog_head, pack_change, unpack_change

SYNCS = b"syncs"
SYNC_STATE = b"sync_state"
DEAD_LETTERS = b"dead_letters"


def _dl_key(sync_id: str, seq: int) -> bytes:
    return sync_id.encode() + b"\x00" + SEQ_KEY.pack(seq)


class SyncTables:
    """The sync tables of one environment; every method takes a transaction."""

    def __init__(self, env, txn):
        """Opens (creating) the tables in ``txn``, a write transaction of the writer."""
        self.env = env
        self.meta = env.open_db(META, txn=txn)
        self.specs = env.open_db(SYNCS, txn=txn)
        self.states = env.open_db(SYNC_STATE, txn=txn)
        self.dead = env.open_db(DEAD_LETTERS, txn=txn)

    def read(self, fn):
        """``fn(txn)`` in a read transaction of its own."""
        with self.env.begin() as txn:
            return fn(txn)

    def changelog_head(self, txn) -> int:
        """The last changelog sequence ``txn`` sees: where a new sync starts."""
        return changelog_head(txn, self.meta)

    def min_cursor(self, txn) -> int | None:
        """The least cursor of every sync (None: no sync): the changelog must keep what comes after it."""
        cursors = [json.loads(v)["cursor"] for _, v in txn.cursor(db=self.states)]
        return min(cursors) if cursors else None

    def exists(self, txn, sync_id: str) -> bool:
        return txn.get(sync_id.encode(), db=self.specs) is not None

    # -- definitions and state ----------------------------------------------------
    def load(self, txn) -> list[tuple[SyncSpec, SyncState]]:
        out = []
        for k, v in txn.cursor(db=self.specs):
            raw = txn.get(k, db=self.states)
            out.append((SyncSpec.from_json(json.loads(v)), SyncState(**json.loads(raw)) if raw else SyncState()))
        return out

    def put_spec(self, txn, spec: SyncSpec) -> None:
        txn.put(spec.id.encode(), json.dumps(spec.to_json()).encode(), db=self.specs)

    def put_state(self, txn, sync_id: str, state: SyncState) -> None:
        txn.put(sync_id.encode(), json.dumps(asdict(state)).encode(), db=self.states)

    def delete(self, txn, sync_id: str) -> None:
        txn.delete(sync_id.encode(), db=self.specs)
        txn.delete(sync_id.encode(), db=self.states)
        delete_prefix(txn, self.dead, sync_id.encode() + b"\x00")

    # -- dead letters -------------------------------------------------------------------
    def add_dead(self, txn, sync_id: str, changes: list[MembershipChange], attempts: int, error: str,
                 now_us: int) -> None:
        for c in changes:
            txn.put(_dl_key(sync_id, c.sequence), msgpack.packb([pack_change(c), attempts, error, now_us]), db=self.dead)

    def remove_dead(self, txn, sync_id: str, seqs: list[int]) -> None:
        for seq in seqs:
            txn.delete(_dl_key(sync_id, seq), db=self.dead)

    def dead_letters(self, txn, sync_id: str, after: int = 0, limit: int = 100) -> list[DeadLetter]:
        """Dead letters with sequence > after, oldest first."""
        prefix = sync_id.encode() + b"\x00"
        out: list[DeadLetter] = []
        cur = txn.cursor(db=self.dead)
        if cur.set_range(_dl_key(sync_id, after + 1)):
            for k, v in cur:
                if not k.startswith(prefix) or len(out) >= limit:
                    break
                row, attempts, error, dead_us = msgpack.unpackb(v)
                seq = SEQ_KEY.unpack(k[len(prefix):])[0]
                out.append(DeadLetter(unpack_change(seq, row), attempts, error, dead_us))
        return out
