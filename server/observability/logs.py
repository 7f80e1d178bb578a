"""Structured logs: one JSON object per line, tied to requests by their id.

Every RPC gets a request id (``new_request_id``, or a well-formed one the
caller sent as ``x-request-id``), returned to the caller in the response
metadata and attached to every log record emitted while the call runs,
through the ``REQUEST_ID`` context variable. A caller quoting the id from an
error finds the server's lines about it with one grep.

API keys never reach a log: the server logs a key's id, never the key, and
as a second line of defence anything that looks like a key (``qk_`` and a
long token) is masked in every message and traceback.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import os
import re
import sys
import time

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("qualify_request_id", default="")

_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,64}\Z")
_KEY_RE = re.compile(r"qk_[A-Za-z0-9_\-]{8,}")
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class _Ids:
    """Process prefix + counter: unique across the processes of one server, no syscall per call."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = os.urandom(4).hex()
        self.counter = itertools.count(1)


_ids = _Ids()
os.register_at_fork(after_in_child=_ids.reset)  # forked serving processes get their own prefix


def new_request_id() -> str:
    return f"{_ids.prefix}{next(_ids.counter):08x}"


def request_id_from(value: str | None) -> str:
    """The caller's ``x-request-id`` when it is a sane token, else a new id."""
    if value and _REQUEST_ID_RE.match(value):
        return value
    return new_request_id()


def redact(text: str) -> str:
    return _KEY_RE.sub("qk_[redacted]", text) if "qk_" in text else text


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, pid, request_id and any ``extra``."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
            "pid": record.process,
        }
        request_id = REQUEST_ID.get()
        if request_id:
            out["request_id"] = request_id
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The human form, for a terminal: the same fields after the message."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = redact(super().format(record))
        extra = [f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")]
        request_id = REQUEST_ID.get()
        if request_id:
            extra.insert(0, f"request_id={request_id}")
        return f"{line} [{' '.join(extra)}]" if extra else line


def configure(level: str = "INFO", fmt: str = "auto", stream=None) -> None:
    """Logs to stderr: JSON lines, or text when ``fmt`` is "text" (or "auto" on a terminal)."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
