"""qualify.clients: blocking and asyncio clients for the Qualify gRPC API, and the local reader.

>>> from qualify.clients import Client, NotFoundError
>>> with Client("127.0.0.1:50051") as client:
...     try:
...         print(client.get("user-42").to_json_dict())
...     except NotFoundError as err:
...         print(err.reason)  # "KEY_NOT_FOUND"

>>> from qualify.clients import LocalReader      # same machine as the server: no RPC
>>> with LocalReader("/var/lib/qualify") as reader:
...     print(reader.get("user-42"))

Names are imported on first use (PEP 562), so ``LocalReader`` does not pull
in grpc and protobuf with the RPC clients: a co-located reader stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_WHERE = {  # public name -> the module that defines it
    **dict.fromkeys(("DeadlineExceededError", "InvalidArgumentError", "AlreadyExistsError", "NotFoundError",
                     "PermissionDeniedError", "QualifyError", "ResourceExhaustedError", "UnauthenticatedError",
                     "UnavailableError", "UnimplementedError"), "._errors"),
    **dict.fromkeys(("Audience", "Explanation", "MembershipChange", "MembershipExplanation", "Preview",
                     "SnapshotEnd"), "._records"),
    **dict.fromkeys(("BatchResult", "MembersPage", "Membership", "Record"), "._values"),
    **dict.fromkeys(("LocalReader", "LocalReaderError", "LayoutMismatchError", "NotYetConsistentError",
                     "StaleReaderError"), ".local"),
    "AsyncClient": ".aio",
    "Client": ".blocking",
    "EventEmitter": ".emitter",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


# The names re-exported lazily above, eagerly for static tools (type checkers,
# IDEs). They look unused to ruff because __all__ is computed from _WHERE,
# hence the noqa: F401.
if TYPE_CHECKING:
    from ._errors import (AlreadyExistsError, DeadlineExceededError, InvalidArgumentError, NotFoundError,  # noqa: F401
                          PermissionDeniedError, QualifyError, ResourceExhaustedError, UnauthenticatedError,
                          UnavailableError, UnimplementedError)
    from ._records import (Audience, Explanation, MembershipChange, MembershipExplanation,  # noqa: F401
                           Preview, SnapshotEnd)
    from ._values import BatchResult, MembersPage, Membership, Record  # noqa: F401
    from .aio import AsyncClient  # noqa: F401
    from .blocking import Client  # noqa: F401
    from .emitter import EventEmitter  # noqa: F401
    from .local import (LayoutMismatchError, LocalReader, LocalReaderError, NotYetConsistentError,  # noqa: F401
                        StaleReaderError)
