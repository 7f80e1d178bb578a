# cython: language_level=3
"""The compiled hot path: bitset membership checks over memory-mapped tables.

Every function takes integers and buffers (memoryviews into LMDB, numpy
arrays) and returns plain values; nothing here knows about gRPC or LMDB.
Bitsets are little-endian: bit ``i`` is bit ``i % 8`` of byte ``i // 8``.
"""

from libc.stdint cimport uint8_t


def test_bit(const uint8_t[::1] bitset, Py_ssize_t index):
    """True when bit ``index`` is set; bits past the end read as 0."""
    if index < 0 or (index >> 3) >= bitset.shape[0]:
        return False
    return (bitset[index >> 3] >> (index & 7)) & 1 == 1


def set_bits(const uint8_t[::1] bitset):
    """The indices of the set bits, ascending."""
    cdef list out = []
    cdef Py_ssize_t i, b
    cdef uint8_t byte
    for i in range(bitset.shape[0]):
        byte = bitset[i]
        b = 0
        while byte:
            if byte & 1:
                out.append(i * 8 + b)
            byte >>= 1
            b += 1
    return out


def count_bits(const uint8_t[::1] bitset):
    """The number of set bits (an audience's size from its bitset)."""
    cdef Py_ssize_t i, n = 0
    cdef uint8_t byte
    for i in range(bitset.shape[0]):
        byte = bitset[i]
        while byte:
            byte &= byte - 1
            n += 1
    return n
