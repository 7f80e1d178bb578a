"""Qualify nodes for the cluster bench: ``qualify serve --project`` over a demo warehouse, with or without [cluster]."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from qualify.server.demo import DEMO_ATTRIBUTES, DEMO_EVENT_MODELS

from ._server import ServerError


def project_toml(folder: Path, warehouse: Path, cluster: str = "") -> Path:
    """A project over the demo warehouse (the demo's attributes and event models), API keys off."""
    lines = ['data_dir = "data"', "", "[warehouse]", 'type = "duckdb"', f'path = "{warehouse}"', "",
             "[parent_model]", 'name = "customers"', 'query = "SELECT * FROM customers"', 'primary_key = "user_id"',
             "", "[parent_model.attributes]"]
    lines += [f'{k} = "{v}"' for k, v in DEMO_ATTRIBUTES.items()]
    lines += ["", "[collections.customers]", ""]
    for name, spec in DEMO_EVENT_MODELS.items():
        lines.append(f"[event_models.{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in spec.items() if k != "properties"]
        lines.append(f"[event_models.{name}.properties]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in spec["properties"].items()]
        lines.append("")
    lines += ["[auth]", "enabled = false", "", cluster]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "qualify.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def cluster_section(urls: list[str], node_id: str, partitions: int, replicas: int) -> str:
    return (f"[cluster]\nnats_url = {json.dumps(urls)}\nnode_id = \"{node_id}\"\npartitions = {partitions}\n"
            f"replicas = {replicas}\nlease_ttl = \"2s\"\nsnapshot_interval = \"60s\"\nevent_retention = \"1h\"\n")


class Node:
    """One ``qualify serve --project`` process; ``address`` and ``pid`` once started."""

    def __init__(self, folder: Path, project: Path):
        self.folder = folder
        self.ready = folder / "ready.json"
        self.log = folder / "server.log"
        self.args = [sys.executable, "-m", "qualify.server.cli", "--log-level", "WARNING", "serve", "--project",
                     str(project), "--port", "0", "--http-port", "-1", "--ready-file", str(self.ready)]
        self.proc: subprocess.Popen | None = None
        self.address, self.pid = "", 0

    def spawn(self) -> "Node":
        self.ready.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        return self

    def wait(self, timeout: float = 180.0) -> "Node":
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise ServerError(f"qualify serve did not start:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
        info = json.loads(self.ready.read_text())
        self.address, self.pid = info["address"], info["pid"]
        return self

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
