"""qualify.evaluator: the compiled hot path behind one narrow interface.

The domain reaches compiled code only through the names exported here.
``make_evaluator`` gives the compiled evaluator, or the pure-Python reference
(the executable specification) when asked to or when the environment sets
``QUALIFY_EVALUATOR=reference``; both have the same interface.
"""

from __future__ import annotations

import os

from ._evaluator import CompiledEvaluator, count_bits, set_bits, test_bit
from .program import Program
from .reference import ReferenceEvaluator

__all__ = ["CompiledEvaluator", "ReferenceEvaluator", "make_evaluator", "count_bits", "set_bits", "test_bit"]


def make_evaluator(program: Program, reference: bool = False) -> CompiledEvaluator | ReferenceEvaluator:
    """The evaluator for ``program``: compiled, unless the reference is asked for."""
    if reference or os.environ.get("QUALIFY_EVALUATOR", "").strip().lower() == "reference":
        return ReferenceEvaluator(program)
    return CompiledEvaluator(program)
