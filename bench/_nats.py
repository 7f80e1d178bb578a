"""A throwaway NATS cluster with JetStream: real nats-server processes on loopback (the cluster bench and tests).

``NatsCluster(folder, 3).start()`` writes one config per server (client
port, cluster routes to the others, a JetStream store in ``folder``), starts
them and waits until JetStream answers with a meta leader. ``kill(i)`` is
kill -9; ``restart(i)`` starts the same server again on the same ports and
store, so it rejoins and catches up.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NATS_SERVER = shutil.which("nats-server") or ("/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None)


def _ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class NatsCluster:
    def __init__(self, folder: Path, size: int = 3, name: str = "qualify-test"):
        self.folder = folder
        self.size = size
        self.name = name
        ports = _ports(2 * size)
        self.client_ports, self.route_ports = ports[:size], ports[size:]
        self.procs: list[subprocess.Popen | None] = [None] * size

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{p}" for p in self.client_ports]

    def config(self, i: int) -> str:
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for j, p in enumerate(self.route_ports) if j != i)
        store = self.folder / f"n{i}"
        text = (f'server_name: "n{i}"\nlisten: "127.0.0.1:{self.client_ports[i]}"\n'
                f'jetstream {{ store_dir: "{store}", max_memory_store: 268435456, max_file_store: 2147483648 }}\n')
        if self.size > 1:  # one server is no cluster: JetStream refuses a cluster block without routes
            text += f'cluster {{ name: "{self.name}", listen: "127.0.0.1:{self.route_ports[i]}", routes: [{routes}] }}\n'
        return text

    def _spawn(self, i: int) -> None:
        path = self.folder / f"n{i}.conf"
        path.write_text(self.config(i))
        log = open(self.folder / f"n{i}.log", "ab")
        self.procs[i] = subprocess.Popen([NATS_SERVER, "-c", str(path)], stdout=log, stderr=subprocess.STDOUT)

    def start(self, timeout: float = 30.0) -> "NatsCluster":
        self.folder.mkdir(parents=True, exist_ok=True)
        for i in range(self.size):
            self._spawn(i)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until JetStream answers account info through every live server (a meta leader exists)."""
        deadline = time.monotonic() + timeout
        for i, p in enumerate(self.procs):
            if p is None or p.poll() is not None:
                continue
            while not asyncio.run(_jetstream_answers(self.urls[i])):
                if time.monotonic() > deadline:
                    raise AssertionError(f"NATS server n{i} has no JetStream leader after {timeout}s:\n{self.log(i)}")
                time.sleep(0.2)

    def log(self, i: int) -> str:
        path = self.folder / f"n{i}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def kill(self, i: int) -> None:
        """kill -9."""
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()

    def restart(self, i: int) -> None:
        self.kill(i)
        self._spawn(i)

    def stop(self) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.terminate()
        for p in self.procs:
            if p is not None:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()


async def _quiet(exc) -> None:
    """nats-py prints every connection error by default; a server that is not listening yet is expected."""


async def _jetstream_answers(url: str) -> bool:
    import nats

    try:
        nc = await nats.connect(url, connect_timeout=1, max_reconnect_attempts=0, allow_reconnect=False,
                                error_cb=_quiet)
    except Exception:  # noqa: BLE001 - not listening yet
        return False
    try:
        await nc.jetstream(timeout=1).account_info()
        return True
    except Exception:  # noqa: BLE001 - no meta leader yet
        return False
    finally:
        await nc.close()


async def purge_qualify(url: str) -> None:
    """Deletes every stream, bucket and object store of a Qualify cluster: the next test starts a new one."""
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream(timeout=10)
    try:
        names = [s.config.name for s in await js.streams_info()]
        for name in names:
            if name.startswith(("QUALIFY_", "KV_qualify-", "OBJ_qualify-")):
                await js.delete_stream(name)
    finally:
        await nc.close()
