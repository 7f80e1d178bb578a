"""Warehouse sync of N people x 10 attributes: a first sync, then an incremental one.

    python -m bench warehouse-sync --json [--people N] [--changed-fraction F]

Generates the demo DuckDB warehouse (table ``customers``, 10 attributes),
writes a qualify.toml beside it, and runs ``qualify sync --json`` as a child
process, timing its wall clock and taking its peak RSS from wait4(). Then it
changes ``ltv`` for a fraction of the rows in DuckDB and syncs again: the
second sync must find exactly those rows changed, and should cost a small
part of the first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import _proc

TARGETS = {"first_seconds_max": 15.0, "peak_rss_mb_max": 2048.0, "second_over_first_max": 0.2}
DESIGN_FIRST_SECONDS = 10.0  # DESIGN.md: 1M people x 10 attributes (with 100 audiences) under 10 s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench warehouse-sync", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--people", type=int, default=1_000_000, help="people in the warehouse (default 1000000)")
    p.add_argument("--changed-fraction", type=float, default=0.01,
                   help="fraction of rows whose ltv changes before the second sync (default 0.01)")
    p.add_argument("--unchanged-sync", action="store_true",
                   help="also run a third sync with nothing changed (the cost of reading and comparing)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per sync (default 600)")
    p.add_argument("--workdir", help="where the warehouse, project and LMDB go (default a new temp dir)")
    return p


def write_project(workdir: Path, warehouse: Path) -> Path:
    from qualify.server.demo import DEMO_ATTRIBUTES

    # json.dumps of a str is a valid TOML basic string.
    lines = [
        f"data_dir = {json.dumps(str(workdir / 'data'))}",
        "",
        "[warehouse]",
        'type = "duckdb"',
        f"path = {json.dumps(str(warehouse))}",
        "",
        "[parent_model]",
        'name = "customers"',
        'query = "SELECT * FROM customers"',
        'primary_key = "user_id"',
        "",
        "[parent_model.attributes]",
        *(f"{name} = {json.dumps(kind)}" for name, kind in DEMO_ATTRIBUTES.items()),
        "",
        "[collections.customers]",
        "",
    ]
    path = workdir / "qualify.toml"
    path.write_text("\n".join(lines))
    return path


def run_sync(project: Path, workdir: Path, label: str, timeout: float) -> dict:
    """One ``qualify sync --json`` child: wall seconds, peak RSS, and its report."""
    out_path, err_path = workdir / f"sync-{label}.json", workdir / f"sync-{label}.log"
    args = [sys.executable, "-m", "qualify.server.cli", "--log-level", "WARNING", "sync",
            "--project", str(project), "--json"]
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, cwd=workdir, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        peak_anon = peak_file = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            anon, file_ = _proc.rss_split_kib(proc.pid)
            peak_anon, peak_file = max(peak_anon, anon), max(peak_file, file_)
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.01)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
    if proc.returncode != 0:
        raise RuntimeError(f"qualify sync ({label}) exited with {proc.returncode}:\n"
                           + err_path.read_text(errors="replace")[-3000:])
    report = json.loads(out_path.read_text())
    tables = report.get("tables", [])
    return {
        "seconds": round(wall, 3),
        "sync_seconds": round(report["seconds"], 3),  # inside the child: excludes interpreter start and imports
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # ru_maxrss is in KiB on Linux
        # RSS splits, sampled every 10 ms: heap and arrays vs. pages of the
        # memory-mapped LMDB file (which the kernel can drop; they are page cache)
        "peak_rss_anon_mb": round(peak_anon / 1024, 1),
        "peak_rss_file_mb": round(peak_file / 1024, 1),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "people": report.get("people"),
        "generation": report.get("generation"),
        "added": sum(t["added"] for t in tables),
        "changed": sum(t["changed"] for t in tables),
        "removed": sum(t["removed"] for t in tables),
        "unchanged": sum(t["unchanged"] for t in tables),
        "tables": tables,
    }


def change_rows(warehouse: Path, fraction: float) -> dict:
    """Adds 1 to ltv for ``fraction`` of the people (those whose number mod 10000 is below it)."""
    import duckdb

    cutoff = round(fraction * 10_000)
    t0 = time.perf_counter()
    with duckdb.connect(str(warehouse)) as con:
        con.execute("UPDATE customers SET ltv = ltv + 1 "
                    "WHERE CAST(substr(user_id, 6) AS BIGINT) % 10000 < ?", [cutoff])
        changed = con.execute("SELECT count(*) FROM customers "
                              "WHERE CAST(substr(user_id, 6) AS BIGINT) % 10000 < ?", [cutoff]).fetchone()[0]
    return {"rows_updated": int(changed), "seconds": round(time.perf_counter() - t0, 3),
            "statement": f"UPDATE customers SET ltv = ltv + 1 WHERE CAST(substr(user_id, 6) AS BIGINT) % 10000 < {cutoff}"}


def run(args) -> dict:
    from qualify.server.demo import generate_demo_warehouse

    started = datetime.datetime.now(datetime.timezone.utc)
    machine = _proc.machine_note()
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="qualify-bench-sync-")
        workdir = Path(tmp.name)
    try:
        warehouse = workdir / "warehouse.duckdb"
        t0 = time.perf_counter()
        generate_demo_warehouse(warehouse, args.people)
        generate_seconds = time.perf_counter() - t0
        project = write_project(workdir, warehouse)
        first = run_sync(project, workdir, "first", args.timeout)
        update = change_rows(warehouse, args.changed_fraction)
        second = run_sync(project, workdir, "second", args.timeout)
        third = run_sync(project, workdir, "unchanged", args.timeout) if args.unchanged_sync else None
        lmdb_mb = sum(f.stat().st_size for f in (workdir / "data").rglob("*") if f.is_file()) / 2**20
    finally:
        if tmp is not None:
            tmp.cleanup()
    ratio = round(second["seconds"] / first["seconds"], 3)
    peak = max(first["peak_rss_mb"], second["peak_rss_mb"])
    passed = {
        "first_seconds": first["seconds"] <= TARGETS["first_seconds_max"],
        "peak_rss": peak < TARGETS["peak_rss_mb_max"],
        "second_over_first": ratio <= TARGETS["second_over_first_max"],
        "counts": (first["added"] == args.people and second["changed"] == update["rows_updated"]
                   and second["added"] == 0 and second["removed"] == 0),
    }
    passed["all"] = all(passed.values())
    machine["loadavg_after"] = _proc.loadavg()
    out = {
        "scenario": "warehouse-sync",
        "date": started.isoformat(timespec="seconds"),
        "config": {"people": args.people, "attributes": 10, "changed_fraction": args.changed_fraction,
                   "command": "python -m qualify.server.cli sync --project qualify.toml --json"},
        "machine": machine,
        "generate_warehouse_seconds": round(generate_seconds, 2),
        "lmdb_mb": round(lmdb_mb, 1),
        "first": first,
        "update": update,
        "second": second,
        "ratios": {"second_over_first": ratio,
                   "second_over_first_sync_seconds": round(second["sync_seconds"] / first["sync_seconds"], 3)},
        "targets": {**TARGETS, "design_first_seconds": DESIGN_FIRST_SECONDS, "pass": passed},
    }
    if third is not None:
        out["unchanged"] = third
    return out


def human(r: dict) -> str:
    f, s, t = r["first"], r["second"], r["targets"]
    lines = [f"sync: {r['config']['people']:,} people x 10 attributes (warehouse generated in "
             f"{r['generate_warehouse_seconds']}s; LMDB {r['lmdb_mb']} MB)"]
    for label, x in (("first", f), ("second", s), ("unchanged", r.get("unchanged"))):
        if x:
            lines.append(f"  {label:9} {x['seconds']:7.2f}s wall ({x['sync_seconds']:.2f}s in sync), peak RSS "
                         f"{x['peak_rss_mb']:.0f} MB (anon {x['peak_rss_anon_mb']:.0f}, LMDB map {x['peak_rss_file_mb']:.0f}), "
                         f"+{x['added']:,} ~{x['changed']:,} -{x['removed']:,}")
    lines.append(f"first {f['seconds']:.2f}s (max {t['first_seconds_max']:g}): {'PASS' if t['pass']['first_seconds'] else 'FAIL'}")
    lines.append(f"peak RSS {max(f['peak_rss_mb'], s['peak_rss_mb']):.0f} MB (max {t['peak_rss_mb_max']:g}): "
                 f"{'PASS' if t['pass']['peak_rss'] else 'FAIL'}")
    lines.append(f"second/first {r['ratios']['second_over_first']} (max {t['second_over_first_max']}): "
                 f"{'PASS' if t['pass']['second_over_first'] else 'FAIL'}")
    lines.append(f"counts: {'PASS' if t['pass']['counts'] else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.people < 1 or not 0 < args.changed_fraction <= 1:
        print("sync: --people must be positive and --changed-fraction in (0, 1]", file=sys.stderr)
        return 2
    try:
        result = run(args)
    except RuntimeError as exc:
        print(f"sync: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else human(result))
    return 0
