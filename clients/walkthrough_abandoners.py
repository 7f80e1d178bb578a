"""The checkout-abandoner walk-through behind ``qualify demo --scenario abandoners``.

It creates "checkout abandoners" (a cart add, then no order of the same sku
within a few seconds) on a server running the embedded demo, adds a product to
two people's carts, lets one of them order it, and waits with no further
event: the other enters at exactly cart + within, by the server's timer. A
late order (timestamped inside the wait) then ends the membership on arrival.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone

import grpc
from google.protobuf import json_format

from qualify.v1 import audience_pb2, audience_pb2_grpc, event_pb2, ingest_pb2, ingest_pb2_grpc

from ._call import call_metadata, channel_credentials, open_channel
from ._errors import error_from_rpc_error
from .walkthrough import put_audience

AUDIENCE = "checkout_abandoners"


def condition(within_seconds: int) -> dict:
    """The audience in the JSON mapping of qualify.v1.Condition."""
    return {"absence": {"after": {"event_model": "cart_adds"}, "absent": {"event_model": "orders"},
                        "within": f"{within_seconds}s", "same": ["sku"],
                        "scope": "SCOPE_WITHIN", "window": f"{max(3600, 10 * within_seconds)}s"}}


def run(address: str, within_seconds: int = 5, say: Callable[[str], None] = print, *, api_key: str | None = None,
        root_certificates=None, certificate_chain=None, private_key=None) -> dict:
    """The walk-through; the key needs audiences:write and ingest (or admin). What it saw, as a dict.

    Raises a QualifyError when a call fails.
    """
    try:
        return _run(address, within_seconds, say, api_key, root_certificates, certificate_chain, private_key)
    except grpc.RpcError as err:
        raise error_from_rpc_error(err) from err


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _event(name: str, user: str, props: dict, ts_us: int | None = None) -> event_pb2.Event:
    event = event_pb2.Event(message_id=str(uuid.uuid4()), type=event_pb2.EVENT_TYPE_TRACK, name=name, user_id=user)
    event.properties.update(props)
    if ts_us is None:
        event.timestamp.GetCurrentTime()
    else:
        event.timestamp.FromMicroseconds(ts_us)
    return event


def _run(address, within, say, api_key, root_certificates, certificate_chain, private_key) -> dict:
    credentials = channel_credentials(None, False, root_certificates, certificate_chain, private_key)
    metadata = call_metadata(None, api_key)
    with open_channel(address, credentials) as channel:
        audiences = audience_pb2_grpc.AudienceServiceStub(channel)
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)
        audience = audience_pb2.Audience(id=AUDIENCE, display_name="Checkout abandoners",
                                         description=f"added to cart, no order of that sku within {within}s")
        json_format.ParseDict(condition(within), audience.condition)
        put_audience(audiences, audience, metadata)

        def enter_us(person: str) -> int | None:
            r = audiences.CheckMembership(audience_pb2.CheckMembershipRequest(
                person_key=person, audience_ids=[AUDIENCE]), metadata=metadata)
            return next((m.enter_time.ToMicroseconds() for m in r.memberships), None)

        def track(*events) -> None:
            ingest.TrackBatch(ingest_pb2.TrackBatchRequest(events=list(events)), metadata=metadata)

        say(f"audience {AUDIENCE}: a cart_adds, then no orders of the same sku within {within}s")
        tag = uuid.uuid4().hex[:6]
        abandoner, buyer = f"demo-abandoner-{tag}", f"demo-buyer-{tag}"
        cart = _event("Product Added", abandoner, {"sku": "sku-0042", "price": 30.0})
        cart_us = cart.timestamp.ToMicroseconds()
        track(cart, _event("Product Added", buyer, {"sku": "sku-0007", "price": 12.0}))
        track(_event("Order Completed", buyer, {"sku": "sku-0007", "total": 12.0}))
        say(f"  {abandoner}: added sku-0042 at {_iso(cart_us)}")
        say(f"  {buyer}: added sku-0007, then ordered it")
        explained = audiences.ExplainMembership(
            audience_pb2.ExplainMembershipRequest(id=AUDIENCE, person_key=abandoner), metadata=metadata)
        say(f"  explain {abandoner}: {explained.root.summary}")
        started = time.monotonic()
        while enter_us(abandoner) is None and time.monotonic() - started < within + 10:
            time.sleep(0.05)
        entered = enter_us(abandoner)
        seen = {"cart_us": cart_us, "enter_us": entered, "buyer_member": enter_us(buyer) is not None}
        if entered is None:
            say(f"  {abandoner}: STILL NOT A MEMBER after {within + 10}s (unexpected)")
            return seen
        say(f"  {abandoner}: entered at {_iso(entered)}, the cart + {(entered - cart_us) / 1e6:g}s, "
            "with no new event")
        say(f"  {buyer}: {'A MEMBER (unexpected)' if seen['buyer_member'] else 'not a member: the order cancelled it'}")
        track(_event("Order Completed", abandoner, {"sku": "sku-0042", "total": 30.0}, cart_us + within * 500_000))
        seen["after_late_order"] = enter_us(abandoner) is not None
        say(f"  {abandoner}: an order timestamped {within / 2:g}s after the cart arrives late: "
            + ("STILL A MEMBER (unexpected)" if seen["after_late_order"] else "exited on arrival"))
        return seen
