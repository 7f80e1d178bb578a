"""qualify.clients: blocking and asyncio clients for the Qualify gRPC API.

>>> from qualify.clients import Client, NotFoundError
>>> with Client("127.0.0.1:50051") as client:
...     try:
...         print(client.get("user-42").to_json_dict())
...     except NotFoundError as err:
...         print(err.reason)  # "KEY_NOT_FOUND"
"""

from ._errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    AlreadyExistsError,
    NotFoundError,
    PermissionDeniedError,
    QualifyError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from ._records import (
    Audience,
    BatchResult,
    Explanation,
    MembersPage,
    Membership,
    MembershipChange,
    MembershipExplanation,
    Preview,
    Record,
    SnapshotEnd,
)
from .aio import AsyncClient
from .blocking import Client
from .emitter import EventEmitter

__all__ = [
    "AsyncClient",
    "Audience",
    "BatchResult",
    "Client",
    "DeadlineExceededError",
    "EventEmitter",
    "Explanation",
    "InvalidArgumentError",
    "MembersPage",
    "Membership",
    "MembershipChange",
    "MembershipExplanation",
    "AlreadyExistsError",
    "NotFoundError",
    "PermissionDeniedError",
    "Preview",
    "QualifyError",
    "Record",
    "ResourceExhaustedError",
    "SnapshotEnd",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
]
