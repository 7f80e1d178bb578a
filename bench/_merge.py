"""One phase's result from its load processes: histograms added, counts summed.

Each load process sends its part of a phase (bench/_loadgen.py,
``Generator._summarize``): per series an encoded HDR histogram, status counts
and per-interval histograms. ``merge`` adds them up exactly and shapes the
phase's entry of the ``--json`` result; its steps are the functions below.
"""

from __future__ import annotations

from . import report
from ._histograms import encode, new_histogram
from ._schedule import Schedule

LAG_WARN_US = 1000.0


def _latency(hist) -> dict:
    if hist.get_total_count() == 0:
        return {}
    out = {f"p{q:g}".replace(".", "_"): hist.get_value_at_percentile(q) for q in report.PERCENTILES}
    out.update(min=hist.get_min_value(), max=hist.get_max_value(), mean=round(hist.get_mean_value(), 1))
    return out


def merge(name: str, role: str, spec: dict, parts: list[dict], wall: float) -> dict:
    """One phase's result from its load processes: histograms added, counts summed."""
    duration, interval = spec["duration"], spec["interval"]
    series = _add_series(parts)
    items_per = {"batch-get": spec["batch"], "ingest": spec["batch"], "ingest-http": spec["batch"]}
    out_series = {sname: _series_result(m, duration, interval) for sname, m in series.items()}
    main_names = [s for s in out_series if s != "ack"]
    primary_name = main_names[0] if len(main_names) == 1 else "all"
    if primary_name == "all":
        out_series["all"] = _all_series(series, out_series, main_names)
    sched = Schedule.parse(spec["schedule"]) if spec["schedule"] else None
    scheduled = int(sum(len(sched.offsets(duration)[i::len(parts)]) for i in range(len(parts)))) if sched else None
    sent = sum(p["sent"] for p in parts)
    completed = sum(out_series[s]["count"] for s in main_names)
    in_window = sum(series[s]["in_window"] for s in main_names)
    items = sum(out_series[s]["count"] * items_per.get(s, 1) for s in main_names)
    result = {
        "name": name, "role": role, "primary": primary_name,
        "mode": ("closed" if spec.get("concurrency") else "open"),
        "schedule": spec["schedule"], "concurrency": spec.get("concurrency"),
        "duration_s": duration, "wall_s": round(wall, 3), "interval_s": interval,
        "target_rps": round(sched.total(duration) / duration, 1) if sched else None,
        "scheduled": scheduled, "sent": sent, "completed": completed,
        "dropped": sum(p["dropped"] for p in parts), "no_reply": sum(p["no_reply"] for p in parts),
        "sent_after_window": sum(p["sent_after_window"] for p in parts),
        "achieved_rps": round(in_window / duration, 1),
        "items": items, "items_per_request": items_per.get(primary_name, 1),
        "items_per_s": round(sum(series[s]["in_window"] * items_per.get(s, 1) for s in main_names) / duration, 1),
        "errors": sum(out_series[s]["errors"] for s in main_names),
        "rejected_events": sum(p.get("rejected_events", 0) for p in parts),
        "series": out_series,
        "generator_lag_us": _latency(_add_lag(parts)),
        "client_rss_mb_max": max(p.get("client_rss_mb", 0) for p in parts),
    }
    result["warnings"] = _warnings(result, spec, sched, scheduled, out_series[primary_name]["error_codes"])
    return result


def _add_series(parts: list[dict]) -> dict[str, dict]:
    """Every process's series added up by name: whole-run histogram, counts, status codes, intervals."""
    series: dict[str, dict] = {}
    for part in parts:
        for sname, s in part["series"].items():
            m = series.setdefault(sname, {"hist": new_histogram(), "codes": {}, "count": 0, "in_window": 0, "iv": {}})
            if s["hist"]:
                m["hist"].decode_and_add(s["hist"])
            m["count"] += s["count"]
            m["in_window"] += s["completed_in_window"]
            for code, n in s["codes"].items():
                m["codes"][code] = m["codes"].get(code, 0) + n
            for i, iv in s["intervals"].items():
                slot = m["iv"].setdefault(int(i), [new_histogram(2), 0, 0])
                if iv["hist"]:
                    slot[0].decode_and_add(iv["hist"])
                slot[1] += iv["count"]
                slot[2] += iv["errors"]
    return series


def _add_lag(parts: list[dict]):
    """The send-lag histograms of the processes that kept to a schedule, added."""
    lag = new_histogram()
    for part in parts:
        if part.get("lag"):
            lag.decode_and_add(part["lag"])
    return lag


def _series_result(m: dict, duration: float, interval: float) -> dict:
    """One merged series as it appears in the result, with its latency-over-time timeline."""
    h = m["hist"]
    return {
        "count": m["count"], "errors": sum(m["codes"].values()), "error_codes": m["codes"],
        "rps": round(m["in_window"] / duration, 1),
        "latency_us": _latency(h),
        "hist": encode(h),
        "timeline": [{"t": round(i * interval, 3), "count": c, "errors": e,
                      "p50_us": hh.get_value_at_percentile(50), "p99_us": hh.get_value_at_percentile(99),
                      "max_us": hh.get_max_value()}
                     for i, (hh, c, e) in sorted(m["iv"].items()) if c],
    }


def _all_series(series: dict[str, dict], out_series: dict[str, dict], main_names: list[str]) -> dict:
    """The series "all" of a mixed phase: every main series together (the e2e "ack" is left out)."""
    total = new_histogram()
    for sname in main_names:
        total.add(series[sname]["hist"])
    out = {"count": sum(out_series[s]["count"] for s in main_names),
           "errors": sum(out_series[s]["errors"] for s in main_names),
           "error_codes": {}, "rps": round(sum(out_series[s]["rps"] for s in main_names), 1),
           "latency_us": _latency(total),
           "hist": encode(total), "timeline": []}
    for sname in main_names:
        for code, n in out_series[sname]["error_codes"].items():
            out["error_codes"][code] = out["error_codes"].get(code, 0) + n
    return out


def _warnings(result: dict, spec: dict, sched: Schedule | None, scheduled: int | None, codes: dict) -> list[str]:
    """What makes the phase's figures less than they seem: a generator behind schedule, dropped ticks, errors."""
    warnings = []
    if sched and not spec.get("concurrency"):
        lag_p99 = result["generator_lag_us"].get("p99", 0)
        if lag_p99 > LAG_WARN_US or result["sent_after_window"] > 0.05 * max(1, scheduled):
            warnings.append(f"the load generator fell behind the schedule: send lag p99 {lag_p99 / 1000:.1f} ms, "
                            f"{result['sent_after_window']:,} requests sent after the run's end; the latencies "
                            f"still count from the intended send times, but add load processes (--processes) or "
                            f"lower the rate to load the server as scheduled")
    if sched and spec.get("concurrency") and result["dropped"]:
        warnings.append(f"closed loop: {result['dropped']:,} of {scheduled:,} scheduled requests were never sent "
                        f"because all {spec['concurrency']} slots were busy; its latencies count from the actual "
                        f"sends, so they leave out the waiting those requests would have seen (coordinated omission)")
    if result["errors"]:
        warnings.append(f"{result['errors']:,} requests failed: " +
                        ", ".join(f"{k} {v:,}" for k, v in sorted(codes.items())))
    return warnings
