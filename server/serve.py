"""``qualify serve``: one process, or a supervisor with a writer and N serving processes, and /metrics."""

from __future__ import annotations

import logging
import threading

from .app import announce_auth, run_async, serve_single
from .config import Project
from .observability import metrics
from .storage.lmdb_store import data_path
from .storage.warehouse_sync import Progress
from .supervisor import serve_workers

log = logging.getLogger(__name__)


def _metrics_endpoint(project: Project, multiprocess: bool):
    """/metrics bound (not serving yet), or None after logging why it cannot listen."""
    m = project.ops.metrics
    try:
        if multiprocess:  # before any fork and any import of prometheus_client: every process writes here
            metrics.prepare_multiprocess(data_path(project.data_dir).parent / "metrics")
        else:
            metrics.setup()
        httpd = metrics.http_server(m.host, m.port, multiprocess=multiprocess)
    except OSError as exc:
        log.error("cannot serve metrics on %s:%d: %s", m.host, m.port, exc)
        return None
    log.info("Prometheus metrics on http://%s:%d/metrics", m.host, httpd.server_port)
    return httpd


def serve(project: Project, *, workers: int | None = None, ready_file: str | None = None,
          progress: Progress | None = None) -> int:
    workers = workers or project.server.workers
    announce_auth(project)
    httpd = None
    if project.ops.metrics.port:
        httpd = _metrics_endpoint(project, multiprocess=workers > 1)
        if httpd is None:
            return 1
    if workers > 1:
        return serve_workers(project, workers, ready_file=ready_file, progress=progress, metrics_http=httpd)
    if httpd is not None:
        threading.Thread(target=httpd.serve_forever, name="qualify-metrics", daemon=True).start()
    return run_async(serve_single(project, ready_file=ready_file, progress=progress))
