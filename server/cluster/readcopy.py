"""Every node's read copy: the whole cluster's memberships, from ``qualify.changes.>``, beside its own warehouse sync.

Reads are answered by any node from its local LMDB environment, laid out
exactly as on one node (storage/lmdb_store.py, storage/realtime.py), so
Personalize Get and BatchGet, CheckMembership, ListMembers, GetAudience,
WatchMemberships and the HTTP API run the single-node code unchanged, at
its cost. What differs is who writes it:

- the warehouse: this node syncs it itself, as one node does;
- memberships, the member index, counts and the changelog: applied from
  the changes every partition owner publishes, consumed in the CHANGES
  stream's order by an ordered consumer that resumes after the stream
  sequence stored with them. A partition's changes are applied in its own
  sequence; one already applied (a replay by a new owner) is skipped;
- audience definitions: from the ``qualify-audiences`` bucket.

Sequences. Each change in the read copy's changelog gets ``(CHANGES stream
sequence << 16) | its index in the message``: the same number on every
node, increasing in the order every node applies them. That is the
cluster-wide position WatchMemberships resumes from on any node (one
integer, rather than a vector of per-partition sequences: the stream
already totally orders the partitions' changes).

Staleness: a read on any node reflects an event once its owner has applied
it, published the change and this node has applied that message: a few
milliseconds on a LAN (bench/RESULTS.md measures it), bounded by the
owner's consumer lag plus this node's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time

import msgpack
from nats.js import api

from ..domain.changes import Direction
from ..storage.realtime import CHANGELOG_SEQ, SEQ_KEY, RealtimeStore
from .apply import APPLYING
from .jetstream import CHANGES_PREFIX, resubscribe, retry
from .messages import change_of, change_rows

log = logging.getLogger(__name__)

POSITION = b"cluster.changes"  # meta: the CHANGES stream sequence applied
PARTITION_SEQS = b"cluster.partition_seqs"  # meta: JSON {partition: its last change applied}
U64 = struct.Struct("<Q")
BATCH = 2000
INDEX_BITS = 16
ENTER = int(Direction.ENTER)
INFO_TIMEOUT = 2.0  # a consumer_info the stream's leader election leaves unanswered counts as a failure
STALLED = 5.0  # seconds without a delivery, with changes waiting, before the consumer is replaced
TURN_WAIT = 0.05  # seconds a batch waits for the partitions' apply lock before it applies beside them


class ReadCopy:
    """Applies the cluster's changes and audiences to this node's environment (through its writer)."""

    def __init__(self, env, writer, res, publish):
        self.env = env
        self.writer = writer
        self.res = res
        # called on the writer thread after the commit: publish(head sequence, a function making the changes)
        self.publish = publish
        self.position = 0
        self.seqs: dict[int, int] = {}
        self._buffer: list = []
        self._arrived = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._sub = None
        self._delivered_at = time.monotonic()
        self.store: RealtimeStore | None = None

    async def start(self) -> None:
        def open_tables(txn):
            self.store = RealtimeStore(self.env, txn)
            raw = txn.get(POSITION, db=self.store.meta)
            self.position = U64.unpack(raw)[0] if raw else 0
            self.seqs = {int(k): v for k, v in json.loads(txn.get(PARTITION_SEQS, db=self.store.meta) or b"{}").items()}

        await asyncio.wrap_future(self.writer.submit(open_tables))
        # (JetStream may not answer for a few seconds yet: a NATS server that just restarted is rejoining.)
        await retry(self._subscribe, "the changes subscription")
        self._tasks = [asyncio.create_task(t) for t in (self._apply_loop(), self._audiences(), self._watchdog())]

    async def _subscribe(self) -> None:
        start = max([self.position] + [seq for seq, _ in self._buffer[-1:]]) + 1
        self._sub = await self.res.js.subscribe(
            CHANGES_PREFIX + "*", cb=self._deliver, ordered_consumer=True, idle_heartbeat=2.0,
            config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                                      opt_start_seq=start, inactive_threshold=30.0))
        self._delivered_at = time.monotonic()

    async def _watchdog(self) -> None:
        """The partitions' consumer watchdog (cluster/partition.py ``_measure_lag``), for the changes."""
        failures = 0
        while True:
            await asyncio.sleep(1.0)
            stalled = time.monotonic() - self._delivered_at > STALLED
            try:
                waiting, failures = (await asyncio.wait_for(self._sub.consumer_info(), INFO_TIMEOUT)).num_pending, 0
            except Exception:  # noqa: BLE001 - a NATS server away, or the consumer is gone
                waiting, failures = None, failures + 1
            if stalled and (waiting or failures >= STALLED) and \
                    await resubscribe(self._sub, self._subscribe, "the changes consumer"):
                failures = 0

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the consumer expires by itself
                pass
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- changes ------------------------------------------------------------------------
    async def _deliver(self, msg) -> None:
        self._delivered_at = time.monotonic()
        seq = msg.metadata.sequence.stream
        if self._buffer and seq <= self._buffer[-1][0]:
            return  # a resubscription delivers again what was buffered
        self._buffer.append((seq, msg.data))
        self._arrived.set()

    async def _apply_loop(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self._buffer:
                batch, self._buffer = self._buffer[:BATCH], self._buffer[BATCH:]
                try:
                    await asyncio.wrap_future(self.writer.submit(lambda txn, b=batch: self._apply(txn, b)))
                except Exception:  # noqa: BLE001 - retried: the position only moves with a commit
                    log.exception("applying %d change messages failed; retrying", len(batch))
                    self._buffer[:0] = batch
                    await asyncio.sleep(0.5)

    def _apply(self, txn, batch) -> None:
        """``_apply_batch`` taking its turn with the partitions' jobs (cluster/apply.py APPLYING), but
        never waiting more than TURN_WAIT behind one (an audience's walk, a slice's warehouse sync).

        Outside the lock, every LMDB call here released the GIL to a partition thread and waited to get
        it back: the read copy's thread made ~0.5 voluntary context switches per ingested event."""
        turn = APPLYING.acquire(timeout=TURN_WAIT)
        try:
            self._apply_batch(txn, batch)
        finally:
            if turn:
                APPLYING.release()

    def _apply_batch(self, txn, batch) -> None:
        """One transaction for a batch of change messages: the changelog's rows in one putmulti, each
        person's membership read and written once, each (audience, person) of the member index once
        (its last state in the batch), the counts once; no MembershipChange is made unless the feed
        has a subscription that wants them (``publish``)."""
        store = self.store
        bits = store.catalog_bits(txn)
        n_bits = list(bits)
        bit_of = {a: i for i, a in enumerate(n_bits) if a is not None}
        counts = store.counts(txn)
        seqs = dict(self.seqs)
        members: dict[str, dict[int, int]] = {}
        index: dict[bytes, bool] = {}  # member index key -> member, the batch's last word on it
        stored: list[tuple[bytes, bytes]] = []  # the changelog's (key, value) pairs, in order
        made: list[tuple[list, int]] = []  # (row, read-copy sequence), for the feed
        position = self.position
        pack, seq_key, get_membership = msgpack.packb, SEQ_KEY.pack, store.membership
        for stream_seq, data in batch:
            if stream_seq <= position:
                continue
            position = stream_seq
            partition, first, rows = change_rows(data)
            last = seqs.get(partition, 0)
            base = stream_seq << INDEX_BITS
            for i, row in enumerate(rows):
                if first + i <= last:
                    continue  # a new owner published what its predecessor had: the same change
                if first + i != last + 1:
                    log.warning("partition %d: changes %d to %d are missing", partition, last + 1, first + i - 1)
                last = first + i
                sequence = base | i
                stored.append((seq_key(sequence), pack(row)))  # the row is pack_change's form
                made.append((row, sequence))
                audience_id, person_key, direction, effective_us = row[0], row[1], row[2], row[3]
                enter = direction == ENTER
                bit = bit_of.get(audience_id)
                if bit is None:
                    if not enter:
                        continue  # an exit from an audience deleted meanwhile: its members already left here
                    bit = bit_of[audience_id] = _bit(n_bits, audience_id)
                m = members.get(person_key)
                if m is None:
                    m = members[person_key] = get_membership(txn, person_key)
                if enter:
                    m[bit] = effective_us
                else:
                    m.pop(bit, None)
                index[audience_id.encode() + b"\x00" + person_key.encode()] = enter
                counts[audience_id] = counts.get(audience_id, 0) + (1 if enter else -1)
            seqs[partition] = last
        for key, m in members.items():
            store.put_membership(txn, key, m)
        if index:
            entered = [(k, b"") for k, member in index.items() if member]
            if entered:
                with txn.cursor(db=store.audience_members) as cur:
                    cur.putmulti(entered)
            for k, member in index.items():
                if not member:
                    txn.delete(k, db=store.audience_members)
        if stored:
            with txn.cursor(db=store.changelog) as cur:
                cur.putmulti(stored, append=True)
            txn.put(CHANGELOG_SEQ, U64.pack(made[-1][1]), db=store.meta)
            store.put_counts(txn, counts)
        if n_bits != bits:
            store.set_catalog_bits(txn, n_bits)
        txn.put(POSITION, U64.pack(position), db=store.meta)
        txn.put(PARTITION_SEQS, json.dumps(seqs).encode(), db=store.meta)

        def committed():
            self.position, self.seqs = position, seqs
            if made:
                self.publish(made[-1][1], lambda: [change_of(row, sequence) for row, sequence in made])

        self.writer.after_commit(committed)

    # -- audiences ------------------------------------------------------------------------
    async def _audiences(self) -> None:
        while True:
            try:
                watcher = await self.res.audiences.watchall()
                async for entry in watcher:
                    if entry is None:
                        continue
                    deleted = entry.operation in ("DEL", "PURGE") or not entry.value
                    record = None if deleted else json.loads(entry.value)
                    if record is not None and record.get("deleted"):  # a tombstone (cluster/audiences.py)
                        record = None
                    await asyncio.wrap_future(self.writer.submit(
                        lambda txn, k=entry.key, r=record: self._put_audience(txn, k, r)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a NATS server went away: watch again
                log.warning("watching audiences failed (%s); watching again", exc)
                await asyncio.sleep(0.5)

    def _put_audience(self, txn, audience_id: str, record: dict | None) -> None:
        store = self.store
        bits = store.catalog_bits(txn)
        if record is not None:
            store.put_audience(txn, {k: record[k] for k in ("id", "display_name", "description", "condition",
                                                            "create_us", "update_us")})
            if audience_id not in bits:
                _bit(bits, audience_id)
                store.set_catalog_bits(txn, bits)
            return
        if txn.get(audience_id.encode(), db=store.audiences) is None:
            return
        if audience_id in bits:  # its members leave with it: the bit may serve another audience later
            bit = bits.index(audience_id)
            for key in store.member_keys(txn, audience_id):
                m = store.membership(txn, key)
                m.pop(bit, None)
                store.put_membership(txn, key, m)
            bits[bit] = None
            store.set_catalog_bits(txn, bits)
        counts = store.counts(txn)
        counts.pop(audience_id, None)
        store.put_counts(txn, counts)
        store.delete_audience(txn, audience_id)


def _bit(bits: list, audience_id: str) -> int:
    """The audience's membership bit, assigning the first free one on first sight."""
    if audience_id in bits:
        return bits.index(audience_id)
    free = bits.index(None) if None in bits else len(bits)
    if free == len(bits):
        bits.append(audience_id)
    else:
        bits[free] = audience_id
    return free
