"""The caller's deadline, for the services that scatter work over a cluster and must answer within it.

The transport sets ``CALL_REMAINING`` to the seconds the client has left
(None: no deadline) around a call; ``budget`` caps it by the server's own
limit, so a client without a deadline still gets an answer or an error in
bounded time.
"""

from __future__ import annotations

import contextvars

CALL_REMAINING: contextvars.ContextVar[float | None] = contextvars.ContextVar("qualify_call_remaining", default=None)


def budget(cap: float) -> float:
    """Seconds this call may take: the client's remaining time, at most ``cap``."""
    remaining = CALL_REMAINING.get()
    return cap if remaining is None else max(0.0, min(cap, remaining))
