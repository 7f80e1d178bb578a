"""Donors: the walk's grafts replayed ahead of it by another process, so that the writer only applies them.

A graft (backfill.py) replays a person's retained events through an
evaluator of the leaves their stored state lacks. At a million logged events
that replay was about half of a new window's walk on the writer thread,
which every acknowledgement waits behind. The walk visits people in key
order, so the replays can run ahead of it, in a process of their own
(storage/replay_process.py) over a read snapshot of the map: a page of
people after a key, the donor state of each stale one dumped (``page``). The
writer loads a donor and grafts it instead of replaying (``Ahead``).

Why a donor read from a snapshot is exact: a person whose stored state
still has the generation it had in the snapshot has not been loaded since
(loading grafts them, and storing writes the current generation), so no
event of theirs arrived meanwhile and no merge touched them: the events the
donor replayed are their events now. A donor is used only then, and only
under the program it was made for; in every other case, and whenever no
donor is there in time, the writer replays as before. One difference:
events that retention removed after the page's snapshot still count in a
donor (a backfill learns the history retained as of its snapshot).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from qualify.evaluator import make_evaluator
from qualify.evaluator.program import Program

from .events import EventModel, ModelSet, compile_models, matching_models

log = logging.getLogger(__name__)

PAGE = 256  # people per page
LEAD = 4 * PAGE  # donors received and not used yet, at most: the pages stay near the walk
_tickets = itertools.count(1)


@dataclass(frozen=True)
class DonorPlan:
    """One page to make: plain values, so that it can cross a pipe."""

    ticket: int
    program_no: int
    leaves: tuple  # the program's leaves
    leaf_epochs: tuple[int, ...]  # each leaf's epoch (engine.leaf_epochs)
    session_timeout_us: int
    reference: bool
    models: tuple[EventModel, ...]
    after: str  # the page starts after this person key
    limit: int = PAGE


@dataclass(frozen=True)
class DonorPage:
    ticket: int
    program_no: int  # the plan's
    last: str | None  # the last person key the page looked at (None: there was no one after ``after``)
    donors: dict[str, tuple[int, bytes]]  # person key -> (their stored generation, the donor's dump)
    failed: bool = False  # the page could not be made (the process logged why)


def plan(engine, after: str) -> DonorPlan:
    program = engine.compiled.program
    return DonorPlan(next(_tickets), engine.program_no, program.leaves, tuple(engine.leaf_epochs),
                     program.session_timeout_us, engine.reference, engine.models.models, after)


def grafter(leaves: tuple, session_timeout_us: int, reference: bool):
    """An evaluator of just these leaves: what a donor is made by, and loaded with."""
    return make_evaluator(Program(leaves, (), 0, session_timeout_us), reference=reference)


def replay(evaluator, models: ModelSet, seqs: Iterable[int], fields: Callable | None, event: Callable):
    """A donor: the events ``seqs`` observed by ``evaluator`` in order.

    ``fields(seq)``: (type, name, timestamp_us, properties, session_id) or
    None; ``event(seq)``: the Event, None once retention removed it.
    """
    donor = evaluator.new_state()
    for seq in seqs:
        f = fields(seq) if fields is not None else None
        route = models.by_user(f[0], f[1]) if f is not None else None
        if route is not None:  # most events: matched here, no Event made
            for model in route:
                filters = models.filters[model]
                if filters is None or filters.matches(f[3]):
                    evaluator.observe(donor, model, f[2], f[3], f[4])
            continue
        ev = event(seq)
        if ev is None:  # older than the log's retention
            continue
        for model, _ in matching_models(ev, models):
            evaluator.observe(donor, model, ev.timestamp_us, ev.properties, ev.session_id)
    return donor


def page(plan_: DonorPlan, people: Iterable[tuple[str, int]], seqs: Callable[[str], list[int]],
         fields: Callable, event: Callable) -> DonorPage:
    """The page of ``plan_``: ``people`` are (key, stored generation) after ``plan_.after``, in key order."""
    models = compile_models(plan_.models)
    newest = max(plan_.leaf_epochs, default=0)
    grafters: dict[tuple[int, ...], object] = {}
    donors, last = {}, None
    for key, generation in people:
        last = key
        if generation >= newest:
            continue
        leaves = tuple(j for j, e in enumerate(plan_.leaf_epochs) if e > generation)
        evaluator = grafters.get(leaves)
        if evaluator is None:
            evaluator = grafters[leaves] = grafter(tuple(plan_.leaves[j] for j in leaves),
                                                   plan_.session_timeout_us, plan_.reference)
        donors[key] = (generation, evaluator.dump(replay(evaluator, models, seqs(key), fields, event)))
    return DonorPage(plan_.ticket, plan_.program_no, last, donors)


@dataclass
class Ahead:
    """The walk's donors: received, and the page asked for (one at a time). A cache that dies with the walk."""

    program_no: int = -1  # the program the donors are of
    donors: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    covered: str = ""  # pages received cover the people up to this key
    ticket: int | None = None  # the page asked for and not received yet
    done: bool = False  # a page reached the last person, or one failed: nothing more to ask
    used: int = 0  # donors grafted (for the log)

    def refill(self, engine, position: str) -> None:
        """Takes the pages that came, and asks for the next one; the walk is at ``position``. Never waits."""
        source = engine.donors
        if source is None:
            return
        if self.program_no != engine.program_no:  # (an audience was deleted meanwhile: the leaves moved)
            self.program_no, self.donors, self.covered, self.ticket, self.done = engine.program_no, {}, "", None, False
        for got in source.answers():
            if got.ticket != self.ticket or got.program_no != self.program_no:  # (asked earlier)
                continue
            self.ticket = None
            if got.failed:
                self.done = True
                log.warning("the backfill's donor pages failed (see the log); the walk replays on the writer")
                continue
            self.donors.update(got.donors)
            self.covered = max(self.covered, got.last or "")
            self.done = got.last is None
        if self.ticket is not None and source.idle():  # its process ended: the page is lost
            self.ticket = None
        if self.covered <= position:  # the walk is past every page: what is left it passed (loaded since)
            self.donors.clear()
        if self.ticket is None and not self.done and len(self.donors) < LEAD:
            asked = plan(engine, max(position, self.covered))
            if source.ask(asked):
                self.ticket = asked.ticket

    def take(self, key: str, generation: int) -> bytes | None:
        """The person's donor, if one came and their stored state is still the one it was made for."""
        got = self.donors.pop(key, None)
        if got is None or got[0] != generation:
            return None
        self.used += 1
        return got[1]
