"""Audience definitions: loaded at a restart; created, updated, deleted. A change costs the program switch, not the history.

Create and update store the definition and switch the program at once; a
backfill (backfill.py) then brings the members, beside ingest. Renaming
moves nobody. Delete costs what the audience's members cost: each exits,
and the other audiences keep their state. These functions run inside the
engine, on the writer thread.
"""

from __future__ import annotations

from . import backfill
from .audiences import Audience, check_audience_id, check_windows
from .changes import Cause, Direction, MembershipChange
from .conditions import parse_condition
from .errors import AudienceExists, AudienceNotFound, FieldViolation, InvalidAudience


def load(engine, txn) -> None:
    """The stored audiences and their membership bits, as a restart finds them."""
    engine.bits = engine.store.catalog_bits(txn)
    for rec in engine.store.load_audiences(txn):
        try:
            cond = parse_condition(rec["condition"], engine.attribute_types, engine.event_model_props)
        except InvalidAudience as exc:
            raise InvalidAudience(f"stored audience {rec['id']!r} no longer fits the project: {exc}",
                                  violations=exc.violations) from None
        engine.audiences[rec["id"]] = Audience(rec["id"], rec["display_name"], rec["description"],
                                               rec["condition"], cond, rec["create_us"], rec["update_us"])
        if rec["id"] not in engine.bits:
            engine.bits.append(rec["id"])


def put(engine, txn, audience_id: str, display_name: str, description: str, definition: dict,
        now_us: int, create: bool) -> tuple[Audience, list[MembershipChange]]:
    """Stores the audience and switches the program at once; a backfill then brings its members."""
    check_audience_id(audience_id)
    exists = audience_id in engine.audiences
    if create and exists:
        raise AudienceExists(f"audience {audience_id!r} already exists", violations=[FieldViolation("audience.id", "already exists")])
    if not create and not exists:
        raise AudienceNotFound(f"no audience {audience_id!r}", metadata={"audience": audience_id})
    condition = parse_condition(definition, engine.attribute_types, engine.event_model_props, path="audience.condition")
    check_windows(condition, engine.retention_us)
    due: list[MembershipChange] = []
    engine._fire_due(txn, now_us, due)
    engine._persist(txn, due)
    old = engine.audiences.get(audience_id)
    audience = Audience(audience_id, display_name, description, definition, condition,
                        old.create_us if old else now_us, now_us)
    engine.audiences[audience_id] = audience
    engine.store.put_audience(txn, audience.record())
    if old is not None and old.definition == definition:  # names only: nobody moves
        return audience, due
    if not exists:
        free = engine.bits.index(None) if None in engine.bits else len(engine.bits)
        if free == len(engine.bits):
            engine.bits.append(audience_id)
        else:
            engine.bits[free] = audience_id
        engine.store.set_catalog_bits(txn, engine.bits)
    engine._switch(txn)
    backfill.start(engine, txn, [audience_id], now_us, new=not exists)
    if engine.on_backfill is not None:
        engine.on_backfill()
    return audience, due


def delete(engine, txn, audience_id: str, now_us: int) -> list[MembershipChange]:
    """Every member exits (from the audience's member index); the others keep their state."""
    if audience_id not in engine.audiences:
        raise AudienceNotFound(f"no audience {audience_id!r}", metadata={"audience": audience_id})
    due: list[MembershipChange] = []
    engine._fire_due(txn, now_us, due)
    engine._persist(txn, due)
    bit = engine.bits.index(audience_id)
    changes = []
    for key in engine.store.member_keys(txn, audience_id):  # what its members cost, not everyone
        bits = engine.store.membership(txn, key)
        if bits.pop(bit, None) is not None:
            changes.append(MembershipChange(audience_id, key, Direction.EXIT, now_us, Cause.AUDIENCE_CHANGE))
            engine.store.put_membership(txn, key, bits)
            slot = engine.slots.get(key)
            if slot is not None:
                engine.members[slot].pop(bit, None)
                engine.current[slot] = None
    engine._persist(txn, changes)
    del engine.audiences[audience_id]
    engine.bits[bit] = None
    engine.counts.pop(audience_id, None)
    if engine.defaults is not None:
        engine.defaults.pop(audience_id, None)
    engine.store.put_counts(txn, engine.counts)
    engine.store.delete_audience(txn, audience_id)
    engine.store.set_catalog_bits(txn, engine.bits)
    backfill.forget(engine, txn, audience_id)
    engine._switch(txn)  # the others keep their state: no one's membership in them moves
    return due + changes
