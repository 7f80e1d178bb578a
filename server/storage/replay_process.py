"""Simulations, and the backfill's donor pages, in processes of their own over the LMDB environment opened read-only.

(The donors' child, DonorProcess, is the same program: domain/donors.py
says what it makes, and why it is exact. What follows is about the
simulations' child; both are started lazily and named on their command
line.)

Why a process: a replay is seconds of CPU. On a thread of the server it
shared the interpreter with the writer and the event loop: each step of an
ingest acknowledgement could wait for a slice of replay work, and the
replay slept after every millisecond of it to let them in, so it ran at
about half of one core (91-160k events/s in the bench). LMDB takes any number of reader processes beside the one
writer (MVCC: a reader never blocks the writer, and sees one committed
snapshot), so the replay reads the map directly, as the ``--workers``
serving processes do, and only the plan (domain/simulate.py's ReplayPlan)
and the timeline cross a pipe.

Why a long-lived child started with ``python -m`` rather than
multiprocessing's spawn: spawn re-imports the server's main module (grpc and
all) in the child, and a fresh process per simulation would pay the
interpreter's start (about 0.25 s) each time. The child is started at the
first simulation and serves one plan at a time; it exits when its pipe from
the server closes (the server stopped or died), even in the middle of a
replay.

Cancellation: the server sends ``CANCEL`` on the same pipe; the replay looks
for it after each slice of work (one poll of the pipe). A child
that does not answer in ``GRACE_SECONDS`` after its deadline or a
cancellation is killed, and its stale slot in the lock table cleared
(``reader_check``), so that it pins no old pages of the map.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # The child. A replay is background work: when the cores are contended the writer and the event loop
    # (an ingest ack waits on them) should get them first, the replay what is left. Nice 10 weighs about a
    # tenth of nice 0; set before the imports below, which cost a quarter of a second of a core. SCHED_BATCH:
    # a CPU-bound task that never preempts the server's threads when it wakes. The donors' child (named on
    # its command line) runs only on a core nothing else wants (SCHED_IDLE): the walk never needs it (it
    # replays on the writer whatever no page brings in time), so it should cost the server nothing. Beside
    # the steady stream, a graft walk at 1M events took 7.5 and 12.5 s with it against 10.8 and 14.7 s
    # with SCHED_BATCH, ack p99 27 and 31 ms against 32 and 37 ms.
    os.nice(10)
    if sys.argv[1:2] == ["donors"] and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    elif hasattr(os, "SCHED_BATCH"):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))

import logging
import subprocess
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import lmdb

from ..domain import donors
from ..domain.donors import DonorPage, DonorPlan
from ..domain.errors import QualifyError, ShuttingDown
from ..domain.events import Event
from ..domain.simulate import ReplayPlan, SimulationTooSlow, Timeline, Wanted, simulate
from .eventlog import EventLog
from .lmdb_store import PEOPLE, U32, _handle, open_env
from .realtime import PERSON_EVENTS, STATES, person_seqs, states_after

log = logging.getLogger(__name__)

CANCEL = "cancel"
STARTED = "started"  # the child's first answer to a plan: from then on a failure is the plan's, not a dead idle child's
GRACE_SECONDS = 5.0  # past the deadline (or a cancellation) before the child is killed
POLL_SECONDS = 0.05  # how often a waiting server thread looks at the cancellation flag


class ReplayFailed(QualifyError):
    """The simulation's process ended before it answered."""


class Cancelled(Exception):
    """The server no longer waits for this replay."""


class SnapshotHistory:
    """domain/simulate.History over one read transaction of a read-only environment."""

    def __init__(self, log_: EventLog, people_keys, person_events, txn):
        self.log, self.people_keys, self.person_events, self.txn = log_, people_keys, person_events, txn

    def events(self, wanted: Wanted):
        return self.log.select(self.txn, wanted)

    def person_id(self, key: str) -> int | None:
        raw = self.txn.get(key.encode(), db=self.people_keys)
        return U32.unpack_from(raw)[0] if raw else None

    def person_seqs(self, key: str, upto: int) -> list[int]:
        return person_seqs(self.txn, self.person_events, key, upto)

    def event(self, seq: int) -> Event | None:
        return self.log.get(self.txn, seq)


def _spawn(role: str, path: Path, map_size: int) -> tuple[subprocess.Popen, Connection, Connection]:
    """A child (``_serve``), its jobs pipe and its results pipe. ``role`` only names it on its command line."""
    jobs_r, jobs_w = os.pipe()
    results_r, results_w = os.pipe()
    args = [sys.executable, "-m", __name__, role, str(jobs_r), str(results_w), str(path), str(map_size)]
    try:
        proc = subprocess.Popen(args, pass_fds=(jobs_r, results_w), stdin=subprocess.DEVNULL)
    finally:
        os.close(jobs_r)
        os.close(results_w)
    return proc, Connection(jobs_w, readable=False), Connection(results_r, writable=False)


def _end(env, proc: subprocess.Popen | None, jobs: Connection | None, results: Connection | None) -> int | None:
    """Closes a child's pipes and ends it, killing it if it is still there; its exit code."""
    for conn in (jobs, results):
        if conn is not None:
            conn.close()
    if proc is None:
        return None
    if proc.poll() is None:
        proc.kill()
    code = proc.wait()
    try:
        env.reader_check()  # its read transaction's slot, if it held one, left in the lock table
    except lmdb.Error:  # the environment is closing with the server
        pass
    return code


class ReplayProcess:
    """The domain's Simulations port: one child process, one simulation at a time (callers queue on a lock)."""

    def __init__(self, env, path: Path, map_size: int):
        self.env = env  # the server's own: to clear a killed child's reader slot
        self.path, self.map_size = Path(path), map_size
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._jobs: Connection | None = None
        self._results: Connection | None = None
        self._closed = False

    def _start(self) -> None:
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        self._proc, self._jobs, self._results = _spawn("simulations", self.path, self.map_size)
        log.info("simulation process %d started", self._proc.pid)

    def run(self, plan: ReplayPlan, cancelled: threading.Event) -> Timeline:
        """The plan's timeline; raises the replay's own errors, or ReplayFailed if its process ended."""
        with self._lock:
            try:
                if not self._begin(plan, cancelled):  # it had died while idle: once more, with a new one
                    self._stop()
                    if not self._begin(plan, cancelled):
                        raise EOFError
                kind, value = self._wait(plan.deadline, cancelled)
            except (EOFError, OSError):  # it died, or close() ended it
                raise ReplayFailed(f"the simulation's process ended before it answered ({self._stop()})") from None
        if kind == "error":
            raise value
        return value

    def _begin(self, plan: ReplayPlan, cancelled: threading.Event) -> bool:
        """Hands the plan over; False if the process ended before it took it (so the plan never ran)."""
        if self._proc is None or self._proc.poll() is not None:
            self._stop()
            self._start()
        try:
            self._jobs.send(plan)
            return self._wait(plan.deadline, cancelled) == STARTED
        except (EOFError, OSError):
            return False

    def _wait(self, deadline: float, cancelled: threading.Event):
        """The child's next message (EOFError: it ended, or missed its deadline by GRACE_SECONDS)."""
        give_up = deadline + GRACE_SECONDS
        while not self._results.poll(POLL_SECONDS):
            if cancelled.is_set() and give_up > time.monotonic() + GRACE_SECONDS:
                self._jobs.send(CANCEL)
                give_up = time.monotonic() + GRACE_SECONDS
            if self._proc.poll() is not None or time.monotonic() > give_up:
                raise EOFError
        return self._results.recv()

    def _stop(self) -> int | None:
        """Ends the child, killing it if it is still there; its exit code."""
        proc, jobs, results = self._proc, self._jobs, self._results
        self._proc = self._jobs = self._results = None
        return _end(self.env, proc, jobs, results)

    def close(self) -> None:
        """Ends the child: closing its pipe makes it exit, at its next look at the pipe."""
        self._closed = True
        proc, jobs = self._proc, self._jobs
        if proc is None:
            return
        try:
            jobs.close()
            proc.wait(GRACE_SECONDS)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()


class DonorProcess:
    """The domain's Donors port: a child of its own, which makes the backfill's donor pages one after the other.

    Apart from the simulations' child, so that a long simulation never holds
    up a walk (the walk then replays on the writer, as it does until this
    child has started). The writer thread alone calls it.
    """

    def __init__(self, env, path: Path, map_size: int):
        self.env, self.path, self.map_size = env, Path(path), map_size
        self._proc: subprocess.Popen | None = None
        self._jobs: Connection | None = None
        self._results: Connection | None = None
        self._asked = 0  # plans sent and not answered
        self._closed = False

    def ask(self, plan: DonorPlan) -> bool:
        if self._closed:
            return False
        try:
            if self._proc is None or self._proc.poll() is not None:
                self._stop()
                self._proc, self._jobs, self._results = _spawn("donors", self.path, self.map_size)
                log.info("backfill donor process %d started", self._proc.pid)
            self._jobs.send(plan)
        except OSError as exc:
            log.warning("backfill donor process unavailable: %s", exc)
            self._stop()
            return False
        self._asked += 1
        return True

    def answers(self) -> list[DonorPage]:
        out = []
        try:
            while self._results is not None and self._results.poll():
                out.append(self._results.recv())
                self._asked -= 1
        except (EOFError, OSError):  # it ended: what it was making is lost
            self._stop()
        return out

    def idle(self) -> bool:
        return self._asked == 0

    def _stop(self) -> None:
        proc, jobs, results = self._proc, self._jobs, self._results
        self._proc = self._jobs = self._results = None
        self._asked = 0
        _end(self.env, proc, jobs, results)

    def close(self) -> None:
        self._closed = True
        self._stop()


# -- the child ------------------------------------------------------------------------------------------------------
def _serve(jobs: Connection, results: Connection, path: Path, map_size: int) -> None:
    env = open_env(path, map_size, readonly=True)
    tables = states = None
    while True:
        try:
            plan = jobs.recv()
        except EOFError:
            return
        if plan == CANCEL:  # for a replay that had already answered
            continue
        if tables is None:  # the writer has made them by the time anyone simulates or backfills
            tables = EventLog(env), _handle(env, f"{PEOPLE}.keys".encode()), _handle(env, PERSON_EVENTS)
            states = _handle(env, STATES)
        if isinstance(plan, DonorPlan):
            results.send(_donors(env, tables[0], states, tables[2], plan))
            continue
        results.send(STARTED)
        results.send(_replay(env, tables, plan, jobs))


def _donors(env, events: EventLog, states, person_events, plan: DonorPlan) -> DonorPage:
    try:
        with env.begin(buffers=False) as txn:
            people = states_after(txn, states, plan.after, plan.limit)
            return donors.page(plan, [(key, stored[2]) for key, stored in people],
                               lambda key: person_seqs(txn, person_events, key),
                               lambda seq: events.fields(txn, seq), lambda seq: events.get(txn, seq))
    except Exception:  # the walk replays on the writer instead
        log.exception("backfill donor page failed")
        return DonorPage(plan.ticket, plan.program_no, None, {}, failed=True)


def _replay(env, tables, plan: ReplayPlan, jobs: Connection):
    def pause() -> None:
        if jobs.poll():
            if jobs.recv() == CANCEL:
                raise Cancelled
    try:
        with env.begin(buffers=False) as txn:
            return "ok", simulate(plan, SnapshotHistory(*tables, txn), pause)
    except (QualifyError, Cancelled) as exc:  # SimulationTooSlow among them: the caller's status
        return "error", exc if not isinstance(exc, Cancelled) else SimulationTooSlow("the simulation was cancelled")
    except EOFError:
        raise SystemExit(0) from None  # the server is gone
    except Exception as exc:  # noqa: BLE001 - reported as INTERNAL, without the internals
        log.exception("simulation failed")
        return "error", ReplayFailed(f"the simulation failed ({type(exc).__name__})")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    jobs_fd, results_fd, path, map_size = int(argv[1]), int(argv[2]), Path(argv[3]), int(argv[4])  # [0]: its role
    _serve(Connection(jobs_fd, writable=False), Connection(results_fd, readable=False), path, map_size)
    return 0


if __name__ == "__main__":
    # The module under its own name, not as __main__: what the child pickles (ReplayFailed) must unpickle as
    # the server's class.
    import importlib

    sys.exit(importlib.import_module(__spec__.name).main(sys.argv[1:]))
