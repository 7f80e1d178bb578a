"""What both clients share about making a call: channel options and the retry policy.

Each client runs the retry loop its own way (time.sleep or asyncio.sleep).

Retries live here rather than in a gRPC service config (`grpc.service_config`
with a `retryPolicy`, gRFC A6) because that mechanism cannot give what we need:
  * A6 applies the call deadline across all attempts; we want each attempt to
    get the full per-call timeout, so one slow failing attempt does not eat the
    budget of the next.
  * A6 clamps `maxAttempts` to 5 on the client, so `retries` above 4 would be
    silently ignored.
  * The attempts are invisible to the caller and to tests.
The backoff is the same shape as A6's: attempt n waits a uniformly random time
in [0, min(base * 2**n, cap)] ("full jitter"), so clients that failed together
do not retry together.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from ._errors import retry_info_delay

#: Per-call metadata: (key, value) pairs; keys ending in "-bin" take bytes.
Metadata = Sequence[tuple[str, str | bytes]]
#: A PEM file's path, or its bytes.
Pem = str | bytes | os.PathLike

# Codes that mean the server did not serve the request, so a read may be sent again.
# DEADLINE_EXCEEDED is not among them: the server may still be working on it,
# and the caller's time budget is what ran out.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    # Ignore a service config published through DNS: a retryPolicy there would
    # multiply with ours (up to 5 gRPC attempts per client attempt). gRPC's
    # transparent retries of requests that never reached the server stay on.
    ("grpc.service_config_disable_resolution", 1),
]


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter, in seconds."""

    base: float = 0.05
    cap: float = 1.0

    def delay(self, retry: int, uniform: Callable[[], float] = random.random) -> float:
        """The pause before retry number `retry` (0 for the first retry)."""
        return uniform() * min(self.cap, self.base * 2.0**retry)


def should_retry(err: grpc.RpcError, retry: int, retries: int) -> bool:
    """Whether a read that failed with `err` gets retry number `retry`."""
    code = err.code() if callable(getattr(err, "code", None)) else None
    return retry < retries and code in RETRYABLE_CODES


def pause(err: grpc.RpcError, retry: int, backoff: Backoff) -> float:
    """The wait before retry number `retry`: the backoff, or longer when the server said so (RetryInfo)."""
    return max(backoff.delay(retry), retry_info_delay(err) or 0.0)


def call_metadata(metadata: Metadata | None, api_key: str | None) -> tuple:
    """The metadata every call carries: the caller's, and the API key as `authorization: Bearer <key>`."""
    out = tuple(metadata or ())
    return (*out, ("authorization", f"Bearer {api_key}")) if api_key else out


def connection_options(index: int, connections: int,
                       base: Sequence[tuple[str, int]] = CHANNEL_OPTIONS) -> list[tuple[str, int]]:
    """Options of channel ``index`` of ``connections``: several get a TCP connection each.

    gRPC shares one subchannel (one TCP connection) between every channel of a
    process with the same target and arguments, and SO_REUSEPORT hands a
    connection to one serving process for its whole life: one connection means
    one `--workers` process, however many there are. A local subchannel pool
    and an argument that differs per channel make each channel its own
    connection, and the kernel spreads those over the workers.
    """
    if connections < 1:
        raise ValueError("connections must be >= 1")
    if connections == 1:
        return list(base)
    return [*base, ("grpc.use_local_subchannel_pool", 1), ("qualify.connection_index", index)]


def open_channel(address: str, credentials: grpc.ChannelCredentials | None,
                 options: Sequence[tuple[str, int]] = CHANNEL_OPTIONS) -> grpc.Channel:
    """A blocking channel: TLS with `credentials`, plain text without."""
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=options)
    return grpc.insecure_channel(address, options=options)


def _pem(value: Pem | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def channel_credentials(
    credentials: grpc.ChannelCredentials | None,
    tls: bool,
    root_certificates: Pem | None,
    certificate_chain: Pem | None,
    private_key: Pem | None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials from the clients' options; None for a plain-text channel.

    `root_certificates` (the CA that signed the server's certificate; default:
    the system's), and for mutual TLS the client's `certificate_chain` and
    `private_key`. Any of them implies TLS; `tls=True` asks for it with the
    system's roots alone. `credentials` (ready-made) wins over all of them.
    """
    if credentials is not None:
        return credentials
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("mutual TLS needs both certificate_chain and private_key")
    if not (tls or root_certificates or certificate_chain):
        return None
    return grpc.ssl_channel_credentials(root_certificates=_pem(root_certificates),
                                        private_key=_pem(private_key), certificate_chain=_pem(certificate_chain))
