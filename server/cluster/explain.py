"""ExplainMembership in a cluster: asked of the person's partition owner, over NATS request-reply.

The explanation needs the person's realtime state, which only the owner of
their partition holds (in its engine and its partition environment); a read
copy has memberships, not state. So any node asks on the core NATS subject
``qualify.explain.<partition>`` and the owner answers from its engine, on
the partition's writer thread, at the asking node's clock, as one node
answers (services/audiences.py ``explain``). Core NATS, not JetStream: a
question is not worth keeping, and one nobody answers (the partition is
moving, NATS is away) fails UNAVAILABLE and the caller asks again.

Request ``[audience id, person key, now_us]``; reply ``["ok", member,
tree]`` or ``["error", error class name, message, metadata]`` for a domain
error (domain/errors.py), raised again on the asking node.
"""

from __future__ import annotations

import asyncio
import logging

import msgpack

from ..domain import errors
from ..domain.errors import QualifyError, StorageUnavailable
from .partitioning import partition_of

log = logging.getLogger(__name__)

SUBJECT = "qualify.explain."
TIMEOUT = 5.0  # seconds for the owner's answer


def _plain(value):
    """msgpack's fallback for numpy scalars in a tree."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot encode {type(value).__name__}")


async def serve(nc, partition) -> object:
    """Answers for one owned partition (``cluster/partition.py`` ``Partition``) until unsubscribed."""

    async def answer(msg) -> None:
        audience_id, person_key, now_us = msgpack.unpackb(msg.data)
        applier = partition.applier
        try:
            member, tree = await asyncio.wrap_future(partition.writer.submit(
                lambda txn: applier.engine.explain(txn, audience_id, person_key, now_us)))
            reply = ["ok", member, tree]
        except QualifyError as exc:
            reply = ["error", type(exc).__name__, exc.message, dict(exc.metadata)]
        except Exception:  # noqa: BLE001 - logged here; the asker gets UNAVAILABLE when no answer comes
            log.exception("partition %d: explaining %s for %s failed", partition.number, audience_id, person_key)
            return
        await msg.respond(msgpack.packb(reply, default=_plain))

    return await nc.subscribe(SUBJECT + str(partition.number), cb=answer)


class Explainer:
    """The asking side: ``await explainer(audience id, person key, now_us)`` -> (member, tree)."""

    def __init__(self, nc, partitions: int):
        self.nc = nc
        self.partitions = partitions

    async def __call__(self, audience_id: str, person_key: str, now_us: int) -> tuple[bool, dict]:
        subject = SUBJECT + str(partition_of(person_key, self.partitions))
        try:
            msg = await self.nc.request(subject, msgpack.packb([audience_id, person_key, now_us]), timeout=TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - no responders, a timeout, NATS away: all mean "ask again"
            raise StorageUnavailable(f"the owner of {person_key!r}'s partition did not answer ({exc}); "
                                     f"it may be moving to another node: retry") from None
        reply = msgpack.unpackb(msg.data)
        if reply[0] == "ok":
            return bool(reply[1]), reply[2]
        cls = getattr(errors, reply[1], None)
        if not (isinstance(cls, type) and issubclass(cls, QualifyError)):
            cls = QualifyError
        raise cls(reply[2], metadata=reply[3])
