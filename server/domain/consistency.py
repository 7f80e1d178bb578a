"""Consistency tokens: read-your-writes across processes.

An acknowledgement (Track, TrackBatch, each StreamEvents ack) carries a
token naming the event log position its transaction committed at. A read
given that token as ``min_token`` waits until the serving process can see
that position, then answers. Seeing the position is enough: evaluation of
a batch runs in the same write transaction that appends it (see
storage/writer.py), so a snapshot that holds event N holds every membership
change that N and the events before it caused.

The token is opaque to callers. Today it is one byte of format and the u64
sequence (big-endian); a cluster will make it a position per partition under
another format byte, which is why the byte is there. An empty token asks for
no wait.
"""

from __future__ import annotations

import struct

from .errors import FieldViolation, InvalidRequest

FORMAT = 1
_TOKEN = struct.Struct(">BQ")
DEFAULT_MAX_WAIT = 1.0  # seconds a read waits for its min_token when the call gives no deadline


def encode_token(position: int) -> bytes:
    """The token for an event log position (0: nothing written yet, the empty token)."""
    return _TOKEN.pack(FORMAT, position) if position else b""


def decode_token(token: bytes, field: str = "min_token") -> int:
    """The event log position a token names; InvalidRequest for bytes that are not a token."""
    if not token:
        return 0
    if len(token) != _TOKEN.size or token[0] != FORMAT:
        raise InvalidRequest(f"{field} is not a consistency token",
                             violations=[FieldViolation(field, "must be a consistency_token returned by IngestService, "
                                                        "unchanged")])
    return _TOKEN.unpack(token)[1]
