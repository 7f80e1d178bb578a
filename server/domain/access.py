"""What one caller may read: all collections and fields, or a named few.

A key that a browser carries is public in all but name: anybody who opens
the page can copy it. Such a key ("publishable") is limited to the
collections and fields the page needs, plus membership, so copying it
reveals nothing more than the page itself shows. The check runs before any
record is looked up, so a refusal says nothing about whether a record exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PermissionDenied


@dataclass(frozen=True)
class Access:
    """``collections`` / ``fields`` None: no limit on that axis."""

    collections: frozenset[str] | None = None
    fields: frozenset[str] | None = None
    key_id: str = ""

    @property
    def limited(self) -> bool:
        return self.collections is not None or self.fields is not None

    def check_collection(self, collection: str) -> None:
        if self.collections is not None and collection not in self.collections:
            raise PermissionDenied(f"the API key {self.key_id} may not read the collection {collection!r}",
                                   metadata={"key_id": self.key_id, "collection": collection})

    def paths(self, columns: tuple[str, ...], requested: tuple[str, ...]) -> tuple[str, ...]:
        """The fields to read: ``requested`` ("": all there are), within what the key may read."""
        if self.fields is None:
            return requested
        if not requested:  # "everything" means everything this key may see, in column order
            return tuple(c for c in columns if c in self.fields)
        outside = [p for p in requested if p not in self.fields]
        if outside:
            raise PermissionDenied(f"the API key {self.key_id} may not read the field {outside[0]!r}",
                                   metadata={"key_id": self.key_id, "field": outside[0]})
        return requested


EVERYTHING = Access()
