"""What both clients share about making a call: channel options and the retry policy.

Each client runs the retry loop its own way (time.sleep or asyncio.sleep).

Retries live here rather than in a gRPC service config (`grpc.service_config`
with a `retryPolicy`, gRFC A6) because that mechanism cannot give what we need:
  * A6 applies the call deadline across all attempts; we want each attempt to
    get the full per-call timeout, so one slow failing attempt does not eat the
    budget of the next.
  * A6 clamps `maxAttempts` to 5 on the client, so `retries` above 4 would be
    silently ignored.
  * The attempts are invisible to the caller and to tests.
The backoff is the same shape as A6's: attempt n waits a uniformly random time
in [0, min(base * 2**n, cap)] ("full jitter"), so clients that failed together
do not retry together.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

#: Per-call metadata: (key, value) pairs; keys ending in "-bin" take bytes.
Metadata = Sequence[tuple[str, str | bytes]]

# Codes that mean the server did not serve the request, so a read may be sent again.
# DEADLINE_EXCEEDED is not among them: the server may still be working on it,
# and the caller's time budget is what ran out.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    # Ignore a service config published through DNS: a retryPolicy there would
    # multiply with ours (up to 5 gRPC attempts per client attempt). gRPC's
    # transparent retries of requests that never reached the server stay on.
    ("grpc.service_config_disable_resolution", 1),
]


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter, in seconds."""

    base: float = 0.05
    cap: float = 1.0

    def delay(self, retry: int, uniform: Callable[[], float] = random.random) -> float:
        """The pause before retry number `retry` (0 for the first retry)."""
        return uniform() * min(self.cap, self.base * 2.0**retry)


def should_retry(err: grpc.RpcError, retry: int, retries: int) -> bool:
    """Whether a read that failed with `err` gets retry number `retry`."""
    code = err.code() if callable(getattr(err, "code", None)) else None
    return retry < retries and code in RETRYABLE_CODES
