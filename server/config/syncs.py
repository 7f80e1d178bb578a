"""The outbound sections of a project file: [[syncs]] (checked as SyncService.CreateSync checks) and [delivery]."""

from __future__ import annotations

import os
from typing import Any

from ..domain.errors import InvalidRequest
from ..domain.syncs import SyncSpec, parse_sync
from .reader import MISSING, Reader, parse_duration

DELIVERY_KEYS = ("retry_initial", "retry_max")
_SYNC_KEYS = ("id", "audiences", "fields", "webhook", "nats")
_WEBHOOK_KEYS = ("url", "secret", "secret_env", "max_batch_size", "max_delay", "max_attempts")
_NATS_KEYS = ("url", "subject", "max_attempts")


def parse_delivery(r: Reader, dl: dict) -> dict:
    """[delivery]: the Project fields retry_initial and retry_max (never below retry_initial)."""
    initial = r.duration(dl, "delivery.retry_initial", 0.2, positive=True)
    longest = r.duration(dl, "delivery.retry_max", 30.0, positive=True)
    return {"retry_initial": initial, "retry_max": max(longest, initial)}


def parse_syncs(r: Reader, raw: Any, parent: str) -> tuple[SyncSpec, ...]:
    """[[syncs]] tables, checked by the same rules as SyncService.CreateSync."""
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        r.problem("syncs", raw, "must be an array of tables ([[syncs]])")
        return ()
    out, seen = [], set()
    for i, t in enumerate(raw):
        spec = _sync(r, f"syncs[{i}]", t, parent)
        if spec is None:
            continue
        if spec.id in seen:
            r.problem(f"syncs[{i}].id", spec.id, "is used by another [[syncs]] table")
        seen.add(spec.id)
        out.append(spec)
    return tuple(out)


def _sync(r: Reader, at: str, t: dict, parent: str) -> SyncSpec | None:
    r.unknown_keys(t, _SYNC_KEYS, at + ".")
    d = {"id": t.get("id"), "audience_ids": t.get("audiences"), "fields": t.get("fields")}
    wrong = [name for name in ("audiences", "fields")
             if name in t and (not isinstance(t[name], list) or not all(isinstance(x, str) for x in t[name]))]
    for name in wrong:
        r.problem(f"{at}.{name}", t[name], "must be a list of strings")
    if wrong:
        return None
    if isinstance(t.get("webhook"), dict):
        webhook = _webhook(r, at, dict(t["webhook"]))
        if webhook is None:
            return None
        d["webhook"] = webhook
    if isinstance(t.get("nats"), dict):
        r.unknown_keys(t["nats"], _NATS_KEYS, at + ".nats.")
        d["nats"] = dict(t["nats"])
    try:
        return parse_sync(d, audiences=None, fields=None, parent=parent, path=at, managed_by_project=True)
    except InvalidRequest as exc:
        for v in exc.violations:
            r.problem(v.field.replace(f"{at}.audience_ids", f"{at}.audiences"), MISSING, v.description)
        return None


def _webhook(r: Reader, at: str, w: dict) -> dict | None:
    """The webhook table with secret_env resolved and max_delay in seconds; None after a problem."""
    r.unknown_keys(w, _WEBHOOK_KEYS, at + ".webhook.")
    if "secret_env" in w:
        name = w.pop("secret_env")
        w["secret"] = os.environ.get(str(name), "")
        if not w["secret"]:
            r.problem(f"{at}.webhook.secret_env", name, "names an environment variable that is not set")
            return None
    if "max_delay" in w:
        try:
            w["max_delay"] = parse_duration(w["max_delay"])
        except ValueError as exc:
            r.problem(f"{at}.webhook.max_delay", w["max_delay"], str(exc))
            return None
    return w
