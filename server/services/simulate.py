"""SimulateAudience: a what-if timeline of a saved or draft audience over the retained history.

The plan (domain/simulate.py) is made here from what the engine holds in
memory; the replay runs in a process of its own (the Simulations port,
storage/replay_process.py) over a read snapshot of the log, one simulation
at a time: it takes none of the interpreter that ingest, timers and other
RPCs need. A thread of this service waits for it (in a poll, without the
interpreter) and tells it to stop when the caller goes away or the deadline
passes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

from ..domain.conditions import parse_condition
from ..domain.errors import FieldViolation, InvalidRequest
from ..domain.ports import Simulations
from ..domain.simulate import SimulationTooSlow, Timeline, plan
from .audiences import check_target

DAY_US = 86_400 * 1_000_000
HOUR_US = 3_600 * 1_000_000
MAX_BUCKETS = 10_000
SLICE_SECONDS = 0.005  # replay work between two looks for a cancellation


class SimulateService:
    """Simulations of the engine's audiences and drafts, replayed by ``runner``."""

    def __init__(self, engine, runner: Simulations, clock, seconds: float = 120.0):
        self.engine = engine
        self.runner = runner
        self.clock = clock
        self.seconds = seconds
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qualify-simulate")

    def _span(self, start_us: int | None, end_us: int | None, bucket_us: int | None,
              last_us: int | None) -> tuple[int, int, int]:
        end = end_us if end_us is not None else self.clock()
        start = start_us if start_us is not None else end - (last_us if last_us is not None else 7 * DAY_US)
        bucket = bucket_us if bucket_us is not None else HOUR_US
        bad = []
        if start >= end:
            bad.append(FieldViolation("start_time", "must be before end_time"))
        if bucket <= 0:
            bad.append(FieldViolation("bucket", "must be longer than 0"))
        elif start < end and -(-(end - start) // bucket) > MAX_BUCKETS:
            bad.append(FieldViolation("bucket", f"makes more than {MAX_BUCKETS} buckets of the span"))
        if bad:
            raise InvalidRequest(f"invalid span: {bad[0].field}: {bad[0].description}", violations=bad)
        return start, end, bucket

    async def simulate(self, audience_id: str | None, draft: dict | None, start_us: int | None, end_us: int | None,
                       bucket_us: int | None, sample: int, last_us: int | None = None) -> Timeline:
        """The audience's timeline over [start, end) (default: the ``last`` 7 days up to now, in hours)."""
        check_target(audience_id, draft, sample)
        start, end, bucket = self._span(start_us, end_us, bucket_us, last_us)
        if draft is None:
            condition = self.engine.audience(audience_id).condition
        else:
            condition = parse_condition(draft, self.engine.attribute_types, self.engine.event_model_props)
        deadline = time.monotonic() + self.seconds
        cancelled = threading.Event()

        def run() -> Timeline:  # on the pool's thread: the plan evaluates the warehouse parts for everyone
            return self.runner.run(plan(self.engine, condition, start, end, bucket, sample, deadline, SLICE_SECONDS),
                                   cancelled)
        try:
            return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self._pool, run), self.seconds)
        except asyncio.TimeoutError:  # still queued behind another simulation
            cancelled.set()
            raise SimulationTooSlow(f"the simulation did not finish within {self.seconds:g}s") from None
        except asyncio.CancelledError:  # the caller went away: the replay stops at its next slice
            cancelled.set()
            raise

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.runner.close()
