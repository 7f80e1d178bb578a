"""Waiting for a consistency token: the read side of read-your-writes (see domain/consistency.py)."""

from __future__ import annotations

import asyncio
import time

from ..domain.consistency import DEFAULT_MAX_WAIT, decode_token
from ..domain.errors import NotYetConsistent
from ..domain.ports import Positions

FIRST_PAUSE = 50e-6
MAX_PAUSE = 0.002


def budget_of(time_remaining: float | None, max_wait: float = DEFAULT_MAX_WAIT) -> float:
    """How long a read may wait: its max wait, cut to the call's deadline less a margin to answer in."""
    if time_remaining is None:
        return max_wait
    return max(0.0, min(max_wait, time_remaining - 0.01))


async def wait_visible(positions: Positions, min_token: bytes, budget: float) -> None:
    """Returns once ``positions`` sees the token's position; NotYetConsistent after ``budget`` seconds.

    It polls: the writer commits before it acknowledges, so a token a caller
    holds is visible at the first look in nearly every case (one read
    transaction, ~1 µs), in this process or any other reading the same map.
    The pauses only matter for tokens that outran the commit (another node,
    a future token) and grow from 50 µs to 2 ms, so a wait costs little CPU.
    """
    want = decode_token(min_token)
    if not want or positions.position() >= want:
        return
    deadline = time.monotonic() + budget
    pause = FIRST_PAUSE
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise NotYetConsistent(f"the write named by min_token is not visible to this server yet "
                                   f"(waited {budget:g}s); retry, or read without min_token", retry_after=0.05)
        await asyncio.sleep(min(pause, deadline - now))
        if positions.position() >= want:
            return
        pause = min(pause * 2, MAX_PAUSE)
