"""Domain errors: one table of reasons, raised by plain-Python code.

The transport maps each error to a gRPC status (see transport/errors.py); the
reason names are qualify.v1.ErrorReason's, so clients can branch on them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Status(enum.Enum):
    """The gRPC status family an error belongs to (no grpc import here)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    UNAVAILABLE = "UNAVAILABLE"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    INTERNAL = "INTERNAL"


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field: its path (e.g. ``keys[3]``) and what is wrong."""

    field: str
    description: str


@dataclass
class QualifyError(Exception):
    """Base of every error the server reports to a caller."""

    message: str
    violations: list[FieldViolation] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    status = Status.INTERNAL
    reason = "INTERNAL_ERROR"

    def __str__(self) -> str:
        return self.message


class InvalidRequest(QualifyError):
    status, reason = Status.INVALID_ARGUMENT, "INVALID_REQUEST"


class UnknownCollection(QualifyError):
    status, reason = Status.INVALID_ARGUMENT, "UNKNOWN_COLLECTION"


class UnknownField(QualifyError):
    status, reason = Status.INVALID_ARGUMENT, "UNKNOWN_FIELD"


class BatchTooLarge(QualifyError):
    status, reason = Status.INVALID_ARGUMENT, "BATCH_TOO_LARGE"


class KeyNotFound(QualifyError):
    status, reason = Status.NOT_FOUND, "KEY_NOT_FOUND"


class NotReady(QualifyError):
    status, reason = Status.UNAVAILABLE, "NOT_READY"


class ShuttingDown(QualifyError):
    status, reason = Status.UNAVAILABLE, "SHUTTING_DOWN"


class NotImplementedYet(QualifyError):
    status, reason = Status.UNIMPLEMENTED, "NOT_IMPLEMENTED"


class StorageUnavailable(QualifyError):
    status, reason = Status.UNAVAILABLE, "STORAGE_UNAVAILABLE"


class InvalidAudience(QualifyError):
    status, reason = Status.INVALID_ARGUMENT, "INVALID_AUDIENCE"


class AudienceNotFound(QualifyError):
    status, reason = Status.NOT_FOUND, "AUDIENCE_NOT_FOUND"


class AudienceExists(QualifyError):
    status, reason = Status.ALREADY_EXISTS, "AUDIENCE_ALREADY_EXISTS"


class Unauthenticated(QualifyError):
    status, reason = Status.UNAUTHENTICATED, "UNAUTHENTICATED"


class PermissionDenied(QualifyError):
    status, reason = Status.PERMISSION_DENIED, "PERMISSION_DENIED"


@dataclass
class RateLimited(QualifyError):
    """``retry_after``: seconds until the caller's rate allows another request."""

    retry_after: float = 0.0

    status, reason = Status.RESOURCE_EXHAUSTED, "RATE_LIMITED"


class TooManyStreams(QualifyError):
    status, reason = Status.RESOURCE_EXHAUSTED, "TOO_MANY_STREAMS"


@dataclass
class NotYetConsistent(QualifyError):
    """A read's min_token is past what this process sees; ``retry_after`` seconds is worth waiting."""

    retry_after: float = 0.05

    status, reason = Status.UNAVAILABLE, "NOT_YET_CONSISTENT"


class PreviewTooSlow(QualifyError):
    status, reason = Status.DEADLINE_EXCEEDED, "PREVIEW_TOO_SLOW"


class SyncNotFound(QualifyError):
    status, reason = Status.NOT_FOUND, "SYNC_NOT_FOUND"


class SyncExists(QualifyError):
    status, reason = Status.ALREADY_EXISTS, "SYNC_ALREADY_EXISTS"


class SyncManagedByProject(QualifyError):
    status, reason = Status.FAILED_PRECONDITION, "SYNC_MANAGED_BY_PROJECT"


class WatchFellBehind(QualifyError):
    status, reason = Status.RESOURCE_EXHAUSTED, "WATCH_FELL_BEHIND"
