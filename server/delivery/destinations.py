"""Where a sync's changes go: a signed webhook, or a NATS JetStream subject.

Each destination has one operation, ``send(sync_id, changes)``, taking the
changes of one batch in changelog order (as JSON-ready dicts, see
``change_json``) and returning once the destination acknowledged all of
them. Failures raise DeliveryError, which says whether a retry can help and
how long the destination asked us to wait.

Webhook requests are signed so receivers can verify them::

    X-Qualify-Timestamp: 1764331200                 (Unix seconds, at each attempt)
    X-Qualify-Signature: v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>

A receiver recomputes the HMAC over the raw body, compares in constant time,
and rejects timestamps older than a few minutes. Redeliveries carry the same
``sequence`` per change: receivers deduplicate on it.

JetStream messages carry ``Nats-Msg-Id: <sync id>:<sequence>``, so the stream
drops redeliveries within its duplicate window.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import json
import time

from ..domain.changes import Cause, MembershipChange
from ..domain.syncs import Nats, Webhook
from ..wire import rfc3339

MAX_RETRY_AFTER = 300.0


class DeliveryError(Exception):
    """A send that failed. ``permanent``: retrying cannot help (e.g. HTTP 400)."""

    def __init__(self, message: str, *, permanent: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.permanent = permanent
        self.retry_after = retry_after


def change_json(c: MembershipChange, fields: dict | None) -> dict:
    """The JSON a destination receives for one change (direction and cause as lower-case names)."""
    out = {"sequence": c.sequence, "audience_id": c.audience_id, "person_key": c.person_key,
           "direction": c.direction.name.lower(), "effective_time": rfc3339(c.effective_us),
           "cause": "snapshot" if c.cause == Cause.UNSPECIFIED else c.cause.name.lower()}
    if c.message_id:
        out["message_id"] = c.message_id
    if fields is not None:
        out["fields"] = fields
    return out


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The X-Qualify-Signature value for a body sent at ``timestamp``."""
    return "v1=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date), capped; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(0.0, when.timestamp() - time.time()), MAX_RETRY_AFTER)


class WebhookSender:
    """POSTs each batch as {"sync_id", "changes": [...]}; 2xx is success."""

    def __init__(self, spec: Webhook, user_agent: str, timeout: float = 10.0):
        self.spec = spec
        self.user_agent = user_agent
        self.timeout = timeout
        self._session = None

    async def send(self, sync_id: str, changes: list[dict], attempt: int) -> None:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        body = json.dumps({"sync_id": sync_id, "changes": changes}, separators=(",", ":")).encode()
        ts = str(int(time.time()))
        headers = {"Content-Type": "application/json", "User-Agent": self.user_agent,
                   "X-Qualify-Sync": sync_id, "X-Qualify-Attempt": str(attempt),
                   "X-Qualify-Timestamp": ts, "X-Qualify-Signature": sign(self.spec.secret, ts, body)}
        try:
            async with self._session.post(self.spec.url, data=body, headers=headers, allow_redirects=False) as resp:
                if 200 <= resp.status < 300:
                    return
                text = (await resp.text(errors="replace"))[:200]
                retryable = resp.status in (408, 425, 429) or resp.status >= 500
                raise DeliveryError(f"HTTP {resp.status} from {self.spec.url}: {text}".rstrip(": "),
                                    permanent=not retryable, retry_after=parse_retry_after(resp.headers.get("Retry-After")))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise DeliveryError(f"{type(exc).__name__} posting to {self.spec.url}: {exc}".rstrip(": ")) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class NatsSender:
    """Publishes each change to JetStream, in order, each acknowledged by the stream."""

    def __init__(self, spec: Nats, timeout: float = 5.0):
        self.spec = spec
        self.timeout = timeout
        self._nc = None
        self._js = None

    async def send(self, sync_id: str, changes: list[dict], attempt: int) -> None:
        import nats
        from nats.errors import Error as NatsError

        try:
            if self._nc is None or self._nc.is_closed:
                # No reconnect loop inside the client: the runner retries with its own backoff
                # and reports each failure in the sync's status.
                self._nc = await asyncio.wait_for(nats.connect(
                    self.spec.url, connect_timeout=self.timeout, allow_reconnect=False, max_reconnect_attempts=1,
                    reconnect_time_wait=0.1, error_cb=_quiet, name=f"qualify-sync-{sync_id}"), self.timeout * 2)
                self._js = self._nc.jetstream(timeout=self.timeout)
            for change in changes:
                if self._nc.is_closed:
                    raise OSError("the connection to the NATS server was lost")
                subject = self.spec.subject.replace("{audience}", change["audience_id"])
                await self._js.publish(subject, json.dumps(change, separators=(",", ":")).encode(),
                                       headers={"Nats-Msg-Id": f"{sync_id}:{change['sequence']}"})
        except (NatsError, asyncio.TimeoutError, OSError) as exc:
            await self.close()
            raise DeliveryError(f"{type(exc).__name__} publishing to {self.spec.url}: {exc}".rstrip(": ")) from None

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            try:
                await nc.close()
            except Exception:  # noqa: BLE001 - a broken connection is dropped either way
                pass


async def _quiet(exc: Exception) -> None:
    """nats-py logs every connection error with a traceback; the sync's status reports it instead."""


def sender_for(spec, user_agent: str):
    return WebhookSender(spec, user_agent) if isinstance(spec, Webhook) else NatsSender(spec)
