"""The warehouse side of every audience: synced attribute columns, and warehouse-only subtrees as arrays over person ids.

A condition's subtrees that read no event are computed for everyone at
once, vectorised, when a sync lands (or the audiences change); an event
then tests one precomputed bit per subtree. Someone the warehouse no
longer has reads as missing everywhere.
"""

from __future__ import annotations

import numpy as np

from .compile import Compiled
from .static import evaluate_static, evaluate_static_missing, without_events


class WarehouseParts:
    def __init__(self) -> None:
        self.columns: dict = {}
        self.alive = np.zeros(0, bool)  # person id -> in the last sync
        self.arrays: list[np.ndarray] = []  # static subtree k -> its value per person id
        self.missing: list[bool] = []  # static subtree k -> its value for someone the warehouse lacks
        self.rows = np.zeros((0, 0), bool)  # person id -> every subtree's value: a person's statics are one slice

    def load(self, columns: dict, alive: np.ndarray, compiled: Compiled) -> None:
        self.columns, self.alive = columns, alive
        self.arrays, self.missing = self.evaluate(compiled)
        self.rows = np.stack(self.arrays, axis=1) if self.arrays else np.zeros((len(alive), 0), bool)

    def recompiled(self, compiled: Compiled) -> "WarehouseParts":
        """New parts for another program over the same synced columns (an audience change reads no column)."""
        parts = WarehouseParts()
        parts.load(self.columns, self.alive, compiled)
        return parts

    def evaluate(self, compiled: Compiled) -> tuple[list[np.ndarray], list[bool]]:
        """Each static subtree of ``compiled`` per person id, and its value for someone missing."""
        missing = [evaluate_static_missing(c) for c in compiled.statics]
        arrays = [np.where(self.alive, evaluate_static(c, self.columns, len(self.alive)), miss)
                  for c, miss in zip(compiled.statics, missing)]
        return arrays, missing

    def defaults(self, compiled: Compiled, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Each audience's value, per person id, for someone with no realtime events."""
        return [arr & self.alive for arr in without_events(compiled.program, arrays, len(self.alive))]

    def changed_since(self, before: "WarehouseParts") -> list[int] | None:
        """Person ids whose static subtrees answer differently than in ``before`` (None: not comparable).

        Only these people's memberships can move with a sync: everything
        else an audience reads is realtime state, which the sync leaves alone.
        """
        if before.rows.shape[1] != self.rows.shape[1]:
            return None
        n = min(len(before.rows), len(self.rows))
        differ = np.flatnonzero((before.rows[:n] != self.rows[:n]).any(axis=1)).tolist()
        return differ + list(range(n, len(self.rows)))  # people the warehouse has just learned about

    def statics(self, pid: int | None) -> bytes:
        """The static subtrees' values for one person id (None: not in the warehouse), as bytes of 0 and 1.

        (Bytes, not a list: the engine keeps one per loaded person, and the
        cyclic collector tracks lists but not bytes.)
        """
        return self.rows[pid].tobytes() if pid is not None and pid < len(self.rows) else bytes(self.missing)

    def value(self, name: str, pid: int | None):
        """An attribute's synced value for a person id (None: missing)."""
        col = self.columns.get(name)
        alive = pid is not None and pid < len(self.alive) and self.alive[pid]
        return col.value(pid) if col is not None and alive else None


def changed(new: np.ndarray, old: np.ndarray | None, skip: np.ndarray) -> list[int]:
    """Person ids whose default membership differs between ``old`` and ``new`` (padding a shorter old), less ``skip``."""
    if old is None:
        old = np.zeros(len(new), bool)
    elif len(old) < len(new):
        old = np.concatenate([old, np.zeros(len(new) - len(old), bool)])
    return np.flatnonzero((new != old[: len(new)]) & ~skip).tolist()


def stored_defaults(store, txn, bits: list[str | None], size: int, skip) -> dict[str, np.ndarray]:
    """Who is a member per the tables, per audience and person id, for people not in ``skip`` (after a restart)."""
    out = {aid: np.zeros(size, bool) for aid in bits if aid is not None}
    for key, member_bits in store.all_memberships(txn):
        if key in skip:
            continue
        pid = store.person_id(txn, key)
        if pid is None or pid >= size:
            continue
        for bit in member_bits:
            if bit < len(bits) and bits[bit] in out:
                out[bits[bit]][pid] = True
    return out
