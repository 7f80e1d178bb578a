"""Composition root: project -> storage -> servicers -> grpc.aio server.

Two shapes, one set of parts:

- one process (``workers=1``): the gRPC server and the writer share the
  process; every write (ingest batches, the warehouse sync) runs on the one
  writer thread (storage/writer.py);
- ``workers=N``: a supervisor with no gRPC and no LMDB state forks one
  writer process (the single LMDB writer, on a Unix socket) and N serving
  processes; each serving process binds the same port with SO_REUSEPORT,
  reads the same memory-mapped environment and forwards Ingest and Audience
  calls to the writer.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.metadata
import json
import logging
import os
import signal
import socket
import threading
import time

import grpc
import lmdb
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from qualify.v1 import audience_pb2, diagnostics_pb2, ingest_pb2, personalize_pb2, sync_pb2

from .config import Project
from .observability import metrics
from .config.operations import Operations
from .security.keys import KeyStore, keys_path
from .storage.lmdb_store import META, Reader, data_path, open_env
from .storage.sync import Progress, SyncError, Syncer
from .clock import Clock, make_clock
from .domain.engine import Engine
from .storage.realtime import RealtimeStore
from .storage.writer import Writer
from .transport.audience import Audiences
from .transport.gate import Gate, server_credentials
from .transport.health import watch_health
from .transport.watch import Watch
from .delivery.feed import ChangeFeed
from .delivery.runner import Deliveries
from .transport.syncs import Syncs
from .transport.ingest import Ingest
from .transport.personalize import Personalize
from .transport.proxy import proxy_handler
from .transport.unimplemented import handler_for

log = logging.getLogger(__name__)

try:
    VERSION = importlib.metadata.version("qualify")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a bare tree
    VERSION = "0.0.0"

SERVED = [personalize_pb2.DESCRIPTOR.services_by_name["PersonalizeService"],
          diagnostics_pb2.DESCRIPTOR.services_by_name["DiagnosticsService"]]
# Served by the process that writes (workers=1); serving processes of
# workers=N have a read-only environment and answer it UNIMPLEMENTED.
INGEST = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"]
AUDIENCE = audience_pb2.DESCRIPTOR.services_by_name["AudienceService"]
SYNC = sync_pb2.DESCRIPTOR.services_by_name["SyncService"]
SERVICE_NAMES = [s.full_name for s in SERVED + [INGEST, AUDIENCE, SYNC]]
GRACE_SECONDS = 5.0
MAX_MESSAGE_BYTES = 16 << 20


async def create_server(reader: Reader, host: str = "127.0.0.1", port: int = 0, *, reuse_port: bool = False,
                        ingest: Ingest | None = None, audiences: Audiences | None = None, syncs: Syncs | None = None,
                        writer_address: str | None = None, address: str | None = None,
                        ops: Operations | None = None, keys: KeyStore | None = None, internal: bool = False):
    """A configured, unstarted server: returns (server, bound port, health servicer).

    ``ingest``, ``audiences`` and ``syncs`` (the writing process) serve
    IngestService, AudienceService and SyncService; a serving process given
    ``writer_address`` forwards them there; otherwise they answer
    UNIMPLEMENTED. ``address`` (e.g. a ``unix:`` path) replaces host and port.
    Every call passes the gate (transport/gate.py): API ``keys`` (None: auth
    off) and ``ops.limits``; ``internal`` (the writer's socket behind the
    serving processes) checks keys again but neither limits nor measures, and
    never uses TLS.
    """
    ops = ops or Operations(auth=False)
    server = grpc.aio.server(options=[
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.max_receive_message_length", ops.limits.max_message_bytes),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ])
    if writer_address is not None:
        channel = grpc.aio.insecure_channel(writer_address)
        writing = [proxy_handler(channel, s) for s in (INGEST, AUDIENCE, SYNC)]
    else:
        writing = ingest.handlers() if ingest is not None else [handler_for(INGEST)]
        writing.append(audiences.handlers() if audiences is not None else handler_for(AUDIENCE))
        writing.append(syncs.handlers() if syncs is not None else handler_for(SYNC))
    server.add_generic_rpc_handlers([Gate(Personalize(reader, VERSION).handlers() + writing,
                                          SERVED + [INGEST, AUDIENCE, SYNC], keys=keys, limits=ops.limits,
                                          edge=not internal)])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(SERVICE_NAMES + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    if ops.tls.enabled and not internal:
        bound = server.add_secure_port(address or f"{host}:{port}", server_credentials(ops.tls))
    else:
        bound = server.add_insecure_port(address or f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {address or f'{host}:{port}'} (address in use?)")
    for name in ["", *SERVICE_NAMES]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    return server, bound, health_servicer


def _health(reader: Reader, health_servicer, project: Project):
    """Health turns SERVING once the first sync has landed, and NOT_SERVING while the map is nearly full."""
    return watch_health(reader, health_servicer, ["", *SERVICE_NAMES], project.ops.limits.map_nearly_full)


def _keys(project: Project) -> KeyStore | None:
    return KeyStore(keys_path(project.data_dir)) if project.ops.auth else None


def _announce_auth(project: Project) -> None:
    if not project.ops.auth:
        log.warning("authentication is OFF: any caller may call every RPC "
                    "(the embedded demo, or [auth] enabled = false in the project file)")
    elif KeyStore(keys_path(project.data_dir)).count == 0:
        log.warning("authentication is on and no API key exists yet: every call is refused until "
                    "`qualify keys create` makes one")


def write_ready_file(path: str | None, host: str, port: int, workers: int) -> None:
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"address": f"{host}:{port}", "port": port, "pid": os.getpid(), "workers": workers}, f)
    os.replace(tmp, path)


def _stop_on_signals(loop, stop: asyncio.Event) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def serve_single(project: Project, *, ready_file: str | None = None, progress: Progress | None = None,
                       address: str | None = None) -> int:
    """One process serving and syncing; returns an exit code.

    With ``address`` it is the writer of ``--workers N``, reached by the
    serving processes on that (Unix socket) address only.
    """
    env = open_env(data_path(project.data_dir), project.map_size, readonly=False)
    # Every write (ingest, sync) goes through the one writer thread.
    clock, test_clock = make_clock()
    writer = Writer(env, clock_us=clock)
    writer.start()
    reader = Reader(env)
    loop = asyncio.get_running_loop()
    engine, store = await _start_engine(env, writer, project, clock)
    feed = _start_feed(env, writer, store, loop)
    deliveries = Deliveries(env, writer, feed, reader, project.parent_model.name, clock, f"qualify/{VERSION}",
                            project.retry_initial, project.retry_max)
    await deliveries.start(list(project.syncs))
    wake = asyncio.Event()
    engine.on_deadline = lambda: loop.call_soon_threadsafe(wake.set)
    host, port = project.server.host, project.server.port
    internal = address is not None
    if project.ops.metrics.port:
        metrics.setup()
    ingest = Ingest(writer, project.event_models, clock_us=clock, limits=project.ops.limits)
    server, port, health_servicer = await create_server(reader, host, port, ingest=ingest,
                                                        audiences=Audiences(engine, writer, store, clock,
                                                                            Watch(feed, store, project.watch_buffer,
                                                                                  project.watch_max_lag)),
                                                        syncs=Syncs(deliveries, reader),
                                                        address=address, ops=project.ops, keys=_keys(project),
                                                        internal=internal)
    await server.start()
    if internal:  # the writer's socket is for the serving processes of this user only
        os.chmod(address.removeprefix("unix:"), 0o600)
    log.info("listening on %s (NOT_SERVING until the first sync lands)", address or f"{host}:{port}")
    stop = asyncio.Event()
    _stop_on_signals(loop, stop)
    failed = False

    async def sync_loop():
        nonlocal failed
        first = True
        while True:
            try:
                syncer, shown = Syncer(env, project), progress if first else None

                def sync_and_reevaluate(txn):
                    report = syncer.run(shown, txn=txn)
                    engine.after_sync(txn, clock())  # warehouse changes move people at once
                    return report

                report = await asyncio.wrap_future(writer.submit(sync_and_reevaluate))
                metrics.warehouse_sync(report.seconds, True, time.time())
                if first:
                    # Everything built so far lives as long as the process: keep it out of
                    # the collector's full passes, which otherwise stall a request for ms.
                    gc.collect()
                    gc.freeze()
                    write_ready_file(ready_file, host, port, 1)
                    log.info("serving %d people from %s on %s:%d", report.people,
                             ", ".join(c.name for c in project.collections), host, port)
            except (SyncError, lmdb.Error) as exc:  # lmdb.Error: the writer's commit failed
                metrics.warehouse_sync(None, False)
                log.error("warehouse sync failed, nothing changed: %s", exc)
                if first and reader.generation == 0:
                    failed = True
                    stop.set()
                    return
            except Exception:  # noqa: BLE001 - a bug must not end the schedule; the next sync may land
                metrics.warehouse_sync(None, False)
                log.exception("warehouse sync failed, nothing changed")
                if first and reader.generation == 0:
                    failed = True
                    stop.set()
                    return
            first = False
            if not project.server.sync_interval:
                return
            await asyncio.sleep(project.server.sync_interval)

    tasks = [asyncio.create_task(sync_loop()), asyncio.create_task(_health(reader, health_servicer, project)),
             asyncio.create_task(_fire_timers(engine, writer, wake, clock, test_clock))]
    await stop.wait()
    log.info("shutting down (grace %.0fs)", GRACE_SECONDS)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(GRACE_SECONDS)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await deliveries.close()  # cursors persisted: a restart resumes where delivery stopped
    # After the server stopped: whatever it queued is committed, then the thread ends.
    await loop.run_in_executor(None, writer.stop)
    env.close()
    return 1 if failed else 0


async def _start_engine(env, writer: Writer, project: Project, clock: Clock):
    """The realtime engine, rebuilt from LMDB on the writer thread and hooked to ingest."""
    store = await asyncio.wrap_future(writer.submit(lambda txn: RealtimeStore(env, txn)))
    log_ = writer.log
    engine = Engine(
        store, project.event_models, [(a.name, a.type) for a in project.parent_model.attributes],
        int(project.session_timeout * 1_000_000),
        read_event=lambda txn, seq: next(log_.read(txn, seq, 1)),
        iter_events=lambda txn: log_.read(txn, 1))
    t0 = time.perf_counter()
    changes = await asyncio.wrap_future(writer.submit(lambda txn: engine.recover(txn, clock())))
    log.info("realtime state rebuilt from the event log in %.2fs (%d audiences, %d people, %d changes on the way)",
             time.perf_counter() - t0, len(engine.audiences), len(engine.slots), len(changes))
    writer.on_events = engine.apply
    return engine, store


def _start_feed(env, writer: Writer, store: RealtimeStore, loop) -> ChangeFeed:
    """The live feed, handed each committed transaction's changelog rows by the writer thread."""
    feed = ChangeFeed(env)

    def publish(committed: bool) -> None:
        rows = store.take_appended()
        if committed and rows:
            loop.call_soon_threadsafe(feed.publish, rows)

    writer.after_txn = publish
    return feed


async def _fire_timers(engine: Engine, writer: Writer, wake: asyncio.Event, clock: Clock, test_clock: bool) -> None:
    """Exits (and enters) that time alone causes, at the instant they are due.

    A test clock may jump at any moment, so then the deadline is polled.
    """
    while True:
        deadline = engine.next_deadline()
        delay = 3600.0 if deadline is None else max(0.0, (deadline - clock()) / 1e6)
        if test_clock:
            delay = min(delay, 0.005)
        wake.clear()
        if delay > 0:
            try:
                await asyncio.wait_for(wake.wait(), timeout=delay)
                continue  # an earlier deadline appeared
            except asyncio.TimeoutError:
                pass
        try:
            await asyncio.wrap_future(writer.submit(lambda txn: engine.tick(txn, clock())))
        except Exception:  # noqa: BLE001 - a failed tick is retried; the log says why
            log.exception("timer tick failed; retrying")
            await asyncio.sleep(0.1)


async def _serve_worker(project: Project, port: int, writer_address: str) -> int:
    env = open_env(data_path(project.data_dir), project.map_size, readonly=True)
    reader = Reader(env)
    if project.ops.metrics.port:
        metrics.setup()
    server, _, health_servicer = await create_server(reader, project.server.host, port, reuse_port=True,
                                                     writer_address=writer_address, ops=project.ops,
                                                     keys=_keys(project))
    await server.start()
    stop = asyncio.Event()
    _stop_on_signals(asyncio.get_running_loop(), stop)
    ready = asyncio.create_task(_health(reader, health_servicer, project))
    await stop.wait()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(GRACE_SECONDS)
    ready.cancel()
    env.close()
    return 0


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
    (and one serving ``metrics_http``, when metrics are on).

    The supervisor holds no gRPC and no LMDB state, so it can fork
    replacements at any time. The writer syncs, ingests and evaluates, and
    listens on a Unix socket in the data directory; the serving processes
    share the public port (SO_REUSEPORT), answer Personalize from the
    memory-mapped environment and forward Ingest and Audience calls to it.
    """
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

    def writer_main() -> int:
        return run_async(serve_single(project, ready_file=str(writer_ready), progress=progress, address=writer_address))

    def worker_main() -> int:
        return run_async(_serve_worker(project, port, writer_address))

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
                write_ready_file(ready_file, project.server.host, port, workers)
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
    return code


def run_async(coro) -> int:
    """Runs the server's event loop, on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


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
    _announce_auth(project)
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
