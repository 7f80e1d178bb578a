"""What a run shows: the text summary, the comparison with an earlier run, and the plots.

The text follows ghz's summary (counts, rates, a response-time histogram,
the latency distribution, status codes) with what ghz leaves out: the target
against the achieved rate, the server's CPU per request, the other work on the
machine, and the generator's own lag. Plots (``--report``) need matplotlib
(``pip install 'qualify[bench]'``).
"""

from __future__ import annotations

import html
import io
import json
import os
import sys

PERCENTILES = (50, 90, 99, 99.9, 99.99)
# metric -> (label, how to read it from a phase, True when bigger is better)
METRICS = {
    "p50": ("p50 latency", lambda ph: _lat(ph, "p50"), False),
    "p90": ("p90 latency", lambda ph: _lat(ph, "p90"), False),
    "p99": ("p99 latency", lambda ph: _lat(ph, "p99"), False),
    "p99_9": ("p99.9 latency", lambda ph: _lat(ph, "p99_9"), False),
    "p99_99": ("p99.99 latency", lambda ph: _lat(ph, "p99_99"), False),
    "max": ("max latency", lambda ph: _lat(ph, "max"), False),
    "achieved_rps": ("achieved requests/s", lambda ph: ph["achieved_rps"], True),
    "errors": ("errors", lambda ph: ph["errors"], False),
    "server_us_per_request": ("server CPU us/request", lambda ph: ph["cpu"]["server_us_per_request"], False),
}


class ReportError(RuntimeError):
    pass


def _lat(phase: dict, key: str):
    return phase["series"][phase["primary"]]["latency_us"].get(key)


def scenario_phase(run: dict) -> dict:
    for ph in run["phases"]:
        if ph["role"] == "scenario":
            return ph
    raise ReportError("the run has no scenario phase")


def load_run(path: str) -> dict:
    try:
        with open(path) as f:
            run = json.load(f)
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: not a bench result (--json output): {exc}") from None
    if run.get("tool") != "qualify bench" or not run.get("phases"):
        raise ReportError(f"{path}: not a `qualify bench --json` result")
    run["_path"] = path
    return run


# Text -----------------------------------------------------------------------


def ms(us) -> str:
    if us is None:
        return "-"
    return f"{us / 1000:.2f} ms" if us < 100_000 else f"{us / 1000:,.0f} ms"


def _num(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _load_line(run: dict, ph: dict) -> str:
    c = run["config"]
    procs = f"{c['processes']} load process{'es' if c['processes'] > 1 else ''} x {c['connections']} connection" \
            f"{'s' if c['connections'] > 1 else ''}"
    if ph["mode"] == "open":
        return f"open loop, {_schedule_text(ph['schedule'])} for {ph['duration_s']:g} s; {procs}"
    pace = f", paced to {_schedule_text(ph['schedule'])}" if ph["schedule"] else ""
    return f"closed loop, {ph['concurrency']} in flight{pace} for {ph['duration_s']:g} s; {procs}"


def _schedule_text(spec: str | None) -> str:
    from ._schedule import Schedule

    return str(Schedule.parse(spec)) if spec else "-"


def _bars(hist, width: int = 40) -> list[str]:
    """A response-time histogram on log-spaced buckets (ghz draws linear ones; tails need log)."""
    lo, hi = max(1, hist.get_min_value()), max(1, hist.get_max_value())
    edges, e = [], lo
    while e < hi:
        edges.append(e)
        e = e * 2
    edges.append(hi + 1)
    counts, prev = [], 0
    for edge in edges[1:]:
        below = _count_below(hist, edge)
        counts.append(below - prev)
        prev = below
    top = max(counts) or 1
    return [f"  {ms(edge - 1):>10} [{n:>8,}] |{'∎' * round(width * n / top)}" for edge, n in zip(edges[1:], counts)]


def _count_below(hist, value: int) -> int:
    total = 0
    for item in hist.get_recorded_iterator():
        if item.value_iterated_to < value:
            total += item.count_at_value_iterated_to
    return total


def decode(encoded: str):
    from hdrh.histogram import HdrHistogram

    return HdrHistogram.decode(encoded) if encoded else None


def text(run: dict) -> str:
    ph = scenario_phase(run)
    floor = next((p for p in run["phases"] if p["role"] == "floor"), None)
    t = run["target"]
    series = ph["series"][ph["primary"]]
    out = ["Summary:",
           f"  Scenario:      {run['scenario']}: {run['description']}",
           f"  Target:        {t['address']}" + (f" (started by the bench: embedded demo, {t['people']:,} people, "
                                                  f"{t['workers']} worker{'s' if t['workers'] > 1 else ''})"
                                                  if t.get("started_by_bench") else ""),
           f"  Load:          {_load_line(run, ph)}"]
    if t.get("e2e_measures"):
        out.append(f"  Measures:      {t['e2e_measures']}")
    if ph["scheduled"] is not None:
        out.append(f"  Count:         {ph['completed']:,} completed, {ph['sent']:,} sent of {ph['scheduled']:,} scheduled"
                   + (f" ({ph['dropped']:,} dropped)" if ph["dropped"] else ""))
    else:
        out.append(f"  Count:         {ph['completed']:,} completed")
    out.append(f"  Requests/sec:  {_num(ph['achieved_rps'])} achieved" +
               (f", {_num(ph['target_rps'])} target" if ph["target_rps"] else ""))
    if ph["items_per_request"] > 1:
        out.append(f"  Items/sec:     {_num(ph['items_per_s'])} ({ph['items_per_request']} per request)")
    if ph.get("background"):
        bg = ph["background"]
        out.append(f"  Background:    {_num(bg['items_per_s'], 0)} events/s streamed alongside "
                   f"(target {_num(bg['target_rps'] * 100, 0)}), {bg['errors']:,} errors")
    lat = series["latency_us"]
    if lat:
        out.append(f"  Fastest:       {ms(lat['min'])}    Average: {ms(lat['mean'])}    Slowest: {ms(lat['max'])}")
        hist = decode(series["hist"])
        out += ["", "Response time histogram:", *_bars(hist)]
    since = "its intended send time (open loop)" if ph["mode"] == "open" else "its actual send (closed loop)"
    out += ["", f"Latency distribution (each request from {since}):"]
    cols = [(name, ph["series"][name]) for name in ph["series"] if name != "all" or ph["primary"] == "all"]
    cols.sort(key=lambda c: c[0] != ph["primary"])
    header = [name for name, _ in cols] + (["noop floor"] if floor else [])
    values = [s["latency_us"] for _, s in cols] + ([floor["series"]["noop"]["latency_us"]] if floor else [])
    out.append("  " + " " * 8 + "".join(f"{h:>16}" for h in header))
    for key, label in [(f"p{q:g}".replace(".", "_"), f"p{q:g}") for q in PERCENTILES] + [("max", "max")]:
        out.append(f"  {label:8}" + "".join(f"{ms(v.get(key)):>16}" for v in values))
    out += ["", "Status code distribution:"]
    ok = sum(s["count"] - s["errors"] for n, s in ph["series"].items() if n not in ("all", "ack"))
    out.append(f"  [OK]   {ok:,} responses")
    codes = ph["series"][ph["primary"]]["error_codes"]
    for code, n in sorted(codes.items(), key=lambda kv: -kv[1]):
        out.append(f"  [{code}]   {n:,} responses")
    if ph["no_reply"]:
        out.append(f"  [no reply before the end]   {ph['no_reply']:,}")
    cpu = ph["cpu"]
    out.append("")
    if cpu["measured"]:
        per = f"{_num(cpu['server_us_per_request'])} us/request"
        if ph["items_per_request"] > 1:
            per += f" ({_num(cpu['server_us_per_item'], 2)} us per item)"
        if floor:
            per += f"; noop floor {_num(floor['cpu']['server_us_per_request'])} us/request"
        out.append(f"Server CPU:    {per}, {cpu['server_cores']} cores busy")
    else:
        out.append("Server CPU:    not measured (the server is not on this machine; --server-pid names it if it is)")
    out.append(f"Client CPU:    {_num(cpu['client_us_per_request'])} us/request, {cpu['client_cores']} cores")
    if cpu["other_cores"] is not None:
        out.append(f"Other work:    {cpu['other_cores']} cores busy with neither the server nor the generator "
                   f"(machine {cpu['machine_cores_busy']} of {run['machine']['cpus']} cores)")
    lag = ph["generator_lag_us"]
    if lag:
        out.append(f"Generator lag: p50 {ms(lag['p50'])}, p99 {ms(lag['p99'])}, max {ms(lag['max'])} behind schedule")
    for w in ph["warnings"]:
        out.append(f"WARNING: {w}")
    for w in floor["warnings"] if floor else []:
        out.append(f"WARNING (noop floor phase): {w}")
    if t.get("exit_code") not in (None, 0):
        out.append(f"WARNING: the server exited with {t['exit_code']}: the run is not valid (log tail in the JSON)")
    if "compare" in run:
        out += ["", *compare_text(run["compare"])]
    return "\n".join(out)


# Compare ----------------------------------------------------------------------


def compare(old: dict, new: dict, threshold: float) -> dict:
    """Each metric's change; worse by more than ``threshold`` percent is a regression."""
    o, n = scenario_phase(old), scenario_phase(new)
    rows, regressions = [], []
    for key, (label, get, bigger_better) in METRICS.items():
        try:
            a, b = get(o), get(n)
        except (KeyError, TypeError):
            continue
        if a is None or b is None:
            continue
        change = (b - a) / a * 100 if a else (0.0 if b == a else float("inf"))
        worse = -change if bigger_better else change
        regression = worse > threshold if a else b > a
        rows.append({"metric": key, "label": label, "old": a, "new": b,
                     "change_pct": round(change, 1) if change != float("inf") else None, "regression": regression})
        if regression:
            regressions.append(key)
    return {"old": {"path": old.get("_path"), "date": old.get("date"), "scenario": old.get("scenario"),
                    "command": old.get("command")},
            "threshold_pct": threshold, "rows": rows, "regressions": regressions,
            "same_scenario": old.get("scenario") == new.get("scenario")}


def _fmt_metric(key: str, v) -> str:
    if key.startswith("p") or key == "max":
        return ms(v)
    return _num(v, 0 if key == "errors" else 1)


def compare_text(cmp: dict) -> list[str]:
    tty = sys.stdout.isatty() and os.environ.get("NO_COLOR") is None
    red = ("\x1b[1;31m", "\x1b[0m") if tty else ("", "")
    out = [f"Compared with {cmp['old']['path']} ({cmp['old']['date']}, {cmp['old']['scenario']}); "
           f"worse by more than {cmp['threshold_pct']:g}% is a regression:"]
    if not cmp["same_scenario"]:
        out.append("  NOTE: the earlier run was another scenario")
    out.append(f"  {'':24}{'old':>14}{'new':>14}{'change':>10}")
    for r in cmp["rows"]:
        change = "n/a" if r["change_pct"] is None else f"{r['change_pct']:+.1f}%"
        line = f"  {r['label']:24}{_fmt_metric(r['metric'], r['old']):>14}{_fmt_metric(r['metric'], r['new']):>14}{change:>10}"
        out.append(f"{red[0]}{line}  <- REGRESSION{red[1]}" if r["regression"] else line)
    out.append(f"  {len(cmp['regressions'])} regression(s)" if cmp["regressions"] else "  no regression")
    return out


# Plots ------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ReportError("--report needs matplotlib: pip install 'qualify[bench]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _percentile_curve(encoded: str):
    """(x, latency ms) for the classic HDR plot: x = 1 / (1 - percentile), log scale."""
    hist = decode(encoded)
    if hist is None:
        return [], []
    xs, ys = [], []
    for item in hist.get_percentile_iterator(5):
        p = item.percentile_level_iterated_to
        if p >= 100:
            break
        xs.append(1 / (1 - p / 100))
        ys.append(item.value_iterated_to / 1000)
    xs.append(xs[-1] * 10 if xs else 1)
    ys.append(hist.get_max_value() / 1000)
    return xs, ys


def figure(run: dict):
    plt = _pyplot()
    ph = scenario_phase(run)
    floor = next((p for p in run["phases"] if p["role"] == "floor"), None)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig = plt.figure(figsize=(11, 4.2), dpi=80)
    grid = fig.add_gridspec(2, 2, height_ratios=(3, 1), hspace=0.08)
    ax1 = fig.add_subplot(grid[0, 0])
    rate = fig.add_subplot(grid[1, 0], sharex=ax1)
    ax2 = fig.add_subplot(grid[:, 1])
    plain_ms = FuncFormatter(lambda v, _: f"{v:g}")
    s = ph["series"][ph["primary"] if ph["primary"] != "all" else next(iter(ph["series"]))]
    tl = s["timeline"]
    xs = [p["t"] + ph["interval_s"] / 2 for p in tl]
    ax1.plot(xs, [p["max_us"] / 1000 for p in tl], color="#d62728", lw=1, label="max")
    ax1.plot(xs, [p["p99_us"] / 1000 for p in tl], color="#ff7f0e", lw=1.2, label="p99")
    ax1.plot(xs, [p["p50_us"] / 1000 for p in tl], color="#1f77b4", lw=1.5, label="p50")
    ax1.set_yscale("log")
    ax1.set_ylabel("latency, ms")
    ax1.set_title(f"Latency over time (per {ph['interval_s'] * 1000:g} ms)", fontsize=10)
    ax1.legend(fontsize=7, loc="upper left", ncol=3)
    rate.plot(xs, [p["count"] / ph["interval_s"] for p in tl], color="#7f7f7f", lw=1, label="sent")
    if ph["schedule"]:
        from ._schedule import Schedule

        sched = Schedule.parse(ph["schedule"])
        rate.plot(xs, [sched.rate_at(x, ph["duration_s"]) for x in xs], color="#2ca02c", lw=1, ls="--",
                  label="target")
    rate.set_ylabel("req/s")
    rate.set_ylim(bottom=0)
    rate.legend(fontsize=7, loc="lower left", ncol=2)
    rate.set_xlabel("seconds into the run" + (" (by intended send time)" if ph["mode"] == "open" else ""))
    ax1.tick_params(labelbottom=False)
    for ax in (ax1, rate):
        ax.grid(True, which="both", alpha=0.25)

    curves = [(f"{run['scenario']} ({ph['primary']})", s["hist"], "#1f77b4", "-")]
    if floor:
        curves.append(("noop floor, same load", floor["series"]["noop"]["hist"], "#7f7f7f", "--"))
    for name, ser in ph["series"].items():
        if name not in (ph["primary"], "all"):
            curves.append((name, ser["hist"], None, "-."))
    old = run.get("_compare_run")
    if old is not None:
        o = scenario_phase(old)
        curves.append((f"earlier run ({old.get('date', '')[:16]})", o["series"][o["primary"]]["hist"], "#d62728", ":"))
    for label, enc, color, ls in curves:
        x, y = _percentile_curve(enc)
        if x:
            ax2.plot(x, y, label=label, color=color, ls=ls, lw=1.5)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    top = max((x for line in ax2.get_lines() for x in line.get_xdata()), default=10)
    ticks = [t for t in (1, 10, 100, 1000, 10000, 100000, 1000000) if t <= top]
    ax2.set_xticks(ticks)
    ax2.set_xticklabels(["0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%"][:len(ticks)])
    ax2.xaxis.set_minor_formatter(NullFormatter())
    for ax in (ax1, ax2):
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain_ms)
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax2.set_xlabel("percentile")
    ax2.set_ylabel("latency, ms")
    ax2.set_title("Latency by percentile", fontsize=10)
    ax2.grid(True, which="both", alpha=0.25)
    ax2.legend(fontsize=7, loc="upper left")
    load = _load_line(run, ph)
    fig.suptitle(f"qualify bench {run['scenario']}: {load}; {run['date']}", fontsize=9)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.86, bottom=0.13, wspace=0.2)
    return fig, plt


def write_report(run: dict, path: str, compare_run: dict | None = None) -> None:
    if compare_run is not None:
        run = {**run, "_compare_run": compare_run}
    fig, plt = figure(run)
    try:
        if path.lower().endswith(".png"):
            fig.savefig(path, format="png")
            return
        if not path.lower().endswith((".html", ".htm")):
            raise ReportError(f"--report {path}: name an .html or a .png file")
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
    finally:
        plt.close(fig)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    body = html.escape(text({k: v for k, v in run.items() if k != "_compare_run"}))
    if "compare" in run and run["compare"]["regressions"]:
        body = "\n".join(f'<mark class="regression">{line}</mark>' if "REGRESSION" in line else line
                         for line in body.splitlines())
    raw = json.dumps({k: v for k, v in run.items() if not k.startswith("_")})
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qualify bench {html.escape(run['scenario'])} {html.escape(run['date'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}
pre{{background:#f6f8fa;padding:1em;overflow-x:auto}} mark.regression{{background:#ffd7d7;color:#a00;font-weight:bold}}
svg{{max-width:100%;height:auto}}</style></head>
<body><h1>qualify bench {html.escape(run['scenario'])}</h1>
<p>{html.escape(run['description'])}. Command: <code>{html.escape(run['command'])}</code></p>
{svg}
<h2>Summary</h2>
<pre>{body}</pre>
<details><summary>The run as JSON (load it with <code>--compare</code>)</summary>
<pre id="run-json">{html.escape(raw)}</pre></details>
</body></html>
"""
    with open(path, "w") as f:
        f.write(page)
