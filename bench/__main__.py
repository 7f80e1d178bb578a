"""``python -m bench SCENARIO [options]``: load benches that print JSON with --json."""

from __future__ import annotations

import argparse
import importlib
import sys

SCENARIOS = {
    "personalize": ("personalize", "PersonalizeService.Get vs the DiagnosticsService.Noop floor: "
                                   "closed-loop rps and server CPU per call, open-loop latency"),
    "sync": ("sync", "warehouse sync of N people x 10 attributes into LMDB: first and incremental "
                     "sync time and peak memory"),
    "evaluator": ("evaluator", "the compiled evaluator in process: per-event evaluation of 100 audiences, "
                               "and the full recompute over 1,000,000 people"),
    "ingest": ("ingest", "StreamEvents throughput, durably acknowledged, with 100 audiences evaluated, "
                         "against logging alone"),
    "e2e": ("e2e", "event acknowledged -> membership visible in Get, under background ingest load"),
    "syncs": ("syncs", "change -> delivery latency on the watch stream and a local webhook at a steady change rate"),
}


def build_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:13} {text}" for name, (_, text) in SCENARIOS.items())
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Qualify load benches. Run from the repository root; each prints one JSON object with --json.",
        epilog=f"scenarios:\n{listing}\n\n`python -m bench SCENARIO --help` shows a scenario's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=sorted(SCENARIOS), metavar="SCENARIO", help="one of: " + ", ".join(SCENARIOS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="the scenario's own options")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f".{SCENARIOS[args.scenario][0]}", __package__)
    return module.main(args.args)


if __name__ == "__main__":
    sys.exit(main())
