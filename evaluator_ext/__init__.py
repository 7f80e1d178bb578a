"""qualify.evaluator: the compiled hot path behind one narrow interface.

The domain reaches compiled code only through the names exported here:

- ``make_evaluator`` gives the compiled evaluator of a ``Program``, or the
  pure-Python reference (the executable specification) when asked to or when
  the environment sets ``QUALIFY_EVALUATOR=reference``; both have the same
  interface;
- ``PredicateMatcher``, ``FilterSet``, ``match_predicate`` and
  ``compare_value`` are the compiled predicate kernels, for the domain's
  event-model filters, warehouse predicates and explanations;
- ``RecordScan`` picks a log's records by their leading msgpack fields
  without decoding them, for a replay that reads a few models' events.

The IR and its enums live in ``qualify.evaluator.program``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ._evaluator import CompiledEvaluator, FilterSet, PredicateMatcher, RecordScan, compare_value, match_predicate
from .program import Program

if TYPE_CHECKING:
    from .reference import ReferenceEvaluator

__all__ = ["CompiledEvaluator", "FilterSet", "PredicateMatcher", "RecordScan", "compare_value", "make_evaluator",
           "match_predicate"]


def make_evaluator(program: Program, reference: bool = False) -> CompiledEvaluator | ReferenceEvaluator:
    """The evaluator for ``program``: compiled, unless the reference is asked for."""
    if reference or os.environ.get("QUALIFY_EVALUATOR", "").strip().lower() == "reference":
        # Imported here so that production, which never asks for it, never loads the specification.
        from .reference import ReferenceEvaluator

        return ReferenceEvaluator(program)
    return CompiledEvaluator(program)
