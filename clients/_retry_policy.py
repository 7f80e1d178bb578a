"""The emitter's retry policy: which failures are worth resending.

A failure is transient (resending can fix it), about the caller (no event
can succeed with this key), or about the batch (one bad event fails its
whole batch: split it to find the event). The emitter's module docstring
lists the codes and reasons of each class; this module is the one place
that decides, so the stream and TrackBatch paths cannot disagree.
"""

from __future__ import annotations

import grpc

from ._errors import error_from_rpc_error

# The failure classes of the retry policy (see the module docstring).
TRANSIENT, CALLER, BATCH = "transient", "caller", "batch"
_TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                              grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED})
# RESOURCE_EXHAUSTED with one of these reasons is load, not the batch's size.
_TRANSIENT_REASONS = frozenset({"RATE_LIMITED", "TOO_MANY_STREAMS", "RESOURCE_EXHAUSTED",
                                "STORAGE_UNAVAILABLE", "NOT_READY"})
_CALLER_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                           grpc.StatusCode.UNIMPLEMENTED})


def failure_kind(err: grpc.RpcError) -> str:
    """TRANSIENT (resend later), CALLER (no event can succeed) or BATCH (split to find the bad event)."""
    error = error_from_rpc_error(err)
    if error.code in _TRANSIENT_CODES or error.reason in _TRANSIENT_REASONS:
        return TRANSIENT
    if error.code in _CALLER_CODES:
        return CALLER
    return BATCH


def is_size_refusal(err: grpc.RpcError) -> bool:
    # gRPC core refuses an oversized message before any handler runs: no ErrorInfo.
    error = error_from_rpc_error(err)
    return error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not error.reason
