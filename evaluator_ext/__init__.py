"""qualify.evaluator: the compiled hot path behind one narrow interface.

The domain reaches compiled code only through the names exported here.
"""

from ._evaluator import count_bits, set_bits, test_bit

__all__ = ["count_bits", "set_bits", "test_bit"]
