"""PreviewAudience and SimulateAudience in a cluster: scattered to every partition's owner, gathered by the asker.

Each partition is a complete single-node store of its people (cluster/apply.py):
their realtime state, their logged events, and the slice of the warehouse whose
keys hash to it. A person lives in exactly one partition (an identity merge
moves the anonymous history to the user's partition: cluster/handover.py), so
a cluster-wide answer is a sum of per-partition answers:

- **preview**: the owner runs the single node's ``preview`` (domain/queries.py)
  on a read snapshot of the partition: the realtime members are replayed from
  their own events, the warehouse-only members come from the partition's slice.
  Counts add up; samples are merged in key order and cut to the sample size.
- **simulate**: two rounds. First every owner lists the logged events of the
  people who moved out of its partitions (their original records, with the
  anonymous id, at their received times: ``moved``). Then every owner replays
  its partitions' logs (without those people, and without the copies a handover
  appended) plus the histories moved in, merged in received order, through the
  single node's replay (domain/simulate.py) over an in-memory ``History``. So a
  visitor is a person of their own until the identify, in the partition of the
  user they become, exactly as one node replays them. Bucket members, enters and
  exits, members at start and events replayed add up across partitions.

The questions travel on core NATS (``qualify.query.<partition>``), like
ExplainMembership's (cluster/explain.py): nothing worth keeping, and a partition
nobody answers (moving, or its node just died) fails the whole call
UNAVAILABLE with the partitions named, so the caller retries. Owners answer on
one thread per kind of question per node (beside the partitions' writers, never
on them), each partition's answer within the asker's deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import logging
import math
import time
from dataclasses import replace

import msgpack

from ..domain import errors
from ..domain.changes import Direction
from ..domain.conditions import parse_condition
from ..domain.errors import QualifyError, StorageUnavailable
from ..domain.events import ANON, EventType, matching_models
from ..domain.simulate import Bucket, SimulationTooSlow, Timeline, Wanted, plan, simulate
from ..storage.eventlog import decode_event, encode_event
from .partitioning import partition_of, person_key

log = logging.getLogger(__name__)

SUBJECT = "qualify.query."
MARGIN = 0.25  # seconds of the asker's budget kept for the answers' way back
_LINKS = (int(EventType.IDENTIFY), int(EventType.ALIAS))

# One thread each on a node: previews do not queue behind a long replay, and neither takes more than one
# core's worth of the interpreter from the partitions' writers.
_POOLS: dict[str, concurrent.futures.ThreadPoolExecutor] = {}


def _pool(kind: str) -> concurrent.futures.ThreadPoolExecutor:
    if kind not in _POOLS:
        _POOLS[kind] = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"qualify-{kind}")
    return _POOLS[kind]


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot encode {type(value).__name__}")


# -- the owner's side ---------------------------------------------------------------------------------------------
def _preview(partition, deadline: float, condition_json: dict, now_us: int, sample: int) -> list:
    engine = partition.applier.engine
    condition = parse_condition(condition_json, engine.attribute_types, engine.event_model_props)
    with partition.env.begin(buffers=False) as txn:
        count, keys = engine.preview(txn, condition, now_us, sample, deadline)
    return [count, keys]


def _moved(partition, deadline: float, until_us: int) -> list:
    """[[target partition, [event records]], ...]: the logged events of the people who moved away, oldest first."""
    applier = partition.applier
    handovers = applier.handovers
    if not handovers.moved:
        return []
    out: dict[int, list[bytes]] = {}
    with partition.env.begin(buffers=False) as txn:
        for n, e in enumerate(applier.writer.log.read(txn, 1)):
            if n % 1024 == 0 and time.monotonic() > deadline:
                raise errors.PreviewTooSlow("listing the moved histories did not finish in time")
            if e.received_us >= until_us:
                break
            if not handovers.visible(e):
                user = handovers.moved[e.user_id or ANON + e.anonymous_id][0]
                out.setdefault(partition_of(user, applier.partitions), []).append(encode_event(e))
    return [[p, records] for p, records in sorted(out.items())]


def _placed(e) -> tuple[int, int]:
    """Where one node would have logged the event: its ingest call's received time, then its place in the call."""
    return e.received_us, e.arrival


class MergedHistory:
    """domain/simulate.History over a partition's log and the histories moved into it, in received order.

    Its own events are taken in log order but placed by their received time
    (a forwarded event is appended when it arrives from the visitor's
    partition, after events received later); those moved away, and the copies
    a handover appended here, are left out, and the moved-in originals merged
    in, each at its place in its ingest call at ties. At one received instant
    and place (events logged before places were kept) a stream whose next
    event is an identify or an alias waits for the others: on one node the visitor's events of an
    instant come before the link that ends it (cluster/handover.py orders them
    so in each partition's stream). Sequences are renumbered from 1.
    """

    def __init__(self, own: list, moved_in: list[list], models, people, txn):
        copies = {e.message_id for stream in moved_in for e in stream if e.message_id}
        own = [e for e in own if not (e.message_id and e.message_id in copies)]
        streams = [sorted(s, key=_placed) for s in [own, *moved_in]]  # stable: log order at ties
        heap = [(*_placed(s[0]), s[0].type in _LINKS, i, 0) for i, s in enumerate(streams) if s]
        heapq.heapify(heap)
        self.log: list = []
        while heap:
            *_, i, j = heapq.heappop(heap)
            self.log.append(replace(streams[i][j], seq=len(self.log) + 1))
            if j + 1 < len(streams[i]):
                nxt = streams[i][j + 1]
                heapq.heappush(heap, (*_placed(nxt), nxt.type in _LINKS, i, j + 1))
        self.index: dict[str, list[int]] = {}  # person key -> seqs: everyone the event names, as on one node
        self._people, self._txn = people, txn
        for e in self.log:
            keys = {e.user_id or ANON + e.anonymous_id} if (e.user_id or e.anonymous_id) else set()
            keys.update(person_key(kind, ident) for _, (kind, ident) in matching_models(e, models))
            for k in keys:
                self.index.setdefault(k, []).append(e.seq)

    def events(self, wanted: Wanted):
        n = 0
        try:
            for e in self.log:
                if e.received_us >= wanted.until_us:
                    break
                if wanted.first_us is None:
                    wanted.first_us = e.received_us
                n += 1
                if n % 128 == 0:
                    wanted.tick()
                if wanted.everything or e.type in wanted.kinds or (e.type, e.name) in wanted.named:
                    yield e
        finally:
            wanted.read = n

    def person_id(self, key: str) -> int | None:
        return self._people.person_id(self._txn, key)

    def person_seqs(self, key: str, upto: int) -> list[int]:
        return [s for s in self.index.get(key, ()) if s <= upto]

    def event(self, seq: int):
        return self.log[seq - 1] if 0 < seq <= len(self.log) else None


def _simulate(partition, deadline: float, condition_json: dict, start_us: int, end_us: int, bucket_us: int,
              sample: int, moved_in: list[list[bytes]]) -> list:
    applier = partition.applier
    engine = applier.engine
    condition = parse_condition(condition_json, engine.attribute_types, engine.event_model_props)
    replay = plan(engine, condition, start_us, end_us, bucket_us, sample, deadline)
    with partition.env.begin(buffers=False) as txn:
        own = [e for e in applier.writer.log.read(txn, 1) if e.received_us < end_us and applier.handovers.visible(e)]
        history = MergedHistory(own, [[decode_event(0, r) for r in records] for records in moved_in],
                                engine.models, applier.store, txn)
        t = simulate(replay, history)
    return [t.members_at_start, [[b.members, b.enters, b.exits] for b in t.buckets],
            {k: [[int(d), at] for d, at in changes] for k, changes in t.sample.items()},
            t.events_replayed, t.replayed_from_us]


_HANDLERS = {"preview": (_preview, "preview"), "moved": (_moved, "simulate"), "simulate": (_simulate, "simulate")}


async def serve(nc, partition) -> object:
    """Answers for one owned partition (``cluster/partition.py`` ``Partition``) until unsubscribed."""

    async def answer(msg) -> None:
        op, budget, *args = msgpack.unpackb(msg.data)
        handler, pool = _HANDLERS[op]
        deadline = time.monotonic() + budget
        try:
            if partition.applier is None or partition.env is None:
                return  # still starting or stopping: the asker names the partition unavailable
            value = await asyncio.get_running_loop().run_in_executor(
                _pool(pool), lambda: handler(partition, deadline, *args))
            reply = ["ok", value]
        except QualifyError as exc:
            reply = ["error", type(exc).__name__, exc.message, dict(exc.metadata)]
        except Exception:  # noqa: BLE001 - logged here; the asker names the partition unavailable
            log.exception("partition %d: answering %s failed", partition.number, op)
            reply = ["failed"]
        data = msgpack.packb(reply, default=_plain)
        if len(data) > nc.max_payload:  # said so at once, rather than the asker waiting out its deadline
            log.warning("partition %d: the %s answer is %d bytes, above NATS's max_payload", partition.number, op,
                        len(data))
            data = msgpack.packb(["too_big", len(data)])
        try:
            await msg.respond(data)
        except Exception as exc:  # noqa: BLE001 - the asker gave up, or NATS is away: it names us unavailable
            log.warning("partition %d: the %s answer could not be sent (%s)", partition.number, op, exc)

    return await nc.subscribe(SUBJECT + str(partition.number), cb=answer)


# -- the asker's side ---------------------------------------------------------------------------------------------
class Scatter:
    """Asks every partition's owner and gathers the answers (see the module docstring)."""

    def __init__(self, nc, partitions: int):
        self.nc = nc
        self.partitions = partitions

    async def _ask(self, op: str, budget: float, args_of) -> list:
        """Every partition's value, or StorageUnavailable naming the partitions that did not answer."""
        timeout = max(0.05, budget)
        owner_budget = max(0.01, budget - MARGIN)

        async def one(p: int):
            payload = msgpack.packb([op, owner_budget, *args_of(p)], default=_plain)
            if len(payload) > self.nc.max_payload:
                return p, ("too_big", len(payload))
            try:
                msg = await self.nc.request(SUBJECT + str(p), payload, timeout=timeout)
            except Exception as exc:  # noqa: BLE001 - no responders, a timeout, NATS away: all mean "unavailable"
                return p, ("unavailable", type(exc).__name__)
            return p, msgpack.unpackb(msg.data, strict_map_key=False)

        answers = await asyncio.gather(*(one(p) for p in range(self.partitions)))
        too_big = sorted(p for p, a in answers if a[0] == "too_big")
        if too_big:
            raise StorageUnavailable(
                f"the {op} question or answer of partitions {', '.join(map(str, too_big[:20]))} is larger than "
                f"NATS's max_payload ({self.nc.max_payload} bytes): ask for a shorter span, fewer buckets or a "
                "smaller sample, or raise max_payload in the NATS configuration",
                metadata={"partitions": ",".join(map(str, too_big)), "max_payload": str(self.nc.max_payload)})
        missing = sorted(p for p, a in answers if a[0] in ("unavailable", "failed"))
        if missing:
            timed_out = any(a[0] == "unavailable" and a[1] == "TimeoutError" for _, a in answers)
            raise StorageUnavailable(
                f"{len(missing)} of {self.partitions} partitions did not answer "
                f"({'within the deadline' if timed_out else 'no owner, or it failed'}): "
                f"{', '.join(map(str, missing[:20]))}{' ...' if len(missing) > 20 else ''}; "
                "a partition may be moving to another node: retry",
                metadata={"partitions": ",".join(map(str, missing)), "unanswered": str(len(missing))})
        for _, a in answers:
            if a[0] == "error":
                cls = getattr(errors, a[1], None)
                if a[1] == "SimulationTooSlow":
                    cls = SimulationTooSlow
                elif not (isinstance(cls, type) and issubclass(cls, QualifyError)):
                    cls = QualifyError
                raise cls(a[2], metadata=a[3])
        return [a[1] for _, a in sorted(answers, key=lambda pa: pa[0])]

    async def preview(self, condition: dict, now_us: int, sample: int, budget: float) -> tuple[int, list[str]]:
        values = await self._ask("preview", budget, lambda p: (condition, now_us, sample))
        return sum(v[0] for v in values), sorted(k for v in values for k in v[1])[:sample]

    async def simulate(self, condition: dict, start_us: int, end_us: int, bucket_us: int, sample: int,
                       budget: float) -> Timeline:
        t0 = time.monotonic()
        moved = await self._ask("moved", budget, lambda p: (end_us,))
        into: dict[int, list[list[bytes]]] = {}
        for sources in moved:
            for target, records in sources:
                into.setdefault(target, []).append(records)
        left = budget - (time.monotonic() - t0)
        values = await self._ask("simulate", left, lambda p: (condition, start_us, end_us, bucket_us, sample,
                                                                into.get(p, [])))
        buckets = None
        people: dict[str, list] = {}
        replayed_from = math.inf
        for members_at_start, series, sampled, _, first_us in values:
            if buckets is None:
                buckets = [[0, 0, 0] for _ in series]
            for b, s in zip(buckets, series):
                for i in range(3):
                    b[i] += s[i]
            people.update(sampled)
            if first_us is not None:
                replayed_from = min(replayed_from, first_us)
        # The sample: the people whose first change in the span came first (on one node: the replay's order).
        chosen = sorted(people, key=lambda k: (people[k][0][1], k))[:sample]
        n = len(buckets or [])
        return Timeline(start_us, end_us, bucket_us,
                        [Bucket(start_us + i * bucket_us, *buckets[i]) for i in range(n)],
                        sum(v[0] for v in values),
                        {k: [(Direction(d), at) for d, at in people[k]] for k in chosen},
                        sum(v[3] for v in values), None if replayed_from is math.inf else int(replayed_from))
