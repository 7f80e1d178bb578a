"""Audience definitions: an id, names people read, and the condition tree with its JSON form."""

from __future__ import annotations

from dataclasses import dataclass

from .conditions import REALTIME, Condition, walk
from .errors import FieldViolation, InvalidAudience, InvalidRequest

AUDIENCE_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")


@dataclass
class Audience:
    id: str
    display_name: str
    description: str
    definition: dict  # the condition in its JSON form, as given
    condition: Condition
    create_us: int
    update_us: int

    def record(self) -> dict:
        """The stored form."""
        return {"id": self.id, "display_name": self.display_name, "description": self.description,
                "condition": self.definition, "create_us": self.create_us, "update_us": self.update_us}


def check_audience_id(audience_id: str) -> None:
    if not audience_id or len(audience_id) > 63 or not set(audience_id) <= AUDIENCE_ID_CHARS:
        raise InvalidRequest(f"invalid audience id {audience_id!r}",
                             violations=[FieldViolation("audience.id", "must be 1-63 characters of a-z, 0-9, _ and -")])


def check_windows(condition: Condition, retention_us: int) -> None:
    """Refuses a window longer than the event log keeps: its backfill, and a restart's, would miss events."""
    # a sequence's within reaches back as far as its window: its first step may be that old
    longest = max((max(c.window_us, getattr(c, "within_us", 0)) for c in walk(condition) if isinstance(c, REALTIME)),
                  default=0)
    if longest > retention_us:
        raise InvalidAudience(
            f"a window of {longest / 1e6:g}s is longer than [realtime] event_retention ({retention_us / 1e6:g}s)",
            violations=[FieldViolation("audience.condition", f"windows must be at most event_retention "
                                                             f"({retention_us / 1e6:g}s), not {longest / 1e6:g}s")])
