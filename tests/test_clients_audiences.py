"""qualify.clients' audience helpers, server_info and connections=N against a real `qualify serve`.

Each scenario runs against Client and AsyncClient (the `client` fixture),
through the same real server on the embedded demo (event model page_views).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from typing import Any

import pytest

from conftest import QualifyServer
from qualify.clients import (
    AlreadyExistsError,
    AsyncClient,
    Audience,
    Client,
    EventEmitter,
    InvalidArgumentError,
    MembershipChange,
    NotFoundError,
    SnapshotEnd,
)
from qualify.v1 import condition_pb2
from google.protobuf import json_format

PEOPLE = 2_000


def viewed(path: str, times: int = 1) -> dict:
    """The README's JSON shape: page_views of ``path`` at least ``times`` times, ever."""
    return {"event": {"event_model": "page_views",
                      "filters": [{"property": "path", "operator": "OPERATOR_EQ", "value": {"string_value": path}}],
                      "scope": "SCOPE_EVER", "comparison": "COMPARISON_GE", "threshold": times}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = QualifyServer(tmp_path_factory.mktemp("clients-audiences"), "--demo-people", str(PEOPLE)).start()
    yield s
    assert s.stop() == 0, s.log()


class Harness:
    """Runs a client method by name: directly (Client) or in a fresh event loop (AsyncClient)."""

    def __init__(self, kind: str, address: str):
        self.kind, self.address = kind, address

    def run(self, method: str, *args: Any, **kw: Any) -> Any:
        if self.kind == "blocking":
            with Client(self.address, timeout=10) as client:
                return getattr(client, method)(*args, **kw)

        async def go():
            async with AsyncClient(self.address, timeout=10) as client:
                return await getattr(client, method)(*args, **kw)

        return asyncio.run(go())

    def watch(self, n: int, ready: threading.Event, **kw: Any) -> list:
        """The first ``n`` records of watch_memberships(**kw); sets ``ready`` once the stream is open."""
        if self.kind == "blocking":
            with Client(self.address) as client:
                it = client.watch_memberships(**kw)
                ready.set()
                out = []
                for record in it:
                    out.append(record)
                    if len(out) == n:
                        it.close()
                        return out

        async def go():
            async with AsyncClient(self.address) as client:
                out = []
                it = client.watch_memberships(**kw)
                ready.set()
                async for record in it:
                    out.append(record)
                    if len(out) == n:
                        await it.aclose()
                        return out

        return asyncio.run(go())


@pytest.fixture(params=["blocking", "aio"])
def client(request, server) -> Harness:
    return Harness(request.param, server.address)


def send_page_views(address: str, user: str, path: str, times: int = 1) -> None:
    with EventEmitter(address, close_timeout=10) as emitter:
        for _ in range(times):
            emitter.page("p", user_id=user, properties={"path": path})
    assert emitter.acknowledged == times


def test_an_audience_round_trip_with_the_readme_shape(client: Harness, server) -> None:
    aid = f"a-{uuid.uuid4().hex[:12]}"
    path = f"/{aid}"
    created = client.run("create_audience", aid, viewed(path), display_name="Viewers", description="d")
    assert isinstance(created, Audience) and created.id == aid and created.display_name == "Viewers"
    assert created.condition == viewed(path) and created.member_count == 0 and created.create_time is not None
    assert not created.live or created.backfill_progress == 1.0  # it returned at once, perhaps backfilling
    live = client.run("wait_live", aid)
    assert live.live and live.backfill_progress == 1.0
    assert client.run("get_audience", aid) == live == dataclasses.replace(created, live=True, backfill_progress=1.0)
    assert aid in [a.id for a in client.run("list_audiences")]
    with pytest.raises(AlreadyExistsError) as err:
        client.run("create_audience", aid, viewed(path))
    assert err.value.reason == "AUDIENCE_ALREADY_EXISTS"

    send_page_views(server.address, "user-7", path)
    [membership] = client.run("check_membership", "user-7", [aid])
    assert membership.audience_id == aid and membership.enter_time is not None
    assert client.run("check_membership", "user-8", [aid]) == []
    page = client.run("list_members", aid)
    assert page.person_keys == ["user-7"] and page.next_page_token == ""
    preview = client.run("preview_audience", aid)
    assert (preview.count, preview.sample_keys) == (1, ["user-7"])
    draft = client.run("preview_audience", viewed(path, times=2))  # a draft: nobody has two views
    assert draft.count == 0

    explained = client.run("explain_membership", aid, "user-7")
    assert explained.member is True and explained.root.value is True and explained.root.count == 1
    assert explained.root.summary

    # A Condition message works as well as a dict; only the fields given change.
    message = json_format.ParseDict(viewed(path, times=2), condition_pb2.Condition())
    updated = client.run("update_audience", aid, message)
    assert updated.condition == viewed(path, times=2) and updated.display_name == "Viewers"
    client.run("wait_live", aid)
    assert client.run("check_membership", "user-7", [aid]) == []
    renamed = client.run("update_audience", aid, display_name="Twice")
    assert renamed.display_name == "Twice" and renamed.condition == viewed(path, times=2)

    client.run("delete_audience", aid)
    with pytest.raises(NotFoundError) as err:
        client.run("get_audience", aid)
    assert err.value.reason == "AUDIENCE_NOT_FOUND"


def test_invalid_conditions_are_invalid_argument_locally_and_from_the_server(client: Harness) -> None:
    with pytest.raises(InvalidArgumentError) as err:  # does not parse: refused before any call
        client.run("create_audience", "bad-local", {"and": {"nope": 1}})
    assert err.value.reason == "INVALID_AUDIENCE" and err.value.field_violations[0][0] == "audience.condition"
    with pytest.raises(InvalidArgumentError) as err:  # parses, but names no such event model
        client.run("create_audience", "bad-remote", {"event": {"event_model": "no_such_model", "scope": "SCOPE_EVER",
                                                               "comparison": "COMPARISON_GE", "threshold": 1}})
    assert err.value.reason == "INVALID_AUDIENCE" and err.value.field_violations


def test_watch_memberships_yields_typed_changes_and_a_snapshot_end(client: Harness, server) -> None:
    aid = f"w-{uuid.uuid4().hex[:12]}"
    path = f"/{aid}"
    client.run("create_audience", aid, viewed(path))
    send_page_views(server.address, "user-11", path)

    ready = threading.Event()
    result: list = []
    watcher = threading.Thread(target=lambda: result.extend(
        client.watch(2, ready, audience_ids=[aid], start="snapshot")))
    watcher.start()
    assert ready.wait(10)
    watcher.join(10)
    snapshot, end = result
    assert isinstance(snapshot, MembershipChange) and snapshot.sequence == 0
    assert (snapshot.audience_id, snapshot.person_key, snapshot.direction) == (aid, "user-11", "enter")
    assert isinstance(end, SnapshotEnd) and end.sequence > 0

    ready = threading.Event()
    result = []
    watcher = threading.Thread(target=lambda: result.extend(
        client.watch(1, ready, audience_ids=[aid], start="sequence", after_sequence=end.sequence)))
    watcher.start()
    assert ready.wait(10)
    send_page_views(server.address, "user-12", path)
    watcher.join(10)
    [change] = result
    assert (change.person_key, change.direction, change.cause) == ("user-12", "enter", "event")
    assert change.sequence > end.sequence and change.message_id and change.effective_time is not None
    client.run("delete_audience", aid)


def test_server_info_has_every_field(client: Harness) -> None:
    info = client.run("server_info")
    assert info["people"] == PEOPLE and info["events_logged"] >= info["events_unmatched"] >= 0
    assert {"events_logged", "events_unmatched", "max_message_bytes", "worker_pid"} <= set(info)
    assert info["max_message_bytes"] == 4 << 20  # the server's [limits] default, what the emitter caps batches by


def test_connections_spread_calls_over_the_workers(server_factory) -> None:
    # SO_REUSEPORT hands each TCP connection to one serving process: one
    # shared connection means one worker, however many there are.
    server = server_factory("--workers", "2", "--demo-people", str(PEOPLE))
    with Client(server.address, timeout=5) as one:
        assert len({one.server_info()["worker_pid"] for _ in range(16)}) == 1
    # 16 connections all hashed to one of 2 workers: about 1 in 30,000.
    with Client(server.address, timeout=5, connections=16) as many:
        pids = {many.server_info()["worker_pid"] for _ in range(32)}
        assert many.get("user-1").key == "user-1"
    assert len(pids) == 2

    async def aio() -> set[int]:
        async with AsyncClient(server.address, timeout=5, connections=16) as client:
            return {(await client.server_info())["worker_pid"] for _ in range(32)}

    assert asyncio.run(aio()) == pids
