"""``--workers N``: a supervisor that forks one writer process and N serving processes, and replaces any that dies.

The supervisor holds no gRPC and no LMDB state, so it can fork replacements
at any time (an LMDB environment must not cross fork(), and gRPC must not
have started). The writer syncs, ingests and evaluates, and listens on a
Unix socket in the data directory; the serving processes share the public
port (SO_REUSEPORT), answer Personalize from the memory-mapped environment
and forward Ingest, Audience and Sync calls to the writer.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading

from .app import run_async, serve_reads, serve_single, write_ready_file
from .config import Project
from .observability import metrics
from .storage.lmdb_store import META, data_path, open_env
from .storage.warehouse_sync import Progress

log = logging.getLogger(__name__)


def _reserve_port(host: str, port: int) -> socket.socket:
    """Binds (without listening) so port 0 resolves to one port all workers share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _fork(main) -> int:
    """Runs ``main()`` (returning an exit code) in a child process; returns its pid."""
    pid = os.fork()
    if pid == 0:  # child: never returns into the parent's code
        code = 1
        try:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            code = main()
        except BaseException:  # noqa: BLE001
            log.exception("process %d failed", os.getpid())
        finally:
            logging.shutdown()
            os._exit(code)
    return pid


def serve_workers(project: Project, workers: int, *, ready_file: str | None = None,
                  progress: Progress | None = None, metrics_http=None) -> int:
    """A supervisor, one writer process and ``workers`` serving processes
    (and one serving ``metrics_http``, when metrics are on); see the module docstring."""
    path = data_path(project.data_dir)
    env = open_env(path, project.map_size, readonly=False)
    with env.begin(write=True) as txn:  # readers need the environment and meta to exist
        env.open_db(META, txn=txn)
    env.close()  # an LMDB environment must not cross fork()
    placeholder = _reserve_port(project.server.host, project.server.port)
    port = placeholder.getsockname()[1]
    socket_path = path.parent / "writer.sock"
    socket_path.unlink(missing_ok=True)
    writer_address = f"unix:{socket_path}"
    writer_ready = path.parent / "writer.ready"
    writer_ready.unlink(missing_ok=True)
    http = project.ops.http
    http_placeholder = _reserve_port(http.host, http.port or 0) if http.enabled else None
    http_port = http_placeholder.getsockname()[1] if http_placeholder is not None else None

    def writer_main() -> int:
        return run_async(serve_single(project, ready_file=str(writer_ready), progress=progress, address=writer_address))

    def worker_main() -> int:
        return run_async(serve_reads(project, port, writer_address, http_port))

    def metrics_main() -> int:  # a process of its own: the supervisor must not run threads while it forks
        metrics_http.serve_forever()
        return 0

    roles = {_fork(writer_main): writer_main}
    roles.update({_fork(worker_main): worker_main for _ in range(workers)})
    if metrics_http is not None:
        roles[_fork(metrics_main)] = metrics_main
    log.info("%d serving processes on %s:%d (SO_REUSEPORT), one writer on %s", workers,
             project.server.host, port, socket_path)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    code, announced = 0, False
    try:
        while not stop.is_set():
            if not announced and writer_ready.exists():
                write_ready_file(ready_file, project.server.host, port, workers, http_port)
                log.info("serving on %s:%d", project.server.host, port)
                announced = True
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid in roles:
                main = roles.pop(pid)
                metrics.process_exited(pid)
                if main is writer_main and not announced:
                    log.error("the writer exited before the first sync landed (status %d)", status)
                    code = 1
                    break
                log.error("process %d exited (status %d); starting another", pid, status)
                roles[_fork(main)] = main
            stop.wait(0.1)
    finally:
        for pid in roles:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in roles:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        placeholder.close()
        if http_placeholder is not None:
            http_placeholder.close()
    return code


