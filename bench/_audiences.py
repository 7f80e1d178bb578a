"""The audiences the benches create: one generator shared by the ingest load and the evaluator bench."""

from __future__ import annotations

from ._operations import METADATA


def audience_definitions(n: int, aggregate_property: str | None = None) -> list[dict]:
    """n audiences over page_views and warehouse attributes: windowed counts with a path
    filter, session counts, ever counts, and (given a numeric property) windowed SUMs,
    each ANDed with a warehouse condition."""
    paths = ["/pricing", "/home", "/docs", "/blog", "/cart"]
    kinds = 4 if aggregate_property else 3
    out = []
    for i in range(n):
        event = {"event_model": "page_views", "comparison": "COMPARISON_GE", "threshold": 1 + i % 5}
        kind = i % kinds
        if kind == 3:
            event.update(scope="SCOPE_WITHIN", window="600s", aggregation="AGGREGATION_SUM",
                         property=aggregate_property, threshold=float(30 + i))
        elif kind == 0:
            event.update(scope="SCOPE_WITHIN", window=f"{60 * (1 + i % 30)}s",
                         filters=[{"property": "path", "operator": "OPERATOR_EQ",
                                   "value": {"string_value": paths[i % len(paths)]}}])
        elif kind == 1:
            event.update(scope="SCOPE_SESSION")
        else:
            event.update(scope="SCOPE_EVER", filters=[{"property": "path", "operator": "OPERATOR_STARTS_WITH",
                                                       "value": {"string_value": "/p"}}])
        attr = [{"attribute": {"attribute": "plan", "operator": "OPERATOR_EQ", "value": {"string_value": "free"}}},
                {"attribute": {"attribute": "ltv", "operator": "OPERATOR_GT", "value": {"float_value": float(40 * i)}}},
                {"attribute": {"attribute": "country", "operator": "OPERATOR_IN",
                               "values": [{"string_value": "US"}, {"string_value": "GB"}]}}][i % 3]
        out.append({"and": {"conditions": [{"event": event}, attr]}})
    return out


def create(address: str, n: int, prefix: str) -> list[str]:
    """Creates ``n`` audiences of :func:`audience_definitions`; their ids."""
    import grpc
    from google.protobuf import json_format

    from qualify.v1 import audience_pb2, audience_pb2_grpc

    ids = []
    with grpc.insecure_channel(address) as ch:
        stub = audience_pb2_grpc.AudienceServiceStub(ch)
        for i, definition in enumerate(audience_definitions(n)):
            a = audience_pb2.Audience(id=f"{prefix}{i}", description="qualify bench; deleted after the run")
            json_format.ParseDict(definition, a.condition)
            stub.CreateAudience(audience_pb2.CreateAudienceRequest(audience=a), timeout=120, metadata=METADATA)
            ids.append(a.id)
    return ids


def delete(address: str, ids: list[str]) -> None:
    import grpc

    from qualify.v1 import audience_pb2, audience_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        stub = audience_pb2_grpc.AudienceServiceStub(ch)
        for a in ids:
            try:
                stub.DeleteAudience(audience_pb2.DeleteAudienceRequest(id=a), timeout=60, metadata=METADATA)
            except grpc.RpcError:
                pass  # gone already, or the server is: nothing left to clean


def setup_e2e(address: str, inputs, persons: int, run_id: str, via: str | None = None,
              min_token: bool = False) -> dict:
    """Creates an audience only this run's events can enter, and finds how to see its changes.

    A probe event (for one of the last keys, which the run does not use) is
    sent with a watch stream open. With ``via="get"``, or if the server answers
    WatchMemberships UNIMPLEMENTED, the run times event -> first Get that shows
    the membership (``min_token``: one Get that carries the Track's
    consistency token, so the server answers once it sees the event).
    Otherwise the probe's change gives the sequence the load processes resume
    after (WATCH_START_SEQUENCE), so no change is missed while their streams
    are being set up.
    """
    import grpc
    from google.protobuf import json_format

    from qualify.v1 import audience_pb2, audience_pb2_grpc, event_pb2, ingest_pb2, ingest_pb2_grpc

    from ._inputs import Keys

    audience_id, path = f"bench_e2e_{run_id}", f"/bench/e2e/{run_id}"
    definition = {"event": {"event_model": "page_views", "scope": "SCOPE_WITHIN", "window": "3600s",
                            "filters": [{"property": "path", "operator": "OPERATOR_EQ", "value": {"string_value": path}}],
                            "comparison": "COMPARISON_GE", "threshold": 1}}
    audience = audience_pb2.Audience(id=audience_id, description="qualify bench e2e; deleted after the run")
    json_format.ParseDict(definition, audience.condition)
    keys = Keys(inputs, 0)
    out = {"audience_id": audience_id, "path": path, "person_base": 0, "persons": persons, "mode": "get",
           "after_sequence": 0}
    with grpc.insecure_channel(address) as ch:
        stub = audience_pb2_grpc.AudienceServiceStub(ch)
        stub.CreateAudience(audience_pb2.CreateAudienceRequest(audience=audience), timeout=60, metadata=METADATA)
        ingest = ingest_pb2_grpc.IngestServiceStub(ch)
        if via == "get":
            return {**out, "mode": "get-token" if min_token else "get"}
        for attempt in range(3):
            watch = stub.WatchMemberships(audience_pb2.WatchMembershipsRequest(
                audience_ids=[audience_id], start=audience_pb2.WATCH_START_NOW), timeout=10, metadata=METADATA)
            mid = f"{run_id}-probe-{attempt}"
            event = event_pb2.Event(message_id=mid, type=event_pb2.EVENT_TYPE_PAGE, name="Page Viewed",
                                    user_id=keys.key(keys.n - 1 - attempt))
            event.properties.update({"path": path})
            event.timestamp.GetCurrentTime()
            try:
                ingest.Track(ingest_pb2.TrackRequest(event=event), timeout=10, metadata=METADATA)
                for message in watch:
                    for change in message.changes:
                        if change.message_id == mid:
                            return {**out, "mode": "watch", "after_sequence": change.sequence}
            except grpc.RpcError as exc:
                if exc.code() is grpc.StatusCode.UNIMPLEMENTED and via is None:
                    return {**out, "why": "get-fallback"}
                if exc.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
            finally:
                watch.cancel()
    raise RuntimeError("e2e: the probe event's membership change never arrived on the watch stream")


def sequence_definitions(n: int, offset: int = 0) -> list[dict]:
    """n sequence and absence audiences over page_views, product_views, cart_adds and orders (issue 15):
    checkout abandoners (cart add, then no order within 30 min; with and without the same sku),
    pricing then cart within 10 min, viewed then added the same sku, a three-step funnel in a session;
    in windows, sessions and ever, each ANDed with a warehouse condition like audience_definitions'."""
    paths = ["/pricing", "/home", "/docs", "/blog", "/cart"]
    out = []
    for k in range(n):
        i = offset + k
        window = f"{3600 * (1 + i % 24)}s"
        kind = k % 6
        if kind == 0:
            body = {"absence": {"after": {"event_model": "cart_adds"}, "absent": {"event_model": "orders"},
                                "within": "1800s", "scope": "SCOPE_WITHIN", "window": window}}
        elif kind == 1:
            body = {"absence": {"after": {"event_model": "cart_adds"}, "absent": {"event_model": "orders"},
                                "within": f"{600 * (1 + i % 3)}s", "same": ["sku"], "scope": "SCOPE_EVER"}}
        elif kind == 2:
            body = {"sequence": {"steps": [
                {"event_model": "page_views", "filters": [{"property": "path", "operator": "OPERATOR_EQ",
                                                           "value": {"string_value": paths[i % len(paths)]}}]},
                {"event_model": "cart_adds"}], "within": "600s", "scope": "SCOPE_WITHIN", "window": window}}
        elif kind == 3:
            body = {"sequence": {"steps": [{"event_model": "product_views"}, {"event_model": "cart_adds"}],
                                 "same": ["sku"], "scope": "SCOPE_SESSION"}}
        elif kind == 4:
            body = {"sequence": {"steps": [{"event_model": "page_views"}, {"event_model": "product_views"},
                                           {"event_model": "cart_adds"}],
                                 "within": f"{300 * (1 + i % 4)}s", "scope": "SCOPE_SESSION"}}
        else:
            body = {"absence": {"after": {"event_model": "product_views"}, "absent": {"event_model": "cart_adds"},
                                "within": "900s", "same": ["sku"], "scope": "SCOPE_WITHIN", "window": window}}
        attr = [{"attribute": {"attribute": "plan", "operator": "OPERATOR_EQ", "value": {"string_value": "free"}}},
                {"attribute": {"attribute": "ltv", "operator": "OPERATOR_GT", "value": {"float_value": float(40 * i)}}},
                {"attribute": {"attribute": "country", "operator": "OPERATOR_IN",
                               "values": [{"string_value": "US"}, {"string_value": "GB"}]}}][i % 3]
        out.append({"and": {"conditions": [body, attr]}})
    return out
