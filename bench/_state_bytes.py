"""Bytes of each event leaf's section in a compiled evaluator dump (the layout in _evaluator.pyx's docstring)."""

from __future__ import annotations


def _uv(raw: bytes, pos: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        b = raw[pos]
        pos += 1
        v |= (b & 0x7F) << shift
        if not b & 0x80:
            return v, pos
        shift += 7


def section_bytes(raw: bytes, with_first: bool = False) -> dict[int, int]:
    """Section key -> the bytes it takes in ``raw``: its 8-byte key, its length prefix and its payload
    (``with_first``: and the payload's first varint, a sequence section's number of values; 0 when empty)."""
    pos = 1
    _, pos = _uv(raw, pos)  # session + 1
    n, pos = _uv(raw, pos)  # session id
    pos += n
    for _ in range(3):  # last ts, arrival counter, horizon
        _, pos = _uv(raw, pos)
    count, pos = _uv(raw, pos)
    out = {}
    for _ in range(count):
        key = int.from_bytes(raw[pos:pos + 8], "little")
        start = pos
        n, pos = _uv(raw, pos + 8)
        first = _uv(raw, pos)[0] if n else 0
        pos += n
        out[key] = (pos - start, first) if with_first else pos - start
    return out
