"""The server's clock: "now" for windows, sessions, timers and validation.

Production reads the wall clock. Tests may set QUALIFY_TEST_CLOCK_FILE to a
file holding integer microseconds since the epoch; the server then reads
"now" from it on every call, so a test can let windows lapse without sleeping.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

Clock = Callable[[], int]
ENV = "QUALIFY_TEST_CLOCK_FILE"


def wall_clock_us() -> int:
    return time.time_ns() // 1000


def file_clock(path: str) -> Clock:
    def now_us() -> int:
        with open(path, "rb") as f:
            return int(f.read().strip())

    return now_us


def make_clock() -> tuple[Clock, bool]:
    """The clock to run with, and whether it is a test clock (timers then poll it)."""
    path = os.environ.get(ENV)
    return (file_clock(path), True) if path else (wall_clock_us, False)
