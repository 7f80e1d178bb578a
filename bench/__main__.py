"""``python -m bench SCENARIO [options]``: the load bench, and three benches of their own.

The load scenarios (personalize, batch-get, ingest, e2e, mixed, noop) are
``qualify bench``: see ``python -m bench --help``. ``warehouse-sync`` and
``evaluator`` time the warehouse sync and the compiled evaluator without a
gRPC client; ``local-reader`` times LocalReader against gRPC Get; ``realtime-syncs`` times changes to their delivery on the watch
stream and a webhook; ``history`` measures what grows with the event log; ``retention-soak`` ingests past
event_retention and watches the log and the changelog level off.
"""

from __future__ import annotations

import importlib
import sys

from .tool import main as load_main

MICRO = {  # scenario (its module, with _ for -) -> what it measures
    "warehouse-sync": "warehouse sync of N people x 10 attributes into LMDB: first and incremental sync time and peak memory",
    "evaluator": "the compiled evaluator in process: per-event evaluation of 100 audiences, and the full "
                 "recompute over 1,000,000 people",
    "history": "restart, audience changes, ingest CPU, memory and disk at several lengths of the event log",
    "simulate": "SimulateAudience over 1,000,000 logged events: replay events/s, and a steady stream's ack p99",
    "realtime-syncs": "change -> delivery latency on the watch stream and a local webhook at a steady change rate",
    "cluster": "a 3-node cluster on NATS against one node, same run: CPU per event and per Get, read staleness, "
               "partition balance, failover after kill -9",
    "retention-soak": "ingest for longer than event_retention: the event log's size levels off; a stalled webhook "
                      "sync holds the changelog back until it catches up, then it is compacted",
    "local-reader": "LocalReader get in the caller's process against gRPC Get and the Noop floor; 1 vs 2 reader "
                    "processes; a reader while the server ingests",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in MICRO:
        return importlib.import_module(f".{argv[0].replace('-', '_')}", __package__).main(argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        load_main(["--help"])  # exits after the load bench's help
    return load_main(argv)


if __name__ == "__main__":
    sys.exit(main())
