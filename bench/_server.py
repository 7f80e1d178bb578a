"""``qualify serve`` as a subprocess: start on port 0, wait until SERVING, stop by PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import _proc


class ServerError(RuntimeError):
    pass


class Server:
    """The embedded demo (or a project file) served from ``workdir``; ``address`` and ``pids`` once started."""

    def __init__(self, workdir: Path, people: int, workers: int = 1, log_level: str = "INFO", nice: int = 0,
                 project: Path | None = None):
        """``project``: serve this project file (bench/_project.py) instead of the embedded demo."""
        self.workdir = Path(workdir)
        self.nice = nice
        self.people = people
        self.workers = workers
        self.ready_file = self.workdir / "ready.json"
        self.log_path = self.workdir / "server.log"
        # -X faulthandler: a crash (SIGSEGV in an extension) leaves every thread's
        # Python traceback in server.log, which the bench reports.
        self.args = [sys.executable, "-X", "faulthandler", "-m", "qualify.server.cli", "--log-level", log_level, "serve",
                     "--port", "0", "--http-port", "0", "--ready-file", str(self.ready_file)]
        self.args += (["--project", str(project)] if project is not None
                      else ["--data-dir", str(self.workdir / "data"), "--demo-people", str(people)])
        if workers > 1:
            self.args += ["--workers", str(workers)]
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.http_address = ""  # host:port of the HTTP API
        self.pid = 0
        self.startup_seconds = 0.0

    def start(self, timeout: float = 300.0) -> "Server":
        self.ready_file.unlink(missing_ok=True)
        t0 = time.perf_counter()
        with open(self.log_path, "ab") as log:
            # Nice is per thread on Linux: set it before exec so every thread
            # (and every forked worker) inherits it.
            self.proc = subprocess.Popen(self.args, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL,
                                         preexec_fn=(lambda: os.nice(self.nice)) if self.nice else None)
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise ServerError(f"qualify serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"qualify serve not ready in {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.02)
        info = json.loads(self.ready_file.read_text())
        self.address, self.pid = info["address"], int(info["pid"])
        if info.get("http_port"):
            self.http_address = f"{self.address.rsplit(':', 1)[0]}:{info['http_port']}"
        self._wait_serving(deadline)
        self.startup_seconds = time.perf_counter() - t0
        return self

    def _wait_serving(self, deadline: float) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if self.proc.poll() is not None:
                    raise ServerError(f"qualify serve exited with {self.proc.returncode}:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServerError(f"qualify serve never reported SERVING:\n{self.log_tail()}")
                time.sleep(0.05)

    def pids(self) -> list[int]:
        """The server process and its serving children (the workers, if any)."""
        return [self.pid, *_proc.children(self.pid)]

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (graceful shutdown), SIGKILL if it is ignored; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def server_note(server: Server) -> dict:
    return {"address": server.address, "pid": server.pid, "pids": server.pids(),
            "startup_seconds": round(server.startup_seconds, 2), "cwd": os.fspath(server.workdir)}
