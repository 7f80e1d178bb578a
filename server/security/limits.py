"""Per-key request rates (token buckets) and concurrent streams.

Both are kept per serving process: with ``--workers N`` a key may make N
times the configured rate in total, spread by the kernel across processes.
State exists only for keys that authenticated, so it is bounded by the key
file, not by what callers send.
"""

from __future__ import annotations

import time


class RateLimiter:
    """A token bucket per key: ``rate`` tokens a second, holding at most ``burst``."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, list[float]] = {}  # key id -> [tokens, when counted]

    def take(self, key_id: str) -> float:
        """0.0 when the request may go now; otherwise the seconds until it could."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        bucket = self._buckets.get(key_id)
        if bucket is None:
            bucket = self._buckets[key_id] = [self.burst, now]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / self.rate


class StreamSlots:
    """At most ``limit`` open streams per key."""

    def __init__(self, limit: int):
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, key_id: str) -> bool:
        n = self._open.get(key_id, 0)
        if n >= self.limit:
            return False
        self._open[key_id] = n + 1
        return True

    def release(self, key_id: str) -> None:
        n = self._open.get(key_id, 0) - 1
        if n > 0:
            self._open[key_id] = n
        else:
            self._open.pop(key_id, None)
