"""RecordScan: records chosen in place by their leading msgpack fields, as msgpack's own decoding would choose them.

The what-if replay (issue 15) reads the event log through it: a record it
wrongly drops is an event the simulation never sees, one it wrongly keeps is
only decoded for nothing. Every case here is held to the same choice made
over ``msgpack.unpackb`` of the record.
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qualify.evaluator import RecordScan

INT64 = 2**63
scalar = st.one_of(st.none(), st.booleans(), st.integers(-INT64, INT64 - 1), st.floats(allow_nan=False),
                   st.text(max_size=300), st.binary(max_size=70_000))
kinds = st.integers(-40, 300)
names = st.sampled_from(["", "a", "Product Added", "x" * 31, "y" * 32, "z" * 255, "w" * 256, "é" * 40])


@st.composite
def records(draw):
    """(kind, name, time, other leading scalars, then maps): the shape of the event log's records."""
    kind, name, at = draw(kinds), draw(names), draw(st.integers(-INT64, INT64 - 1))
    lead = draw(st.lists(scalar, min_size=4, max_size=4))
    tail = draw(st.lists(st.dictionaries(st.text(max_size=5), scalar, max_size=3), max_size=6))
    return msgpack.packb([lead[0], lead[1], kind, name, lead[2], lead[3], None, at, *tail], use_bin_type=True)


def expected(raw_records, named, kind_set, everything, until):
    kept, read, first = [], 0, None
    for i, raw in enumerate(raw_records):
        t = msgpack.unpackb(raw)
        if t[7] >= until:
            break
        read += 1
        first = t[7] if first is None else first
        if everything or t[2] in kind_set or (t[2], t[3]) in named:
            kept.append(i)
    return kept, read, first


@settings(max_examples=300, deadline=None)
@given(st.lists(records(), max_size=30), st.sets(st.tuples(kinds, names), max_size=4), st.sets(kinds, max_size=2),
       st.booleans(), st.integers(-INT64, INT64 - 1), st.integers(1, 5))
def test_the_scan_keeps_what_decoding_would(raw_records, named, kind_set, everything, until, every):
    ticks = []
    scan = RecordScan(2, 3, 7, named, kind_set, everything, until)
    items = [(i.to_bytes(8, "big"), raw) for i, raw in enumerate(raw_records)]
    got = [int.from_bytes(k, "big") for k, _ in scan.scan(iter(items), lambda: ticks.append(scan.read), every)]
    kept, read, first = expected(raw_records, named, kind_set, everything, until)
    assert (got, scan.read, scan.first_time) == (kept, read, first)
    assert ticks == list(range(every, read + 1, every))


def test_the_event_log_layout():
    """Fields 2, 3 and 7 of eventlog.encode_event's tuple: type, name, received time."""
    from qualify.server.domain.events import Event, EventType
    from qualify.server.storage.eventlog import encode_event

    raw = encode_event(Event(message_id="m" * 40, type=EventType.TRACK, name="Order Completed", user_id="u",
                             timestamp_us=5, received_us=1_796_309_816_448_993, properties={"sku": "a"}))
    scan = RecordScan(2, 3, 7, [(int(EventType.TRACK), "Order Completed")], [], False, 2**62)
    assert list(scan.scan([(b"k", raw)])) == [(b"k", raw)] and scan.first_time == 1_796_309_816_448_993
    assert list(RecordScan(2, 3, 7, [(int(EventType.TRACK), "Order")], [], False, 2**62).scan([(b"k", raw)])) == []


@pytest.mark.parametrize("raw", [b"", msgpack.packb({"a": 1}), msgpack.packb([1, 2, 3]),
                                 msgpack.packb([1, "m", 2, "n", [1], "", 0, 7]), msgpack.packb([1, "m", "2", "n", "", "", 0, 7]),
                                 msgpack.packb([1, "m", 2, 3, "", "", 0, 7]), msgpack.packb([1, "m", 2, "n", "", "", 0, 7])[:-3]])
def test_a_record_of_another_shape_is_an_error_not_a_guess(raw):
    with pytest.raises(ValueError):
        list(RecordScan(2, 3, 7, [], [], True, 2**62).scan([(b"k", raw)]))
