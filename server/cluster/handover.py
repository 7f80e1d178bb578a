"""Identity merges across partitions: a person's history moves to the partition of the user it was linked to.

(The first version keeps merges within a partition, as on one node, and
leaves an anonymous person hashed elsewhere where they are; see the
README's cluster guarantees.)
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class Handovers:
    """Runs on the partition's writer thread, inside ``Applier.apply``'s transaction."""

    def __init__(self, applier, txn):
        self.applier = applier

    def hand_over(self, txn, event, now: int) -> None:
        """An identify or alias here links a person of this partition to a user owned elsewhere."""

    def forward(self, txn, event, now: int) -> bool:
        """Whether ``event`` names someone who moved to another partition (then it was forwarded there)."""
        return False

    def receive(self, txn, item, now: int) -> None:
        """A history handed over by another partition joins its user's here."""
