"""Prometheus metrics: every metric Qualify exports, and the endpoint that serves them.

Code that records calls the functions below (``events``, ``sync_delivered``,
...). They do nothing until ``setup()`` has run in the process, so callers
never check whether metrics are on, and a process without metrics pays one
``is None`` test per call.

One process (``workers = 1``): ``setup()``, then ``http_server()`` served on
a daemon thread.

``--workers N``: every process writes its values to memory-mapped files in
one folder (prometheus-client's multiprocess mode) and the endpoint adds
them up. The supervisor calls ``prepare_multiprocess(folder)`` before it
forks and before anything imports prometheus_client (the client picks its
storage at import), binds ``http_server(..., multiprocess=True)`` (so a port
in use fails the start) and forks a child to serve it: the supervisor itself
stays single-threaded, as a process that forks must. Every other child calls
``setup()`` after the fork. Gauges say how processes combine
(``multiprocess_mode``): the LMDB map and sync lag come from the process
that knows them, so the endpoint reports the live maximum or the most recent
value, never a sum.

Metrics (all prefixed ``qualify_``):

- ``rpc_duration_seconds{method,code}`` histogram: server time per RPC, by final status;
- ``events_accepted_total``, ``events_duplicate_total`` counters: events newly logged,
  and acknowledged as already logged;
- ``events_rejected_total{reason}`` counter: rejected events, by RejectionReason name;
- ``evaluation_lag_seconds`` histogram: arrival to evaluation committed, for the oldest
  event of each write transaction;
- ``membership_changes_total{audience,direction}`` counter: enters and exits written;
- ``lmdb_map_used_bytes``, ``lmdb_map_size_bytes`` gauges: pages in use, map reserved;
- ``warehouse_sync_duration_seconds`` histogram, ``warehouse_sync_failures_total``
  counter, ``warehouse_sync_last_success_timestamp_seconds`` gauge;
- ``sync_delivered_total{sync}``, ``sync_failures_total{sync}`` counters and
  ``sync_lag_seconds{sync}`` gauge: realtime syncs (``sync_delivered``,
  ``sync_failed``, ``sync_lag`` below, called by the delivery code).
"""

from __future__ import annotations

import enum
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"

# Seconds. Personalize answers in tens of microseconds; streams last minutes.
RPC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
               2.5, 5.0, 10.0, 60.0)
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SYNC_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)



class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter as C, Gauge as G, Histogram as H

        self.rpc = H("qualify_rpc_duration_seconds", "Server time per RPC, by method and final status code",
                     ("method", "code"), buckets=RPC_BUCKETS)
        self.accepted = C("qualify_events_accepted_total", "Events newly written to the event log")
        self.duplicate = C("qualify_events_duplicate_total", "Events acknowledged as already in the log")
        self.rejected = C("qualify_events_rejected_total", "Events rejected, by RejectionReason", ("reason",))
        self.evaluation_lag = H("qualify_evaluation_lag_seconds",
                                "From an event's arrival to the commit of its evaluation "
                                "(the oldest event of each write transaction)", buckets=LAG_BUCKETS)
        self.changes = C("qualify_membership_changes_total", "Audience enters and exits written",
                         ("audience", "direction"))
        self.map_used = G("qualify_lmdb_map_used_bytes", "LMDB pages in use (the data file's high-water mark)",
                          multiprocess_mode="livemax")
        self.map_size = G("qualify_lmdb_map_size_bytes", "LMDB map size reserved", multiprocess_mode="livemax")
        self.wh_duration = H("qualify_warehouse_sync_duration_seconds", "Warehouse syncs that landed",
                             buckets=SYNC_BUCKETS)
        self.wh_failures = C("qualify_warehouse_sync_failures_total", "Warehouse syncs that failed")
        self.wh_last = G("qualify_warehouse_sync_last_success_timestamp_seconds",
                         "Unix time the last warehouse sync landed", multiprocess_mode="livemax")
        self.delivered = C("qualify_sync_delivered_total", "Membership changes a realtime sync delivered", ("sync",))
        self.sync_failures = C("qualify_sync_failures_total", "Failed delivery attempts of a realtime sync", ("sync",))
        self.sync_lag = G("qualify_sync_lag_seconds",
                          "Latest delay from a membership change taking effect to its delivery", ("sync",),
                          multiprocess_mode="livemostrecent")
        self.changelog_held = G("qualify_changelog_held_by_syncs",
                                "1 while a realtime sync keeps changes older than changelog_retention from compaction",
                                multiprocess_mode="livemax")


_m: _Metrics | None = None


def prepare_multiprocess(folder: Path) -> None:
    """In the supervisor, before forking: an empty folder for every process's values."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.environ[ENV] = str(folder)


def setup() -> None:
    """Creates the metrics in this process (after the fork, in --workers mode); idempotent."""
    global _m
    if _m is not None:
        return
    if os.environ.get(ENV):
        from prometheus_client import values

        if not getattr(values.ValueClass, "_multiprocess", False):  # imported before the folder was set
            values.ValueClass = values.MultiProcessValue()
    _m = _Metrics()


def enabled() -> bool:
    return _m is not None


def http_server(host: str, port: int, multiprocess: bool = False):
    """A bound WSGI server for /metrics, not serving yet (``serve_forever``); OSError if it cannot listen."""
    import socket
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app

    registry = REGISTRY
    if multiprocess:
        from prometheus_client import multiprocess as mp

        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry)

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args) -> None:  # a scrape every few seconds is not news
            pass

    return make_server(host, port, make_wsgi_app(registry), server_class=Server, handler_class=Quiet)


def process_exited(pid: int) -> None:
    """Drops a dead process's live gauges (multiprocess mode; the supervisor calls it)."""
    if os.environ.get(ENV):
        from prometheus_client import multiprocess as mp

        mp.mark_process_dead(pid)


# -- recording ------------------------------------------------------------------------


def rpc_observer(method: str) -> Callable[[str, float], None] | None:
    """``observe(code_name, seconds)`` for one method (children cached), or None when metrics are off."""
    if _m is None:
        return None
    family = _m.rpc
    children = {"OK": family.labels(method, "OK")}

    def observe(code: str, seconds: float) -> None:
        child = children.get(code)
        if child is None:
            child = children[code] = family.labels(method, code)
        child.observe(seconds)

    return observe


def events(accepted: int, duplicates: int, rejected: Mapping[str, int] | None = None) -> None:
    """One ingest request's outcome; ``rejected`` maps RejectionReason names to counts."""
    if _m is None:
        return
    if accepted:
        _m.accepted.inc(accepted)
    if duplicates:
        _m.duplicate.inc(duplicates)
    for reason, n in (rejected or {}).items():
        _m.rejected.labels(reason).inc(n)


def evaluation_lag(seconds: float) -> None:
    if _m is not None:
        _m.evaluation_lag.observe(max(0.0, seconds))


def membership_changes(rows: Iterable[tuple[str, enum.Enum]]) -> None:
    """(audience id, Direction) of each change written."""
    if _m is None:
        return
    for (audience, direction), n in Counter(rows).items():
        _m.changes.labels(audience, direction.name.lower()).inc(n)


def lmdb_map(used_bytes: int, size_bytes: int) -> None:
    if _m is not None:
        _m.map_used.set(used_bytes)
        _m.map_size.set(size_bytes)


def warehouse_sync(seconds: float | None, ok: bool, finished_at: float | None = None) -> None:
    """A warehouse sync that landed (``ok``, with its duration) or failed."""
    if _m is None:
        return
    if ok:
        _m.wh_duration.observe(seconds or 0.0)
        if finished_at is not None:
            _m.wh_last.set(finished_at)
    else:
        _m.wh_failures.inc()


def sync_delivered(sync: str, n: int = 1) -> None:
    """Realtime sync ``sync`` delivered ``n`` membership changes."""
    if _m is not None and n:
        _m.delivered.labels(sync).inc(n)


def sync_failed(sync: str, n: int = 1) -> None:
    """Realtime sync ``sync`` failed ``n`` delivery attempts (each retry that fails counts)."""
    if _m is not None and n:
        _m.sync_failures.labels(sync).inc(n)


def changelog_held(held: bool) -> None:
    """Whether the last compaction slice left old changes for a sync that has not delivered them."""
    if _m is not None:
        _m.changelog_held.set(1 if held else 0)


def sync_lag(sync: str, seconds: float) -> None:
    """How long after taking effect the change realtime sync ``sync`` just delivered reached it."""
    if _m is not None:
        _m.sync_lag.labels(sync).set(max(0.0, seconds))
