"""Sequence and absence conditions: their domain values and their validation (issue 15).

A ``sequence`` is 2 to 5 steps, each an event model with property filters,
that must happen in order (by event timestamp, ties by arrival; one event
fills one step), the last at most ``within`` after the first, all carrying
equal values of the ``same`` properties, all in the scope. An ``absence`` is
"A, then no B within T": the person qualifies at exactly A + T if no B came.
The exact semantics, and the caps that bound the evaluator's state, are
``qualify.evaluator._reference_sequences``'s.

JSON (the proto's mapping, proto field names)::

    {"sequence": {"steps": [{"event_model": "page_views", "filters": [...]},
                            {"event_model": "trial_starts"}],
                  "within": "600s", "scope": "SCOPE_EVER"}}
    {"absence": {"after": {"event_model": "cart_adds"}, "absent": {"event_model": "orders"},
                 "within": "1800s", "same": ["sku"], "scope": "SCOPE_WITHIN", "window": "86400s"}}

Parsing runs inside ``conditions._Parser`` (``parse``), which owns predicates,
durations and the violation list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qualify.evaluator.program import Scope

if TYPE_CHECKING:
    from .conditions import Predicate

MIN_STEPS, MAX_STEPS = 2, 5
MAX_SAME = 3


@dataclass(frozen=True)
class Step:
    event_model: str
    filters: tuple["Predicate", ...]


@dataclass(frozen=True)
class SequenceCondition:
    steps: tuple[Step, ...]
    within_us: int  # 0: no bound but the scope
    same: tuple[str, ...]
    scope: Scope
    window_us: int  # WITHIN only; 0 otherwise


@dataclass(frozen=True)
class AbsenceCondition:
    after: Step
    absent: Step
    within_us: int
    same: tuple[str, ...]
    scope: Scope
    window_us: int

    @property
    def steps(self) -> tuple[Step, Step]:
        return (self.after, self.absent)


def _numeric(t) -> bool:
    return t.name in ("INT", "FLOAT")


def _step(parser, raw: Any, path: str) -> Step | None:
    if not isinstance(raw, dict):
        parser.bad(path, "must be a step: {\"event_model\": ..., \"filters\": [...]}")
        return None
    if not parser.known(raw, path, "step"):
        return None
    parsed = parser.model_filters(raw, path)
    return None if parsed is None else Step(*parsed)


def _same(parser, raw: Any, steps: list[tuple[Step, str]], path: str) -> tuple[str, ...] | None:
    names = raw if isinstance(raw, list) else None
    if names is None or not all(isinstance(n, str) and n for n in names):
        parser.bad(path, "must be a list of property names")
        return None
    if len(set(names)) != len(names) or len(names) > MAX_SAME:
        parser.bad(path, f"must name distinct properties, at most {MAX_SAME}")
        return None
    for name in names:
        types = []
        for step, at in steps:
            t = parser.event_models[step.event_model].get(name)
            if t is None:
                parser.bad(path, f"{name!r} is not a property of {step.event_model!r} ({at}): every step "
                                 "must carry it")
                return None
            types.append(t)
        if len(set(types)) > 1 and not all(_numeric(t) for t in types):
            parser.bad(path, f"{name!r} has different types in the steps "
                             f"({', '.join(sorted({t.name.lower() for t in types}))}): equal values need one type")
            return None
    return tuple(names)


def _scope(parser, body: dict, path: str) -> tuple[Scope, int] | None:
    name = str(body.get("scope", "SCOPE_UNSPECIFIED")).removeprefix("SCOPE_")
    if name not in Scope.__members__:
        parser.bad(f"{path}.scope", "must be SCOPE_WITHIN, SCOPE_SESSION or SCOPE_EVER")
        return None
    scope = Scope[name]
    if scope is Scope.WITHIN:
        window = parser.duration(body.get("window"), f"{path}.window")
        return None if window is None else (scope, window)
    if body.get("window") not in (None, "0s"):
        parser.bad(f"{path}.window", f"only SCOPE_WITHIN takes a window, not SCOPE_{scope.name}")
        return None
    return scope, 0


def _within(parser, raw: Any, path: str, required: bool) -> int | None:
    if raw in (None, "0s") and not required:
        return 0
    if raw in (None, "0s"):
        parser.bad(path, 'an absence needs a within, such as "1800s" (JSON Duration)')
        return None
    return parser.duration(raw, path, what="within")


def parse_sequence(parser, body: dict, path: str) -> SequenceCondition | None:
    raw_steps = body.get("steps", [])
    if not isinstance(raw_steps, list) or not MIN_STEPS <= len(raw_steps) <= MAX_STEPS:
        parser.bad(f"{path}.steps", f"a sequence has {MIN_STEPS} to {MAX_STEPS} steps")
        return None
    steps = []
    for i, raw in enumerate(raw_steps):
        step = _step(parser, raw, f"{path}.steps[{i}]")
        if step is None:
            return None
        steps.append(step)
    within = _within(parser, body.get("within"), f"{path}.within", required=False)
    same = _same(parser, body.get("same", []), [(s, f"steps[{i}]") for i, s in enumerate(steps)], f"{path}.same")
    scope = _scope(parser, body, path)
    if within is None or same is None or scope is None:
        return None
    return SequenceCondition(tuple(steps), within, same, scope[0], scope[1])


def parse_absence(parser, body: dict, path: str) -> AbsenceCondition | None:
    after = _step(parser, body.get("after"), f"{path}.after")
    absent = _step(parser, body.get("absent"), f"{path}.absent")
    if after is None or absent is None:
        return None
    within = _within(parser, body.get("within"), f"{path}.within", required=True)
    same = _same(parser, body.get("same", []), [(after, "after"), (absent, "absent")], f"{path}.same")
    scope = _scope(parser, body, path)
    if within is None or same is None or scope is None:
        return None
    if scope[0] is Scope.WITHIN and within >= scope[1]:
        parser.bad(f"{path}.within", "must be shorter than the window: A must still be in it at A + within")
        return None
    return AbsenceCondition(after, absent, within, same, scope[0], scope[1])
