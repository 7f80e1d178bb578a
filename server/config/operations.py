"""The operational settings of a project file: [auth], [tls], [limits], [metrics], [http].

``config.project.parse_project`` hands each table here (unknown keys already
reported) with its problem reporter, so these sections read like the rest
of the file: every problem at once, each naming its key and value.

```toml
[auth]
enabled = true                 # API keys required (the default with a project file)

[tls]                          # absent: plain text
cert = "tls/server.crt"        # PEM certificate chain, relative to this file
key = "tls/server.key"         # PEM private key
client_ca = "tls/clients.crt"  # optional: mutual TLS, clients need a certificate it signed

[limits]
max_message_bytes = 4194304    # largest request accepted (4 MiB)
max_batch_events = 1000        # events per TrackBatch / StreamEvents batch
max_event_properties = 256     # keys in an event's properties (and in its traits, and its context)
max_string_bytes = 8192        # any string in an event (names, ids, property values), audience texts
max_streams_per_key = 16       # concurrent streaming calls per API key
requests_per_second = 10000    # per API key and serving process (token bucket); 0 = unlimited
burst = 20000                  # the bucket's size
map_nearly_full = 0.95         # health turns NOT_SERVING when the LMDB map is this full

[metrics]
port = 9464                    # Prometheus /metrics on its own port; 0 or absent: off
host = "127.0.0.1"

[http]                         # absent (or no port): no HTTP listener
host = "127.0.0.1"
port = 8080                    # the Segment tracking API and the Personalization API as JSON; 0: any free port
cors_origins = ["https://shop.example.com"]   # browsers' origins allowed to call; "*" any; absent: none
```
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MAX_MESSAGE_BYTES = 4 << 20

SECTIONS: dict[str, tuple[str, ...]] = {
    "auth": ("enabled",),
    "tls": ("cert", "key", "client_ca"),
    "limits": ("max_message_bytes", "max_batch_events", "max_event_properties", "max_string_bytes",
               "max_streams_per_key", "requests_per_second", "burst", "map_nearly_full"),
    "metrics": ("port", "host"),
    "http": ("host", "port", "cors_origins"),
}


@dataclass(frozen=True)
class TlsSettings:
    """Certificate files; ``client_ca`` set means mutual TLS."""

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_batch_events: int = 1000
    max_event_properties: int = 256
    max_string_bytes: int = 8192
    max_streams_per_key: int = 16
    requests_per_second: float = 10_000.0  # 0: unlimited
    burst: int = 20_000
    map_nearly_full: float = 0.95


@dataclass(frozen=True)
class MetricsSettings:
    port: int = 0  # 0: no metrics endpoint
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP listener; ``port`` None: off, 0: any free port (the bound one goes in the ready file)."""

    port: int | None = None
    host: str = "127.0.0.1"
    cors_origins: tuple[str, ...] = ()  # "*": any origin
    demo_window: float | None = None  # the embedded demo's /demo page: its audience's window, seconds (not a TOML key)

    @property
    def enabled(self) -> bool:
        return self.port is not None


@dataclass(frozen=True)
class Operations:
    """How the server is exposed and watched. Auth is on unless a project turns it off."""

    auth: bool = True
    tls: TlsSettings = field(default_factory=TlsSettings)
    limits: Limits = field(default_factory=Limits)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    http: HttpSettings = field(default_factory=HttpSettings)


Report = Callable[[str, Any, str], None]

# (key, minimum, maximum) of the integer limits.
_INT_LIMITS = (
    ("max_message_bytes", 1024, 1 << 30),
    ("max_batch_events", 1, 100_000),
    ("max_event_properties", 1, 100_000),
    ("max_string_bytes", 64, 1 << 30),
    ("max_streams_per_key", 1, 100_000),
    ("burst", 1, 1 << 31),
)


def parse_operations(tables: dict[str, dict], base: Path, problem: Report, missing: Any) -> Operations:
    """The five sections (``tables[name]``, {} when absent) as settings; problems go to ``problem``."""
    auth = tables["auth"].get("enabled", True)
    if not isinstance(auth, bool):
        problem("auth.enabled", auth, "must be true or false")
        auth = True
    return Operations(auth=auth, tls=_tls(tables["tls"], base, problem, missing),
                      limits=_limits(tables["limits"], problem), metrics=_metrics(tables["metrics"], problem),
                      http=_http(tables["http"], problem))


def _tls(raw: dict, base: Path, problem: Report, missing: Any) -> TlsSettings:
    paths: dict[str, Path] = {}
    for k in SECTIONS["tls"]:
        if k not in raw:
            continue
        value = raw[k]
        if not isinstance(value, str) or not value.strip():
            problem(f"tls.{k}", value, "must be the path of a PEM file")
            continue
        full = (base / value).resolve()
        if not full.is_file():
            problem(f"tls.{k}", value, f"no such file ({full})")
            continue
        paths[k] = full
    if not raw:
        return TlsSettings()
    for k in ("cert", "key"):
        if k not in raw:
            problem(f"tls.{k}", missing, "is required when [tls] is present (the server's certificate and key)")
    if len(paths) != len(raw) or "cert" not in paths or "key" not in paths:
        return TlsSettings()
    from ..security.tls import check_certificates  # stdlib ssl; only when TLS is configured

    for key, message in check_certificates(paths["cert"], paths["key"], paths.get("client_ca")):
        problem(f"tls.{key}", raw[key], message)
    return TlsSettings(cert=paths["cert"], key=paths["key"], client_ca=paths.get("client_ca"))


def _limits(raw: dict, problem: Report) -> Limits:
    values: dict[str, Any] = {}
    for key, low, high in _INT_LIMITS:
        if key in raw:
            v = raw[key]
            if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
                problem(f"limits.{key}", v, f"must be an integer from {low} to {high}")
            else:
                values[key] = v
    if "requests_per_second" in raw:
        v = raw["requests_per_second"]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            problem("limits.requests_per_second", v, "must be a number >= 0 (0: unlimited)")
        else:
            values["requests_per_second"] = float(v)
    if "map_nearly_full" in raw:
        v = raw["map_nearly_full"]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v <= 1:
            problem("limits.map_nearly_full", v, "must be a fraction above 0 and at most 1 (e.g. 0.95)")
        else:
            values["map_nearly_full"] = float(v)
    return Limits(**values)


def _metrics(raw: dict, problem: Report) -> MetricsSettings:
    port = raw.get("port", 0)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        problem("metrics.port", port, "must be an integer from 0 (off) to 65535")
        port = 0
    host = raw.get("host", "127.0.0.1")
    if not isinstance(host, str) or not host.strip():
        problem("metrics.host", host, "must be a host name or address")
        host = "127.0.0.1"
    return MetricsSettings(port=port, host=host)


def _http(raw: dict, problem: Report) -> HttpSettings:
    port = raw.get("port")
    if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535):
        problem("http.port", port, "must be an integer from 0 (any free port) to 65535")
        port = None
    host = raw.get("host", "127.0.0.1")
    if not isinstance(host, str) or not host.strip():
        problem("http.host", host, "must be a host name or address")
        host = "127.0.0.1"
    origins = raw.get("cors_origins", [])
    if not isinstance(origins, list) or not all(isinstance(o, str) and o.strip() for o in origins):
        problem("http.cors_origins", origins, 'must be a list of origins, e.g. ["https://shop.example.com"], or ["*"]')
        origins = []
    return HttpSettings(port=port, host=host, cors_origins=tuple(o.strip().rstrip("/") for o in origins))
