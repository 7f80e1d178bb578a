"""HDR histograms of latencies in microseconds, and their encoded form.

The load processes record into them and the parent merges them; both sides
use the same range and encoding, which is why they live apart from either.
"""

from __future__ import annotations

LOWEST_US, HIGHEST_US = 1, 3_600_000_000  # histogram range: 1 us .. 1 h


def new_histogram(digits: int = 3):
    from hdrh.histogram import HdrHistogram

    return HdrHistogram(LOWEST_US, HIGHEST_US, digits)


def encode(hist) -> str:
    """The histogram's standard compressed, base64 form ("" when empty)."""
    return hist.encode().decode() if hist.get_total_count() else ""
