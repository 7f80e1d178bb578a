"""Real destinations for the sync tests: an HTTP receiver that misbehaves on
request, and a nats-server with JetStream, each started and stopped by the test.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

from aiohttp import web

from conftest import free_port


class WebhookReceiver:
    """An aiohttp server on its own thread that records every POST.

    ``fail_share`` of requests answer 503 (seeded, so runs repeat);
    ``status`` forces one status for every request; ``down()`` closes the
    listening socket (connection refused) until ``up()``.
    """

    def __init__(self, secret: str, fail_share: float = 0.0, seed: int = 1):
        self.secret = secret.encode()
        self.fail_share = fail_share
        self.random = random.Random(seed)
        self.status: int | None = None
        self.retry_after: str | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.accepted: list[dict] = []   # the changes of every 2xx request, in arrival order
        self.batches: list[int] = []     # changes per 2xx request
        self.requests = 0
        self.bad_signatures = 0
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.runner: web.AppRunner | None = None
        self.site: web.TCPSite | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.up()

    def _call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _setup(self):
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        ts = request.headers.get("X-Qualify-Timestamp", "")
        expected = "v1=" + hmac.new(self.secret, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        with self.lock:
            self.requests += 1
            if not hmac.compare_digest(expected, request.headers.get("X-Qualify-Signature", "")) \
                    or abs(time.time() - int(ts or 0)) > 300:
                self.bad_signatures += 1
                return web.Response(status=401)
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            if self.status is not None:
                return web.Response(status=self.status, text="forced", headers=headers)
            if self.random.random() < self.fail_share:
                return web.Response(status=503, text="flaky", headers=headers)
            changes = json.loads(body)["changes"]
            self.accepted.extend(changes)
            self.batches.append(len(changes))
        return web.Response(status=204)

    def up(self) -> None:
        async def start():
            await self._setup()
            self.site = web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True)
            await self.site.start()
        self._call(start())

    def down(self) -> None:
        """Refuses connections and drops the open ones (keep-alive included) until up()."""
        self._call(self.runner.cleanup())

    def unique(self) -> dict[int, dict]:
        """First arrival of each sequence."""
        with self.lock:
            out: dict[int, dict] = {}
            for c in self.accepted:
                out.setdefault(c["sequence"], c)
            return out

    def wait_for(self, sequences: set[int], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not sequences <= set(self.unique()):
            if time.monotonic() > deadline:
                missing = sorted(sequences - set(self.unique()))
                raise AssertionError(f"{len(missing)} change(s) never arrived, e.g. {missing[:5]}")
            time.sleep(0.05)

    def close(self) -> None:
        self._call(self.runner.cleanup())  # a no-op when already down
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def find_nats_server() -> str | None:
    return shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server") if Path(p).exists()), None)


class NatsServer:
    """nats-server with JetStream on a free port, its store in ``store_dir`` (kept across restarts)."""

    def __init__(self, binary: str, store_dir: Path):
        self.binary = binary
        self.store_dir = store_dir
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> "NatsServer":
        self.log = open(self.store_dir.parent / f"nats-{time.monotonic_ns()}.log", "wb")
        self.proc = subprocess.Popen([self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js",
                                      "-sd", str(self.store_dir)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    if re.match(rb"INFO ", s.recv(4096)):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"nats-server did not start: {Path(self.log.name).read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.log.close()
