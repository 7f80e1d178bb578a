"""The realtime walk-through behind ``qualify demo``, against a running server.

It creates the "high intent pricing" audience (viewed /pricing at least 3
times within a short window, and plan is free), streams page views for one
free-plan person, shows them enter, then waits, with no further event, until
the window lapses and they exit by themselves.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import grpc
from google.protobuf import json_format

from qualify.v1 import audience_pb2, audience_pb2_grpc, event_pb2, ingest_pb2, ingest_pb2_grpc

from ._call import call_metadata, channel_credentials, open_channel
from ._errors import error_from_rpc_error
from .blocking import Client

AUDIENCE = "high_intent_pricing"


def condition(window_seconds: int) -> dict:
    """The audience in the JSON mapping of qualify.v1.Condition."""
    return {"and": {"conditions": [
        {"event": {"event_model": "page_views",
                   "filters": [{"property": "path", "operator": "OPERATOR_EQ", "value": {"string_value": "/pricing"}}],
                   "scope": "SCOPE_WITHIN", "window": f"{window_seconds}s",
                   "comparison": "COMPARISON_GE", "threshold": 3}},
        {"attribute": {"attribute": "plan", "operator": "OPERATOR_EQ", "value": {"string_value": "free"}}},
    ]}}


def run(address: str, window_seconds: int = 10, say: Callable[[str], None] = print, *, api_key: str | None = None,
        root_certificates=None, certificate_chain=None, private_key=None) -> None:
    """The walk-through; the key needs the scopes audiences:write, ingest and personalize (or admin).

    Raises a QualifyError when a call fails.
    """
    try:
        _run(address, window_seconds, say, api_key, root_certificates, certificate_chain, private_key)
    except grpc.RpcError as err:  # the audience and ingest calls use the generated stubs
        raise error_from_rpc_error(err) from err


def put_audience(audiences, audience: audience_pb2.Audience, metadata) -> None:
    """Creates the walk-through's audience, or (made by an earlier run) updates it to this definition."""
    try:
        audiences.CreateAudience(audience_pb2.CreateAudienceRequest(audience=audience), metadata=metadata)
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
        audiences.UpdateAudience(audience_pb2.UpdateAudienceRequest(audience=audience), metadata=metadata)


def _run(address, window_seconds, say, api_key, root_certificates, certificate_chain, private_key) -> None:
    credentials = channel_credentials(None, False, root_certificates, certificate_chain, private_key)
    metadata = call_metadata(None, api_key)
    client = Client(address, api_key=api_key, credentials=credentials)
    with open_channel(address, credentials) as channel, client:
        audiences = audience_pb2_grpc.AudienceServiceStub(channel)
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)
        audience = audience_pb2.Audience(id=AUDIENCE, display_name="High intent pricing",
                                         description=f"viewed /pricing 3+ times in {window_seconds}s, on the free plan")
        json_format.ParseDict(condition(window_seconds), audience.condition)
        put_audience(audiences, audience, metadata)
        client.wait_live(AUDIENCE)  # its backfill over the retained events, beside ingest
        say(f"audience {AUDIENCE}: page_views of /pricing >= 3 within {window_seconds}s AND plan = free")
        person = next(k for k in (f"user-{i}" for i in range(1, 1000))
                      if client.get(k, fields=["plan"]).fields.get("plan") == "free" and not client.get(k).memberships)
        say(f"person {person} (plan free)")
        for n in range(1, 4):
            event = event_pb2.Event(message_id=str(uuid.uuid4()), type=event_pb2.EVENT_TYPE_PAGE,
                                    name="Pricing", user_id=person)
            event.properties.update({"path": "/pricing"})
            event.timestamp.GetCurrentTime()
            ingest.Track(ingest_pb2.TrackRequest(event=event), metadata=metadata)
            member = [m.audience_id for m in client.get(person).memberships]
            say(f"  pricing view {n}: memberships {member}")
        explained = audiences.ExplainMembership(
            audience_pb2.ExplainMembershipRequest(id=AUDIENCE, person_key=person), metadata=metadata)
        say(f"  explain: {explained.root.children[0].summary}")
        started = time.monotonic()
        while client.get(person).memberships and time.monotonic() - started < window_seconds + 10:
            time.sleep(0.1)
        left = not client.get(person).memberships
        say(f"  {time.monotonic() - started:.1f}s later, no new event: "
            + ("exited by itself" if left else "STILL A MEMBER (unexpected)"))
