"""Read views of the realtime tables: each call one read transaction, from any thread or process.

Watches, realtime syncs and AudienceService's reads use these; they see what
has committed and never wait for the writer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from ..domain.backfill import fraction
from ..domain.changes import MembershipChange
from .lmdb_store import META
from .realtime import (AUDIENCE_MEMBERS, AUDIENCES, BACKFILL, CHANGELOG, COUNTS, MEMBERS, SEQ_KEY, _catalog, _page,
                       changelog_head, decode_membership, read_changelog)


class ChangelogView:
    """The changelog and the member index from any process, each read in its own transaction."""

    def __init__(self, env):
        self.env = env
        with env.begin() as txn:
            self.meta = env.open_db(META, txn=txn, create=False)
            self.changelog = env.open_db(CHANGELOG, txn=txn, create=False)
            self.audience_members = env.open_db(AUDIENCE_MEMBERS, txn=txn, create=False)
            self.members = env.open_db(MEMBERS, txn=txn, create=False)

    def head(self) -> int:
        with self.env.begin() as txn:
            return changelog_head(txn, self.meta)

    def read(self, after: int, limit: int) -> list[MembershipChange]:
        with self.env.begin() as txn:
            return read_changelog(txn, self.changelog, after, limit)

    def start(self) -> int:
        """The oldest retained change's sequence (0: none retained)."""
        with self.env.begin() as txn, txn.cursor(db=self.changelog) as cur:
            return SEQ_KEY.unpack(cur.key())[0] if cur.first() else 0

    def audiences(self) -> tuple[list[str], int]:
        """The audiences that exist, and the changelog head, in one read."""
        with self.env.begin() as txn:
            return [a for a in _catalog(txn, self.meta) if a is not None], changelog_head(txn, self.meta)

    def snapshot(self, audience_ids: list[str]):
        """Yields the changelog head, then (audience, person key, enter time) of every member, in one read."""
        with self.env.begin() as txn:
            yield changelog_head(txn, self.meta)
            bits = _catalog(txn, self.meta)
            for aid in audience_ids:
                if aid in bits:
                    for key, enter_us in _members_of(txn, self.audience_members, self.members, aid, bits.index(aid)):
                        yield aid, key, enter_us


class AudienceReads:
    """Audience definitions, counts and memberships as committed, each call one read transaction (any thread)."""

    def __init__(self, env):
        self.env = env
        with env.begin() as txn:
            self.meta = env.open_db(META, txn=txn, create=False)
            self.audiences = env.open_db(AUDIENCES, txn=txn, create=False)
            self.members = env.open_db(MEMBERS, txn=txn, create=False)
            self.audience_members = env.open_db(AUDIENCE_MEMBERS, txn=txn, create=False)

    def read(self, fn):
        """``fn(txn)`` in a read transaction of its own: a consistent snapshot of what has committed."""
        with self.env.begin() as txn:
            return fn(txn)

    def audience(self, audience_id: str) -> tuple[dict | None, int]:
        """The stored record (None: no such audience, else with its ``backfill`` progress) and its member count."""
        k = _key(audience_id)
        if k is None:
            return None, 0
        with self.env.begin() as txn:
            raw = txn.get(k, db=self.audiences)
            counts = json.loads(txn.get(COUNTS, db=self.meta) or b"{}")
            walk = _backfill(txn, self.meta)
        return (_with_state(json.loads(raw), walk) if raw else None), counts.get(audience_id, 0)

    def all(self) -> list[tuple[dict, int]]:
        """Every stored record, in id order (with its ``backfill`` progress), and its member count."""
        with self.env.begin() as txn:
            counts = json.loads(txn.get(COUNTS, db=self.meta) or b"{}")
            walk = _backfill(txn, self.meta)
            return [(_with_state(json.loads(v), walk), counts.get(k.decode(), 0))
                    for k, v in txn.cursor(db=self.audiences)]

    def memberships(self, person_key: str, audience_ids: list[str]) -> tuple[list[str], list[tuple[str, int]]]:
        """(the named audiences that do not exist, (audience, enter time) of those the person is in); none named: all."""
        with self.env.begin() as txn:
            existing = sorted(k.decode() for k in txn.cursor(db=self.audiences).iternext(values=False))
            ids = audience_ids or existing
            missing = [a for a in ids if a not in existing]
            bits = _catalog(txn, self.meta)
            k = _key(person_key)
            member = decode_membership(txn.get(k, db=self.members)) if k is not None else {}
        found = [(a, member[bits.index(a)]) for a in ids if a in bits and bits.index(a) in member]
        return missing, found

    def list_members(self, audience_id: str, after: str, limit: int) -> tuple[bool, list[str], str]:
        """(whether the audience exists, a page of member keys after ``after``, the next page's token)."""
        k = _key(audience_id)
        if k is None:
            return False, [], ""
        with self.env.begin() as txn:
            if txn.get(k, db=self.audiences) is None:
                return False, [], ""
            keys, token = _page(txn, self.audience_members, audience_id, after, limit)
        return True, keys, token


def _backfill(txn, meta) -> dict | None:
    raw = txn.get(BACKFILL, db=meta)
    return json.loads(raw) if raw else None


def _with_state(record: dict, walk: dict | None) -> dict:
    """The record, with ``backfill``: None when LIVE, else how far its backfill is (0 to 1)."""
    record["backfill"] = fraction(walk) if walk is not None and record["id"] in walk["audiences"] else None
    return record


def _members_of(txn, index, members, audience_id: str, bit: int) -> Iterator[tuple[str, int]]:
    prefix = audience_id.encode() + b"\x00"
    cur = txn.cursor(db=index)
    if cur.set_range(prefix):
        for k in cur.iternext(values=False):
            if not k.startswith(prefix):
                break
            key = k[len(prefix):]
            enter = decode_membership(txn.get(key, db=members)).get(bit)
            if enter is not None:
                yield key.decode(), enter


def _key(text: str) -> bytes | None:
    """``text`` as an LMDB key, or None when no key can be it (empty, over 511 bytes, not UTF-8)."""
    try:
        raw = text.encode()
    except UnicodeEncodeError:  # a lone surrogate from a lenient decode: nothing is stored under it
        return None
    return raw if 0 < len(raw) <= 511 else None
