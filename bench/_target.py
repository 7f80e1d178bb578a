"""The server under load: whether it runs on this machine, and which processes are its.

The bench counts a local server's CPU (bench/_proc.py); these find the
processes to count when the bench did not start the server itself.
"""

from __future__ import annotations

import socket
from pathlib import Path

from . import _proc


def is_local(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        return any(ip.startswith("127.") or ip == "::1"
                   for *_, sa in socket.getaddrinfo(host, None) for ip in [sa[0]])
    except OSError:
        return False


def server_tree(worker_pids: list[int]) -> list[int]:
    """A local server's processes: the one that answered, or its supervisor and all its children."""
    roots = set()
    for pid in set(worker_pids):
        fields = _proc._stat_fields(pid)
        if fields is None:
            continue
        parent = int(fields[1])
        try:
            cmdline = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
        except OSError:
            cmdline = []
        roots.add(parent if b"serve" in cmdline and any(b"qualify" in c for c in cmdline) else pid)
    return sorted({p for r in roots for p in [r, *_proc.children(r)]})
