"""Percentiles of a list of samples, for the in-process benches (the load tool uses HDR histograms)."""

from __future__ import annotations


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(q * len(xs) + 0.5) - 1))]


def stats_ms(xs: list[float]) -> dict:
    return {"p50_ms": round(percentile(xs, 0.5) * 1e3, 3), "p90_ms": round(percentile(xs, 0.9) * 1e3, 3),
            "p99_ms": round(percentile(xs, 0.99) * 1e3, 3), "max_ms": round(max(xs) * 1e3, 3), "n": len(xs)}
